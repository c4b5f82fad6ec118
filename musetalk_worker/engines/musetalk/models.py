"""Loading the MuseTalk models from a models folder in the standard layout.

Every path is relative to one models folder (the same layout upstream and the
build-time downloader use). A missing file is an error naming the file and how
to get it; nothing is ever downloaded here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import WhisperFeatureExtractor, WhisperModel

from ...model_files import require
from ...options import Acceleration
from ...precision import precise_cpu_group_norm
from ...vae import load_autoencoder, load_state
from .audio import AudioEncoder
from .bisenet import BiSeNet, load_bisenet

logger = logging.getLogger(__name__)

# version -> (folder, weight files in order of preference)
UNET_FILES = {
    "v15": ("musetalkV15", ("unet.safetensors", "unet.pth")),
    "v1": ("musetalk", ("pytorch_model.bin",)),
}
UNET_CONFIG = "musetalk.json"
VAE_DIR = "sd-vae"
WHISPER_DIR = "whisper"
FACE_PARSING_WEIGHTS = "face-parse-bisent/79999_iter.pth"


def load_unet(models_dir: Path, version: str, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """MuseTalk's UNet for ``version`` (``v15`` or ``v1``), in eval mode."""
    folder, candidates = UNET_FILES[version]
    config = json.loads(require(models_dir, f"{folder}/{UNET_CONFIG}").read_text())
    weights = next((Path(models_dir) / folder / c for c in candidates if (Path(models_dir) / folder / c).exists()), None)
    if weights is None:
        require(models_dir, f"{folder}/{candidates[-1]}")
    # Read (or memory-mapped) straight into the device and dtype, and assigned to a model built on the
    # meta device: no random initialisation of 850 M parameters, and no second copy of them.
    state = load_state(weights, device, dtype)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict(state, assign=True)
    logger.info("loaded UNet %s from %s", version, weights)
    # Already on ``device`` in ``dtype`` (load_state): no ``unet.to(dtype)``, which in diffusers only warns.
    return precise_cpu_group_norm(unet.eval().requires_grad_(False))


def load_vae(models_dir: Path, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """The sd-vae-ft-mse autoencoder, in eval mode."""
    return load_autoencoder(require(models_dir, f"{VAE_DIR}/config.json").parent, device, dtype)


def load_audio_encoder(models_dir: Path, device: torch.device) -> AudioEncoder:
    """Whisper's feature extractor and encoder (the decoder is dropped), in float32.

    The encoder is small; float32 keeps the audio prompts exact whatever the
    precision of the UNet.
    """
    folder = require(models_dir, f"{WHISPER_DIR}/config.json").parent
    require(models_dir, f"{WHISPER_DIR}/preprocessor_config.json")
    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    # transformers 5 keeps the checkpoint's dtype unless told: ask for float32.
    encoder = WhisperModel.from_pretrained(folder, dtype=torch.float32).get_encoder()
    return AudioEncoder(extractor, encoder.to(device).eval().requires_grad_(False))


def load_face_parser(models_dir: Path, device: torch.device) -> BiSeNet:
    """BiSeNet face parsing in float32 (masks are cheap and must be stable)."""
    return load_bisenet(require(models_dir, FACE_PARSING_WEIGHTS), device)


def speed_up(module: torch.nn.Module, acceleration: Acceleration) -> torch.nn.Module:
    """Applies a deployment's :class:`Acceleration` to a loaded model, in place; returns it."""
    device = next(module.parameters()).device
    if acceleration.channels_last:
        if device.type == "cuda":
            module.to(memory_format=torch.channels_last)
        else:
            # On the CPU, group norm must see NCHW tensors to stay precise (precision.py).
            logger.warning("channels_last applies to CUDA only; %s stays in NCHW", type(module).__name__)
    if acceleration.compile != "off":
        # Fixed shapes (the engine pads batches) keep it to one graph per batch size.
        module.compile(mode=None if acceleration.compile == "default" else acceleration.compile, dynamic=False)
    return module
