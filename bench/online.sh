#!/usr/bin/env bash
# Online latency (issue 15, point 6): the real server under open-loop Poisson
# arrivals of single-input requests over many tasks with Zipf popularity, the
# offered load stepped up to saturation, once with the server's mixed-task
# batching and once with one task per batch (the hidden, benchmark-only
# `serve --batch-policy one-task`). Both servers run side by side and their
# steps take turns (one at a time), so a host whose speed drifts over minutes
# weighs on both ladders alike.
#
# Usage: bench/online.sh            (env below; defaults in brackets)
#   TASKS [1000]       tasks in the store, ids t0000..: in turn sentiment (shallow,
#                      10 virtual tokens), topic (deep, 10-token prefix in 6 layers)
#                      and spam (shallow), hard links to prompts/*.safetensors
#   ZIPF [1.1]         task popularity Zipf(ZIPF) over a seeded ranking (SEED [7])
#   POLICIES ["mixed one-task"]  the servers measured, their steps alternating
#   DURATION [20]      seconds of arrivals per step
#   RATE0 [10]         first offered load (requests/s); each next one is FACTOR [1.25] times it,
#   MAX_STEPS [30]     at most MAX_STEPS, until the first step whose p99 exceeds LIMIT_MS [250];
#   STEPS [""]         or these loads instead (e.g. "10 20 40 80")
#   PAST [1]           steps run after the first over the limit (the plot's saturated side)
#   REFINE [2]         bisection steps between the last load within the limit and the first over
#   UNLOADED [200]     sequential requests for the unloaded latency (after 50 of warm-up)
#   STORE [/tmp/softprompt-online]  where the store is made (remade when TASKS changes)
#   OUT [bench/out/online]          results: <policy>.json, summary.json, serve logs
#   PNG [bench/online.png]          the plot (commit it from a full run only; point PNG
#                      elsewhere for a smoke run)
#   SERVE_FLAGS [""]   extra `serve` flags for both servers
#
# For each policy: `serve --prompts $STORE --task-memory unlimited
# --sync-interval-ms 0 --batch-policy <policy>` (every task resident, no store
# polling), wait for /ready; then bench/online_load.py over all of them, each
# server its own ladder, one measurement at a time: the unloaded latency,
# then the steps; one JSON line per step (offered and achieved load, goodput,
# p50/p99 from the scheduled send time, errors, client send lag and CPU). Then
# the report: each policy's knee (highest load with p99 <= LIMIT_MS), the knee
# ratio mixed / one-task (target >= 1.5), p99 at half the knee against 3x the
# unloaded p50 (target <= 3x), and the plot of p50/p99 against load.
# Client and server share the machine (2 cores in BENCHMARKS.md); the client is
# one asyncio process, its CPU share per step is in the results.
#
# Needs the reference venv's numpy (.venv, tests/reference/requirements.txt);
# installs matplotlib into it when missing (bench/requirements-online.txt).
# A full run (both policies, defaults) is about 35 steps of ~21 s (the ladder
# climbs past 120 req/s for mixed on 2 cores): roughly 15 minutes. A smoke run:
#   TASKS=200 DURATION=5 STEPS="20 40 80 120" REFINE=1 UNLOADED=50 \
#   OUT=bench/out/online-smoke PNG=bench/out/online-smoke/online.png bench/online.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TASKS=${TASKS:-1000}
ZIPF=${ZIPF:-1.1}
SEED=${SEED:-7}
POLICIES=${POLICIES:-mixed one-task}
DURATION=${DURATION:-20}
RATE0=${RATE0:-10}
FACTOR=${FACTOR:-1.25}
MAX_STEPS=${MAX_STEPS:-30}
STEPS=${STEPS:-}
PAST=${PAST:-1}
REFINE=${REFINE:-2}
LIMIT_MS=${LIMIT_MS:-250}
UNLOADED=${UNLOADED:-200}
STORE=${STORE:-/tmp/softprompt-online}
OUT=${OUT:-bench/out/online}
PNG=${PNG:-bench/online.png}
SERVE_FLAGS=${SERVE_FLAGS:-}
PY=${PY:-.venv/bin/python}
BIN=${CARGO_TARGET_DIR:-target}/release/softprompt
SENTENCES=data/sentiment/test.jsonl

