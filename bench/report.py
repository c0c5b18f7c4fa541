#!/usr/bin/env python3
"""Combines the rounds of the many-task workload benchmark into one table.

Reads DIR/rust_round*.json (paths a, b and the matmul rate for d, from
examples/workload.rs) and DIR/peft_round*.json (path c, from
bench/peft_workload.py), prints a Markdown table of medians, the ratios
(medians of per-round ratios) against their targets, and the correctness
check: max |logit difference| between (a) and (c) (and (a) and (b)) over every
request of every round. Writes DIR/summary.json. Standard library only.

    python3 bench/report.py bench/out [--cpu "AMD EPYC"] [--load "..."]
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

TOL = 1e-4  # (a) vs (c): the same work, f32 on both sides


def max_abs_diff(x, y):
    assert len(x) == len(y), (len(x), len(y))
    worst = 0.0
    for a, b in zip(x, y):
        assert len(a) == len(b), (a, b)
        worst = max(worst, max(abs(p - q) for p, q in zip(a, b)))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--cpu", default="", help="CPU model name (lscpu)")
    ap.add_argument("--load", default="", help="load averages during the run (uptime)")
    args = ap.parse_args()

    rust = {json.loads(p.read_text())["round"]: json.loads(p.read_text()) for p in args.dir.glob("rust_round*.json")}
    torch = {json.loads(p.read_text())["round"]: json.loads(p.read_text()) for p in args.dir.glob("peft_round*.json")}
    rounds = sorted(set(rust) & set(torch))
    if not rounds:
        print(f"no complete round in {args.dir}", file=sys.stderr)
        return 1
    workload = json.loads((args.dir / "workload.json").read_text())
    first = rust[rounds[0]]
    tokens = first["text_tokens"]
    for r in rounds:
        assert rust[r]["text_tokens"] == torch[r]["text_tokens"] == tokens, "rounds of different workloads"

    per_round = []
    for r in rounds:
        a, c = rust[r], torch[r]
        roofline_secs = a["flops"] / (a["matmul_gflops"] * 1e9)
        per_round.append(
            {
                "a": tokens / a["secs_a"],
                "b": tokens / a["secs_b"],
                "c": tokens / c["secs_c"],
                "d": tokens / roofline_secs,
                "matmul_gflops": a["matmul_gflops"],
            }
        )
    med = {k: statistics.median(p[k] for p in per_round) for k in per_round[0]}
    ratio = {
        "a/c": statistics.median(p["a"] / p["c"] for p in per_round),
        "a/b": statistics.median(p["a"] / p["b"] for p in per_round),
        "a/d": statistics.median(p["a"] / p["d"] for p in per_round),
    }
    diff_ac = max(max_abs_diff(rust[r]["logits_a"], torch[r]["logits_c"]) for r in rounds)
    diff_ab = max(max_abs_diff(rust[r]["logits_a"], rust[r]["logits_b"]) for r in rounds)
    gflop = first["flops"] / 1e9

    tasks = workload["tasks"]
    shallow = sum(t["peft_type"] == "PROMPT_TUNING" for t in tasks)
    lens = [t["num_virtual_tokens"] for t in tasks]
    print(
        f"workload: {workload['requests']} requests, {tokens:,} text tokens ([CLS]/[SEP] included; no virtual "
        f"tokens, no padding), {len(tasks)} tasks ({shallow} PROMPT_TUNING, {len(tasks) - shallow} PREFIX_TUNING, "
        f"{min(lens)}-{max(lens)} virtual tokens), windows of {workload['window']}; {gflop:.1f} GFLOP useful work"
    )
    print(
        f"threads: engine {first['threads']}, torch {torch[rounds[0]]['threads']} (attention: "
        f"{torch[rounds[0]]['attn']}); rounds: {len(rounds)} (medians); CPU: {args.cpu or '?'}"
    )
    if args.load:
        print(f"load average: {args.load}")
    print()
    print("| path | text tokens/s | batches | s / pass |")
    print("| --- | ---: | ---: | ---: |")
    rows = [
        ("(a) engine, one mixed-task batch per window", "a", first["batches_a"]),
        ("(b) engine, one batch per task per window", "b", first["batches_b"]),
        ("(c) HF PEFT + transformers, one batch per task per window", "c", torch[rounds[0]]["batches_c"]),
        (f"(d) roofline: useful FLOPs at the matmul rate ({med['matmul_gflops']:.1f} GFLOP/s)", "d", None),
    ]
    for name, k, batches in rows:
        print(f"| {name} | {med[k]:,.0f} | {'' if batches is None else batches} | {tokens / med[k]:.2f} |")
    print()
    targets = {"a/c": 1.5, "a/b": 2.0, "a/d": 0.6}
    for k, want in targets.items():
        verdict = "met" if ratio[k] >= want else "NOT met"
        print(f"{k}: {ratio[k]:.2f} (target >= {want}; {verdict})")
    ok = diff_ac <= TOL
    print(f"correctness: max |logit (a) - (c)| = {diff_ac:.2e} over {len(rounds)} x {workload['requests']} requests "
          f"({'within' if ok else 'ABOVE'} {TOL:g}); max |(a) - (b)| = {diff_ab:.2e}")

    summary = {
        "rounds": rounds,
        "text_tokens": tokens,
        "median_tokens_per_s": med,
        "ratios": ratio,
        "per_round": per_round,
        "max_abs_diff_a_c": diff_ac,
        "max_abs_diff_a_b": diff_ab,
        "cpu": args.cpu,
        "load": args.load,
    }
    (args.dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
