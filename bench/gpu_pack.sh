#!/usr/bin/env bash
# Prepares, on the development machine (no GPU needed), what bench/gpu.sh
# reads on the GPU machine, in the git-ignored gpu/:
#   gpu/softprompt.xz  the `cuda` build (scripts/cuda_build.sh CAP), stripped, xz'd
#   gpu/model/         the default model, its float tensors in 16 bits (f16),
#                      with its config and tokenizer files
# then checks what one device call carries (gpu/, data/sentiment/ and the
# tracked tree) against its 64 MiB, and prints the GLIBC versions the binary
# needs (the GPU machine's libraries are older than this one's).
#
# Usage: bash bench/gpu_pack.sh [CAP]
#   CAP 80 (default): compute_80 PTX, which the driver JIT-compiles for 8.x and
#   9.0 alike; 90 gives sm_90a PTX for H100/H200 only.
# Then, on a session lent a GPU:  run(command="bash bench/gpu.sh", carry=["gpu", "data/sentiment"])
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CAP=${1:-80}
PY=${PY:-.venv/bin/python}
SRC=${SRC:-models/all-MiniLM-L6-v2}
[[ -f $SRC/model.safetensors ]] || { echo "error: $SRC missing (scripts/fetch_model.sh)" >&2; exit 1; }
[[ -f data/sentiment/test.jsonl ]] || { echo "error: data/sentiment missing (scripts/fetch_data.sh)" >&2; exit 1; }

bash scripts/cuda_build.sh "$CAP"
mkdir -p gpu
strip -o gpu/softprompt "target-cuda/softprompt-cuda-sm$CAP"
xz -6 -T2 -f gpu/softprompt

rm -rf gpu/model.tmp && mkdir -p gpu/model.tmp
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
    [[ -f $SRC/$f ]] && cp "$SRC/$f" gpu/model.tmp/
done
"$PY" - "$SRC/model.safetensors" gpu/model.tmp/model.safetensors <<'PYEOF'
import sys
import torch
from safetensors.torch import load_file, save_file
t = load_file(sys.argv[1])
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in t.items()}, sys.argv[2],
          metadata={"format": "pt"})
PYEOF
rm -rf gpu/model && mv gpu/model.tmp gpu/model

tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb gpu/softprompt.xz gpu/model data/sentiment | tail -1 | cut -f1)
total=$((tracked + carried))
echo "carried: gpu/ + data/sentiment $((carried / 1024)) KiB, tracked tree $((tracked / 1024)) KiB:" \
     "$((total / 1024 / 1024)) MiB of 64"
(( total < 64 * 1024 * 1024 )) || { echo "error: over the 64 MiB one device call carries" >&2; exit 1; }
xz -dc gpu/softprompt.xz > /tmp/softprompt-gpu-check
echo "GLIBC needed: $(objdump -T /tmp/softprompt-gpu-check | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1)"
rm -f /tmp/softprompt-gpu-check
