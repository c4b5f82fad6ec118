#!/usr/bin/env bash
# The speed table on a lent GPU machine (the device tool), from the repo root there,
# with .kit carried (made here by scripts/device_kit.sh). That machine has no network,
# ffmpeg, diffusers, librosa or OpenMMLab; the kit brings them. See bench/README.md,
# "On a lent GPU machine".
#
#   bash bench/on_device.sh all            setup + models + speed fp16, then fp32
#   bash bench/on_device.sh setup          install the kit, print versions and nvidia-smi
#   bash bench/on_device.sh models         setup + the random real-architecture models
#   bash bench/on_device.sh speed [DTYPES] setup + models + bench.speed, one run per dtype
#                                          (DTYPES comma-separated, default fp16,fp32)
#   bash bench/on_device.sh side [JOBS]    setup + models + bench.side_by_side against upstream
#                                          MuseTalk (from .kit/side, see scripts/device_kit.sh), one
#                                          table per job: 4s (speech as long as the source), 16s
#                                          (4x), cached (avatar cache), 4s-fp16, cached-fp16 (both
#                                          sides in half precision); default 4s,cached,16s
#   bash bench/on_device.sh cold           setup + models + scripts/measure_cold_start.py: the
#                                          worker (handler.py --rp_serve_api) from process start
#                                          to ready, then test_input.json's job, on the random
#                                          real-size models (needs a kit made with WORKER=1)
#
# Each step does the ones before it that this machine has not done yet (a machine goes
# back 30 s after a call, and a fresh one is bare), so any step works as the first call.
# Every output lands in $OUT (the tool brings it back): on_device.log (everything),
# versions.txt, speed-<dtype>.md/.json, side-<job>.md/.json, cold.jsonl. Exits non-zero on any failure,
# with the reason as the last line.
#
# Settings (environment), the defaults being the issue's configuration:
#   SPEED_ARGS   bench.speed options besides --dtypes/--json
#                (default: --device cuda --width 704 --height 1216 --seconds 10 --fps 25
#                 --batch-sizes 8,16,32 --landmarks dwpose --repeat-with-cache --timeout 240)
#   MODELS_ARGS  bench.random_models options (default --with-dwpose)
#   SIDE_ARGS    bench.side_by_side options besides the media (.kit/side/media-args), models,
#                boxes and the job's own (default: --device cuda --runs 2 --landmarks dwpose
#                --timeout 240)
#   COLD_ARGS    scripts/measure_cold_start.py options besides the models (default: --device cuda
#                --landmarks dwpose --local-input-dir examples --job test_input.json --runs 3;
#                --drop-caches is added where /proc/sys/vm/drop_caches can be written)
#   MODELS       the models folder both sides get (default bench.random_models' folder)
#   LIMIT_S      start the next dtype or job only if, at the pace of the last one (+30 %), it
#                ends within this many seconds of the start (default 570: a call is cut
#                at 600 s); one left out is named in the last line, for another call
#   MMCV_OPS=1   build mmcv 2.1.0 with its CPU ops from .kit/sdist instead of using
#                mmcv-lite with an import stub (13.5 min on 2 cores here: about
#                2 min on 16, estimated)
#   PY           the interpreter (default python3; the kit's wheels are for CPython 3.12)
#   STATE        where the kit is installed (default /tmp/musetalk-kit)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STARTED=$SECONDS
PY=${PY:-python3}
STATE=${STATE:-/tmp/musetalk-kit}
KIT=$ROOT/.kit
OUT=${OUT:-/tmp/musetalk-bench-out}
SPEED_ARGS=${SPEED_ARGS:---device cuda --width 704 --height 1216 --seconds 10 --fps 25 --batch-sizes 8,16,32 --landmarks dwpose --repeat-with-cache --timeout 240}
MODELS_ARGS=${MODELS_ARGS:---with-dwpose}
SIDE_ARGS=${SIDE_ARGS:---device cuda --runs 2 --landmarks dwpose --timeout 240}
COLD_ARGS=${COLD_ARGS:---device cuda --landmarks dwpose --local-input-dir examples --job test_input.json --runs 3}
MODELS=${MODELS:-$HOME/.cache/musetalk-worker/bench-models}
LIMIT_S=${LIMIT_S:-570}
mkdir -p "$OUT"

die() { echo "on_device.sh: FAILED: $*" >&2; exit 1; }
step() { echo "=== $* ($((SECONDS - STARTED)) s)"; }
export PATH="$STATE/bin:$PATH" PYTHONPATH="$STATE/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# mmdet's sources have invalid escape sequences, which Python 3.12 warns about when compiling;
# mmengine imports pkg_resources, which warns about itself in every process.
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::SyntaxWarning,ignore:pkg_resources is deprecated:UserWarning}

