# syntax=docker/dockerfile:1.7
# MuseTalk lip-sync worker for RunPod serverless. Build, push and arguments: README.md (The image).
#
# Stages:
#   weights  every file of weights.lock.json, downloaded and SHA-256-checked. It sees
#            only the lock and the downloader, so a code change never downloads again.
#   mmcv     mmcv 2.1.0 built with CUDA ops by scripts/build_mmcv.sh (the script CI runs).
#   worker   CUDA base + Python 3.11 + ffmpeg; dependencies by scripts/setup.sh (CI's
#            installer) with the mmcv wheel; the weights; then the code, which changes most.

ARG CUDA_VERSION=13.0.2
ARG UBUNTU_VERSION=22.04
ARG WEIGHTS_PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------
FROM ${WEIGHTS_PYTHON_IMAGE} AS weights
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /build
COPY builder/requirements.txt builder/requirements.txt
RUN python -m pip install -r builder/requirements.txt
# weights.py imports nothing else from the package, so it is copied alone: a change
# elsewhere in musetalk_worker/ leaves this stage's cache (and the 5 GB) untouched.
COPY weights.lock.json ./
COPY musetalk_worker/weights.py musetalk_worker/weights.py
COPY builder/ builder/
# "default" is the lock's default set; add components with a list such as "default,v1" or
# "default,latentsync-1.6" (LatentSync 1.6, +2.6 GB; latentsync-1.5 likewise).
ARG WEIGHT_COMPONENTS=default
# 1: store the UNet as musetalkV15/unet.safetensors (recorded hash) instead of unet.pth.
# LatentSync's UNets are always stored as float16 latentsync_unet.safetensors (what the
# engine computes in on the GPU): 2.5 GB instead of the 5 GB float32 latentsync_unet.pt.
# GFPGAN (when asked for) is stored as gfpgan/GFPGANv1.4.safetensors (its params_ema), so
# the worker never unpickles it.
ARG CONVERT_UNET=0
# Mirrors for mirrored or air-gapped builds (see README.md (The image)).
ARG HF_ENDPOINT=https://huggingface.co
ARG WEIGHTS_URL_MIRROR=
# A token, only for a private mirror: docker build --secret id=hf_token,src=FILE. It is
# mounted for this step alone and never stored in a layer.
RUN --mount=type=secret,id=hf_token,required=false \
    set -eu; \
    convert=latentsync-1.6,latentsync-1.5,gfpgan; \
    if [ "$CONVERT_UNET" = 1 ]; then convert="$convert,v15"; fi; \
    HF_TOKEN_PATH=/run/secrets/hf_token python -m builder.fetch_weights --lock weights.lock.json --dest /models \
        --components "$WEIGHT_COMPONENTS" --convert-unet "$convert" --remove-converted-sources \
        --jobs 4 --no-progress

# ---------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS mmcv
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Python 3.11 from the deadsnakes archive (Ubuntu 22.04 ships 3.10).
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent build-essential \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements/ requirements/
COPY scripts/build_mmcv.sh scripts/build_mmcv.sh
# torch to build against; setuptools is held below 81 by the constraint in worker.txt.
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install -r requirements/torch.txt -c requirements/worker.txt \
        setuptools ninja==1.13.2 wheel==0.48.0
# CUDA 13 builds sm_75 and newer: T4, A100, A40/A4000-A6000/3090, L4/L40S/4090, H100/H200, B200, 5090.
ARG TORCH_CUDA_ARCH_LIST="7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
# 0 builds mmcv's ops for the CPU only (DWPose inference calls none of them).
ARG MMCV_CUDA_OPS=1
# Parallel compile jobs (default: all cores); lower it if nvcc runs out of memory.
ARG MAX_JOBS
RUN FORCE_CUDA="$MMCV_CUDA_OPS" MMCV_WITH_OPS=1 MMCV_WHEEL_DIR=/wheels \
    TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" \
    bash scripts/build_mmcv.sh /opt/venv/bin/python

# ---------------------------------------------------------------------------------------
# The base flavour holds the CUDA runtime (cudart); cuBLAS, cuDNN and the rest come with
# torch's wheels, so the larger "runtime" flavour would only add a second copy.
FROM nvidia/cuda:${CUDA_VERSION}-base-ubuntu${UBUNTU_VERSION} AS worker
# Build-time only (an ARG), so the running container keeps the usual apt behaviour.
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# libgl1/libglib2.0-0: opencv-python (not -headless) loads them at import.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ffmpeg libgl1 libglib2.0-0 \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && rm -rf /var/lib/apt/lists/*

# Weights before dependencies and code: the largest layer changes least, so a rebuild
# or a push after a code or dependency change reuses it.
COPY --from=weights /models /models

WORKDIR /app
COPY requirements/ requirements/
COPY scripts/ scripts/
# The same installer as CI (no --test: no test tools here). build_mmcv.sh finds the CUDA
# wheel in MMCV_WHEEL_DIR; a compiler is present only while xtcocotools builds.
RUN --mount=type=bind,from=mmcv,source=/wheels,target=/wheels \
    apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ python3.11-dev \
 && VENV=/opt/venv MMCV_WHEEL_DIR=/wheels bash scripts/setup.sh \
 && apt-get purge -y --auto-remove gcc g++ python3.11-dev \
 && rm -rf /var/lib/apt/lists/* /root/.cache

# The CUDA images ask the NVIDIA runtime for compute,utility only; "video" also mounts
# libnvidia-encode, without which h264_nvenc never opens (MUSETALK_VIDEO_ENCODER=auto
# would always fall back to libx264).
ENV PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,video \
    MUSETALK_MODELS_DIR=/models \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1
# No malloc variables: the worker sets malloc itself (musetalk_worker/allocator.py). It keeps freed
# memory during a job, as the networks free and take back tens of MiB per image (the
# MALLOC_MMAP_THRESHOLD_=131072 this image set before doubled the CPU networks' time in page
# faults), and hands it back after each job (bench/README.md, "Keeping freed memory").
COPY weights.lock.json ./
COPY builder/ builder/
COPY musetalk_worker/ musetalk_worker/
COPY handler.py ./
# PYTHONDONTWRITEBYTECODE keeps a running worker from writing .pyc files, so without this every cold
# start would compile the worker's package again (pip compiled the libraries' at install). handler.py
# runs as __main__, which Python always compiles from source, and builder/ is not run here.
RUN python -m compileall -q musetalk_worker
CMD ["python", "-u", "handler.py"]
