#!/usr/bin/env python3
"""TF-IDF + logistic regression baseline on the data/<task>/{train,test}.jsonl
splits written by scripts/fetch_data.sh (needs scikit-learn).

Usage: .venv/bin/python scripts/data/baseline.py [data_dir]
Prints one JSON line per task: test accuracy, macro-F1, seconds.
Features: word 1-2-grams, sublinear tf, min_df 2; LogisticRegression(C=10).
The text is the same the trainer sees (the full JSONL text, not cut to tokens).
"""
import json
import os
import sys
import time

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score


def load(path):
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(l) for l in f if l.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "data"
    for task in ["sentiment", "topic", "spam"]:
        d = os.path.join(root, task)
        if not os.path.isfile(os.path.join(d, "train.jsonl")):
            print(f"{task}: missing (run scripts/fetch_data.sh)", file=sys.stderr)
            continue
        t0 = time.time()
        xtr, ytr = load(os.path.join(d, "train.jsonl"))
        xte, yte = load(os.path.join(d, "test.jsonl"))
        vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
        clf = LogisticRegression(C=10, max_iter=2000)
        clf.fit(vec.fit_transform(xtr), ytr)
        pred = clf.predict(vec.transform(xte))
        print(json.dumps({
            "task": task, "train": len(ytr), "test": len(yte),
            "accuracy": round(accuracy_score(yte, pred), 4),
            "macro_f1": round(f1_score(yte, pred, average="macro"), 4),
            "seconds": round(time.time() - t0, 1),
        }))


if __name__ == "__main__":
    main()
