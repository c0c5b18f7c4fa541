#!/usr/bin/env python3
"""PEFT reference for `softprompt train`.

Two modes:

  --fixtures
      Writes tests/fixtures/train/peft_encoders.safetensors: PEFT 0.21's own
      P-Tuning prompt encoders (bidirectional LSTM + MLP, and MLP) and the
      prefix-tuning projection MLP, built on tiny-bert's sizes with fixed
      seeds: their weights (under softprompt's parameter names) and their
      output. tests/train.rs loads the weights into our encoders and checks
      the outputs match.

  --data DIR --method {prompt-tuning,p-tuning,p-tuning-v2} [options]
      Trains the same method with PEFT + transformers on DIR/train.jsonl
      (the same seeded validation hold-out is NOT reproduced; PEFT trains on
      all of train.jsonl) and scores DIR/test.jsonl. Prints one JSON line with
      accuracy and wall-clock seconds. Pooling is PEFT's (BERT pooler +
      classifier), unless --mean-pooling, which swaps the pooler for a masked
      mean over the text tokens (softprompt's default for this model).
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fixtures():
    from peft import PrefixTuningConfig, PromptEncoderConfig, TaskType
    from peft.tuners.p_tuning.model import PromptEncoder
    from peft.tuners.prefix_tuning.model import PrefixEncoder
    from safetensors.torch import save_file

    torch.manual_seed(0)
    out = {}
    H = 32  # tiny-bert hidden size

    def put(case, state, rename, output):
        for k, v in state.items():
            out[f"{case}/{rename(k)}"] = v.detach().clone().contiguous()
        out[f"{case}/output"] = output.detach().clone().contiguous()

    def ptuning_name(k):
        k = k.replace("embedding.weight", "prompt.embedding")
        k = k.replace("lstm_head.", "encoder.lstm.").replace("mlp_head.", "encoder.mlp.")
        return k

    for case, kind, n in [("lstm", "LSTM", 3), ("mlp", "MLP", 4)]:
        cfg = PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=n, token_dim=H,
                                  encoder_hidden_size=16, encoder_reparameterization_type=kind,
                                  num_transformer_submodules=1, num_attention_heads=4, num_layers=2)
        enc = PromptEncoder(cfg).eval()
        with torch.no_grad():
            y = enc(torch.arange(n).unsqueeze(0))[0]
        put(case, enc.state_dict(), ptuning_name, y)

    cfg = PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=2, token_dim=H, num_layers=2,
                             encoder_hidden_size=16, prefix_projection=True, num_attention_heads=4)
    enc = PrefixEncoder(cfg).eval()
    with torch.no_grad():
        y = enc(torch.arange(2).unsqueeze(0))[0]
    put("prefix", enc.state_dict(),
        lambda k: k.replace("embedding.weight", "prompt.embedding").replace("transform.", "encoder.mlp."), y)

    path = os.path.join(ROOT, "tests/fixtures/train/peft_encoders.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(out, path)
    print(f"wrote {path}: {sorted(out)}")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


class MeanPooler(torch.nn.Module):
    """Replaces BertPooler: mean over the positions set in `mask` (text tokens)."""

    def __init__(self):
        super().__init__()
        self.mask = None

    def forward(self, hidden):
        m = self.mask
        if m.shape[1] != hidden.shape[1]:  # shallow prompt: virtual tokens come first, excluded
            pad = torch.zeros(m.shape[0], hidden.shape[1] - m.shape[1], dtype=m.dtype)
            m = torch.cat([pad, m], 1)
        m = m.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1)


def train(args):
    from peft import (PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, PromptTuningInit,
                      TaskType, get_peft_model)
    from transformers import AutoTokenizer, BertForSequenceClassification, get_linear_schedule_with_warmup

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tr = read_jsonl(os.path.join(args.data, "train.jsonl"))
    te = read_jsonl(os.path.join(args.data, "test.jsonl"))
    labels = sorted({r["label"] for r in tr})
    lid = {l: i for i, l in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(args.model)
    # No dropout anywhere, as softprompt trains: the config values reach the
    # nn.Dropout modules and SDPA's `dropout_p` (a float the attention keeps,
    # which setting nn.Dropout.p afterwards would miss).
    model = BertForSequenceClassification.from_pretrained(
        args.model, num_labels=len(labels), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(getattr(m, "dropout_prob", 0.0) == 0.0 for m in model.modules())
    if args.mean_pooling:
        model.bert.pooler = MeanPooler()
    n = args.virtual_tokens
    if args.method == "prompt-tuning":
        cfg = PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=n,
                                 prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    elif args.method == "p-tuning":
        cfg = PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=n,
                                  encoder_reparameterization_type=args.reparam.upper())
    else:
        cfg = PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=n,
                                 prefix_projection=args.reparam == "mlp", encoder_hidden_size=model.config.hidden_size)
    model = get_peft_model(model, cfg)
    if args.init == "vocab" and args.method != "prompt-tuning":
        # softprompt's default for encoders of hidden width: the encoder's input
        # rows start as sampled vocabulary embeddings (PEFT's own: N(0, 1)).
        emb = model.prompt_encoder["default"].embedding.weight
        if emb.shape[1] != model.config.hidden_size:
            raise SystemExit("--init vocab needs a prompt of hidden width (an MLP/LSTM encoder)")
        words = model.get_base_model().bert.embeddings.word_embeddings.weight
        ids = torch.randint(0, words.shape[0], (emb.shape[0],), generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            emb.copy_(words[ids])
    model.print_trainable_parameters()
    params = [p for p in model.parameters() if p.requires_grad]
    head = [p for n_, p in model.named_parameters() if p.requires_grad and "classifier" in n_]
    rest = [p for n_, p in model.named_parameters() if p.requires_grad and "classifier" not in n_]
    opt = torch.optim.AdamW([{"params": rest, "lr": args.lr}, {"params": head, "lr": args.head_lr or args.lr}],
                            weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = (len(tr) + args.batch_size - 1) // args.batch_size
    total = args.steps or steps_per_epoch * args.epochs
    sched = get_linear_schedule_with_warmup(opt, int(round(0.06 * total)), total)
    budget = args.max_tokens if args.method == "p-tuning-v2" else min(args.max_tokens, 512 - n)

    def batch(rows):
        enc = tok([r["text"] for r in rows], truncation=True, max_length=budget, padding=True, return_tensors="pt")
        if args.mean_pooling:
            model.base_model.bert.pooler.mask = enc["attention_mask"] if args.method != "p-tuning-v2" else enc["attention_mask"]
        return enc

    t0 = time.time()
    model.train()
    step = 0
    while step < total:
        perm = torch.randperm(len(tr), generator=g).tolist()
        for i in range(0, len(perm), args.batch_size):
            if step >= total:
                break
            rows = [tr[j] for j in perm[i:i + args.batch_size]]
            enc = batch(rows)
            y = torch.tensor([lid[r["label"]] for r in rows])
            loss = model(**enc, labels=y).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % args.log_every == 0:
                print(f"step {step}/{total} loss {loss.item():.4f} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    train_s = time.time() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, 0 if args.no_test else len(te), 64):
            rows = te[i:i + 64]
            logits = model(**batch(rows)).logits
            correct += sum(int(p) == lid[r["label"]] for p, r in zip(logits.argmax(-1), rows))
    res = {"data": args.data, "method": args.method, "reparam": args.reparam, "init": args.init, "mean_pooling": args.mean_pooling,
           "steps": total, "batch_size": args.batch_size, "lr": args.lr, "virtual_tokens": n,
           "max_tokens": args.max_tokens, "test_accuracy": None if args.no_test else correct / len(te),
           "train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / max(total, 1), 4),
           "threads": args.threads}
    print(json.dumps(res))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", action="store_true")
    ap.add_argument("--data")
    ap.add_argument("--model", default=os.path.join(ROOT, "models/all-MiniLM-L6-v2"))
    ap.add_argument("--method", choices=["prompt-tuning", "p-tuning", "p-tuning-v2"], default="prompt-tuning")
    ap.add_argument("--reparam", choices=["none", "mlp", "lstm"], default="none")
    ap.add_argument("--virtual-tokens", type=int, default=10)
    ap.add_argument("--init", choices=["peft", "vocab"], default="peft",
                    help="p-tuning / p-tuning-v2 encoder input: PEFT's N(0, 1) or sampled vocabulary embeddings "
                         "(softprompt's default); prompt-tuning always samples the vocabulary")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--head-lr", type=float)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--mean-pooling", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=20, help="print the training loss every N steps")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-test", action="store_true", help="skip the test-set evaluation (bench/train.sh times steps only)")
    args = ap.parse_args()
    if args.fixtures:
        fixtures()
    else:
        train(args)


if __name__ == "__main__":
    main()
