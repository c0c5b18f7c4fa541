#!/usr/bin/env python3
"""Linear probe on the frozen default model: the ceiling a head alone reaches.

Embeds every text of data/<task>/{train,test}.jsonl with the frozen encoder
(masked mean over the text tokens, as softprompt's `mean` pooling), cut to
--max-tokens, fits LogisticRegression on the train split and scores the test
split. It says how much of a task's gap to TF-IDF comes from the frozen
representation and the token budget rather than from the soft prompt.

  .venv/bin/python scripts/data/frozen_probe.py topic spam --max-tokens 128 256
"""
import argparse
import json
import os
import time

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from transformers import AutoModel, AutoTokenizer

from baseline import load  # (texts, labels) of one JSONL split, as the baseline reads it

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@torch.no_grad()
def embed(model, tok, texts, max_tokens, batch=32):
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append((h * m).sum(1) / m.sum(1))
    return torch.cat(out).numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tasks", nargs="+")
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[128])
    ap.add_argument("--model", default=os.path.join(ROOT, "models/all-MiniLM-L6-v2"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model).eval()
    for task in args.tasks:
        tr_text, tr_label = load(os.path.join(ROOT, "data", task, "train.jsonl"))
        te_text, te_label = load(os.path.join(ROOT, "data", task, "test.jsonl"))
        for n in args.max_tokens:
            t0 = time.time()
            xtr = embed(model, tok, tr_text, n)
            xte = embed(model, tok, te_text, n)
            sc = StandardScaler().fit(xtr)
            clf = LogisticRegression(C=1.0, max_iter=3000).fit(sc.transform(xtr), tr_label)
            acc = clf.score(sc.transform(xte), te_label)
            print(json.dumps({"task": task, "max_tokens": n, "probe_test_accuracy": round(acc, 4),
                              "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
