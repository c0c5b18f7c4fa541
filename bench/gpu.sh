#!/usr/bin/env bash
# The GPU check of issue 12, as ONE script for a machine with an NVIDIA GPU,
# its driver, and Python with torch, transformers and peft, but no Rust
# toolchain and no network. bench/gpu_pack.sh prepares, on the development
# machine, what it reads (git-ignored, under 64 MiB in all):
#   gpu/softprompt.xz   the release binary built with --features cuda, stripped
#   gpu/model/          a 16-bit copy of the default model (and its tokenizer)
#   data/sentiment/     the workload's sentences (scripts/fetch_data.sh)
# plus the tracked tree (tests/fixtures/minilm-*, bench/*.py).
#
# It prints, and writes under $OUT (bench/out/gpu):
#   1. parity on the GPU: f32 logits against PEFT on the parity fixtures (the
#      reference recomputed here with the carried weights, in f32 on the CPU:
#      bench/fixture_reference.py), target ≤ 1e-4; f16/bf16 on the 64-task
#      workload against PEFT f32 on the GPU: |Δp| ≤ 1e-2 and the same top label
#      on ≥ 99.5% of rows;
#   2. throughput on the bench/run.sh workload (2,048 sentences, windows of 64)
#      at 64 and 1,000 tasks, half shallow, half deep: (a) mixed-task batches,
#      (b) one task per batch (the engine, `softprompt workload run`), (c) PEFT
#      on PyTorch, (d) plain PyTorch BertModel on the one-task batches, both in
#      the same 16-bit dtype on the same GPU (bench/peft_workload.py);
#   3. the HTTP server on the GPU at saturation over the 1,000 tasks (clients on
#      the host CPUs: bench/saturate.py) against the bare engine's (a);
#   then the table with the targets (bench/gpu_report.py).
#
# Usage: bash bench/gpu.sh
# Env (defaults): DEVICE (cuda), DTYPE16 (f16), TASK_COUNTS ("64 1000"),
#   REQUESTS (2048), WINDOW (64), BIN (gpu/softprompt.xz unpacked; or a path),
#   MODEL (gpu/model), PY (python3), OUT (bench/out/gpu), SERVER_SECS (20).
# DEVICE=cpu runs every step on the CPU with the CPU binary
# (BIN=target/release/softprompt MODEL=models/all-MiniLM-L6-v2 DTYPE16=bf16):
# the smoke test of this script where there is no GPU (bench/README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE=${DEVICE:-cuda}
DTYPE16=${DTYPE16:-f16}
TASK_COUNTS=${TASK_COUNTS:-64 1000}
REQUESTS=${REQUESTS:-2048}
WINDOW=${WINDOW:-64}
MODEL=${MODEL:-gpu/model}
PY=${PY:-python3}
OUT=${OUT:-bench/out/gpu}
SERVER_SECS=${SERVER_SECS:-20}
DATA=(data/sentiment/test.jsonl data/sentiment/train.jsonl)
start=$(date +%s)
step() { echo "== [$(($(date +%s) - start)) s] $*"; }
mkdir -p "$OUT"

# The binary, and the CUDA libraries it links (the driver's libcuda.so.1; the
# CUDA 13 runtime, cuBLAS, cuRAND and NVRTC from Python's nvidia wheels, which
# torch brings, or a system CUDA).
if [[ -z ${BIN:-} ]]; then
    [[ -f gpu/softprompt.xz ]] || { echo "error: gpu/softprompt.xz missing (bench/gpu_pack.sh)" >&2; exit 1; }
    BIN=$OUT/softprompt
    xz -dc gpu/softprompt.xz > "$BIN"
    chmod +x "$BIN"
fi
if [[ $DEVICE != cpu ]]; then
    libs=$("$PY" - <<'EOF'
import pathlib
dirs = set()
try:
    import nvidia
    for base in nvidia.__path__:
        for p in pathlib.Path(base).rglob("lib*.so*"):
            if any(k in p.name for k in ("cublas", "cudart", "curand", "nvrtc")):
                dirs.add(str(p.parent))
except ImportError:
    pass
print(":".join(sorted(dirs)))
EOF
)
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:/usr/local/cuda/lib64"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    if ldd "$BIN" | grep "not found"; then
        echo "error: $BIN cannot find the libraries above (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)" >&2
        exit 1
    fi