cargo build --release --locked --quiet
"$PY" -c "import numpy" || { echo "error: $PY needs numpy (the reference venv)" >&2; exit 1; }
[[ -f $SENTENCES ]] || { echo "error: $SENTENCES missing (scripts/fetch_data.sh)" >&2; exit 1; }
if ! "$PY" -c "import matplotlib" 2>/dev/null; then
    echo "installing matplotlib into .venv for the plot (bench/requirements-online.txt)" >&2
    "$PY" -m pip install --quiet -r bench/requirements-online.txt
fi
mkdir -p "$OUT"

# The store: t0000.. in turn sentiment, topic, spam; hard links to one copy
# of each shipped file.
if [[ ! -f $STORE/.made ]] || [[ $(cat "$STORE/.made") != "$TASKS" ]]; then
    rm -rf "$STORE" && mkdir -p "$STORE/.src"
    "$PY" - "$STORE" "$TASKS" <<'EOF'
import os, shutil, sys
store, n = sys.argv[1], int(sys.argv[2])
width = max(4, len(str(n - 1)))
kinds = ["sentiment", "topic", "spam"]
for k in kinds:
    shutil.copy(f"prompts/{k}.safetensors", f"{store}/.src/{k}.safetensors")
for i in range(n):
    os.link(f"{store}/.src/{kinds[i % 3]}.safetensors", f"{store}/t{i:0{width}d}.safetensors")
EOF
    echo "$TASKS" > "$STORE/.made"
fi

echo "# bench/online.sh $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo '+dirty'):" \
     "$TASKS tasks, Zipf $ZIPF, $DURATION s/step, p99 limit $LIMIT_MS ms;" \
     "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"

pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
ports=() results=()
for policy in $POLICIES; do
    port=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    log="$OUT/serve-$policy.log"
    # shellcheck disable=SC2086 # SERVE_FLAGS is a list of flags
    "$BIN" serve --prompts "$STORE" --addr "127.0.0.1:$port" --task-memory unlimited \
        --sync-interval-ms 0 --batch-policy "$policy" $SERVE_FLAGS > "$log" 2>&1 &
    pids+=($!)
    s=$(date +%s%N)
    until curl -sf "127.0.0.1:$port/ready" >/dev/null; do
        kill -0 "${pids[-1]}" 2>/dev/null || { echo "error: serve exited; see $log" >&2; exit 1; }
        sleep 0.1
    done
    echo "{\"policy\": \"$policy\", \"ready_ms\": $((($(date +%s%N) - s) / 1000000))}"
    ports+=("$port") results+=("$OUT/$policy.json")
done
rates=()
[[ -n $STEPS ]] && read -r -a rates <<< "$STEPS"
# shellcheck disable=SC2086 # POLICIES is a list of words
"$PY" bench/online_load.py run --port "${ports[@]}" --policy $POLICIES --out "${results[@]}" \
    --tasks "$TASKS" --sentences "$SENTENCES" --zipf "$ZIPF" --seed "$SEED" \
    --duration "$DURATION" --rate0 "$RATE0" --factor "$FACTOR" --max-steps "$MAX_STEPS" \
    ${rates[@]+--rates "${rates[@]}"} --past "$PAST" --refine "$REFINE" --limit-ms "$LIMIT_MS" \
    --unloaded "$UNLOADED" \
    --server-info "{\"flags\": \"--task-memory unlimited --sync-interval-ms 0 --batch-policy {policy} $SERVE_FLAGS\"}"
for p in "${pids[@]}"; do kill "$p"; wait "$p" 2>/dev/null || true; done
pids=()
"$PY" bench/online_load.py report --png "$PNG" --summary "$OUT/summary.json" "${results[@]}"
