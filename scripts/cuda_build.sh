#!/usr/bin/env bash
# Builds the CUDA binary on a machine without a GPU:
#
#   bash scripts/cuda_build.sh          # compute capability 9.0 (H100/H200)
#   bash scripts/cuda_build.sh 80 90    # one binary per capability
#
# Runs scripts/cuda_toolchain.sh (idempotent), then, for each capability,
# `cargo build --release --features cuda` with CUDA_COMPUTE_CAP set, into
# target-cuda/ (CARGO_TARGET_DIR; separate from the CPU build's target/), and
# copies the binary to target-cuda/softprompt-cuda-sm<CAP>.
#
# candle-kernels compiles each kernel file to ONE PTX for ONE architecture
# (nvcc -gencode=arch=compute_<CAP>,code=sm_<CAP> --ptx); the driver
# JIT-compiles that PTX at load. PTX for compute_80 also runs on 8.6/8.9/9.0
# (and later); a capability of 90 or above becomes "90a" (cudaforge adds the
# suffix), whose PTX runs on 9.0 only. So `80` gives one binary for 8.x and
# H100/H200 alike; `90` is for H100/H200 only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/cuda_toolchain.sh >/dev/null
# shellcheck source=/dev/null
. .cuda/env.sh
[ $# -gt 0 ] || set -- 90
for cap in "$@"; do
  echo "== cargo build --release --features cuda (CUDA_COMPUTE_CAP=$cap, $CARGO_TARGET_DIR)" >&2
  start=$(date +%s)
  CUDA_COMPUTE_CAP=$cap nice -n 10 cargo build --release --features cuda --locked --bin softprompt
  cp "$CARGO_TARGET_DIR/release/softprompt" "$CARGO_TARGET_DIR/softprompt-cuda-sm$cap"
  echo "built $CARGO_TARGET_DIR/softprompt-cuda-sm$cap in $(($(date +%s) - start)) s" >&2
done