setup() {
  [ -f "$KIT/SHA256SUMS" ] || die "no .kit here: run scripts/device_kit.sh before the call and name .kit in carry"
  local stamp
  stamp=$(sha256sum "$KIT/SHA256SUMS" | cut -c1-16)${MMCV_OPS:+-ops}
  if [ "$(cat "$STATE/done" 2>/dev/null)" = "$stamp" ]; then
    echo "kit already installed in $STATE"
    return
  fi
  step "setup: installing the kit into $STATE"
  (cd "$KIT" && sha256sum --quiet -c SHA256SUMS) || die ".kit is incomplete or changed (sha256 check above)"
  "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
    || die "$PY is $("$PY" -V 2>&1), but the kit's wheels are for CPython 3.12 (set PY)"
  rm -rf "$STATE"
  mkdir -p "$STATE/bin"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$STATE/site" \
    "$KIT"/wheels/*.whl || die "pip could not install .kit/wheels"
  # mmengine imports pkg_resources, which setuptools >= 81 no longer has.
  if ! "$PY" -c 'import pkg_resources' 2>/dev/null; then
    echo "the image's setuptools has no pkg_resources: adding setuptools 80 from the kit"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$STATE/site" \
      "$KIT"/pkg_resources/*.whl || die "pip could not install .kit/pkg_resources"
  fi
  if [ -n "${MMCV_OPS:-}" ]; then
    build_mmcv_ops
  else
    # mmcv-lite has no compiled ops, but mmpose imports mmcv.ops when it loads (its
    # EDPoseHead), which loads mmcv._ext. DWPose inference (RTMPose: CSPNeXt + RTMCC
    # head, SimCC decoding) calls no op, so an import stub stands in; a call would raise.
    cat > "$STATE/site/mmcv/_ext.py" <<'EOF'
"""Import stub for mmcv's compiled ops, written by bench/on_device.sh over mmcv-lite.

mmpose imports mmcv.ops when it loads (EDPoseHead), and mmcv.ops loads this module
and checks that each op's function exists. DWPose inference (RTMPose: CSPNeXt +
RTMCC head, SimCC decoding) calls none of them; a call raises.
"""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def op(*args, **kwargs):
        raise RuntimeError(f"mmcv op {name!r} was called, but this mmcv is mmcv-lite with an import stub for "
                           "its compiled ops (bench/on_device.sh); run it with MMCV_OPS=1 to build the real ones")

    op.__name__ = name
    return op
EOF
  fi
  # xtcocotools was built for numpy 2 on glibc >= 2.14; rebuild from source if it does not load.
  if ! "$PY" -c 'import xtcocotools._mask' 2>/dev/null; then
    echo "the kit's xtcocotools does not import here: building it from .kit/sdist"
    { "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$STATE/build" "$KIT"/sdist/xtcocotools-*.tar.gz \
      && "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$STATE/site" "$STATE"/build/xtcocotools-*.whl; } \
      || die "could not build xtcocotools"
  fi
  # Compile once here, so that no measured child pays for it.
  "$PY" -m compileall -q -j 0 "$STATE/site" >/dev/null || true
  "$PY" - "$KIT/ffmpeg.tar.xz" "$STATE/bin" <<'EOF' || die "could not unpack .kit/ffmpeg.tar.xz"
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
    tar.extractall(sys.argv[2], filter="data")
EOF
  # bench/media.py reads its picture and speech from ../shared/media, which does not travel.
  local f
  for f in yongen.jpeg eng.wav; do
    if [ ! -f "../shared/media/$f" ]; then
      { mkdir -p ../shared/media && cp "$KIT/media/$f" ../shared/media/; } \
        || die "could not put $f into $(dirname "$ROOT")/shared/media, where bench/media.py reads it"
    fi
  done
  check
  echo "$stamp" > "$STATE/done"
}

build_mmcv_ops() {
  step "setup: building mmcv with CPU ops from .kit/sdist (MMCV_OPS=1)"
  local src=$STATE/mmcv-src
  mkdir -p "$src"
  tar -xzf "$KIT"/sdist/mmcv-*.tar.gz -C "$src"
  # mmcv 2.1.0 hard-codes -std=c++14/17; recent torch headers need C++17 or later.
  sed -i -E 's/-std=c\+\+1[47]/-std=c++17/g' "$src"/mmcv-*/setup.py
  # CUDA hidden: CPU ops only (none is used here; a CUDA build takes far longer).
  CUDA_VISIBLE_DEVICES="" MAX_JOBS=$(nproc) "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-index \
    -w "$STATE/build" "$src"/mmcv-* || die "the mmcv build failed"
  rm -rf "$STATE"/site/mmcv "$STATE"/site/mmcv_lite-*.dist-info
  "$PY" -m pip install -q --no-index --no-deps --target "$STATE/site" "$STATE"/build/mmcv-*.whl \
    || die "could not install the mmcv wheel"
}

