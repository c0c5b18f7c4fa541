#!/usr/bin/env python3
"""Many-task workload, paths (e) and (f): ONNX Runtime on the plain encoder.

Reads what `examples/workload.rs prepare` wrote under --out (workload.json,
requests.jsonl with the token ids the engine used) and the models that
bench/export_onnx.py wrote under --onnx, and times the same requests through
ONNX Runtime's CPU execution provider, no prompt:

  (e) encoder_f32.onnx   the plain encoder, f32;
  (f) encoder_int8.onnx  the same graph after quantize_dynamic (QInt8 weights);

each batched two ways:

  padded  arrival order: windows of `window` consecutive requests (workload.json,
          64 by default), each window one batch right-padded to its longest row
          -- the batches of the engine's (a) and (a0);
  sorted  all requests sorted by length (stable), batches of --sorted-batch (16),
          each right-padded to its longest row: the usual offline trick that
          removes most padding (it needs the whole request list up front).

Writes ort_round{R}.json. bench/run.sh drives it; see bench/README.md.

    .venv/bin/python bench/ort_workload.py --round 1 --threads 2

Timed, per (model, batching): one pass over all requests -- the sort (sorted
only), building each batch's padded int64 arrays and the full session.run (both
outputs of the graph: last_hidden_state and pooler_output). Not timed: loading
the session, tokenization (the ids are the engine's, read from requests.jsonl),
a warm-up over --warmup windows' worth of requests (evenly spread batches of the
same batching), and turning pooler_output into logits afterwards. The logits are
the first task's head (its PEFT adapter's classifier) on pooler_output -- the
head path (a0) runs -- so that report.py can check (e) against (a0).

Session: intra_op_num_threads = --threads, inter_op_num_threads = 1, sequential
execution, ORT's default graph optimizations (ORT_ENABLE_ALL) and thread
spinning; CPUExecutionProvider.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

MODELS = {"e": "encoder_f32.onnx", "f": "encoder_int8.onnx"}


def padded_batches(lengths, window):
    """Arrival order: windows of `window` consecutive requests."""
    idx = list(range(len(lengths)))
    return [idx[i : i + window] for i in range(0, len(idx), window)]


def sorted_batches(lengths, size):
    """All requests sorted by length (ties in arrival order), batches of `size`."""
    idx = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [idx[i : i + size] for i in range(0, len(idx), size)]


def feeds(ids, members):
    """Right-padded input_ids / attention_mask / token_type_ids (pad id 0, as BERT's [PAD])."""
    longest = max(len(ids[i]) for i in members)
    x = np.zeros((len(members), longest), dtype=np.int64)
    mask = np.zeros((len(members), longest), dtype=np.int64)
    for b, i in enumerate(members):
        x[b, : len(ids[i])] = ids[i]
        mask[b, : len(ids[i])] = 1
    return {"input_ids": x, "attention_mask": mask, "token_type_ids": np.zeros_like(x)}


def one_pass(sess, ids, make_batches):
    """Timed pass; returns seconds and [(members, pooler_output)]."""
    out = []
    t = time.perf_counter()
    for members in make_batches():
        _, pooled = sess.run(None, feeds(ids, members))
        out.append((members, pooled))
    return time.perf_counter() - t, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    ap.add_argument("--onnx", type=Path, default=None, help="exported models (default: OUT/onnx)")
    ap.add_argument("--round", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True, help="intra_op_num_threads (= the engine's threads)")
    ap.add_argument("--warmup", type=int, default=4, help="windows' worth of requests run untimed first, per model and batching")
    ap.add_argument("--sorted-batch", type=int, default=16, help="batch size of the length-sorted batching")
    args = ap.parse_args()
    onnx_dir = args.onnx or args.out / "onnx"

    workload = json.loads((args.out / "workload.json").read_text())
    window = workload["window"]
    ids = [json.loads(line)["ids"] for line in (args.out / "requests.jsonl").open()]
    lengths = [len(r) for r in ids]
    text_tokens = sum(lengths)

    # The head (a0) runs: the first task's classifier, as the engine reads it back.
    head_task = workload["tasks"][0]["id"]
    st = load_file(str(args.out / "adapters" / head_task / "adapter_model.safetensors"))
    w = next(v for k, v in st.items() if k.endswith("classifier.weight"))
    b = next(v for k, v in st.items() if k.endswith("classifier.bias"))

    batchings = {
        "padded": lambda: padded_batches(lengths, window),
        "sorted": lambda: sorted_batches(lengths, args.sorted_batch),
    }
    result = {
        "round": args.round,
        "threads": args.threads,
        "window": window,
        "sorted_batch": args.sorted_batch,
        "head_task": head_task,
        "versions": {"onnxruntime": ort.__version__, "numpy": np.__version__},
        "text_tokens": text_tokens,
    }
    line = []
    for path, file in MODELS.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        t0 = time.perf_counter()
        sess = ort.InferenceSession(str(onnx_dir / file), so, providers=["CPUExecutionProvider"])
        load_secs = time.perf_counter() - t0
        for name, make in batchings.items():
            key = f"{path}_{name}"
            batches = make()
            # Warm-up: as many requests as --warmup windows, in batches spread
            # over the pass (so the sorted batching warms up on long rows too).
            n_warm = min(len(batches), max(1, -(-args.warmup * window // len(batches[0]))))
            for k in range(n_warm):
                sess.run(None, feeds(ids, batches[k * len(batches) // n_warm]))
            secs, got = one_pass(sess, ids, make)
            logits = [None] * len(ids)
            for members, pooled in got:
                for i, row in zip(members, pooled.astype(np.float64) @ w.T.astype(np.float64) + b):
                    logits[i] = [float(v) for v in row]
            padded = sum(len(m) * max(lengths[i] for i in m) for m in batches)
            result.update(
                {
                    f"secs_{key}": secs,
                    f"batches_{key}": len(batches),
                    f"padded_tokens_{key}": padded,
                    f"load_secs_{path}": load_secs,
                    f"logits_{key}": logits,
                }
            )
            line.append(f"({path}) {name} {text_tokens / secs:.0f}")
    print(
        f"round {args.round}: ORT {', '.join(line)} text tokens/s; "
        f"{args.threads} intra-op threads, onnxruntime {ort.__version__}",
        flush=True,
    )
    (args.out / f"ort_round{args.round}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
