#!/usr/bin/env bash
# Smoke test of a built image: start it, wait for /health and /ready,
# classify, upload a task through the admin API and classify with it, run the
# image's HEALTHCHECK command, then stop it with SIGTERM while requests are in
# flight and check that it drained and exited 0 well inside the grace period.
#
# Usage: deploy/smoke-test.sh IMAGE [MODEL_DIR]
#   MODEL_DIR (e.g. models) is mounted read-only at /models; leave it out for
#   an image built with BAKE_MODEL=1.
#   ENGINE=docker|podman (default: podman if present, else docker)
#   PORT=18080           host port; the container runs with host networking
#                        when NETWORK=host (default: -p PORT:8080)
# Needs curl on the host. Prints each step with its time.
set -euo pipefail

image="${1:?usage: deploy/smoke-test.sh IMAGE [MODEL_DIR]}"
model_dir="${2:-}"
ENGINE="${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}"
PORT="${PORT:-18080}"
NETWORK="${NETWORK:-}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
name="softprompt-smoke-$$"
base="http://127.0.0.1:$PORT"
ms() { echo $(( $(date +%s%N) / 1000000 )); }
t0=$(ms)
say() { local d=$(( $(ms) - t0 )); printf '[%4d.%03ds] %s\n' $((d / 1000)) $((d % 1000)) "$*"; }
fail() { say "FAIL: $*"; "$ENGINE" logs "$name" 2>&1 | tail -20 || true; exit 1; }

work="$(mktemp -d)"
cleanup() { "$ENGINE" rm -f "$name" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
echo "smoke-token-$$" > "$work/admin_token"
chmod 0644 "$work/admin_token"

args=(run -d --name "$name" --read-only --tmpfs /tmp
      -v "$work/admin_token:/run/secrets/admin_token:ro"
      -e SOFTPROMPT_ADMIN_TOKEN_FILE=/run/secrets/admin_token)
if [[ "$NETWORK" == host ]]; then
    args+=(--network host -e "SOFTPROMPT_ADDR=0.0.0.0:$PORT")
else
    args+=(-p "127.0.0.1:$PORT:8080")
fi
[[ -n "$model_dir" ]] && args+=(-v "$(cd "$model_dir" && pwd):/models:ro")
# A writable copy of the shipped tasks for the upload step.
mkdir -p "$work/prompts" && cp "$repo"/prompts/*.safetensors "$work/prompts/" && chmod -R a+rwX "$work/prompts"
args+=(-v "$work/prompts:/prompts")

say "starting $image ($ENGINE)"
"$ENGINE" "${args[@]}" "$image" >/dev/null

wait_for() { # PATH SECONDS
    local deadline=$(( $(date +%s) + $2 ))
    until curl -fsS -o /dev/null "$base$1" 2>/dev/null; do
        [[ $(date +%s) -lt $deadline ]] || fail "$1 not 200 after $2 s"
        [[ "$("$ENGINE" inspect -f '{{.State.Running}}' "$name")" == true ]] || fail "container exited"
        sleep 0.2
    done
    say "$1 -> 200"
}
wait_for /health 120
wait_for /ready 120

classify() { # TASK TEXT
    curl -fsS "$base/v1/tasks/$1/classify" -H 'content-type: application/json' \
        -d "{\"inputs\": \"$2\"}"
}
out="$(classify sentiment 'a gripping, beautifully acted film')" || fail "classify"
say "classify sentiment: $out"
grep -q '"label"' <<<"$out" || fail "no label in $out"

code="$(curl -sS -o "$work/upload.json" -w '%{http_code}' -X PUT "$base/admin/tasks/smoke-copy" \
    -H "authorization: Bearer smoke-token-$$" -H 'content-type: application/octet-stream' \
    --data-binary @"$repo/prompts/sentiment.safetensors")"
[[ "$code" == 201 || "$code" == 200 ]] || fail "upload answered $code: $(cat "$work/upload.json")"
say "admin upload smoke-copy -> $code"
code="$(curl -sS -o /dev/null -w '%{http_code}' -X PUT "$base/admin/tasks/x" -H 'authorization: Bearer wrong' \
    -H 'content-type: application/octet-stream' --data-binary @"$repo/prompts/sentiment.safetensors")"
[[ "$code" == 401 ]] || fail "wrong token answered $code"
say "admin upload with a wrong token -> 401"
out="$(classify smoke-copy 'dull and lifeless')" || fail "classify smoke-copy"
say "classify smoke-copy: $out"

hc="$("$ENGINE" inspect -f '{{json .Config.Healthcheck}}' "$name" 2>/dev/null || true)"
say "image HEALTHCHECK: $hc"
"$ENGINE" exec "$name" /usr/local/bin/softprompt-healthcheck || fail "healthcheck command failed"
say "softprompt-healthcheck in the container -> exit 0"
user="$("$ENGINE" exec "$name" id -u)"
[[ "$user" == 10001 ]] || fail "runs as uid $user"
say "process uid: $user"

# SIGTERM with requests in flight: every one must get an answer (200, or 503
# once draining started), and the container must exit 0 before the grace period.
# 8 requests of 16 long inputs each keep the engine busy for a few seconds.
text="the central bank raised interest rates again while the striker scored twice in the final and a new phone shipped with a faster chip"
text="$text $text $text $text"
body="{\"inputs\": [$(for i in $(seq 1 16); do printf '"%s %d",' "$text" "$i"; done | sed 's/,$//')]}"
for i in $(seq 1 8); do
    (curl -sS -o /dev/null -w '%{http_code}\n' "$base/v1/tasks/topic/classify" -H 'content-type: application/json' \
        -d "$body" >> "$work/codes" 2>/dev/null || echo "none" >> "$work/codes") &
done
sleep 0.3
stop_start=$(ms)
"$ENGINE" stop -t 40 "$name" >/dev/null
stop_ms=$(( $(ms) - stop_start ))
wait
exit_code="$("$ENGINE" inspect -f '{{.State.ExitCode}}' "$name")"
say "stop (SIGTERM) took ${stop_ms} ms, exit code $exit_code; in-flight answers: $(sort "$work/codes" | uniq -c | tr '\n' ' ')"
[[ "$exit_code" == 0 ]] || fail "exit code $exit_code"
(( stop_ms < 40000 )) || fail "stop took ${stop_ms} ms"
! grep -q none "$work/codes" || fail "a request in flight got no answer"
"$ENGINE" logs "$name" 2>&1 | grep -iE "drain|shutdown|signal|stopp" | tail -5 || true
say "PASS"
