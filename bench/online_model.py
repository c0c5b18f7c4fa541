#!/usr/bin/env python3
"""What an ideal server with the measured batch costs would do on bench/online.sh's ladder.

    .venv/bin/python bench/online_model.py bench/out/online              # a run's mixed.json, one-task.json
    .venv/bin/python bench/online_model.py bench/out/online --sweep      # and other fixed-cost shares

Why: issue 15's point 6 asks for a knee ratio mixed / one-task >= 1.5 and a p99 at half the
knee <= 3x the unloaded latency. Whether a run misses them through the server (scheduling,
contention) or through the arithmetic of queueing with its own forward costs decides what to
work on. This replays the benchmark's traffic (Poisson arrivals, tasks Zipf(1.1) over the run's
task count) through an ideal single inference thread:
- a batch of n rows costs A + B*n ms, fitted by least squares to every step of the run
  (batch time = engine busy share x span / batches, against rows per batch, both policies);
  or, with --curve, the cost a batch of each size had in `cargo bench --bench engine`'s
  "short rows in mixed batches of n rows" (ms per batch at n = 1, 2, 4 ... 64; straight lines
  between the sizes given). The line overstates small batches: measured costs fall steeply from
  1 to 4 rows and are flat after, and a one-task server lives on 1-2 row batches near its knee;
- mixed takes every waiting request (up to --cap rows), one-task only the oldest one's task;
  the oldest waits up to --wait ms for company unless --cap rows wait (the server's
  --max-batch-size and --batch-wait-ms, read from the run's flags; defaults 64, and 0 for runs
  since 2026-12-08, 2 before);
- each request also pays a fixed cost outside the engine (HTTP, tokenizing) of the unloaded
  p50 minus one one-row batch and the batch wait.
It prints the model's knees (highest load with p99 <= the run's limit, searched on a grid of
--step req/s) and p99 at half the knee beside the run's. --sweep keeps A + B (a one-row
forward) and moves the share of it that is fixed per batch, which is what batching saves.
Pure Python + numpy (the reference venv); a few seconds per policy.
"""
import argparse
import collections
import json
import os

import numpy as np


def fit(runs):
    """A, B (ms) of batch time = A + B * rows, over every step with batches."""
    xs, ys = [], []
    for r in runs:
        for s in r["steps"]:
            b = s.get("batching") or {}
            if b.get("batches"):
                xs.append(b["rows_per_batch"])
                ys.append(1000 * b["engine_busy"] * s["span_s"] / b["batches"])
    B, A = np.polyfit(xs, ys, 1)
    return float(A), float(B)


def parse_curve(text):
    """`n:ms,n:ms,...` (ms per batch of n rows) as a cost function of n, straight lines between
    the sizes given, on from the last two past the largest."""
    pts = sorted((int(n), float(ms)) for n, ms in (p.split(":") for p in text.split(",")))
    if len(pts) < 2 or pts[0][0] != 1:
        raise SystemExit("error: --curve needs n:ms pairs from n=1 and at least two sizes")
    ns, ms = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts])
    slope = (ms[-1] - ms[-2]) / (ns[-1] - ns[-2])

    def cost(rows):
        if rows <= ns[-1]:
            return float(np.interp(rows, ns, ms))
        return float(ms[-1] + slope * (rows - ns[-1]))

    return cost


def p99(rate, policy, cost, over, tasks, zipf, cap, wait, n, seed):
    rng = np.random.default_rng(seed)
    weights = np.arange(1, tasks + 1) ** -zipf
    t = np.cumsum(rng.exponential(1000 / rate, n))
    task = rng.choice(tasks, n, p=weights / weights.sum())
    lat = np.empty(n)
    waiting, free, i, done = collections.deque(), 0.0, 0, 0
    while done < n:
        if not waiting:
            free = max(free, t[i])
        while i < n and t[i] <= free:
            waiting.append(i)
            i += 1
        # The server's --batch-wait-ms: the oldest row waits that long for
        # company unless the queue already holds a full batch.
        if wait > 0 and len(waiting) < cap and t[waiting[0]] + wait > free:
            full = i + cap - len(waiting) - 1
            free = min(t[waiting[0]] + wait, t[full] if full < n else np.inf)
            while i < n and t[i] <= free:
                waiting.append(i)
                i += 1
        if policy == "mixed":
            batch = [waiting.popleft() for _ in range(min(cap, len(waiting)))]
        else:
            k = task[waiting[0]]
            batch = [j for j in waiting if task[j] == k][:cap]
            taken = set(batch)
            waiting = collections.deque(j for j in waiting if j not in taken)
        free += cost(len(batch))
        lat[batch] = free - t[batch] + over
        done += len(batch)
    return float(np.percentile(lat, 99))


