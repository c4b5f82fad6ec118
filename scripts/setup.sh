#!/usr/bin/env bash
# One set-up for every use: creates the venv (.venv, or $VENV) and installs
# ffmpeg, torch, the worker's requirements and, where wanted, the OpenMMLab
# stack (DWPose landmarks; without it the dlib back-end is used).
#   scripts/setup.sh                  runtime only
#   scripts/setup.sh --test           plus the test tools
#   scripts/setup.sh --openmmlab      OpenMMLab too (the default on Linux; on macOS only when asked)
#   scripts/setup.sh --no-openmmlab   without OpenMMLab (dlib landmarks only)
# Linux takes ffmpeg from apt, macOS from Homebrew. Re-running it is cheap:
# pip skips what is installed and mmcv's wheel is cached.
set -euo pipefail

# Which branch to take; a function so the tests can run the macOS branch on Linux (a faked uname).
os_name() { uname -s; }

install_ffmpeg() {
  if command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null; then
    return 0
  fi
  if [ "$(os_name)" = Darwin ]; then
    if ! command -v brew >/dev/null; then
      echo "ffmpeg is missing and so is Homebrew: install Homebrew (https://brew.sh) or ffmpeg, then run this again" >&2
      exit 1
    fi
    echo "installing ffmpeg (Homebrew)"
    brew install ffmpeg
  else
    echo "installing ffmpeg"
    local sudo=""
    if [ "$(id -u)" != 0 ]; then sudo=sudo; fi
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
  fi
}

# 1 when OpenMMLab is to be installed: as asked ($1: --openmmlab, --no-openmmlab or empty), else
# on Linux only (mmcv has no macOS wheel and its build there is untested; dlib serves instead).
wants_openmmlab() {
  case "${1:-}" in
    --openmmlab) echo 1 ;;
    --no-openmmlab) echo 0 ;;
    *) if [ "$(os_name)" = Darwin ]; then echo 0; else echo 1; fi ;;
  esac
}

install_openmmlab() {
  local py=$1
  shift
  "$@" ninja wheel
  if [ "$(os_name)" = Darwin ]; then
    # build_mmcv.sh's default job count comes from nproc, which macOS lacks.
    MAX_JOBS=${MAX_JOBS:-$(sysctl -n hw.ncpu)} bash scripts/build_mmcv.sh "$py"
  else
    bash scripts/build_mmcv.sh "$py"
  fi
  "$@" -r requirements/openmmlab.txt
  # xtcocotools' wheels are built against numpy 1 and fail under numpy 2: build it here,
  # against the installed numpy and cython (its setup.py imports both).
  "$@" --no-build-isolation --no-binary xtcocotools xtcocotools==1.14.3
  "$@" --no-deps mmpose==1.3.2 mmdet==3.3.0
}

main() {
  local with_test=0 openmmlab_choice=""
  for arg in "$@"; do
    case "$arg" in
      --test) with_test=1 ;;
      --openmmlab | --no-openmmlab) openmmlab_choice=$arg ;;
      *) echo "unknown option $arg (use --test, --openmmlab, --no-openmmlab)" >&2; exit 2 ;;
    esac
  done
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  local venv=${VENV:-.venv}

  install_ffmpeg
  [ -x "$venv/bin/python" ] || python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
  local py="$venv/bin/python"
  local pip=("$py" -m pip install -q --disable-pip-version-check)

  "${pip[@]}" -r requirements/torch.txt
  "${pip[@]}" -r requirements/worker.txt
  # Fine-tuning (python -m musetalk_worker.train): peft and accelerate.
  "${pip[@]}" -r requirements/train.txt
  if [ "$(wants_openmmlab "$openmmlab_choice")" = 1 ]; then
    install_openmmlab "$py" "${pip[@]}"
  else
    echo "OpenMMLab not installed: face landmarks come from dlib (scripts/setup.sh --openmmlab for DWPose)"
  fi
  if [ "$with_test" = 1 ]; then
    "${pip[@]}" -r requirements/test.txt
  fi
  "$py" -c "import torch, cv2, diffusers, transformers, dlib, runpod
print('set-up ok: torch', torch.__version__, '| CUDA', torch.cuda.is_available(), '| MPS', torch.backends.mps.is_available())"
}

# Sourced (as the tests do), it only defines the functions.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
