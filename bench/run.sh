#!/usr/bin/env bash
# Many-task workload vs HF PEFT, in one go (see bench/README.md):
#   (a) the engine, one mixed-task batch per arrival window;
#   (b) the engine, one batch per task per window;
#   (c) HF PEFT + transformers on PyTorch CPU, one batch per task per window;
#   (d) the roofline: the workload's useful FLOPs at the f32 matmul rate
#       measured at the model's shapes in the same run;
#   (a0) the engine on the plain encoder (no prompt), one batch per window;
#   (e) ONNX Runtime f32 and (f) ONNX Runtime int8 (dynamic quantization) on
#       the plain encoder, each padded in arrival order (one batch per window)
#       and length-sorted (batches of SORTED_BATCH).
# Prints the table, the ratios (a)/(c), (a)/(b), (a)/(d), the like-for-like
# (a0)/best (e) and (a0)/best (f), and the max |logit| differences (a)-(c),
# (a0)-(e); writes everything under $OUT.
#
# Usage: bench/run.sh
# Environment (defaults): THREADS (nproc) threads for every side,
#   ROUNDS (3) interleaved rounds, REQUESTS (2048), WINDOW (64),
#   SORTED_BATCH (16), OUT (bench/out), SOFTPROMPT_MODEL (models/all-MiniLM-L6-v2).
#   Anything else in the environment (e.g. OMP_WAIT_POLICY) reaches PyTorch
#   unchanged.
# Idempotent: fetches the model and data only when missing, installs
# onnxruntime/onnx into .venv only when missing (bench/requirements-ort.txt),
# exports the ONNX models only when stale (bench/export_onnx.py), rebuilds the
# same seeded workload, replaces the previous results.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

THREADS="${THREADS:-$(nproc)}"
ROUNDS="${ROUNDS:-3}"
REQUESTS="${REQUESTS:-2048}"
WINDOW="${WINDOW:-64}"
SORTED_BATCH="${SORTED_BATCH:-16}"
OUT="${OUT:-bench/out}"
MODEL="${SOFTPROMPT_MODEL:-models/all-MiniLM-L6-v2}"
PY=.venv/bin/python

if ! "$PY" -c "import torch, transformers, peft" 2>/dev/null; then
    cat >&2 <<EOF
error: $PY with torch, transformers and peft is needed for path (c). Make it with
    python3 -m venv .venv && .venv/bin/pip install -r tests/reference/requirements.txt
(torch 2.15, transformers 4.57.6, peft 0.21.2; about 3 GB).
EOF
    exit 1
fi
if ! "$PY" -c "import onnxruntime, onnx" 2>/dev/null; then
    echo "installing onnxruntime and onnx into .venv for paths (e)/(f) (bench/requirements-ort.txt)" >&2
    "$PY" -m pip install --quiet -r bench/requirements-ort.txt
fi
SOFTPROMPT_MODEL_DIR="$MODEL" scripts/fetch_model.sh >/dev/null
if ! scripts/fetch_data.sh >/dev/null; then
    # Only data/sentiment is used; the other sets may fail to fetch (npm).
    [[ -f data/sentiment/test.jsonl && -f data/sentiment/train.jsonl ]] || {
        echo "error: data/sentiment missing and scripts/fetch_data.sh failed" >&2
        exit 1
    }
fi

cargo build --release --quiet --example workload
BIN=target/release/examples/workload
"$BIN" --model "$MODEL" --out "$OUT" prepare --requests "$REQUESTS" --window "$WINDOW"
rm -f "$OUT"/rust_round*.json "$OUT"/peft_round*.json "$OUT"/ort_round*.json "$OUT"/summary.json "$OUT"/report.md
# The plain encoder as ONNX, f32 and int8; checked against PyTorch (< 1e-3).
"$PY" bench/export_onnx.py --model "$MODEL" --out "$OUT/onnx"

cpu="$( (lscpu 2>/dev/null || true) | sed -n 's/^Model name: *//p' | head -n 1)"
load_start="$(uptime | sed 's/.*load average: //')"
echo "CPU: $cpu; $(nproc) CPUs; $THREADS threads; load average at start: $load_start"
if awk -v l="${load_start%%,*}" -v n="$(nproc)" 'BEGIN { exit !(l > n / 2) }'; then
    # Under contention PyTorch's OpenMP workers busy-wait for descheduled
    # peers and (c) slows several-fold, far more than the engine (bench/README.md).
    echo "warning: the machine is busy (load ${load_start%%,*} on $(nproc) CPUs): (c) is distorted;" \
        "only a quiet run counts (OMP_WAIT_POLICY=PASSIVE softens the distortion)" >&2
fi
rust_round() { RAYON_NUM_THREADS="$THREADS" "$BIN" --model "$MODEL" --out "$OUT" run --round "$1"; }
peft_round() { "$PY" bench/peft_workload.py --out "$OUT" --round "$1" --threads "$THREADS"; }
ort_round() {
    "$PY" bench/ort_workload.py --out "$OUT" --onnx "$OUT/onnx" --round "$1" --threads "$THREADS" \
        --sorted-batch "$SORTED_BATCH"
}
for r in $(seq 1 "$ROUNDS"); do
    # Reverse the order every other round, so slow drift in background load
    # falls on every side alike.
    if (( r % 2 )); then
        rust_round "$r"; peft_round "$r"; ort_round "$r"
    else
        ort_round "$r"; peft_round "$r"; rust_round "$r"
    fi
done
load_end="$(uptime | sed 's/.*load average: //')"

echo
python3 bench/report.py "$OUT" --cpu "$cpu" --load "start $load_start; end $load_end" | tee "$OUT/report.md"
