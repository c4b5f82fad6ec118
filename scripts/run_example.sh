#!/usr/bin/env bash
# The main job: set-up, the weights (unless present), then one real job
# (test_input.json: the sample face and speech in examples/) through handler.py,
# exactly as RunPod's local test runs it.
#
# Models default to ./models, filled from weights.lock.json (needs Hugging Face
# and the weight hosts). To run offline on other models (say the parity
# fixture's), set MUSETALK_MODELS_DIR and MUSETALK_WEIGHTS_LOCK=none.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MUSETALK_MODELS_DIR=${MUSETALK_MODELS_DIR:-$PWD/models}
# test_input.json names its files relative to this folder.
export MUSETALK_LOCAL_INPUT_DIR=${MUSETALK_LOCAL_INPUT_DIR:-$PWD/examples}
# On Apple silicon, ops without an MPS kernel run on the CPU instead of failing;
# torch reads this when it loads, so it is set here, before handler.py starts.
export PYTORCH_ENABLE_MPS_FALLBACK=${PYTORCH_ENABLE_MPS_FALLBACK:-1}
if [ "${MUSETALK_WEIGHTS_LOCK:-}" != "none" ]; then
  # Skips every file already present with the right SHA-256.
  "${VENV:-.venv}/bin/python" -m builder.fetch_weights --dest "$MUSETALK_MODELS_DIR"
fi
exec "${VENV:-.venv}/bin/python" handler.py
