"""Writes tests/fixtures/tiny-bert-bin/: the tiny-bert encoder as a PyTorch
`pytorch_model.bin` with only `vocab.txt` for the tokenizer, to test the
loader's fallbacks (no model.safetensors, no tokenizer.json).

Run after make_fixtures.py:  .venv/bin/python tests/reference/make_bin_fixture.py
"""
import json
import pathlib
import shutil

import torch
from safetensors.torch import load_file

root = pathlib.Path(__file__).resolve().parents[2] / "tests" / "fixtures"
src = root / "tiny-bert"
dst = root / "tiny-bert-bin"
shutil.rmtree(dst, ignore_errors=True)
dst.mkdir()
state = load_file(str(src / "model.safetensors"))
torch.save({k: v.contiguous() for k, v in state.items()}, str(dst / "pytorch_model.bin"))
shutil.copy(src / "config.json", dst / "config.json")
shutil.copy(src / "vocab.txt", dst / "vocab.txt")
tc = json.loads((src / "tokenizer_config.json").read_text())
(dst / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": tc.get("do_lower_case", True)}, indent=2) + "\n")
print("wrote", sorted(p.name for p in dst.iterdir()))
