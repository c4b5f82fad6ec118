"""What one LatentSync model folder loads to: UNet3D, VAE, whisper, mouth mask and the DDIM schedule.

The folder has upstream's checkpoint layout (the weight lock's ``latentsync-<version>/`` and the parity
fixtures' ``models/``)::

    latentsync_unet.pt            (or latentsync_unet.safetensors beside it, preferred)
    whisper/tiny.pt
    sd-vae-ft-mse/                (a diffusers AutoencoderKL folder)
    mask.png
    configs/unet/<one>.yaml       optional: the UNet architecture, and in ``data.resolution`` the resolution
    configs/scheduler_config.json optional: the DDIM config (else upstream's, below)

Without a yaml the UNet is upstream's stage2 architecture (:class:`UNetConfig`'s defaults, shared by 1.5 and 1.6),
and only the caller knows the resolution (512 for 1.6, 256 for 1.5).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import yaml
from diffusers import AutoencoderKL, DDIMScheduler

from ...errors import ErrorCode, LipSyncError
from ...vae import SCALING_FACTOR, load_autoencoder
from .align import FaceGeometry, MouthMask
from .audio import WHISPER_CHECKPOINT, LatentSyncAudio
from .unet import LatentSyncUNet, load_unet
from .unet_config import UNetConfig

UNET_CHECKPOINT = "latentsync_unet.pt"
VAE_FOLDER = "sd-vae-ft-mse"
MASK = "mask.png"
UNET_CONFIGS = "configs/unet"
SCHEDULER_CONFIG = "configs/scheduler_config.json"

# Upstream's configs/scheduler_config.json at a229c39 (timesteps 951, 901, ..., 1 for 20 steps).
UPSTREAM_SCHEDULER_CONFIG: Dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
    "skip_prk_steps": True,
}


@dataclasses.dataclass
class LatentSyncModels:
    """The loaded models of one LatentSync folder, on one device in one dtype.

    ``resolution`` is the face size the UNet was trained at (the default of every job); ``scheduler_config`` is
    the DDIM config, from which :meth:`scheduler` makes a fresh scheduler per job.
    """

    folder: Path
    unet: LatentSyncUNet
    vae: AutoencoderKL
    audio: LatentSyncAudio
    mask_path: Path
    scheduler_config: Dict[str, Any]
    resolution: int
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(cls, folder: Path, device: torch.device, dtype: torch.dtype,
             resolution: Optional[int] = None) -> "LatentSyncModels":
        """Every model of ``folder`` on ``device`` in ``dtype``.

        ``resolution`` overrides the yaml's ``data.resolution``; without a yaml it must be given.

        Raises:
            LipSyncError(models_missing): a file is missing or unreadable (the message names it and the folder),
                ``configs/unet`` holds more than one yaml, no resolution is known, or the UNet and whisper
                disagree on the audio width.
        """
        folder = Path(folder)
        config, yaml_resolution = _unet_config(folder)
        resolution = resolution if resolution is not None else yaml_resolution
        if resolution is None:
            raise _missing(folder, f"no {UNET_CONFIGS}/*.yaml says the resolution of the models in {folder}; "
                                   f"pass it (512 for LatentSync 1.6, 256 for 1.5)")
        try:
            FaceGeometry(resolution)
        except ValueError as e:
            raise _missing(folder, f"the LatentSync resolution of {folder}: {e}") from e
        # Every file is checked before the first one loads: a 5 GB UNet is not read only to find the mask absent.
        for relative in (WHISPER_CHECKPOINT, f"{VAE_FOLDER}/config.json", MASK):
            _require(folder, relative)
        if not any((folder / UNET_CHECKPOINT).with_suffix(s).is_file() for s in (".pt", ".safetensors")):
            _require(folder, UNET_CHECKPOINT)
        scheduler_config = _scheduler_config(folder)

        audio = LatentSyncAudio.load(folder, device, dtype)
        width = audio.encoder.dims.n_audio_state
        if width != config.cross_attention_dim:
            raise _missing(folder, f"the UNet of {folder} attends to {config.cross_attention_dim}-wide audio "
                                   f"but {WHISPER_CHECKPOINT} is {width} wide; use the whisper it was trained with")
        vae = load_autoencoder(folder / VAE_FOLDER, device, dtype)
        # Upstream sets these whatever the folder's config says.
        vae.register_to_config(scaling_factor=SCALING_FACTOR, shift_factor=0.0)
        unet = load_unet(folder / UNET_CHECKPOINT, config, device, dtype)
        return cls(folder=folder, unet=unet, vae=vae, audio=audio, mask_path=folder / MASK,
                   scheduler_config=scheduler_config, resolution=int(resolution), device=torch.device(device),
                   dtype=dtype)

    def scheduler(self) -> DDIMScheduler:
        """A new DDIM scheduler (it holds the job's timesteps, so one per job)."""
        return DDIMScheduler.from_config(self.scheduler_config)

    def mouth_mask(self, resolution: Optional[int] = None) -> MouthMask:
        """The fixed mouth mask at ``resolution`` (default: the models').

        Raises:
            LipSyncError(models_missing): ``mask.png`` cannot be read as an image.
        """
        try:
            return MouthMask.load(self.mask_path, resolution or self.resolution)
        except FileNotFoundError as e:
            raise _missing(self.folder, f"{e} (in {self.folder})") from e


def _unet_config(folder: Path) -> Tuple[UNetConfig, Optional[int]]:
    """The UNet architecture of ``folder`` and the resolution its yaml gives (None without a yaml or a value)."""
    found = sorted((folder / UNET_CONFIGS).glob("*.yaml"))
    if not found:
        return UNetConfig(), None
    if len(found) > 1:
        raise _missing(folder, f"{folder / UNET_CONFIGS} holds {len(found)} UNet configs "
                               f"({', '.join(p.name for p in found)}); keep the one the checkpoint was trained with")
    config = UNetConfig.from_yaml(found[0])
    data = (yaml.safe_load(found[0].read_text()) or {}).get("data")
    resolution = data.get("resolution") if isinstance(data, dict) else None
    if resolution is not None and not isinstance(resolution, int):
        raise _missing(folder, f"{found[0]}: data.resolution must be an integer, got {resolution!r}")
    return config, resolution


def _scheduler_config(folder: Path) -> Dict[str, Any]:
    path = folder / SCHEDULER_CONFIG
    if not path.is_file():
        return dict(UPSTREAM_SCHEDULER_CONFIG)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _missing(folder, f"{path} cannot be read as JSON ({e})") from e
    if not isinstance(config, dict):
        raise _missing(folder, f"{path} is not a JSON object")
    return config


def _require(folder: Path, relative: str) -> Path:
    path = folder / relative
    if not path.is_file():
        raise _missing(folder, f"the LatentSync model file '{relative}' is missing from {folder}")
    return path


def _missing(folder: Path, problem: str) -> LipSyncError:
    return LipSyncError(
        ErrorCode.MODELS_MISSING,
        f"{problem}. Fetch the weights with `python -m builder.fetch_weights --dest <models folder> "
        f"--components latentsync-1.6` (or latentsync-1.5).",
        stage="load",
    )
