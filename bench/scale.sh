#!/usr/bin/env bash
# Tenancy at scale (issue 14): many tasks in a local directory store, Zipf
# traffic, a task cache of a fraction of the task bytes.
#
# Usage: bench/scale.sh            (env below; defaults in brackets)
#   SHALLOW [100000]  shallow tasks (prompts/sentiment.safetensors: 10 virtual tokens)
#   DEEP [1000]       deep tasks (prompts/topic.safetensors: 10-token prefix in 6 layers)
#   BUDGET [0.05]     --task-memory as a fraction of the tasks' bytes
#   REQUESTS [5000]   classify requests (one input each), Zipf(ZIPF [1.1]) over all tasks
#   THREADS [16]      client threads
#   STORE [/tmp/softprompt-scale]  where the store is made (hard links: little disk)
#   S3 [0]            1: the same tasks in a local S3 server instead (moto_server from
#                     .venv-test, scripts/test_deps.sh); moto keeps every object in memory,
#                     so keep SHALLOW to ~100,000 there
#   STORE_NICE [0]    S3=1: niceness of moto (19: it runs only on CPU the server leaves idle)
#
# Three measurements on the release binary:
#   1. start-up: `serve` with the budget, time until /ready 200, its RSS,
#      and how long after that the first full listing of the store ended;
#   2. cached: the traffic against it: requests/s, latency, hit ratio, cold
#      loads (mean, and the histogram bucket holding p50/p99), evictions, RSS;
#   3. all resident: a second server with no bound and no prefetch, the same
#      traffic once to load every requested task, then again: requests/s.
# Prints one JSON line per measurement and the ratio cached / all resident.
# Needs the reference venv's numpy (.venv, tests/reference/requirements.txt).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SHALLOW=${SHALLOW:-100000}
DEEP=${DEEP:-1000}
BUDGET=${BUDGET:-0.05}
REQUESTS=${REQUESTS:-5000}
THREADS=${THREADS:-16}
ZIPF=${ZIPF:-1.1}
STORE=${STORE:-/tmp/softprompt-scale}
PY=${PY:-.venv/bin/python}
BIN=target/release/softprompt
cargo build --release --quiet
"$PY" -c "import numpy" || { echo "error: $PY needs numpy (the reference venv)" >&2; exit 1; }

# The store: ids t0000000.. (shallow first, then deep), hard links to the two
# shipped task files (a file may have at most ~65,000 links: a fresh copy
# every 50,000). Remade when the counts differ.
want=$((SHALLOW + DEEP))
if [[ ! -f $STORE/.made ]] || [[ $(cat "$STORE/.made") != "$SHALLOW $DEEP" ]]; then
    rm -rf "$STORE" && mkdir -p "$STORE"
    "$PY" - "$STORE" "$SHALLOW" "$DEEP" <<'EOF'
import os, shutil, sys
store, shallow, deep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
base = None
for i in range(shallow + deep):
    src = "prompts/sentiment.safetensors" if i < shallow else "prompts/topic.safetensors"
    p = f"{store}/t{i:07d}.safetensors"
    if i in (0, shallow) or (i - (0 if i < shallow else shallow)) % 50000 == 0:
        shutil.copy(src, p)
        base = p
    else:
        os.link(base, p)
EOF
    echo "$SHALLOW $DEEP" > "$STORE/.made"
fi
prompts_flag=("--prompts" "$STORE")
if [[ ${S3:-0} == 1 ]]; then
    VT=.venv-test/bin
    [[ -x $VT/moto_server && -x $VT/python ]] || { echo "error: run scripts/test_deps.sh (moto_server, boto3)" >&2; exit 1; }
    port=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    # STORE_NICE: run moto at this niceness, so that the server's CPU is not
    # taken by the store (as when the store runs elsewhere); cold loads wait.
    nice -n "${STORE_NICE:-0}" "$VT/moto_server" -H 127.0.0.1 -p "$port" > /tmp/softprompt-scale-moto.log 2>&1 &
    moto=$!
    until curl -s "127.0.0.1:$port" >/dev/null; do sleep 0.2; done
    export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true \
        AWS_ENDPOINT_URL="http://127.0.0.1:$port" NO_PROXY=127.0.0.1,localhost
    s=$(date +%s)
    "$VT/python" - "$STORE" "$want" "$port" <<'EOF2'
import boto3, sys
from concurrent.futures import ThreadPoolExecutor
store, n, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
s3.create_bucket(Bucket="scale")
def put(i):
    with open(f"{store}/t{i:07d}.safetensors", "rb") as f:
        data = f.read()
    s3.put_object(Bucket="scale", Key=f"tasks/t{i:07d}.safetensors", Body=data)