check() {
  step "setup: versions and import checks"
  {
    echo "engine: $(engine)"
    echo "python: $("$PY" -V 2>&1) at $(command -v "$PY")"
    "$PY" - <<'EOF'
import importlib, importlib.metadata, os, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
for name in ("torchvision", "numpy", "cv2", "PIL", "diffusers", "transformers", "huggingface_hub", "tokenizers",
             "safetensors", "librosa", "soundfile", "soxr", "numba", "scipy", "sklearn", "mmcv", "mmengine",
             "mmdet", "mmpose", "xtcocotools", "pycocotools", "setuptools"):
    module = importlib.import_module(name)
    version = getattr(module, "__version__", None) or importlib.metadata.version(name)
    folder = os.path.dirname(module.__file__)
    if module.__file__.endswith("__init__.py"):
        folder = os.path.dirname(folder)
    print(f"{name} {version} ({folder})")
EOF
    echo "$(ffmpeg -version | head -n 1) at $(command -v ffmpeg)"
    echo "$(ffprobe -version | head -n 1) at $(command -v ffprobe)"
    echo "ffmpeg encoders: $(ffmpeg -hide_banner -encoders 2>/dev/null | awk '$2 ~ /^(libx264|h264_nvenc|aac)$/ { printf "%s ", $2 }')"
    nproc | sed 's/^/CPU cores: /'
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
    nvidia-smi || true
  } 2>&1 | tee "$OUT/versions.txt" || die "a package of the kit does not import (above)"
  "$PY" - <<'EOF' || die "the engine or its dwpose back-end does not import (above)"
import mmcv.ops  # noqa: F401  (through the stub with mmcv-lite)
import musetalk_worker.engines.musetalk.pipeline  # noqa: F401
from musetalk_worker.faces import _mmpose_importable
assert _mmpose_importable(), "mmpose.apis does not import"
print("imports ok: musetalk_worker.engines.musetalk.pipeline, mmpose.apis")
EOF
}

engine() {
  local commit
  commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) \
    && echo "$commit (git here)" || echo "$(cat "$KIT/ENGINE") (recorded by scripts/device_kit.sh; no git checkout here)"
}

models() {
  setup
  step "models: python -m bench.random_models $MODELS_ARGS"
  local t0=$SECONDS
  # shellcheck disable=SC2086  # MODELS_ARGS is a list of options
  "$PY" -m bench.random_models $MODELS_ARGS || die "bench.random_models failed"
  echo "random models ready in $((SECONDS - t0)) s (a second run finds them and costs nothing)"
}

