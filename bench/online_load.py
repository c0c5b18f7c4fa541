#!/usr/bin/env python3
"""Open-loop online latency against a running `softprompt serve` (bench/online.sh drives it).

    python bench/online_load.py run --port 18095 18096 --policy mixed one-task --tasks 1000 \
        --out mixed.json one-task.json
    python bench/online_load.py report --png bench/online.png mixed.json one-task.json

`run` measures one or more running servers (one --port, --policy label and --out each). With
several, their sweeps take turns: one step (or unloaded measurement) at a time, each server's
next step right after the other's, so the servers are compared minute by minute on a host
whose speed drifts (1.5-1.7x within minutes on the 2-CPU VMs of BENCHMARKS.md), not one
ladder of ~7 minutes after the other. Each server runs its own ladder:
  1. unloaded latency: UNLOADED single-input requests one after another (one in flight);
  2. steps of offered load: for DURATION seconds, single-input classify requests arrive as a
     Poisson process of the step's rate; each goes to a task drawn Zipf(ZIPF) over the task ids
     t0000.. (seeded random ranking, as bench/scale_load.py) with a sentence drawn from
     data/sentiment/test.jsonl. Open loop: a request is sent at its scheduled time whatever
     the earlier ones are doing (asyncio, one connection per request in flight, reused when
     idle), and its latency runs from the scheduled time, so a client that falls behind
     counts against the server, never for it. The loads climb geometrically (or follow
     --rates) until p99 exceeds --limit-ms, --past more steps are run for the plot, then
     --refine bisection steps between the last good and the first bad load, the unloaded
     latency once more (the host's speed drifts over a long ladder), and one step at half the
     knee;
  3. one JSON line per step on stdout, with what the batcher did meanwhile (from /metrics:
     batches, rows and distinct tasks per batch, padded positions per batch, the inference
     thread's busy share, the mean queue wait); everything in --out.

p50/p99 count every request of the step: a failed one (not 200: 429 busy, 503 timeout, a
client timeout or a broken connection) counts as infinitely slow, so a p99 within the limit
means at least 99% of the requests were answered 200 within it; when the quantile falls on
a failure it is reported as null. The knee is the highest load whose p99 is within the limit
and below which no measured load failed it. A single 20-s step can fail on a transient (a
hiccup of the shared host) while a higher one passes; `report` then also prints the highest
load that passed at all, and the ratio of those, so that a reader sees both. Goodput is 200s per second over the step's span
(first arrival to last answer, at least DURATION).

`report` reads the `run` results, prints the knees, mixed / one-task, and p99 at half the knee
against 3x the unloaded p50, writes --summary, and plots p50 and p99 against offered load
(matplotlib; bench/requirements-online.txt).

The client is plain asyncio on raw HTTP/1.1 (no aiohttp in the venv, and less CPU per request
than a full client: it shares the machine with the server). Its send lag (actual send minus
scheduled time) and CPU are recorded per step to show when it is not keeping up.
"""
import argparse
import asyncio
import http.client
import json
import math
import os
import platform
import resource
import sys
import time

import numpy as np


# ---------------------------------------------------------------- HTTP client


