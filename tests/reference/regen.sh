#!/usr/bin/env bash
# Regenerate every reference fixture: creates .venv if missing, fetches the default
# model if missing, runs the generators, then re-checks everything with the NumPy spec.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
    .venv/bin/pip install -r tests/reference/requirements.txt
fi
.venv/bin/python tests/reference/make_fixtures.py
.venv/bin/python tests/reference/make_bin_fixture.py
if bash scripts/fetch_model.sh; then
    .venv/bin/python tests/reference/make_minilm_expected.py
else
    echo "warning: default model unavailable; minilm fixtures not regenerated" >&2
fi
.venv/bin/python tests/reference/check_semantics.py
