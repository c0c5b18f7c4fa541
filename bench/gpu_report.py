#!/usr/bin/env python3
"""The report of bench/gpu.sh: reads what its steps wrote under OUT and prints
the issue-12 table (parity, the 16-bit check, throughput at each task count,
the server at saturation) with each target and whether it is met; writes
OUT/summary.json. Exit status 0 whether targets are met or not (the table says),
1 when a result file is missing.

    python3 bench/gpu_report.py bench/out/gpu
"""
import json
import math
import sys
from pathlib import Path


def softmax(x):
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]


def argmax(x):
    return max(range(len(x)), key=lambda i: x[i])


def load(path):
    if not path.exists():
        print(f"missing: {path}", file=sys.stderr)
        return None
    return json.loads(path.read_text())


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/out/gpu")
    meta = load(out / "meta.json") or {}
    summary, lines, missing = {"meta": meta}, [], False

    def verdict(ok):
        return "met" if ok else "NOT met"

    # Parity of f32 on the fixtures (JSON lines of `softprompt workload parity`).
    par = out / "parity-f32.jsonl"
    if par.exists():
        cases = [json.loads(x) for x in par.read_text().splitlines() if x.startswith("{")]
        worst = max(c["max_abs_logit"] for c in cases)
        summary["parity_f32_max_abs_logit"] = worst
        lines.append(f"parity f32 vs PEFT (fixtures, {len(cases)} adapters): max |Δlogit| {worst:.2e} "
                     f"(target ≤ 1e-4: {verdict(worst <= 1e-4)})")
    else:
        missing = True

    dtype16 = meta.get("dtype16", "f16")
    counts = meta.get("task_counts", [64, 1000])
    # 16-bit check: our 16-bit (a) against PEFT f32 on the smallest workload.
    w = out / f"w{counts[0]}"
    ours, ref = load(w / f"device_{dtype16}.json"), load(w / f"torch_c_{meta.get('device', 'cuda')}_f32.json")
    if ours and ref:
        rows, within, worst = 0, 0, 0.0
        for g, r in zip(ours["logits_a"], ref["logits_c"]):
            pg, pr = softmax(g), softmax(r)
            d = max(abs(a - b) for a, b in zip(pg, pr))
            worst = max(worst, d)
            rows += 1
            within += d <= 1e-2 and argmax(g) == argmax(r)
        frac = within / rows
        summary["half"] = {"dtype": dtype16, "rows": rows, "fraction_within": frac, "worst_abs_prob": worst}
        lines.append(f"{dtype16} vs PEFT f32 ({rows} workload rows, {counts[0]} tasks): {100 * frac:.2f}% of rows with "
                     f"|Δp| ≤ 1e-2 and the same top label, worst |Δp| {worst:.2e} (target ≥ 99.5%: {verdict(frac >= 0.995)})")
    else:
        missing = True

    lines.append("")
    lines.append("| tasks | (a) mixed | (b) one task/batch | (c) PEFT | (d) plain PyTorch | a/b | a/c | a/d |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    dev = meta.get("device", "cuda")
    for n in counts:
        w = out / f"w{n}"
        a = load(w / f"device_{dtype16}.json")
        c = load(w / f"torch_c_{dev}_{dtype16}.json")
        d = load(w / f"torch_d_{dev}_{dtype16}.json")
        if not (a and c and d):
            missing = True
            continue
        ta, tb = a["tokens_per_s_a"], a["tokens_per_s_b"]
        tc, td = c["text_tokens"] / c["secs_c"], d["text_tokens"] / d["secs_d"]
        summary[f"tasks_{n}"] = {"a": ta, "b": tb, "c": tc, "d": td, "a_over_b": ta / tb, "a_over_c": ta / tc,
                                 "a_over_d": ta / td, "batches_a": a["batches_a"], "batches_b": a["batches_b"]}
        lines.append(f"| {n} | {ta:,.0f} | {tb:,.0f} | {tc:,.0f} | {td:,.0f} | {ta / tb:.2f} | {ta / tc:.2f} | {ta / td:.2f} |")
    big = summary.get(f"tasks_{counts[-1]}")
    if big:
        lines.append(f"targets at {counts[-1]} tasks: a/c {big['a_over_c']:.2f} (≥ 10: {verdict(big['a_over_c'] >= 10)}), "
                     f"a/b {big['a_over_b']:.2f} (≥ 3: {verdict(big['a_over_b'] >= 3)}), "
                     f"a/d {big['a_over_d']:.2f} (≥ 0.9: {verdict(big['a_over_d'] >= 0.9)})")

    srv = load(out / "server.json")
    if srv and big:
        ratio = srv["text_tokens_per_s"] / big["a"]
        summary["server"] = {**srv, "over_engine": ratio}
        lines.append(f"server at saturation ({counts[-1]} tasks, {srv['processes']} client processes × "
                     f"{srv['concurrency']} in flight, ≤ {srv['inputs']} inputs/request): {srv['text_tokens_per_s']:,.0f} "
                     f"text tokens/s, {srv['requests_per_s']:,.0f} req/s, {srv['errors']} errors; server/engine "
                     f"{ratio:.2f} (target ≥ 0.8: {verdict(ratio >= 0.8)})")
    else:
        missing = True

    print("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
