#!/usr/bin/env bash
# Trains the shipped tasks in prompts/ from the data written by
# scripts/fetch_data.sh, with the default model. Usage: prompts/train.sh [task...]
# (tasks: sentiment topic spam; default all). Logs go to prompts/logs/ (ignored).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${BIN:-target/release/softprompt}
mkdir -p prompts/logs
run() {
    local name=$1; shift
    echo "== $name: $*"
    /usr/bin/time -f "$name wall %e s" "$BIN" train --quiet \
        --train "data/$name/train.jsonl" --test "data/$name/test.jsonl" \
        --output "prompts/$name.safetensors" --checkpoint "prompts/logs/$name.ckpt" --data-name "$name (scripts/fetch_data.sh)" "$@" \
        2>&1 | tee "prompts/logs/$name.log"
}
for t in "${@:-sentiment topic spam}"; do
  for task in $t; do
    case $task in
    sentiment) run sentiment --method prompt-tuning --virtual-tokens 10 --init vocab \
        --batch-size 32 --epochs 1 --lr 0.03 --eval-every 66 --val-fraction 0.05 --max-tokens 128 ;;
    topic) run topic --method p-tuning-v2 --reparam mlp --virtual-tokens 10 \
        --batch-size 16 --epochs 3 --lr 0.01 --head-lr 0.03 --eval-every 25 --val-fraction 0.1 --max-tokens 128 --patience 4 --seed 7 ;;
    spam) run spam --method p-tuning --reparam mlp --virtual-tokens 10 \
        --batch-size 16 --epochs 1 --lr 0.01 --head-lr 0.03 --eval-every 48 --val-fraction 0.05 --max-tokens 128 --patience 4 ;;
    *) echo "unknown task $task" >&2; exit 2 ;;
    esac
  done
done