class Pool:
    """Keep-alive HTTP/1.1 connections to one server; a request takes an idle one or opens one."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.idle = []

    async def post(self, path, body):
        """POSTs `body` (JSON bytes); returns the status. A reused connection the server has
        closed meanwhile is retried once on a fresh one."""
        reused = bool(self.idle)
        try:
            return await self._post(path, body)
        except (ConnectionError, asyncio.IncompleteReadError, EOFError):
            if not reused:
                raise
            return await self._post(path, body, fresh=True)

    async def _post(self, path, body, fresh=False):
        if self.idle and not fresh:
            r, w = self.idle.pop()
        else:
            r, w = await asyncio.open_connection(self.host, self.port)
        try:
            w.write(
                b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s"
                % (path.encode(), self.host.encode(), len(body), body)
            )
            await w.drain()
            line = await r.readline()
            if not line:
                raise EOFError("connection closed before the status line")
            status = int(line.split()[1])
            length, chunked, close = None, False, False
            while True:
                line = await r.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                k, _, v = line.decode("latin-1").partition(":")
                k, v = k.strip().lower(), v.strip().lower()
                if k == "content-length":
                    length = int(v)
                elif k == "transfer-encoding" and "chunked" in v:
                    chunked = True
                elif k == "connection" and v == "close":
                    close = True
            if chunked:
                while True:
                    size = int((await r.readline()).split(b";")[0], 16)
                    await r.readexactly(size + 2)
                    if size == 0:
                        break
            elif length is not None:
                await r.readexactly(length)
            else:
                await r.read()
                close = True
        except BaseException:
            # Timeouts (cancellation) included: a half-read connection is never reused.
            w.close()
            raise
        if close:
            w.close()
        else:
            self.idle.append((r, w))
        return status

    def close(self):
        for _, w in self.idle:
            w.close()
        self.idle.clear()


# ---------------------------------------------------------------- workload


class Workload:
    """Seeded task and sentence draws."""

    def __init__(self, tasks, zipf, seed, sentences_path, width):
        rng = np.random.default_rng(seed)
        ranks = np.arange(1, tasks + 1, dtype=np.float64)
        p = ranks**-zipf
        self.p = p / p.sum()
        self.order = rng.permutation(tasks)  # rank -> task
        self.tasks, self.width = tasks, width
        with open(sentences_path) as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        self.bodies = [json.dumps({"inputs": t}).encode() for t in texts]

    def draw(self, n, seed):
        """n (path, body) pairs."""
        rng = np.random.default_rng(seed)
        tasks = self.order[rng.choice(self.tasks, size=n, p=self.p)]
        texts = rng.integers(0, len(self.bodies), size=n)
        return [
            (f"/v1/tasks/t{t:0{self.width}d}/classify", self.bodies[s])
            for t, s in zip(tasks.tolist(), texts.tolist())
        ]


def quantile(sorted_values, q):
    """Nearest-rank quantile; None when it falls on a failure (inf) or there is nothing."""
    if not sorted_values:
        return None
    v = sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]
    return None if math.isinf(v) else round(v * 1000, 2)


def describe(results, limit_s):
    """Latency summary of (ok, seconds) pairs; failures count as infinitely slow."""
    all_lat = sorted(s if ok else math.inf for ok, s in results)
    ok_lat = sorted(s for ok, s in results if ok)
    return {
        "p50_ms": quantile(all_lat, 0.50),
        "p99_ms": quantile(all_lat, 0.99),
        "ok_p50_ms": quantile(ok_lat, 0.50),
        "ok_p99_ms": quantile(ok_lat, 0.99),
        "ok_mean_ms": round(sum(ok_lat) / len(ok_lat) * 1000, 2) if ok_lat else None,
        "within_limit": round(sum(1 for s in ok_lat if s <= limit_s) / max(len(all_lat), 1), 4),
    }


# ---------------------------------------------------------------- measurements


async def unloaded(pool, work, n, seed, timeout, limit_s):
    """n requests one after another: the latency of a request that never waits for others."""
    results, errors = [], {}
    for path, body in work.draw(n, seed):
        t = time.perf_counter()
        try:
            status = await asyncio.wait_for(pool.post(path, body), timeout)
        except Exception as e:  # noqa: BLE001 - counted, not fatal
            status = type(e).__name__
        ok = status == 200
        if not ok:
            errors[str(status)] = errors.get(str(status), 0) + 1
        results.append((ok, time.perf_counter() - t))
    out = {"requests": n, "errors": sum(errors.values()), "error_kinds": errors}
    out.update(describe(results, limit_s))
    return out


async def step(pool, work, rate, duration, seed, timeout, limit_s):
    """One step of open-loop Poisson arrivals at `rate` per second for `duration` seconds."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * duration * 1.5) + 100)
    times = np.cumsum(gaps)
    times = times[times < duration].tolist()
    reqs = work.draw(len(times), seed + 1)
    loop = asyncio.get_running_loop()
    results = [None] * len(times)
    done_at = [0.0]
    errors = {}

    async def one(i, scheduled):
        path, body = reqs[i]
        try:
            status = await asyncio.wait_for(pool.post(path, body), timeout)
        except Exception as e:  # noqa: BLE001 - counted, not fatal
            status = type(e).__name__
        now = loop.time()
        done_at[0] = max(done_at[0], now)
        ok = status == 200
        if not ok:
            errors[str(status)] = errors.get(str(status), 0) + 1
        results[i] = (ok, now - scheduled)

    cpu0 = time.process_time()
    start = loop.time() + 0.05
    lags, running = [], []
    for i, t in enumerate(times):
        scheduled = start + t
        wait = scheduled - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        lags.append(loop.time() - scheduled)
        running.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*running)
    span = max(duration, done_at[0] - start)
    ok = sum(1 for r in results if r[0])
    lags.sort()
    out = {
        "offered_rps": round(rate, 2),
        "arrived_rps": round(len(times) / duration, 2),
        "requests": len(times),
        "goodput_rps": round(ok / span, 2),
        "errors": len(times) - ok,
        "error_kinds": errors,
    }
    out.update(describe(results, limit_s))
    out["send_lag_p99_ms"] = round(lags[max(0, math.ceil(0.99 * len(lags)) - 1)] * 1000, 2) if lags else None
    out["span_s"] = round(span, 2)
    out["client_cpu"] = round((time.process_time() - cpu0) / span, 3)
    return out


