#!/usr/bin/env bash
# The project's test command (README, CI): fetches the default model if it is
# missing (idempotent), then runs every test. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/fetch_model.sh
cargo test "$@"
