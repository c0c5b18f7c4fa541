#!/usr/bin/env python3
"""Closed-loop saturation load on the real server (bench/gpu.sh): the
workload's requests (requests.jsonl from `softprompt workload prepare`), each
POSTed to /v1/tasks/<task>/classify, from several client processes keeping
many requests in flight, for a fixed time; prints one JSON line with the
served text tokens/s, requests/s and errors.

    python3 bench/saturate.py --port 8080 --requests bench/out/gpu/w1000/requests.jsonl

Each request carries `--inputs` consecutive requests of the file that share a
task (the workload assigns tasks at random, so mostly 1; grouping is what a
client with several texts for one task does), so that a Python client can
offer the load a GPU serves. Text tokens are counted from the file's token ids
(the same count as the engine's (a)), for answered requests only.
"""
import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_load import Pool  # noqa: E402


def bodies(path, per_request):
    """(task, body bytes, text tokens) per request, in file order."""
    reqs = [json.loads(line) for line in open(path)]
    out, i = [], 0
    while i < len(reqs):
        group = [reqs[i]]
        while len(group) < per_request and i + len(group) < len(reqs) and reqs[i + len(group)]["task"] == group[0]["task"]:
            group.append(reqs[i + len(group)])
        i += len(group)
        body = json.dumps({"inputs": [g["text"] for g in group]}).encode()
        out.append((group[0]["task"], body, sum(len(g["ids"]) for g in group)))
    return out


async def client(port, work, offset, stride, concurrency, duration):
    pool = Pool("127.0.0.1", port)
    done = {"ok": 0, "errors": 0, "tokens": 0}
    start = time.perf_counter()
    stop = start + duration

    async def one(k):
        i = offset + k * stride
        while time.perf_counter() < stop:
            task, body, tokens = work[i % len(work)]
            i += concurrency * stride
            try:
                status = await pool.post(f"/v1/tasks/{task}/classify", body)
            except Exception:  # noqa: BLE001 — counted, the load goes on
                status = 0
            if status == 200:
                done["ok"] += 1
                done["tokens"] += tokens
            else:
                done["errors"] += 1

    await asyncio.gather(*(one(k) for k in range(concurrency)))
    done["secs"] = time.perf_counter() - start
    pool.close()
    return done


def proc(args, offset, q):
    work = bodies(args.requests, args.inputs)
    q.put(asyncio.run(client(args.port, work, offset, args.processes, args.concurrency, args.duration)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--requests", required=True, help="requests.jsonl of `softprompt workload prepare`")
    ap.add_argument("--processes", type=int, default=max(1, mp.cpu_count() // 2))
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight per process")
    ap.add_argument("--inputs", type=int, default=8, help="most inputs per request (consecutive, same task)")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the timed run")
    args = ap.parse_args()
    if args.warmup > 0:
        warm = argparse.Namespace(**{**vars(args), "duration": args.warmup})
        q = mp.Queue()
        ps = [mp.Process(target=proc, args=(warm, k, q)) for k in range(args.processes)]
        for p in ps:
            p.start()
        for _ in ps:
            q.get()
        for p in ps:
            p.join()
    q = mp.Queue()
    ps = [mp.Process(target=proc, args=(args, k, q)) for k in range(args.processes)]
    for p in ps:
        p.start()
    results = [q.get() for _ in ps]
    # Each process's own span, from its first request to its last answer.
    secs = max(r["secs"] for r in results)
    for p in ps:
        p.join()
    ok = sum(r["ok"] for r in results)
    errors = sum(r["errors"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    print(json.dumps({
        "text_tokens_per_s": tokens / secs, "requests_per_s": ok / secs, "errors": errors,
        "secs": secs, "processes": args.processes, "concurrency": args.concurrency, "inputs": args.inputs,
    }), flush=True)
    return 0 if ok > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
