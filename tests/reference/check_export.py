#!/usr/bin/env python3
"""Check softprompt's PEFT export against HF PEFT itself.

Every tiny fixture adapter (tests/fixtures/adapters/*) is read by softprompt,
stored in its native format, read back and exported again as a PEFT adapter
directory (`task::peft::write_dir`). This script loads each exported directory
with `PeftModel.from_pretrained(AutoModelForSequenceClassification(...), dir)`
and checks that the logits on the fixture batch equal the ones PEFT computed
from the original adapter (tests/fixtures/expected.json) within 1e-5.

The export is done by a Rust test that writes into $EXPORT_DIR when it is set:

    EXPORT_DIR=/tmp/x cargo test --test task_files -- --exact \
        peft_export_of_every_fixture_adapter_reimports_bit_exactly

This script runs that itself unless --export-dir points at an existing export.

    .venv/bin/python tests/reference/check_export.py [--export-dir DIR]

RoBERTa + PREFIX_TUNING: peft 0.21.2 + transformers 4.57.6 crash in
`_prefix_tuning_forward` (see README.md, "Surprises"), so for that adapter the
logits are computed the way make_fixtures.py does it, by hand with the prefix
PEFT builds from the loaded adapter (`get_prompt`) and the loaded classifier.
For the BERT prefix adapters PEFT's own forward is used and the by-hand path is
asserted equal to it.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import torch  # noqa: E402
import transformers  # noqa: E402
import peft  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import run_peft  # noqa: E402  (the same forward that produced expected.json)

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures"
TOL = 1e-5
RUST_TEST = "peft_export_of_every_fixture_adapter_reimports_bit_exactly"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
transformers.logging.set_verbosity_error()


def export(out: Path) -> None:
    env = dict(os.environ, EXPORT_DIR=str(out))
    cmd = ["cargo", "test", "--test", "task_files", "--", "--exact", RUST_TEST]
    print("+", f"EXPORT_DIR={out}", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def encode(tokenizer, inputs):
    """Same batch as make_fixtures.py: unpadded rows + one right-padded batch."""
    rows = [tokenizer(i["text"], i["text_pair"], return_token_type_ids=True) for i in inputs]
    batch = tokenizer.pad(
        [{k: r[k] for k in ("input_ids", "token_type_ids", "attention_mask")} for r in rows],
        padding=True,
        return_tensors="pt",
    )
    return rows, batch


@torch.no_grad()
def run(pm, batch):
    """make_fixtures.py's PeftModel call (by hand for RoBERTa prefixes), and how it was made."""
    logits, note = run_peft(pm, batch)
    return logits, ("by hand (PEFT's RoBERTa prefix forward crashes)" if note else "PeftModel forward")


@torch.no_grad()
def check_case(case, export_dir: Path) -> float:
    name = case["adapter"]
    adapter = export_dir / name
    model_dir = FIX / case["model"]
    torch.manual_seed(12345)  # a classifier re-initialized for another label count is random; the adapter replaces it
    base = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=case["num_labels"], ignore_mismatched_sizes=True, attn_implementation="eager"
    ).eval()
    pm = PeftModel.from_pretrained(base, str(adapter)).eval()
    cfg = pm.active_peft_config
    saved = load_file(str(adapter / "adapter_model.safetensors"))

    want_type = "PREFIX_TUNING" if case["peft_type"] == "PREFIX_TUNING" else "PROMPT_TUNING"
    got_type = cfg.peft_type.value if hasattr(cfg.peft_type, "value") else str(cfg.peft_type)
    assert got_type == want_type, (name, got_type)
    assert cfg.num_virtual_tokens == case["num_virtual_tokens"], name
    # The classifier PEFT runs is the exported one (modules_to_save was honoured).
    head = pm.get_base_model().classifier
    if hasattr(head, "out_proj"):
        assert torch.equal(head.out_proj.weight, saved["base_model.classifier.out_proj.weight"]), name
        assert torch.equal(head.dense.weight, saved["base_model.classifier.dense.weight"]), name
    else:
        assert torch.equal(head.weight, saved["base_model.classifier.weight"]), name
    if want_type == "PROMPT_TUNING":
        assert torch.equal(pm.get_prompt(batch_size=1)[0], saved["prompt_embeddings"]), name

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows, batch = encode(tokenizer, case["inputs"])
    assert [r["input_ids"] for r in rows] == case["input_ids"], f"{name}: token ids differ from the fixture"
    logits, how = run(pm, batch)
    want = torch.tensor(case["logits"], dtype=torch.float32)
    diff = (logits - want).abs().max().item()
    print(f"{name:18s} {want_type:14s} max |Δlogit| {diff:.3e}  ({how})", flush=True)
    return diff


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--export-dir", type=Path, help="an existing export (else one is made with cargo test)")
    args = ap.parse_args()
    os.chdir(REPO)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    expected = json.loads((FIX / "expected.json").read_text())
    with tempfile.TemporaryDirectory(prefix="softprompt-export-") as tmp:
        export_dir = args.export_dir
        if export_dir is None:
            export_dir = Path(tmp)
            export(export_dir)
        worst = 0.0
        for case in expected["cases"]:
            worst = max(worst, check_case(case, export_dir))
    print(f"overall max |Δlogit| {worst:.3e} (tolerance {TOL:g}) over {len(expected['cases'])} adapters")
    if not worst <= TOL:
        print("FAIL", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