with ThreadPoolExecutor(16) as ex:
    list(ex.map(put, range(n)))
EOF2
    echo "# S3: $want objects put into moto in $(( $(date +%s) - s )) s"
    prompts_flag=("--prompts" "s3://scale/tasks")
fi
# Tensor bytes per task as the server counts them (prompt + head, f32).
bytes=$((SHALLOW * (10 * 384 + 2 * 384 + 2) * 4 + DEEP * (10 * 6 * 2 * 384 + 5 * 384 + 5) * 4))
budget=$("$PY" -c "print(int($bytes * $BUDGET))")
echo "# bench/scale.sh $(date -u +%FT%TZ): $SHALLOW shallow + $DEEP deep tasks ($want), task bytes $bytes, budget $budget ($BUDGET);" \
     "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; $REQUESTS requests, Zipf $ZIPF, $THREADS client threads"

serve() { # port, extra flags...
    local port=$1; shift
    "$BIN" serve "${prompts_flag[@]}" --addr "127.0.0.1:$port" --log-format text "$@" > "/tmp/softprompt-scale-$port.log" 2>&1 &
    echo $!
}
ready() { # pid port -> ms
    local s e; s=$(date +%s%N)
    until curl -sf "127.0.0.1:$2/ready" >/dev/null; do
        kill -0 "$1" 2>/dev/null || { echo "error: serve exited; see /tmp/softprompt-scale-$2.log" >&2; exit 1; }
        sleep 0.05
    done
    e=$(date +%s%N); echo $(((e - s) / 1000000))
}
listed() { # port -> ms until /ready shows the store's first full listing done
    local s e; s=$(date +%s%N)
    until curl -s "127.0.0.1:$1/ready" | "$PY" -c "import json,sys; sys.exit(json.load(sys.stdin)['store']['listed_tasks'] is None)"; do
        sleep 0.2
    done
    e=$(date +%s%N); echo $(((e - s) / 1000000))
}
rss_mb() { awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$1/status"; }
# CPU seconds a process has used (user + system; its threads included).
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$1/stat"; }
# The store server's CPU seconds, when it runs here (moto: on the same cores).
store_cpu() { if [[ -n ${moto:-} ]]; then cpu_s "$moto"; else echo 0; fi; }
load() { "$PY" bench/scale_load.py --port "$1" --tasks "$want" --requests "$REQUESTS" --threads "$THREADS" --zipf "$ZIPF"; }

pid=$(serve 18090 --task-memory "$budget")
trap 'kill $pid ${pid2:-} ${moto:-} 2>/dev/null || true' EXIT
ms=$(ready "$pid" 18090)
rss0=$(rss_mb "$pid")
# A store too large to list within --listing-wait-ms is listed after /ready:
# the traffic below waits for that listing, so that it measures the steady
# state (on moto, listing pages cost the store server CPU on these cores).
lms=$(listed 18090)
echo "{\"startup\": {\"ready_ms\": $ms, \"rss_mb\": $rss0, \"listing_done_after_ready_ms\": $lms}}"
c0=$(cpu_s "$pid"); m0=$(store_cpu)
cached=$(load 18090)
c1=$(cpu_s "$pid"); m1=$(store_cpu)
echo "{\"cached\": $cached, \"rss_mb\": $(rss_mb "$pid"), \"budget_mb\": $((budget / 1048576)), \"server_cpu_s\": $(awk "BEGIN {print $c1 - $c0}"), \"store_cpu_s\": $(awk "BEGIN {print $m1 - $m0}")}"
kill "$pid"; wait "$pid" 2>/dev/null || true

pid2=$(serve 18091 --task-memory unlimited --prefetch false)
ready "$pid2" 18091 >/dev/null
listed 18091 >/dev/null
load 18091 >/dev/null
c0=$(cpu_s "$pid2"); m0=$(store_cpu)
warm=$(load 18091)
c1=$(cpu_s "$pid2"); m1=$(store_cpu)
echo "{\"all_resident\": $warm, \"rss_mb\": $(rss_mb "$pid2"), \"server_cpu_s\": $(awk "BEGIN {print $c1 - $c0}"), \"store_cpu_s\": $(awk "BEGIN {print $m1 - $m0}")}"
"$PY" -c "
import json, sys
c, w = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f'cached / all resident: {c[\"requests_per_s\"] / w[\"requests_per_s\"]:.3f} (target >= 0.9); hit ratio {c[\"hit_ratio\"]}')
" "$cached" "$warm"
