#!/usr/bin/env bash
# One set-up for every use: creates the venv (.venv, or $VENV) and installs
# ffmpeg, torch, the worker's requirements and the OpenMMLab stack (DWPose).
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   plus the test tools
# Re-running it is cheap: pip skips what is installed and mmcv's wheel is cached.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1

if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then
  echo "installing ffmpeg"
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
fi

[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

"${PIP[@]}" -r requirements/torch.txt
"${PIP[@]}" -r requirements/worker.txt
"${PIP[@]}" ninja wheel
bash scripts/build_mmcv.sh "$PY"
"${PIP[@]}" -r requirements/openmmlab.txt
# xtcocotools' wheels are built against numpy 1 and fail under numpy 2: build it here,
# against the installed numpy and cython (its setup.py imports both).
"${PIP[@]}" --no-build-isolation --no-binary xtcocotools xtcocotools==1.14.3
"${PIP[@]}" --no-deps mmpose==1.3.2 mmdet==3.3.0
if [ "$WITH_TEST" = 1 ]; then
  "${PIP[@]}" -r requirements/test.txt
fi
"$PY" -c "import torch, cv2, diffusers, transformers, dlib, runpod; print('set-up ok: torch', torch.__version__)"
