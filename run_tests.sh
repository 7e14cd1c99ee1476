#!/usr/bin/env bash
# The test command: sets up .venv/ if needed, then runs the whole suite.
# Extra arguments go to pytest, e.g. ./run_tests.sh -k fetch
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh
exec .venv/bin/python -m pytest "$@"
