#!/usr/bin/env python3
"""Many-task workload, paths (c) HF PEFT and (d) plain transformers, on PyTorch.

Reads what `examples/workload.rs prepare` wrote under --out (workload.json,
requests.jsonl, adapters/tNN/ exported by softprompt's PEFT exporter), runs the
same requests in the same arrival windows, and writes peft_round{R}.json with
the timing and the logits. bench/run.sh drives it; see bench/README.md.

    .venv/bin/python bench/peft_workload.py --round 1 --threads 2
    python3 bench/peft_workload.py --round 1 --device cuda --dtype f16     # bench/gpu.sh
    python3 bench/peft_workload.py --round 1 --device cuda --dtype f16 --path d

(d) is what a user would otherwise run for plain classification: the base
BertModel (no prompt, no adapter) on the same one-task batches, padded the same
way, its pooler output as the result; it times the encoder alone.

Batching: PEFT applies one prompt adapter per forward pass, so each window of
consecutive requests is split into one batch per task (tasks in order of first
arrival in the window, rows in arrival order, right-padded to the group's
longest row) -- the same rule as path (b) of the Rust side.

Adapters: PEFT refuses to mix peft types in one PeftModel ("Cannot combine
adapters with different peft types"), so the base model is loaded twice: one
PeftModel holds the 32 PROMPT_TUNING adapters, the other the 32 PREFIX_TUNING
ones, each added with load_adapter(adapter_name=...) and chosen with
set_adapter per batch (which also swaps the adapter's own classifier, saved via
modules_to_save). Loading is not timed; a warm-up over the first windows runs
before the timed pass; set_adapter and building the padded tensors are timed,
as the engine's batch assembly is on the Rust side. Tokenization is timed on
neither side: the script tokenizes with the model's HF tokenizer and checks
that the ids equal the ones the Rust side used.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# On the CPU, keep torch off any GPU (set before torch is imported).
if "--device" not in sys.argv or sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

transformers.logging.set_verbosity_error()


def groups_by_first_arrival(window):
    """Indices of the window's requests grouped by task, groups in order of first arrival."""
    order, members = [], {}
    for i, r in enumerate(window):
        if r["task"] not in members:
            members[r["task"]] = []
            order.append(r["task"])
        members[r["task"]].append(i)
    return [(t, members[t]) for t in order]


def pad(rows, pad_id):
    """Right-padded input_ids, attention_mask and token_type_ids for one batch."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    return ids, mask, torch.zeros_like(ids)


@torch.inference_mode()
def run(windows, models, pad_id, device, plain=None):
    """One pass over the windows; returns logits in request order and the batch count.

    With `plain` (a BertModel), path (d): the same batches through the plain
    encoder; its pooler output stands in for the logits.
    """
    logits, batches = [], 0
    for w in windows:
        out = [None] * len(w)
        for task, members in groups_by_first_arrival(w):
            ids, mask, types = (t.to(device) for t in pad([w[i]["ids"] for i in members], pad_id))
            if plain is not None:
                got = plain(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output[:, :2]
            else:
                pm = models[task]
                pm.set_adapter(task, inference_mode=True)
                got = pm(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
            # .tolist() copies to the host: every batch is finished when timed.
            for i, row in zip(members, got.float().tolist()):
                out[i] = row
            batches += 1
        logits.extend(out)
    return logits, batches


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    ap.add_argument("--round", type=int, required=True)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (= the engine's threads; 0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"], help="weights and activations")
    ap.add_argument("--path", default="c", choices=["c", "d"], help="c: PEFT with each task's adapter; d: the plain BertModel")
    ap.add_argument("--result", help="file name under --out (default: peft_round{R}.json for (c), torch_d_{device}_{dtype}.json for (d))")
    ap.add_argument("--warmup", type=int, default=4, help="windows run untimed first")
    ap.add_argument(
        "--attn", default="sdpa", choices=["sdpa", "eager"], help="transformers attention implementation (default: its own default, sdpa)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if device.type == "cuda":
        # Reference f32 means f32: no TF32 matmuls.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    workload = json.loads((args.out / "workload.json").read_text())
    model_dir = workload["model"]
    window = workload["window"]
    requests = [json.loads(line) for line in (args.out / "requests.jsonl").open()]

    tok = AutoTokenizer.from_pretrained(model_dir)
    for i, r in enumerate(requests):
        ids = tok(r["text"])["input_ids"]
        if ids != r["ids"]:
            print(f"request {i}: HF tokenizer gives {ids}, the Rust side used {r['ids']}", file=sys.stderr)
            return 1

    t0 = time.perf_counter()
    models, by_type, plain = {}, {}, None
    if args.path == "d":
        plain = transformers.AutoModel.from_pretrained(model_dir, attn_implementation=args.attn)
        plain = plain.to(device=device, dtype=dtype).eval()
    else:
        for t in workload["tasks"]:
            by_type.setdefault(t["peft_type"], []).append(t["id"])
    for peft_type, ids in by_type.items():
        base = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=workload["labels"], attn_implementation=args.attn
        ).eval()
        pm = PeftModel.from_pretrained(base, str(args.out / "adapters" / ids[0]), adapter_name=ids[0]).eval()
        for a in ids[1:]:
            pm.load_adapter(str(args.out / "adapters" / a), adapter_name=a)
        got = pm.peft_config[ids[-1]].peft_type
        assert getattr(got, "value", got) == peft_type, (ids[-1], got, peft_type)
        pm = pm.to(device=device, dtype=dtype)
        for a in ids:
            models[a] = pm
    load_secs = time.perf_counter() - t0

    windows = [requests[i : i + window] for i in range(0, len(requests), window)]
    run(windows[: args.warmup], models, tok.pad_token_id, device, plain)
    t = time.perf_counter()
    logits, batches = run(windows, models, tok.pad_token_id, device, plain)
    secs = time.perf_counter() - t

    text_tokens = sum(len(r["ids"]) for r in requests)
    print(
        f"round {args.round}: ({args.path}) {'PEFT' if args.path == 'c' else 'plain BertModel'} {text_tokens / secs:.0f} "
        f"text tokens/s ({secs:.2f} s, {batches} batches; load {load_secs:.1f} s); {args.device} {args.dtype}, "
        f"torch {torch.get_num_threads()} threads, attn {args.attn}",
        flush=True,
    )
    result = {
        "round": args.round,
        "path": args.path,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "attn": args.attn,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "text_tokens": text_tokens,
        f"secs_{args.path}": secs,
        f"batches_{args.path}": batches,
        "load_secs": load_secs,
        f"logits_{args.path}": logits,
    }
    name = args.result or (
        f"peft_round{args.round}.json" if args.path == "c" else f"torch_d_{args.device}_{args.dtype}.json")
    (args.out / name).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
