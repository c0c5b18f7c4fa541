#!/usr/bin/env python3
"""Zipf traffic against a running `softprompt serve` (bench/scale.sh drives it).

Sends REQUESTS single-input classify requests over the task ids t0000000..,
popularity Zipf(S) over a seeded random ranking of the tasks, from THREADS
client threads with keep-alive connections, and prints one JSON line:
throughput, latency p50/p99, errors, and the server's cache counters
(hits, misses, loads, evictions, load-latency histogram) read from
/metrics before and after.

    python bench/scale_load.py --port 18090 --tasks 100000 --requests 5000
"""
import argparse
import http.client
import json
import threading
import time

import numpy as np


def metrics(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    out = {"load_buckets": {}}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith("softprompt_task_load_seconds_bucket"):
            le = name.split('le="')[1].split('"')[0]
            out["load_buckets"][le] = float(value)
        elif name in ("softprompt_task_cache_hits_total", "softprompt_task_cache_misses_total",
                      "softprompt_task_evictions_total", "softprompt_tasks_resident",
                      "softprompt_task_bytes_resident", "softprompt_task_load_seconds_count",
                      "softprompt_task_load_seconds_sum"):
            out[name] = float(value)
        elif name.startswith('softprompt_task_loads_total{outcome="loaded"}'):
            out["loads"] = float(value)
    return out


def quantile_from_buckets(before, after, q):
    """Upper bound of the bucket holding quantile q of the loads between two scrapes."""
    rows = []
    for le, v in after.items():
        bound = float("inf") if le == "+Inf" else float(le)
        rows.append((bound, v - before.get(le, 0.0)))
    rows.sort()
    total = rows[-1][1] if rows else 0
    if total <= 0:
        return None
    for bound, cum in rows:
        if cum >= q * total:
            return bound
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tasks", type=int, required=True, help="ids t0000000 .. t{tasks-1}")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    ranks = np.arange(1, args.tasks + 1, dtype=np.float64)
    p = ranks ** -args.zipf
    p /= p.sum()
    order = rng.permutation(args.tasks)  # rank -> task
    picks = order[rng.choice(args.tasks, size=args.requests, p=p)]
    body = json.dumps({"inputs": "a gorgeous, witty, seductive movie"}).encode()

    before = metrics(args.port)
    lat = [0.0] * args.requests
    errors = []
    next_i = [0]
    lock = threading.Lock()

    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=60)
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= args.requests:
                return
            path = f"/v1/tasks/t{picks[i]:07d}/classify"
            t = time.perf_counter()
            try:
                conn.request("POST", path, body, {"content-type": "application/json"})
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    errors.append(r.status)
            except Exception as e:  # noqa: BLE001 - counted, not fatal
                errors.append(str(e))
                conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=60)
            lat[i] = time.perf_counter() - t

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = metrics(args.port)

    d = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
    hits, misses = d("softprompt_task_cache_hits_total"), d("softprompt_task_cache_misses_total")
    s = sorted(lat)
    print(json.dumps({
        "requests": args.requests,
        "distinct_tasks": int(len(set(picks.tolist()))),
        "seconds": round(wall, 3),
        "requests_per_s": round(args.requests / wall, 1),
        "latency_p50_ms": round(s[len(s) // 2] * 1000, 2),
        "latency_p99_ms": round(s[int(len(s) * 0.99) - 1] * 1000, 2),
        "errors": len(errors),
        "error_kinds": sorted({str(e) for e in errors})[:5],
        "hit_ratio": round(hits / max(hits + misses, 1), 4),
        "loads": int(d("loads")),
        "evictions": int(d("softprompt_task_evictions_total")),
        "load_mean_ms": round(d("softprompt_task_load_seconds_sum") / max(d("softprompt_task_load_seconds_count"), 1) * 1000, 3),
        "load_p50_ms_at_most": (lambda v: v and v * 1000)(quantile_from_buckets(before["load_buckets"], after["load_buckets"], 0.5)),
        "load_p99_ms_at_most": (lambda v: v and v * 1000)(quantile_from_buckets(before["load_buckets"], after["load_buckets"], 0.99)),
        "resident_tasks": after.get("softprompt_tasks_resident"),
        "resident_bytes": after.get("softprompt_task_bytes_resident"),
    }))


if __name__ == "__main__":
    main()
