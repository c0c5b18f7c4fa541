#!/usr/bin/env python3
"""PEFT reference logits of the parity fixtures for another copy of the model
(bench/gpu.sh: the 16-bit copy carried to the GPU machine, whose weights differ
from the f32 checkpoint the fixtures were made with).

Reads a fixture file (tests/fixtures/minilm-expected.json: cases with adapter,
inputs [{text, text_pair}], num_labels), runs each input through transformers +
PEFT with --model's weights in f32 on the CPU (no TF32, no GPU: the reference
is exact f32), and writes the same file with `logits` replaced.

    python3 bench/fixture_reference.py --model gpu/model \
        --fixtures tests/fixtures/minilm-expected.json --adapters tests/fixtures/minilm-adapters \
        --out bench/out/gpu/fixtures-expected.json
"""
import argparse
import json
import os
import sys
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoTokenizer, BertForSequenceClassification  # noqa: E402

transformers.logging.set_verbosity_error()


@torch.inference_mode()
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--fixtures", required=True, type=Path)
    ap.add_argument("--adapters", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    exp = json.loads(args.fixtures.read_text())
    tok = AutoTokenizer.from_pretrained(args.model)
    for case in exp["cases"]:
        base = BertForSequenceClassification.from_pretrained(
            args.model, num_labels=case["num_labels"], torch_dtype=torch.float32
        ).eval()
        pm = PeftModel.from_pretrained(base, str(args.adapters / case["adapter"])).eval()
        logits = []
        for i, inp in enumerate(case["inputs"]):
            enc = tok(inp["text"], inp.get("text_pair"), return_tensors="pt")
            if enc["input_ids"][0].tolist() != case["input_ids"][i]:
                print(f"{case['adapter']} input {i}: token ids differ from the fixture's", file=sys.stderr)
                return 1
            logits.append(pm(**enc).logits[0].float().tolist())
        case["logits"] = logits
    exp["generator"] = f"bench/fixture_reference.py --model {args.model}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(exp, indent=1) + "\n")
    print(f"wrote {args.out}: {len(exp['cases'])} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