fi
need=$(objdump -T "$BIN" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1 || true)
echo "binary needs ${need:-GLIBC ?}; this machine: $(ldd --version | head -1)"
"$BIN" --version
gpu=$([[ $DEVICE == cpu ]] && grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //' \
      || nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
"$PY" - "$OUT/meta.json" "$DEVICE" "$DTYPE16" "$TASK_COUNTS" "$gpu" <<'EOF'
import json, sys, time
out, device, dtype16, counts, gpu = sys.argv[1:]
json.dump({"device": device, "dtype16": dtype16, "task_counts": [int(c) for c in counts.split()],
           "hardware": gpu, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, open(out, "w"))
EOF

step "1. parity: PEFT reference for $MODEL's weights, then the engine on $DEVICE"
"$PY" bench/fixture_reference.py --model "$MODEL" --fixtures tests/fixtures/minilm-expected.json \
    --adapters tests/fixtures/minilm-adapters --out "$OUT/fixtures-expected.json"
"$BIN" workload parity --model "$MODEL" --expected "$OUT/fixtures-expected.json" \
    --adapters tests/fixtures/minilm-adapters --device "$DEVICE" --dtype f32 --kernels device \
    | tee "$OUT/parity-f32.jsonl"
"$BIN" workload parity --model "$MODEL" --expected "$OUT/fixtures-expected.json" \
    --adapters tests/fixtures/minilm-adapters --device "$DEVICE" --dtype "$DTYPE16" --kernels device \
    | tee "$OUT/parity-$DTYPE16.jsonl"

for n in $TASK_COUNTS; do
    w=$OUT/w$n
    step "2. $n tasks: prepare (tasks, PEFT adapters, native store, requests)"
    store=""
    [[ $n == "${TASK_COUNTS##* }" ]] && store="--store $OUT/store$n"
    # shellcheck disable=SC2086 # $store is one flag and its value, or nothing
    "$BIN" workload prepare --model "$MODEL" --out "$w" --tasks "$n" --requests "$REQUESTS" \
        --window "$WINDOW" --data "${DATA[@]}" $store
    step "2. $n tasks: (a), (b) the engine ($DTYPE16)"
    "$BIN" workload run --model "$MODEL" --out "$w" --device "$DEVICE" --dtype "$DTYPE16" --kernels device
    if [[ $n == "${TASK_COUNTS%% *}" ]]; then
        step "2. $n tasks: PEFT f32 on $DEVICE, the reference of the $DTYPE16 check"
        "$PY" bench/peft_workload.py --out "$w" --round 1 --device "$DEVICE" --dtype f32 \
            --result "torch_c_${DEVICE}_f32.json"
    fi
    step "2. $n tasks: (c) PEFT ($DTYPE16)"
    "$PY" bench/peft_workload.py --out "$w" --round 1 --device "$DEVICE" --dtype "$DTYPE16" \
        --result "torch_c_${DEVICE}_${DTYPE16}.json"
    step "2. $n tasks: (d) plain BertModel ($DTYPE16)"
    "$PY" bench/peft_workload.py --out "$w" --round 1 --device "$DEVICE" --dtype "$DTYPE16" --path d \
        --result "torch_d_${DEVICE}_${DTYPE16}.json"
done

n=${TASK_COUNTS##* }
step "3. the server on $DEVICE at saturation, $n tasks"
port=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$BIN" serve --model "$MODEL" --prompts "$OUT/store$n" --device "$DEVICE" --kernels device \
    --dtype "$DTYPE16" --addr "127.0.0.1:$port" --task-memory unlimited --sync-interval-ms 0 \
    > "$OUT/serve.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
until curl -sf "127.0.0.1:$port/ready" >/dev/null; do
    kill -0 "$pid" 2>/dev/null || { echo "error: serve exited; see $OUT/serve.log" >&2; tail -5 "$OUT/serve.log" >&2; exit 1; }
    sleep 0.2
done
"$PY" bench/saturate.py --port "$port" --requests "$OUT/w$n/requests.jsonl" --duration "$SERVER_SECS" \
    | tee "$OUT/server.json"
kill "$pid"; wait "$pid" 2>/dev/null || true

step "report"
"$PY" bench/gpu_report.py "$OUT"