BATCH_METRICS = ("softprompt_batch_rows", "softprompt_batch_tasks", "softprompt_batch_tokens",
                 "softprompt_batch_seconds", "softprompt_queue_seconds")


def scrape(port):
    """The batcher's histogram sums and counts from /metrics (nothing in flight when called)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    finally:
        c.close()
    out = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name.endswith(("_sum", "_count")) and name.rsplit("_", 1)[0] in BATCH_METRICS:
            out[name] = float(value)
    return out


def batching(before, after, span):
    """What the batcher did during a step: batches, rows and distinct tasks per batch, padded
    positions per batch, the inference thread's busy share, the mean queue wait."""
    d = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
    n = d("softprompt_batch_rows_count")
    if n <= 0:
        return {"batches": 0}
    waits = d("softprompt_queue_seconds_count")
    return {
        "batches": int(n),
        "rows_per_batch": round(d("softprompt_batch_rows_sum") / n, 2),
        "tasks_per_batch": round(d("softprompt_batch_tasks_sum") / n, 2),
        "tokens_per_batch": round(d("softprompt_batch_tokens_sum") / n, 1),
        "engine_busy": round(d("softprompt_batch_seconds_sum") / span, 3),
        "queue_mean_ms": round(d("softprompt_queue_seconds_sum") / waits * 1000, 2) if waits else None,
    }


def good(s, limit_ms):
    return s["p99_ms"] is not None and s["p99_ms"] <= limit_ms