# paced ITEMS RUNNER: "RUNNER item" for each item of the comma list ITEMS, starting one only if,
# at the last one's pace plus 30 %, it would end within LIMIT_S of the script's start.
# Leaves the items not started in SKIPPED and those whose runner failed in FAILED.
paced() {
  local item last=0 t0
  SKIPPED=() FAILED=()
  for item in ${1//,/ }; do
    if [ $((SECONDS - STARTED + last * 13 / 10)) -gt "$LIMIT_S" ]; then
      SKIPPED+=("$item")
      continue
    fi
    t0=$SECONDS
    "$2" "$item" || FAILED+=("$item")
    last=$((SECONDS - t0))
  done
}

# report STEP ITEMS: prints each item's table ($OUT/STEP-item.md), then fails naming what was left
# out or failed.
report() {
  local step=$1 item left
  step "done"
  for item in ${2//,/ }; do
    [ -s "$OUT/$step-$item.md" ] && cat "$OUT/$step-$item.md"
  done
  left=$(IFS=,; echo "${SKIPPED[*]}")
  [ ${#SKIPPED[@]} = 0 ] || die "not started, it would not end within LIMIT_S=$LIMIT_S s: $left; run 'bash bench/on_device.sh $step $left' in another call"
  [ ${#FAILED[@]} = 0 ] || die "$step failed for: ${FAILED[*]} (see on_device.log)"
}

# The tables name the engine's commit from git, which the device copy may lack.
# shellcheck disable=SC2329  # called by the runners of paced
name_commit() {
  if grep -q "unknown commit" "$@" 2>/dev/null; then
    sed -i "s|unknown commit|$(cat "$KIT/ENGINE") (recorded by scripts/device_kit.sh)|" "$@" 2>/dev/null || true
  fi
}

# shellcheck disable=SC2329  # run through paced
speed_one() {
  local dtype=$1 rc=0
  step "speed $dtype: python -m bench.speed --dtypes $dtype $SPEED_ARGS"
  # shellcheck disable=SC2086  # SPEED_ARGS is a list of options
  "$PY" -m bench.speed --dtypes "$dtype" $SPEED_ARGS --json "$OUT/speed-$dtype.json" > "$OUT/speed-$dtype.md" || rc=$?
  name_commit "$OUT/speed-$dtype.md" "$OUT/speed-$dtype.json"
  return "$rc"
}

speed() {
  local dtypes=${1:-fp16,fp32}
  models
  paced "$dtypes" speed_one
  report speed "$dtypes"
}

# shellcheck disable=SC2329  # run through paced
side_one() {
  local job=$1 rc=0 extra
  case "$job" in
    4s) extra="" ;;
    16s) extra="--audio-seconds 16" ;;
    cached) extra="--cached-avatar" ;;
    4s-fp16) extra="--fp16" ;;
    cached-fp16) extra="--cached-avatar --fp16" ;;
    *) echo "unknown side-by-side job $job (4s, 16s, cached, 4s-fp16, cached-fp16)"; return 1 ;;
  esac
  local args
  args="--upstream $STATE/upstream --models $MODELS --boxes $KIT/side/boxes.json $(cat "$KIT/side/media-args") $SIDE_ARGS $extra"
  step "side $job: python -m bench.side_by_side $args"
  # shellcheck disable=SC2086  # args is a list of options
  "$PY" -m bench.side_by_side $args --json "$OUT/side-$job.json" > "$OUT/side-$job.md" || rc=$?
  name_commit "$OUT/side-$job.md" "$OUT/side-$job.json"
  return "$rc"
}

side() {
  local jobs=${1:-4s,cached,16s}
  [ -s "$KIT/side/upstream.tar.gz" ] \
    || die "no upstream MuseTalk in .kit/side: make the kit with UPSTREAM=<a MuseTalk checkout or git directory> scripts/device_kit.sh"
  models
  if [ "$(cat "$STATE/upstream/KIT" 2>/dev/null)" != "$(sha256sum "$KIT/side/upstream.tar.gz" | cut -c1-16)" ]; then
    rm -rf "$STATE/upstream"
    mkdir -p "$STATE/upstream"
    tar -xzf "$KIT/side/upstream.tar.gz" -C "$STATE/upstream" || die "could not unpack .kit/side/upstream.tar.gz"
    sha256sum "$KIT/side/upstream.tar.gz" | cut -c1-16 > "$STATE/upstream/KIT"
  fi
  echo "upstream MuseTalk: $(cat "$KIT/side/UPSTREAM")"
  paced "$jobs" side_one
  report side "$jobs"
}

cold() {
  compgen -G "$KIT/wheels/runpod-*.whl" >/dev/null \
    || die "the kit has no runpod (the image lacks the worker's own packages): make it with WORKER=1 scripts/device_kit.sh"
  models
  "$PY" -c 'import runpod, fastapi, uvicorn, boto3, tenacity; print("worker packages: runpod", runpod.__version__)' \
    || die "the worker's packages do not import (above)"
  local args=$COLD_ARGS
  [ -w /proc/sys/vm/drop_caches ] && args="$args --drop-caches"
  step "cold: python scripts/measure_cold_start.py --models-dir $MODELS $args"
  # The weights lock describes the real weights; these are random ones.
  # shellcheck disable=SC2086  # args is a list of options
  MUSETALK_WEIGHTS_LOCK=none "$PY" scripts/measure_cold_start.py --models-dir "$MODELS" $args > "$OUT/cold.jsonl" \
    || die "measure_cold_start.py failed (see on_device.log)"
  step "done"
  cat "$OUT/cold.jsonl"
}

main() {
  case "${1:-}" in
    setup) setup ;;
    models) models ;;
    speed) speed "${2:-}" ;;
    side) side "${2:-}" ;;
    cold) cold ;;
    all) speed fp16,fp32 ;;
    *) die "usage: bash bench/on_device.sh all | setup | models | speed [fp16,fp32] | side [4s,cached,16s] | cold" ;;
  esac
  echo "on_device.sh: ok ($((SECONDS - STARTED)) s)"
}

main "$@" 2>&1 | tee -a "$OUT/on_device.log"
exit "${PIPESTATUS[0]}"
