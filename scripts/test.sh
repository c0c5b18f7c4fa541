#!/usr/bin/env bash
# The project's test command (README, CI): fetches the default model if it is
# missing (idempotent), installs the outside tools of the deployment tests
# (scripts/test_deps.sh, idempotent), then runs every test. Extra arguments go
# to cargo test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/fetch_model.sh
bash scripts/test_deps.sh
export SOFTPROMPT_TEST_BIN="$PWD/.venv-test/bin"
cargo test "$@"
