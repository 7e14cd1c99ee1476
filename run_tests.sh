#!/usr/bin/env bash
# The test command: sets up .venv/ if needed, then runs the whole suite.
# Extra arguments go to pytest, e.g. ./run_tests.sh -k fetch
# Python: the existing .venv's, else the newest supported one found (3.13, 3.12,
# 3.11), or PYTHON=python3.12 ./run_tests.sh; see scripts/setup_venv.sh.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh
VENV="${GBIF_EMBED_VENV:-.venv}"
exec "$VENV/bin/python" -m pytest "$@"
