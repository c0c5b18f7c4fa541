#!/usr/bin/env bash
# Our packed f32 matmul against ONNX Runtime's (MLAS) at a MiniLM layer's four
# linear shapes, alternated ROUNDS times so that a shared machine's slow and
# fast minutes fall on both sides (see bench/README.md): each round runs
# `cargo bench --bench linear` and bench/ort_matmul.py once, each reporting the
# fastest of 7 timings per shape; the table gives the median over rounds.
#
# Usage: bench/linear_vs_ort.sh
# Environment (defaults): ROWS ("1736": the rows of one 64-request window of
#   bench/run.sh), THREADS (nproc), ROUNDS (4).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROWS="${ROWS:-1736}"
THREADS="${THREADS:-$(nproc)}"
ROUNDS="${ROUNDS:-4}"
PY=.venv/bin/python
if ! "$PY" -c "import onnxruntime, onnx" 2>/dev/null; then
    echo "error: $PY with onnxruntime and onnx is needed (bench/requirements-ort.txt; see bench/run.sh)" >&2
    exit 1
fi
# The benchmark binary's path as cargo reports it (not the newest file under
# target/, which may be another build's).
bin="$(cargo bench --bench linear --no-run --quiet --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "linear" and m.get("executable"):
        print(m["executable"])')"
[[ -x "$bin" ]] || { echo "error: cargo did not report the linear benchmark's binary" >&2; exit 1; }
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
ort_rows=()
for m in $ROWS; do ort_rows+=(--rows "$m"); done
for r in $(seq 1 "$ROUNDS"); do
    # "m=  1736 qkv      gemm ... | packed Avx2  118.0 (0.97×) | ..." -> "m=1736 qkv packed 118.0"
    RAYON_NUM_THREADS="$THREADS" LINEAR_ROWS="$ROWS" "$bin" |
        sed -n 's/^m= *\([0-9]*\) \([a-z_]*\) [^|]*| packed [A-Za-z0-9]* *\([0-9.]*\).*/m=\1 \2 packed \3/p' >>"$log"
    "$PY" bench/ort_matmul.py "${ort_rows[@]}" --threads "$THREADS" |
        sed -n 's/^\(m=[0-9]* [a-z_]*\) ort \([0-9.]*\).*/\1 ort \2/p' >>"$log"
done
cpu="$( (lscpu 2>/dev/null || true) | sed -n 's/^Model name: *//p' | head -n 1)"
echo "CPU: $cpu; $THREADS threads; $ROUNDS alternated rounds; GFLOP/s, median of the rounds' fastest-of-7"
python3 - "$log" <<'PY'
import statistics, sys
from collections import defaultdict
runs = defaultdict(list)
for line in open(sys.argv[1]):
    m, shape, side, rate = line.split()
    runs[(m, shape, side)].append(float(rate))
print(f"{'rows':>6} {'shape':9} {'packed':>7} {'ort':>7} {'packed/ort':>10}")
for (m, shape, side) in sorted({(m, s, "packed") for (m, s, _) in runs}, key=lambda k: (int(k[0][2:]), k[1])):
    p = statistics.median(runs[(m, shape, "packed")])
    o = statistics.median(runs[(m, shape, "ort")])
    print(f"{m[2:]:>6} {shape:9} {p:7.1f} {o:7.1f} {p / o:10.2f}")
PY
