"""Face crops and their VAE latents: what the UNet sees of each source frame."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
from diffusers import AutoencoderKL

from ...batching import in_calls
from ...device import images_per_call
from .boxes import Box

CROP_SIZE = 256


def crop_face(frame: np.ndarray, box: Box) -> np.ndarray:
    """The face box of a BGR frame resized to 256x256 with Lanczos-4 (as MuseTalk was trained)."""
    x1, y1, x2, y2 = box
    return cv2.resize(frame[y1:y2, x1:x2], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LANCZOS4)


class LatentEncoder:
    """Encodes face crops into the UNet's 8-channel reference latents.

    The encoder takes :func:`device.images_per_call` images per call (on the
    CPU one: each latent is then the same whatever else was in the batch).
    """

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae
        self.images_per_call = images_per_call(next(vae.parameters()).device)

    @torch.inference_mode()
    def encode(self, crops: Sequence[np.ndarray]) -> torch.Tensor:
        """Latents [B, 8, 32, 32] (float32, CPU) of BGR 256x256 crops.

        Channels 0-3 encode the crop with its lower half blanked (the mouth the
        UNet must generate), channels 4-7 the whole crop. The posterior mode is
        used, not a sample, so the same input always gives the same output.
        """
        param = next(self.vae.parameters())
        rgb = np.stack([c[:, :, ::-1] for c in crops])
        # NCHW in memory, as upstream feeds its encoder.
        x = torch.from_numpy(rgb).to(param.device).permute(0, 3, 1, 2).float().contiguous() / 255.0
        masked = x.clone()
        masked[:, :, CROP_SIZE // 2 :, :] = 0
        images = (torch.cat([masked, x]) * 2.0 - 1.0).to(param.dtype)
        latents = in_calls(self._latent, images, self.images_per_call)
        masked_latents, whole_latents = latents.float().chunk(2)
        return torch.cat([masked_latents, whole_latents], dim=1).cpu()

    def _latent(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mode() * self.vae.config.scaling_factor
