#!/usr/bin/env bash
# One command on a fresh machine: creates .venv/, installs, builds the
# stand-in model once, then runs the demo (a self-made GBIF export whose
# pictures are served from loopback). Extra arguments go to `gbif-embed demo`
# (and through it to Beam), e.g. ./run_local.sh --direct_num_workers 2
# Python: the existing .venv's, else the newest supported one found (3.13, 3.12,
# 3.11), or PYTHON=python3.12 ./run_local.sh; see scripts/setup_venv.sh.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh
VENV="${GBIF_EMBED_VENV:-.venv}"
MODEL="${GBIF_EMBED_MODEL:-demo/model-inception_v4}"
if [ ! -f "$MODEL/tfhub_module.pb" ]; then
  echo "building the Inception-v4 stand-in embedder once (STAND-IN, not the DMS model) in $MODEL"
  "$VENV/bin/gbif-embed" make-model --out "$MODEL" --arch inception_v4
fi
# Not exec: the run times its start from its own process start, not this script's.
"$VENV/bin/gbif-embed" demo --model "$MODEL" "$@"
