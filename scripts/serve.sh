#!/usr/bin/env bash
# The README's serve command: fetches the default model on first use, builds
# the release binary and serves the default model with the tasks in prompts/.
# Extra arguments go to `softprompt serve` (see `softprompt serve --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/fetch_model.sh
exec cargo run --release -- serve "$@"
