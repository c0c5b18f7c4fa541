#!/usr/bin/env python3
"""Independent NumPy re-implementation of the soft-prompt forward passes.

Reads ONLY the fixture files (config.json, model.safetensors, adapter_config.json,
adapter_model.safetensors) and expected.json -- no transformers / peft -- and
recomputes every logit / feature in expected.json. It is the executable spec of
the semantics the Rust server must follow; each rule is also tested against a
plausible wrong alternative to show the fixtures tell them apart.

    .venv/bin/python tests/reference/check_semantics.py [expected.json ...]
Defaults to tests/fixtures/expected.json (+ tests/fixtures/minilm-expected.json if present).
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures"
_erf = np.vectorize(math.erf)


def model_dir(name: str) -> Path:
    if name == "all-MiniLM-L6-v2":
        return REPO / "models" / "all-MiniLM-L6-v2"
    return FIX / name


class Encoder:
    """BERT / RoBERTa encoder from a config.json + model.safetensors (either key naming)."""

    def __init__(self, d: Path):
        self.cfg = json.loads((d / "config.json").read_text())
        w = load_file(str(d / "model.safetensors"))
        prefix = "bert." if self.cfg["model_type"] == "bert" else "roberta."
        self.w = {}
        self.head = {}
        for k, v in w.items():
            if k.startswith(prefix):
                self.w[k[len(prefix):]] = v.astype(np.float32)
            elif k.startswith("classifier."):
                self.head[k] = v
            else:  # sentence-transformers naming (no prefix)
                self.w[k] = v.astype(np.float32) if v.dtype != np.int64 else v
        self.H = self.cfg["hidden_size"]
        self.nh = self.cfg["num_attention_heads"]
        self.hd = self.H // self.nh
        self.L = self.cfg["num_hidden_layers"]
        self.eps = self.cfg["layer_norm_eps"]
        self.is_roberta = self.cfg["model_type"] == "roberta"
        self.pad = self.cfg.get("pad_token_id", 0)

    def ln(self, x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]

    def lin(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def embed(self, ids):
        return self.w["embeddings.word_embeddings.weight"][np.asarray(ids)]

    def forward(self, x, positions, token_types, key_mask, prefix=None):
        """x: [T, H] input embeddings of ONE sequence (virtual tokens included for shallow prompts).
        positions / token_types: [T]. key_mask: [T] 1 = attend.
        prefix: per layer (K [nh, n, hd], V [nh, n, hd]) or None; prefix keys are always attended."""
        h = x + self.w["embeddings.position_embeddings.weight"][positions] + \
            self.w["embeddings.token_type_embeddings.weight"][token_types]
        h = self.ln(h, "embeddings.LayerNorm")
        T = h.shape[0]
        bias = np.where(np.asarray(key_mask) > 0, 0.0, -1e30).astype(np.float32)
        for l in range(self.L):
            p = f"encoder.layer.{l}."
            q = self.lin(h, p + "attention.self.query").reshape(T, self.nh, self.hd).transpose(1, 0, 2)
            k = self.lin(h, p + "attention.self.key").reshape(T, self.nh, self.hd).transpose(1, 0, 2)
            v = self.lin(h, p + "attention.self.value").reshape(T, self.nh, self.hd).transpose(1, 0, 2)
            b = bias
            if prefix is not None:
                pk, pv = prefix[l]
                k = np.concatenate([pk, k], 1)
                v = np.concatenate([pv, v], 1)
                b = np.concatenate([np.zeros(pk.shape[1], np.float32), bias])
            s = q @ k.transpose(0, 2, 1) / math.sqrt(self.hd) + b
            s = s - s.max(-1, keepdims=True)
            a = np.exp(s)
            a /= a.sum(-1, keepdims=True)
            ctx = (a @ v).transpose(1, 0, 2).reshape(T, self.H)
            h = self.ln(self.lin(ctx, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
            inter = self.lin(h, p + "intermediate.dense")
            inter = 0.5 * inter * (1.0 + _erf(inter / math.sqrt(2.0)))
            h = self.ln(self.lin(inter, p + "output.dense") + h, p + "output.LayerNorm")
        return h

    def pooler(self, h0):
        if "pooler.dense.weight" not in self.w:
            return None
        return np.tanh(self.lin(h0, "pooler.dense"))


def classify(enc, head, h, pooled):
    if enc.is_roberta:  # RobertaClassificationHead on hidden[0]
        x = np.tanh(h[0] @ head["base_model.classifier.dense.weight"].T + head["base_model.classifier.dense.bias"])
        return x @ head["base_model.classifier.out_proj.weight"].T + head["base_model.classifier.out_proj.bias"]
    return pooled @ head["base_model.classifier.weight"].T + head["base_model.classifier.bias"]


def run_case(enc, case, adapter_dir, variant="correct"):
    acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    aw = load_file(str(adapter_dir / "adapter_model.safetensors"))
    P = aw["prompt_embeddings"]
    n = acfg["num_virtual_tokens"]
    assert P.shape[0] == n
    out = []
    pad_len = max(len(x) for x in case["input_ids"])  # the reference ran one right-padded batch
    for ids, tts in zip(case["input_ids"], case["token_type_ids"]):
        T = len(ids)
        ids_p = list(ids) + [enc.pad] * (pad_len - T)
        tts_p = list(tts) + [0] * (pad_len - T)
        mask = [1] * T + [0] * (pad_len - T)
        if acfg["peft_type"] in ("PROMPT_TUNING", "P_TUNING"):
            x = np.concatenate([P, enc.embed(ids_p)], 0)
            tt = [1 if variant == "virtual_token_type_1" else 0] * n + tts_p
            km = [1] * n + mask
            if enc.is_roberta:
                # inputs_embeds path: sequential positions from padding_idx+1, pads included
                pos = np.arange(n + pad_len) + enc.pad + 1
            else:
                pos = np.arange(n + pad_len)
            if variant == "text_positions_from_0":
                pos = np.concatenate([pos[:n], pos[n:] - n])
            if variant == "pool_first_text_token":
                h = enc.forward(x, pos, tt, km)
                out.append(classify(enc, aw, h[n:], enc.pooler(h[n])))
                continue
            h = enc.forward(x, pos, tt, km)
        else:  # PREFIX_TUNING: element [t, ((2*l+kv)*heads+h)*head_dim+d]
            pre = P.reshape(n, enc.L, 2, enc.nh, enc.hd)
            prefix = [(pre[:, l, 0].transpose(1, 0, 2), pre[:, l, 1].transpose(1, 0, 2)) for l in range(enc.L)]
            if variant == "prefix_kv_swapped":
                prefix = [(v, k) for k, v in prefix]
            off = 0 if variant == "prefix_positions_not_offset" else n
            if enc.is_roberta:
                m = np.asarray(mask)
                pos = (np.cumsum(m) + off) * m + enc.pad
            else:
                pos = np.arange(pad_len) + off
            h = enc.forward(enc.embed(ids_p), pos, tts_p, mask, prefix)
        out.append(classify(enc, aw, h, enc.pooler(h[0])))
    return np.asarray(out)


def main(paths):
    worst = 0.0
    for path in paths:
        exp = json.loads(Path(path).read_text())
        adapters_root = FIX / ("minilm-adapters" if "minilm" in Path(path).name else "adapters")
        encs = {}
        for case in exp["cases"]:
            enc = encs.setdefault(case["model"], Encoder(model_dir(case["model"])))
            want = np.asarray(case["logits"])
            got = run_case(enc, case, adapters_root / case["adapter"])
            err = float(np.abs(got - want).max())
            worst = max(worst, err)
            if case["peft_type"] == "PREFIX_TUNING":
                alts = ["prefix_positions_not_offset", "prefix_kv_swapped"]
            else:
                alts = ["text_positions_from_0", "pool_first_text_token"]
                if not enc.is_roberta:  # RoBERTa has a single token type
                    alts.append("virtual_token_type_1")
            alt_err = {a: float(np.abs(run_case(enc, case, adapters_root / case["adapter"], a) - want).max()) for a in alts}
            print(f"{case['adapter']:18s} max|err| {err:.2e}   wrong alternatives: "
                  + ", ".join(f"{a} {e:.2f}" for a, e in alt_err.items()))
            assert err < 1e-4, case["adapter"]
            assert all(e > 1e-3 for e in alt_err.values()), (case["adapter"], alt_err)
        for base in exp["base"]:
            dirs = [model_dir(base["model"])]
            if base["model"] == "tiny-bert":
                dirs.append(FIX / "tiny-bert-st")
            for d in dirs:
                enc = Encoder(d)
                pad_len = max(len(x) for x in base["input_ids"])
                for i, (ids, tts) in enumerate(zip(base["input_ids"], base["token_type_ids"])):
                    T = len(ids)
                    ids_p = list(ids) + [enc.pad] * (pad_len - T)
                    mask = np.array([1] * T + [0] * (pad_len - T))
                    if enc.is_roberta:
                        pos = np.cumsum(mask) * mask + enc.pad
                    else:
                        pos = np.arange(pad_len)
                    h = enc.forward(enc.embed(ids_p), pos, list(tts) + [0] * (pad_len - T), mask)
                    errs = [np.abs(h[0] - base["cls_hidden"][i]).max(),
                            np.abs(h[:T].mean(0) - base["mean_pooled"][i]).max()]
                    if base["pooler_output"] is not None:
                        errs.append(np.abs(enc.pooler(h[0]) - base["pooler_output"][i]).max())
                    worst = max(worst, float(max(errs)))
                    assert max(errs) < 1e-4, (d, i, errs)
                print(f"base {d.name:18s} ok")
    print(f"all checks passed, worst |err| {worst:.2e}")


if __name__ == "__main__":
    args = sys.argv[1:] or [str(FIX / "expected.json")] + (
        [str(FIX / "minilm-expected.json")] if (FIX / "minilm-expected.json").exists() else [])
    main(args)
