"""Generation: audio prompts + reference latents -> new face images, in batches.

MuseTalk is a single UNet step at timestep 0 (not a diffusion loop), followed
by the VAE decoder.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ...batching import in_calls
from ...device import images_per_call


def positional_encoding(length: int, dim: int) -> torch.Tensor:
    """Sinusoidal positional encoding [length, dim] added to the audio prompts."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequencies = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * frequencies)
    table[:, 1::2] = torch.cos(position * frequencies)
    return table


class FaceGenerator:
    """Runs the UNet and the VAE decoder; both must be on the same device and dtype.

    Inputs may live on the host: they are copied to the device without waiting
    (from pinned memory on CUDA), and outputs stay on the device, so a caller
    can queue the next batch while the GPU still works on this one.
    """

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, fixed_batch: Optional[int] = None):
        """``fixed_batch``: pad every batch to this size (compiled models then see one shape)."""
        self.unet = unet
        self.vae = vae
        self.fixed_batch = fixed_batch
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._timestep = torch.zeros(1, device=self.device, dtype=torch.long)
        # The UNet takes whole batches (faster per frame on every device measured), the decoder what the device
        # runs fastest (device.images_per_call).
        self.decodes_per_call = images_per_call(self.device)
        self._positions: Optional[torch.Tensor] = None

    @torch.inference_mode()
    def predict_latents(self, latents: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """UNet output [B, 4, 32, 32] for reference latents [B, 8, 32, 32] and prompts [B, 50, 384]."""
        prompts = self._to_device(prompts).float()
        if self._positions is None or self._positions.shape != prompts.shape[1:]:
            self._positions = positional_encoding(prompts.shape[1], prompts.shape[2]).to(self.device)
        prompts = prompts + self._positions
        count = len(latents)
        latents, prompts = self._padded(self._to_device(latents).to(self.dtype)), self._padded(prompts.to(self.dtype))
        return self.unet(latents, self._timestep, encoder_hidden_states=prompts).sample[:count]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Face images [B, 256, 256, 3] (BGR uint8, on the generator's device) from predicted latents."""
        count = len(latents)
        scaled = latents.to(self.dtype) / self.vae.config.scaling_factor
        if self.decodes_per_call is None:  # one image per call is one shape already
            scaled = self._padded(scaled)
        images = in_calls(lambda part: self.vae.decode(part).sample, scaled, self.decodes_per_call)[:count]
        images = (images.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).flip(-1)

    def _padded(self, batch: torch.Tensor) -> torch.Tensor:
        if self.fixed_batch is None:
            return batch
        # Always a new tensor, made in inference mode, even with nothing to add: a compiled
        # model's guards also check that, and a mismatch would recompile it.
        missing = max(self.fixed_batch - len(batch), 0)
        return torch.cat([batch, batch.new_zeros((missing, *batch.shape[1:]))])

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)
