#!/usr/bin/env bash
# Builds mmcv 2.1.0 (with its compiled ops) into a wheel and installs it.
#
# Why a script: PyPI has only mmcv 2.1.0's source, and its setup.py hard-codes
# -std=c++14/17, while the headers of torch 2.14 need C++20. We patch that one
# flag and build against the torch already installed (no build isolation).
# The wheel is cached in $MMCV_WHEEL_DIR so later installs take seconds.
#
# Usage: scripts/build_mmcv.sh PYTHON   (PYTHON: the interpreter of the target venv)
set -euo pipefail
PY=${1:?usage: build_mmcv.sh PYTHON}
VERSION=2.1.0
WHEEL_DIR=${MMCV_WHEEL_DIR:-$HOME/.cache/musetalk-worker/wheels}
mkdir -p "$WHEEL_DIR"

if "$PY" -c "import mmcv, mmcv._ext, sys; sys.exit(mmcv.__version__ != '$VERSION')" 2>/dev/null; then
  echo "mmcv $VERSION with ops already installed"
  exit 0
fi

wheel=$(ls "$WHEEL_DIR"/mmcv-$VERSION-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip download --no-deps --no-build-isolation --no-binary :all: "mmcv==$VERSION" -d "$work"
  tar -xzf "$work/mmcv-$VERSION.tar.gz" -C "$work"
  sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g' "$work/mmcv-$VERSION/setup.py"
  echo "building mmcv $VERSION with ops (about 15 min on 2 cores; cached afterwards)"
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip wheel --no-deps --no-build-isolation \
    -w "$WHEEL_DIR" "$work/mmcv-$VERSION"
  wheel=$(ls "$WHEEL_DIR"/mmcv-$VERSION-*.whl | head -n 1)
fi
"$PY" -m pip install --no-deps "$wheel"