async def sweep(args, port, policy, turn):
    """One server's ladder; every measurement holds `turn` (shared by the servers measured)."""
    width = max(4, len(str(args.tasks - 1)))
    work = Workload(args.tasks, args.zipf, args.seed, args.sentences, width)
    pool = Pool("127.0.0.1", port)
    limit_s = args.limit_ms / 1000
    seed = args.seed * 1000

    async with turn:
        # Warm-up, not recorded: connections, caches, the allocator.
        await unloaded(pool, work, args.warmup, seed, args.timeout, limit_s)
        base = await unloaded(pool, work, args.unloaded, seed + 1, args.timeout, limit_s)
    print(json.dumps({"policy": policy, "unloaded": base}), flush=True)

    steps = []

    async def measure(rate, role):
        nonlocal seed
        seed += 10
        # asyncio.Lock wakes its waiters in order, so with two servers the steps alternate.
        async with turn:
            await asyncio.sleep(args.pause)
            before = scrape(port)
            s = await step(pool, work, rate, args.duration, seed, args.timeout, limit_s)
            s["batching"] = batching(before, scrape(port), s["span_s"])
        s["role"] = role
        s["good"] = good(s, args.limit_ms)
        steps.append(s)
        print(json.dumps({"policy": policy, **s}), flush=True)
        return s

    rates = args.rates or [args.rate0 * args.factor**k for k in range(args.max_steps)]
    last_good, first_bad, past = None, None, 0
    for rate in rates:
        s = await measure(rate, "ladder")
        if first_bad is None:
            if s["good"]:
                last_good = rate
            else:
                first_bad = rate
        else:
            past += 1
        if first_bad is not None and past >= args.past:
            break
    if last_good is not None and first_bad is not None:
        lo, hi = last_good, first_bad
        for _ in range(args.refine):
            mid = math.sqrt(lo * hi)
            if (await measure(mid, "refine"))["good"]:
                lo = mid
            else:
                hi = mid
        last_good = lo
    knee = last_good
    # The unloaded latency again, just before the half-knee step: a shared host's speed drifts
    # over a ladder of many minutes (1.6x within ten minutes on the 2-CPU Xeon VM of
    # 2026-12-07), so the ratio that isolates queueing compares two measurements of one minute.
    again = None
    if knee:
        async with turn:
            await asyncio.sleep(args.pause)
            again = await unloaded(pool, work, args.unloaded, seed + 2, args.timeout, limit_s)
        print(json.dumps({"policy": policy, "unloaded_before_half_knee": again}), flush=True)
    half = await measure(knee / 2, "half_knee") if knee else None
    pool.close()
    return {
        "policy": policy,
        "tasks": args.tasks,
        "zipf": args.zipf,
        "seed": args.seed,
        "duration_s": args.duration,
        "limit_ms": args.limit_ms,
        "unloaded": base,
        "steps": steps,
        "knee_rps": round(knee, 2) if knee else None,
        "first_bad_rps": round(first_bad, 2) if first_bad else None,
        "half_knee": half,
        "unloaded_before_half_knee": again,
        "server": {k: v.replace("{policy}", policy) if isinstance(v, str) else v
                   for k, v in args.server_info.items()},
        "interleaved_with": [p for p in args.policy if p != policy],
        "machine": machine(),
        "started_utc": args.started,
    }


async def sweeps(args):
    turn = asyncio.Lock()
    return await asyncio.gather(*(sweep(args, port, policy, turn)
                                  for port, policy in zip(args.port, args.policy)))


def machine():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def run(args):
    # Open loop: at saturation thousands of requests may be in flight, one socket each.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    if not len(args.port) == len(args.policy) == len(args.out):
        sys.exit("error: give as many --port, --policy and --out values as servers")
    if len(set(args.policy)) != len(args.policy):
        sys.exit("error: --policy labels must differ")
    args.started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for out, path in zip(asyncio.run(sweeps(args)), args.out):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        print(json.dumps({"policy": out["policy"], "knee_rps": out["knee_rps"],
                          "unloaded_p50_ms": out["unloaded"]["p50_ms"]}), flush=True)


# ---------------------------------------------------------------- report


