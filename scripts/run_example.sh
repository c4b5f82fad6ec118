#!/usr/bin/env bash
# The main job: set-up, the weights (unless present), then one real job
# (test_input.json) through handler.py, exactly as RunPod's local test runs it.
#
# Models default to ./models, filled from weights.lock.json (needs Hugging Face
# and the weight hosts). To run offline on other models (say the parity
# fixture's), set MUSETALK_MODELS_DIR and MUSETALK_WEIGHTS_LOCK=none.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUSETALK_MODELS_DIR=${MUSETALK_MODELS_DIR:-$PWD/models}
export MUSETALK_LOCAL_INPUT_DIR=${MUSETALK_LOCAL_INPUT_DIR:-$(cd .. && pwd)/shared}
if [ "${MUSETALK_WEIGHTS_LOCK:-}" != "none" ]; then
  # Skips every file already present with the right SHA-256.
  "${VENV:-.venv}/bin/python" -m builder.fetch_weights --dest "$MUSETALK_MODELS_DIR"
fi
exec "${VENV:-.venv}/bin/python" handler.py
