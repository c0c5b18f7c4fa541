#!/usr/bin/env bash
# Training speed side by side: seconds per optimizer step of `softprompt
# train` and of PEFT on PyTorch (tests/reference/train_peft.py), for the three
# shipped recipes (prompts/train.sh), in one run on the same machine, with the
# same threads, batch size, token budget, method and prompt length.
#
# Usage: bench/train.sh [STEPS]        (default 30 steps per recipe and side)
# Needs: target/release/softprompt (cargo build --release), data/ from
# scripts/fetch_data.sh, and the reference venv:
#   python3 -m venv .venv && .venv/bin/pip install -r tests/reference/requirements.txt
# Env: THREADS (default 2), TASKS (default "sentiment topic spam").
#
# Both sides time the steps only (forward, backward, update; PEFT's includes
# tokenizing its batch, ours tokenizes up front): model loading, validation
# and the test set are outside the clock. Each side trains on its own batch
# order: PEFT pads each batch to its longest row, softprompt packs rows
# without padding, as each does when a user trains with it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STEPS=${1:-30}
THREADS=${THREADS:-2}
TASKS=${TASKS:-sentiment topic spam}
BIN=${BIN:-target/release/softprompt}
PY=.venv/bin/python
[[ -x $BIN ]] || { echo "error: $BIN missing; run cargo build --release" >&2; exit 1; }
"$PY" -c "import torch, transformers, peft" 2>/dev/null || {
    echo "error: $PY with torch, transformers and peft is needed (see the header of this script)" >&2; exit 1; }
for t in $TASKS; do
    [[ -f data/$t/train.jsonl ]] || { echo "error: data/$t missing; run scripts/fetch_data.sh" >&2; exit 1; }
done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# Recipe flags shared by both sides, then each side's own spelling of the init.
recipe() {
    case $1 in
    sentiment) echo "--method prompt-tuning --virtual-tokens 10 --batch-size 32 --lr 0.03 --max-tokens 128" ;;
    topic) echo "--method p-tuning-v2 --reparam mlp --virtual-tokens 10 --batch-size 16 --lr 0.01 --head-lr 0.03 --max-tokens 128" ;;
    spam) echo "--method p-tuning --reparam mlp --virtual-tokens 10 --batch-size 16 --lr 0.01 --head-lr 0.03 --max-tokens 128" ;;
    *) echo "unknown task $1" >&2; exit 2 ;;
    esac
}

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
flags=$(grep -m1 '^flags' /proc/cpuinfo)
isa=AVX2
[[ $flags == *avx512f* ]] && isa=AVX-512
[[ $flags == *avx512_vnni* ]] && isa="$isa+VNNI"
echo "# bench/train.sh $(date -u +%FT%TZ) — $cpu ($isa), $(nproc) cores, $THREADS threads, $STEPS steps per side"
for t in $TASKS; do
    # shellcheck disable=SC2046
    RAYON_NUM_THREADS=$THREADS "$BIN" train --quiet --train "data/$t/train.jsonl" --val-fraction 0 \
        --steps "$STEPS" --output "$out/$t.safetensors" --checkpoint "$out/$t.ckpt" $(recipe "$t") \
        > "$out/$t.ours" 2> "$out/$t.ours.err" || { cat "$out/$t.ours.err" >&2; exit 1; }
    init=()
    [[ $t != sentiment ]] && init=(--init vocab)
    # shellcheck disable=SC2046
    "$PY" tests/reference/train_peft.py --data "data/$t" --steps "$STEPS" --threads "$THREADS" \
        --mean-pooling --no-test --log-every 1000000 "${init[@]}" $(recipe "$t") \
        > "$out/$t.peft" 2> "$out/$t.peft.err" || { cat "$out/$t.peft.err" >&2; exit 1; }
done
"$PY" - "$out" $TASKS <<'EOF'
import json, re, sys
out, tasks = sys.argv[1], sys.argv[2:]
print("| recipe | softprompt s/step | PEFT s/step | softprompt / PEFT |")
print("| --- | --- | --- | --- |")
for t in tasks:
    ours = re.search(r"\(([\d.]+)s per step\)", open(f"{out}/{t}.ours").read())
    peft = json.loads(open(f"{out}/{t}.peft").read().strip().splitlines()[-1])
    o, p = float(ours.group(1)), peft["seconds_per_step"]
    print(f"| {t} | {o:.3f} | {p:.3f} | {o / p:.2f}× |")
EOF
