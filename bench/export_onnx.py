#!/usr/bin/env python3
"""Exports the plain encoder (no prompt) to ONNX, f32 and int8, for paths (e)/(f).

    .venv/bin/python bench/export_onnx.py [--model models/all-MiniLM-L6-v2] [--out bench/out/onnx]

Writes under --out:
  encoder_f32.onnx   BertModel of --model (eval), exported with torch.onnx.export
                     (the TorchScript exporter, dynamo=False; see below): inputs
                     input_ids, attention_mask, token_type_ids (int64, [batch, sequence],
                     both axes dynamic); outputs last_hidden_state [batch, sequence, hidden]
                     and pooler_output [batch, hidden].
  encoder_int8.onnx  the same graph through onnxruntime.quantization.quantize_dynamic
                     (QInt8 weights; activations quantized per call at run time).
  export.json        what was exported, with which versions, and the check below.

Check (every call, also when the files are already there): ORT f32 against PyTorch
on a padded batch of sentences of different lengths: max |difference| of
last_hidden_state over the real (non-padding) positions and of pooler_output;
asserts < 1e-3. A padded batch is used on purpose: a trace that baked in the
dummy input's mask would pass an unpadded check. The int8 model's difference is
printed for information only (quantization error, no limit).

Idempotent: the export is skipped when export.json records the same model file
(size and mtime), opset and torch/onnx/onnxruntime versions and both .onnx files
exist; --force re-exports.

Why dynamo=False: torch 2.15's default exporter (dynamo=True) needs the
onnxscript package, which the reference venv does not have; the TorchScript
exporter needs only torch (plus onnx for the quantizer). Attention is exported
with transformers' "eager" implementation, whose mask is plain arithmetic on
attention_mask; the sdpa path has data-dependent branches on the mask that a
trace could freeze.
"""
import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: E402
from transformers import AutoTokenizer, BertModel  # noqa: E402

transformers.logging.set_verbosity_error()

TOL = 1e-3
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
OUTPUTS = ["last_hidden_state", "pooler_output"]
CHECK_SENTENCES = [
    "A gripping, beautifully shot film.",
    "I have rarely been so bored in a cinema; the plot goes nowhere and the actors seem to know it.",
    "Fine.",
    "The soundtrack is wonderful, but the second half drags on far too long for its own good.",
]


class Encoder(torch.nn.Module):
    """BertModel with positional inputs and a tuple of the two outputs."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


def load(model_dir):
    bert = BertModel.from_pretrained(model_dir, attn_implementation="eager", add_pooling_layer=True).eval()
    return Encoder(bert).eval()


def batch(tok, sentences):
    enc = tok(sentences, padding=True, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in INPUTS}


def stamp(model_dir, opset):
    st = (Path(model_dir) / "model.safetensors").stat()
    return {
        "model": str(model_dir),
        "model_file": {"size": st.st_size, "mtime_ns": st.st_mtime_ns},
        "opset": opset,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
    }


def export(model, tok, f32_path, opset):
    feeds = batch(tok, CHECK_SENTENCES[:2])  # two rows of different lengths: a padded dummy batch
    args = tuple(torch.from_numpy(feeds[k]) for k in INPUTS)
    axes = {k: {0: "batch", 1: "sequence"} for k in INPUTS}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    axes["pooler_output"] = {0: "batch"}
    tmp = f32_path.with_suffix(".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporter's deprecation notice
        torch.onnx.export(
            model,
            args,
            str(tmp),
            input_names=INPUTS,
            output_names=OUTPUTS,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(str(tmp))
    tmp.replace(f32_path)


def quantize(f32_path, int8_path):
    tmp = int8_path.with_suffix(".tmp")
    # quantize_dynamic logs a hint to run quant_pre_process first; the int8 path
    # is defined as plain quantize_dynamic on the exported graph (bench/README.md).
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(f32_path), str(tmp), weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().setLevel(level)
    tmp.replace(int8_path)


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def mean_pool(h, real):
    """Mean over the real positions of each row (what sentence-transformers embeds)."""
    m = real[:, :, None].astype(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def min_cosine(x, y):
    return (np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))).min()


def check(model, tok, f32_path, int8_path):
    """Max |ORT - PyTorch| on a padded batch; returns {name: diff}."""
    feeds = batch(tok, CHECK_SENTENCES)
    with torch.inference_mode():
        ref_h, ref_p = (t.numpy() for t in model(*(torch.from_numpy(feeds[k]) for k in INPUTS)))
    real = feeds["attention_mask"].astype(bool)
    diffs = {}
    for name, path in (("f32", f32_path), ("int8", int8_path)):
        h, p = session(path).run(OUTPUTS, feeds)
        assert h.shape == ref_h.shape and p.shape == ref_p.shape, (name, h.shape, p.shape)
        diffs[name] = {
            "last_hidden_state": float(np.abs(h - ref_h)[real].max()),
            "pooler_output": float(np.abs(p - ref_p).max()),
            "min_cosine_mean_pooled": float(min_cosine(mean_pool(h, real), mean_pool(ref_h, real))),
        }
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/all-MiniLM-L6-v2")
    ap.add_argument("--out", type=Path, default=Path("bench/out/onnx"))
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--force", action="store_true", help="export again even if up to date")
    args = ap.parse_args()
    torch.set_num_threads(1)

    args.out.mkdir(parents=True, exist_ok=True)
    f32_path, int8_path, meta_path = args.out / "encoder_f32.onnx", args.out / "encoder_int8.onnx", args.out / "export.json"
    want = stamp(args.model, args.opset)
    try:
        have = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        have = {}
    fresh = not args.force and f32_path.exists() and int8_path.exists() and all(have.get(k) == v for k, v in want.items())

    tok = AutoTokenizer.from_pretrained(args.model)
    model = load(args.model)
    if not fresh:
        export(model, tok, f32_path, args.opset)
        quantize(f32_path, int8_path)
    diffs = check(model, tok, f32_path, int8_path)
    mb = {k: round(p.stat().st_size / 2**20, 1) for k, p in (("f32", f32_path), ("int8", int8_path))}
    print(
        f"onnx: {'exported' if not fresh else 'up to date'} under {args.out} (opset {args.opset}; f32 {mb['f32']} MiB, "
        f"int8 {mb['int8']} MiB); max |ORT - PyTorch| on {len(CHECK_SENTENCES)} padded sentences: "
        f"f32 {diffs['f32']['last_hidden_state']:.2e} (hidden) / {diffs['f32']['pooler_output']:.2e} (pooler), "
        f"int8 {diffs['int8']['last_hidden_state']:.2e} / {diffs['int8']['pooler_output']:.2e} (quantization, no limit; "
        f"cosine of mean-pooled rows >= {diffs['int8']['min_cosine_mean_pooled']:.4f})"
    )
    meta = dict(want, exporter="torch.onnx.export(dynamo=False), attn_implementation=eager", inputs=INPUTS, outputs=OUTPUTS,
                int8="onnxruntime.quantization.quantize_dynamic(weight_type=QuantType.QInt8)", sizes_mib=mb, check=diffs)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    worst = max(diffs["f32"]["last_hidden_state"], diffs["f32"]["pooler_output"])
    if not worst < TOL:
        print(f"error: ORT f32 differs from PyTorch by {worst:.2e} (limit {TOL:g})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
