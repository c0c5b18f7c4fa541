#!/usr/bin/env python3
"""Parity fixtures on the real default model, all-MiniLM-L6-v2.

Needs the model in models/all-MiniLM-L6-v2 (scripts/fetch_model.sh). Writes
  tests/fixtures/minilm-adapters/<name>/   PEFT adapters on that model (small: prompt/prefix + classifier)
  tests/fixtures/minilm-expected.json      same format as expected.json
The model's weights are keyed without the `bert.` prefix (sentence-transformers
layout); transformers loads them into BertForSequenceClassification.bert.
Its tokenizer.json pads/truncates to 128: here the batch is padded to the
longest row (padding=True), like in make_fixtures.py.

    .venv/bin/python tests/reference/make_minilm_expected.py
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (chdirs to the repo root)
from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType  # noqa: E402
from transformers import BertForSequenceClassification, BertTokenizerFast  # noqa: E402

NAME = "all-MiniLM-L6-v2"
MODEL_DIR = Path("models") / NAME
OUT_ROOT = mf.FIX / "minilm-adapters"
OUT_JSON = mf.FIX / "minilm-expected.json"

INPUTS = [
    ("A man is playing a guitar on the street.", None),
    ("The quarterly report shows that revenue grew by twelve percent.", None),
    ("How do I reset my password?", "Click on 'Forgot password' and follow the instructions in the email."),
    ("I absolutely loved this film!", None),
]

SPECS = [
    ("minilm_pt_8", 2, lambda: PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=8,
                                                   prompt_tuning_init=PromptTuningInit.RANDOM)),
    ("minilm_prefix_6", 2, lambda: PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=6)),
]


def main() -> int:
    if not (MODEL_DIR / "config.json").exists():
        print(f"{MODEL_DIR} missing: run scripts/fetch_model.sh first", file=sys.stderr)
        return 1
    mf.MODEL_DIRS[NAME] = MODEL_DIR
    mf.MODEL_CLASSES[NAME] = BertForSequenceClassification
    tok = BertTokenizerFast.from_pretrained(str(MODEL_DIR))

    if OUT_ROOT.exists():
        mf.shutil.rmtree(OUT_ROOT)
    cases = []
    for i, (name, labels, make_cfg) in enumerate(SPECS):
        case, info = mf.make_adapter(name, NAME, labels, make_cfg, True, tok, seed=900 + 10 * i,
                                     inputs=INPUTS, out_root=OUT_ROOT, prompt_std=0.5)
        cases.append(case)
        print(f"{name}: saved {info['saved_keys']}")

    expected = {
        "generator": "tests/reference/make_minilm_expected.py",
        "versions": {
            "torch": mf.torch.__version__.split("+")[0],
            "transformers": mf.transformers.__version__,
            "peft": mf.peft.__version__,
            "tokenizers": mf.tokenizers.__version__,
        },
        "cases": cases,
        "base": [mf.base_features(NAME, tok, INPUTS)],
    }
    OUT_JSON.write_text(json.dumps(expected, indent=1) + "\n")
    print(f"{OUT_ROOT}: {mf.dir_size(OUT_ROOT)} bytes; {OUT_JSON}: {OUT_JSON.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