def report(args):
    runs = []
    for p in args.results:
        with open(p) as f:
            runs.append(json.load(f))
    by = {r["policy"]: r for r in runs}
    summary = {"policies": {}}
    for r in runs:
        base = r["unloaded"]["p50_ms"]
        half = r["half_knee"]
        # Without a load over the limit the knee is only the highest load tried.
        lower_bound = r["knee_rps"] is not None and r["first_bad_rps"] is None
        entry = {
            "knee_rps": r["knee_rps"],
            "knee_is_lower_bound": lower_bound,
            "unloaded_p50_ms": base,
            "unloaded_p99_ms": r["unloaded"]["p99_ms"],
            "half_knee_rps": half and half["offered_rps"],
            "half_knee_p99_ms": half and half["p99_ms"],
        }
        if half and base:
            p99 = half["p99_ms"]
            entry["half_knee_p99_over_unloaded_p50"] = p99 and round(p99 / base, 2)
            entry["half_knee_ok"] = p99 is not None and p99 <= 3 * base
        # Runs before 2026-12-07 have no second unloaded measurement.
        near = (r.get("unloaded_before_half_knee") or {}).get("p50_ms")
        if half and near:
            p99 = half["p99_ms"]
            entry["unloaded_p50_before_half_knee_ms"] = near
            entry["half_knee_p99_over_adjacent_unloaded_p50"] = p99 and round(p99 / near, 2)
            entry["half_knee_ok_adjacent"] = p99 is not None and p99 <= 3 * near
        # The highest load within the limit at all: above the knee when a
        # step failed on a transient and a later, higher one passed.
        passed = [s["offered_rps"] for s in r["steps"]
                  if s.get("role") != "half_knee" and s["p99_ms"] is not None
                  and s["p99_ms"] <= r["limit_ms"]]
        entry["highest_within_limit_rps"] = max(passed) if passed else None
        summary["policies"][r["policy"]] = entry
        print(
            f"{r['policy']}: knee {'>= ' if lower_bound else ''}{r['knee_rps']} req/s (p99 <= {r['limit_ms']} ms"
            f"{'; no load over the limit was tried' if lower_bound else ''}); unloaded p50 {base} ms, "
            f"p99 {r['unloaded']['p99_ms']} ms; at half the knee ({entry['half_knee_rps']} req/s) p99 "
            f"{entry['half_knee_p99_ms']} ms vs 3 x unloaded p50 = {base and round(3 * base, 2)} ms: "
            f"{'ok' if entry.get('half_knee_ok') else 'NOT met'} (target <= 3x)"
        )
        if r["knee_rps"] and passed and max(passed) > r["knee_rps"]:
            print(f"{r['policy']}: a higher load passed after a failed step: "
                  f"{max(passed)} req/s within the limit")
        if "unloaded_p50_before_half_knee_ms" in entry:
            near = entry["unloaded_p50_before_half_knee_ms"]
            print(
                f"{r['policy']}: unloaded p50 just before the half-knee step {near} ms (host drift: "
                f"{near / base:.2f}x the first); half-knee p99 = "
                f"{entry['half_knee_p99_over_adjacent_unloaded_p50']}x it: "
                f"{'ok' if entry['half_knee_ok_adjacent'] else 'NOT met'} (target <= 3x)"
            )
    m, o = by.get("mixed"), by.get("one-task")
    if m and o and m["knee_rps"] and o["knee_rps"]:
        ratio = m["knee_rps"] / o["knee_rps"]
        summary["knee_ratio_mixed_over_one_task"] = round(ratio, 3)
        summary["knee_ratio_ok"] = ratio >= 1.5
        caveat = ""
        if summary["policies"]["mixed"]["knee_is_lower_bound"] or summary["policies"]["one-task"]["knee_is_lower_bound"]:
            caveat = "; a knee is only a lower bound, so the ratio is too uncertain to judge"
        print(f"knee mixed / one-task: {ratio:.2f} ({'ok' if ratio >= 1.5 else 'NOT met'}; target >= 1.5{caveat})")
        hm = summary["policies"]["mixed"]["highest_within_limit_rps"]
        ho = summary["policies"]["one-task"]["highest_within_limit_rps"]
        if (hm, ho) != (m["knee_rps"], o["knee_rps"]) and hm and ho:
            summary["highest_within_limit_ratio"] = round(hm / ho, 3)
            print(f"highest load within the limit, mixed / one-task: {hm} / {ho} = {hm / ho:.2f} "
                  f"(a step below it failed on one side: read both ratios)")
    elif m and o:
        print("knee mixed / one-task: undefined (a policy has no load within the limit)")
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=1)
    if args.png:
        plot(runs, args.png)
        print(f"plot: {args.png}")


def plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colours = {"mixed": "tab:blue", "one-task": "tab:orange"}
    top = 1.0
    for r in runs:
        for s in r["steps"]:
            for k in ("p50_ms", "p99_ms", "ok_p99_ms"):
                if s[k]:
                    top = max(top, s[k])
    clip = top * 1.5  # where a p99 that fell on a failed request is drawn
    for r in runs:
        c = colours.get(r["policy"], None)
        # The ladder and its refinement make the curve; the half-knee step (a load that may
        # repeat one of the ladder's) is drawn apart.
        steps = sorted((s for s in r["steps"] if s["role"] != "half_knee"), key=lambda s: s["offered_rps"])
        halves = [s for s in r["steps"] if s["role"] == "half_knee"]
        x = [s["offered_rps"] for s in steps]
        for key, style, label in (("p99_ms", "-", "p99"), ("p50_ms", "--", "p50")):
            y = [s[key] if s[key] is not None else clip for s in steps]
            ax.plot(x, y, style, marker="o", ms=3, color=c, label=f"{r['policy']} {label}")
            failed = [(xi, clip) for xi, s in zip(x, steps) if s[key] is None]
            if failed:
                ax.plot(*zip(*failed), "x", color=c, ms=7)
        for h in halves:
            if h["p99_ms"] is not None:
                ax.plot([h["offered_rps"]], [h["p99_ms"]], "s", mfc="none", color=c, ms=7)
        ax.axhline(r["unloaded"]["p50_ms"], color=c, lw=0.6, ls=":")
        if r["knee_rps"]:
            ax.axvline(r["knee_rps"], color=c, lw=0.8, ls="-.")
            ax.annotate(f" knee {r['knee_rps']:.0f} req/s", (r["knee_rps"], 0.02),
                        xycoords=("data", "axes fraction"), color=c, rotation=90, va="bottom", fontsize=8)
    limit = runs[0]["limit_ms"]
    ax.axhline(limit, color="grey", lw=0.8)
    ax.text(ax.get_xlim()[0], limit * 1.05, f"p99 limit {limit} ms", color="grey", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s, Poisson, 1 input each)")
    ax.set_ylabel("latency from scheduled send (ms)")
    r0 = runs[0]
    ax.set_title(
        f"softprompt serve, {r0['tasks']} tasks Zipf({r0['zipf']}), {r0['machine']['cores']} cores, "
        f"{r0['duration_s']:g} s/step\n(x: quantile fell on a failed request; square: p99 at half the knee; "
        f"dotted: unloaded p50)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure running servers, their steps taking turns")
    r.add_argument("--port", type=int, nargs="+", required=True, help="one per server")
    r.add_argument("--tasks", type=int, required=True, help="ids t0000 .. t{tasks-1}")
    r.add_argument("--policy", nargs="+", required=True, help="label of each server's --batch-policy")
    r.add_argument("--out", nargs="+", required=True, help="results JSON, one per server")
    r.add_argument("--sentences", default="data/sentiment/test.jsonl")
    r.add_argument("--zipf", type=float, default=1.1)
    r.add_argument("--seed", type=int, default=7)
    r.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per step")
    r.add_argument("--rates", type=float, nargs="*", help="explicit offered loads (req/s), else a geometric ladder")
    r.add_argument("--rate0", type=float, default=10.0)
    r.add_argument("--factor", type=float, default=1.25)
    r.add_argument("--max-steps", type=int, default=30)
    r.add_argument("--past", type=int, default=1, help="steps run after the first over the limit")
    r.add_argument("--refine", type=int, default=2, help="bisection steps between the last good and first bad load")
    r.add_argument("--limit-ms", type=float, default=250.0)
    r.add_argument("--unloaded", type=int, default=200)
    r.add_argument("--warmup", type=int, default=50)
    r.add_argument("--timeout", type=float, default=60.0, help="client timeout per request (s)")
    r.add_argument("--pause", type=float, default=1.0, help="idle seconds before each step")
    r.add_argument("--server-info", type=json.loads, default={},
                   help="JSON recorded with the results ({policy} in a string: each server's label)")
    p = sub.add_parser("report", help="knees, targets and the plot from run results")
    p.add_argument("results", nargs="+")
    p.add_argument("--png")
    p.add_argument("--summary")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    sys.exit(main())