def knee(policy, cost, over, args, limit):
    last = None
    rate = args.step
    while rate <= args.max_rate:
        if p99(rate, policy, cost, over, args.tasks, args.zipf, args.cap, args.wait, args.requests, args.seed) > limit:
            break
        last = rate
        rate += args.step
    return last


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", help="a bench/online.sh OUT directory (mixed.json, one-task.json)")
    ap.add_argument("--sweep", action="store_true", help="also other shares of fixed cost per batch")
    ap.add_argument("--cap", type=int, help="most rows per batch (default: the run's --max-batch-size, else 64)")
    ap.add_argument("--wait", type=float,
                    help="ms the oldest row waits for company (default: the run's --batch-wait-ms, else the server default of the run's date; "
                         "another value models that server with the run's other costs)")
    ap.add_argument("--curve", help="n:ms,... batch costs from the engine bench instead of the run's A + B*n fit")
    ap.add_argument("--requests", type=int, default=100000, help="simulated requests per load")
    ap.add_argument("--step", type=float, default=10.0, help="req/s between loads tried")
    ap.add_argument("--max-rate", type=float, default=3000.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    runs = {}
    for policy in ("mixed", "one-task"):
        path = os.path.join(args.dir, f"{policy}.json")
        if os.path.exists(path):
            with open(path) as f:
                runs[policy] = json.load(f)
    if not runs:
        raise SystemExit(f"error: no mixed.json or one-task.json under {args.dir}")
    any_run = next(iter(runs.values()))
    args.tasks, args.zipf, limit = any_run["tasks"], any_run["zipf"], any_run["limit_ms"]
    flags = (any_run.get("server") or {}).get("flags", "").split()

    def flag(name, default):
        return float(flags[flags.index(name) + 1]) if name in flags[:-1] else default

    args.cap = args.cap or int(flag("--max-batch-size", 64))
    # The server's default wait was 2 ms until 2026-12-08, 0 since.
    run_wait = flag("--batch-wait-ms", 2.0 if any_run.get("started_utc", "") < "2026-12-08" else 0.0)
    args.wait = run_wait if args.wait is None else args.wait
    a, b = fit(runs.values())
    unloaded = float(np.mean([r["unloaded"]["p50_ms"] for r in runs.values()]))
    # A lone request waits the full batch wait: not a cost outside the engine.
    over = max(0.0, unloaded - (a + b) - run_wait)
    print(f"fit over {args.dir}: a batch of n rows costs {a:.2f} + {b:.2f} n ms "
          f"(fixed share of a one-row forward {a / (a + b):.0%}); outside the engine {over:.2f} ms; "
          f"unloaded p50 {unloaded:.2f} ms; at most {args.cap} rows per batch, batch wait {args.wait:g} ms")

    def report(cost, label):
        knees = {}
        one = cost(1)
        for policy in ("mixed", "one-task"):
            k = knee(policy, cost, over, args, limit)
            knees[policy] = k
            if k is None:
                print(f"  {label} {policy}: no load within {limit} ms")
                continue
            half = p99(k / 2, policy, cost, over, args.tasks, args.zipf, args.cap, args.wait, args.requests,
                       args.seed)
            seen = ""
            r = runs.get(policy)
            if r and label == "measured costs" and r.get("knee_rps"):
                h = (r.get("half_knee") or {}).get("p99_ms")
                seen = f"; the run: knee {r['knee_rps']}, half-knee p99 {h} ms"
            print(f"  {label} {policy}: knee {k:.0f} req/s, p99 at half the knee {half:.1f} ms "
                  f"= {half / (one + args.wait + over):.2f}x unloaded{seen}")
        if knees["mixed"] and knees["one-task"]:
            print(f"  {label}: knee ratio {knees['mixed'] / knees['one-task']:.2f}")

    report(lambda rows: a + b * rows, "measured costs")
    if args.curve:
        curve = parse_curve(args.curve)
        print("the engine bench's curve: ms per row at " + ", ".join(
            f"{n} rows {curve(n) / n:.2f}" for n in (1, 2, 4, 8, 16, 64)))
        report(curve, "bench curve")
    if args.sweep:
        one = a + b
        for share in (0.1, 0.3, 0.5, 0.7):
            report(lambda rows, s=share: s * one + (1 - s) * one * rows, f"fixed share {share:.0%}")


if __name__ == "__main__":
    main()
