"""LatentSync's inference of one chunk of aligned faces: conditions, DDIM with guidance and DeepCache, decode, paste.

The recipe and its numeric order are upstream's (``LipsyncPipeline.__call__`` at ``a229c39``), per chunk of at
most 16 frames:

1. pixels ``(face / 255 - 0.5) / 0.5``; masked pixels = pixels times the float64 mouth mask (mouth zeroed);
2. the mask at latent size (nearest); the VAE posterior of the masked pixels, then of the pixels themselves,
   each sampled and scaled by 0.18215;
3. from the job's one noise frame (the same for every frame and chunk), DDIM over the scheduler's timesteps
   (eta 0): the UNet on ``[x_t, mask, masked, reference]`` with the audio, with guidance ``g > 1`` on the batch
   ``[null audio, audio]`` and ``eps = u + g (a - u)``; DeepCache restarts at step 0 in every chunk;
4. ``vae.decode(latents / 0.18215)`` (not clamped), and the reference pasted back outside the mouth.

Randomness: every draw comes from the job's CPU ``torch.Generator`` (seeded by the caller with
``torch.Generator().manual_seed(seed)``, which is upstream's ``set_seed`` stream): the noise frame once, at
construction, then per chunk the masked posterior's sample and the reference's. Draws are float32 on the CPU and
then moved, so a seed gives the same noise on any device and in any dtype (upstream draws on its execution
device, so its GPU runs differ from its CPU ones); with float32 on the CPU they are upstream's draws exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ...batching import in_calls
from ...device import images_per_call
from .align import reference_pixels
from .audio import guidance_audio_embeds
from .models import LatentSyncModels
from .restore import paste_mouth
from .unet import DeepCache

DEEPCACHE_INTERVAL = 3

# on_step(step_index, noise prediction before guidance (B, 4, f, l, l), latents after the step (1, 4, f, l, l)).
StepObserver = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclasses.dataclass(frozen=True)
class DenoiseSettings:
    """The sampler's settings: DDIM ``steps``, ``guidance`` (classifier-free only above 1), DeepCache on or off."""

    steps: int = 20
    guidance: float = 1.5
    deepcache: bool = True

    @property
    def cfg(self) -> bool:
        """Whether the UNet also runs on null audio (upstream's ``guidance_scale > 1``)."""
        return self.guidance > 1.0


@dataclasses.dataclass(frozen=True)
class Conditions:
    """What one chunk of ``f`` faces conditions the UNet on; latents are ``(1, c, f, l, l)``, scaled."""

    reference_pixels: torch.Tensor  # (f, 3, r, r) float32 in [-1, 1]
    mask: torch.Tensor  # (1, 1, f, l, l), 1 = keep
    masked: torch.Tensor  # (1, 4, f, l, l)
    reference: torch.Tensor  # (1, 4, f, l, l)
    # The VAE posteriors (f, 4, l, l) of the masked and the reference pixels, unscaled, in draw order.
    posteriors: Tuple[DiagonalGaussianDistribution, DiagonalGaussianDistribution]

    def channels(self, batch: int) -> torch.Tensor:
        """The 9 condition channels ``(batch, 9, f, l, l)`` that follow the 4 noisy ones in the UNet's input."""
        return torch.cat([self.mask, self.masked, self.reference], dim=1).repeat(batch, 1, 1, 1, 1)


def draw_noise(generator: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal float32 noise of ``shape`` on the CPU from ``generator`` (a CPU generator)."""
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def frames_to_video(x: torch.Tensor) -> torch.Tensor:
    """``(f, c, h, w)`` per-frame maps as the UNet's one video ``(1, c, f, h, w)``."""
    return x.permute(1, 0, 2, 3)[None]


def video_to_frames(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`frames_to_video` for one video: ``(1, c, f, h, w)`` to ``(f, c, h, w)``."""
    return x[0].permute(1, 0, 2, 3)


def guide(noise: torch.Tensor, guidance: float) -> torch.Tensor:
    """The guided noise ``u + g (a - u)`` from the batch ``[u, a]``; a batch of one is returned as it is."""
    if noise.shape[0] == 1:
        return noise
    uncond, audio = noise.chunk(2)
    return uncond + guidance * (audio - uncond)


class ChunkDenoiser:
    """One job's sampler: draws the job's noise frame at construction, then turns chunks of faces into pasted faces.

    ``generator`` is the job's seeded CPU generator; it is drawn from in upstream's order, so chunks must be given
    in order, each once. Nothing but the noise frame and the scheduler is kept between chunks.
    """

    def __init__(self, models: LatentSyncModels, settings: DenoiseSettings, generator: torch.Generator,
                 resolution: Optional[int] = None):
        if generator.device.type != "cpu":
            raise ValueError(f"the generator must be a CPU torch.Generator (upstream's stream), "
                             f"got one on {generator.device}")
        self.models, self.settings, self.generator = models, settings, generator
        self.resolution = resolution or models.resolution
        self.mask = models.mouth_mask(self.resolution)
        vae = models.vae.config
        self.latent_size = self.resolution // 2 ** (len(vae.block_out_channels) - 1)
        self.scheduler = models.scheduler()
        self.scheduler.set_timesteps(settings.steps, device=models.device)
        shape = (1, vae.latent_channels, 1, self.latent_size, self.latent_size)
        self.initial_noise = draw_noise(generator, shape).to(models.device, models.dtype)
        # The VAE takes the chunk's frames in calls of what the device runs fastest (device.images_per_call).
        self.images_per_call = images_per_call(models.device)

    @property
    def timesteps(self) -> torch.Tensor:
        """The DDIM timesteps of every chunk, e.g. 951, 901, ..., 1 for 20 steps."""
        return self.scheduler.timesteps

    @torch.inference_mode()
    def __call__(self, faces: torch.Tensor, audio: torch.Tensor,
                 on_step: Optional[StepObserver] = None) -> torch.Tensor:
        """The pasted faces ``(f, 3, r, r)`` (float, about [-1, 1]) of one chunk.

        ``faces`` (f, 3, r, r) uint8 are the aligned faces, ``audio`` (f, 50, d) their audio windows;
        ``on_step`` sees every DDIM step. The result is what restore resizes to the crop and blends back.
        """
        conditions = self.condition(faces)
        latents = self.denoise(conditions, audio, on_step)
        return self.paste(self.decode(latents), conditions)

    @torch.inference_mode()
    def condition(self, faces: torch.Tensor) -> Conditions:
        """The chunk's conditions; draws the masked, then the reference posterior sample."""
        r = self.resolution
        if faces.ndim != 4 or tuple(faces.shape[1:]) != (3, r, r) or faces.dtype != torch.uint8:
            raise ValueError(f"faces must be uint8 (frames, 3, {r}, {r}), got {faces.dtype} {tuple(faces.shape)}")
        reference = reference_pixels(faces.to(self.models.device))
        keep = F.interpolate(self.mask.keep, size=(self.latent_size, self.latent_size))
        keep = frames_to_video(keep.expand(len(faces), -1, -1, -1)).to(self.models.device, self.models.dtype)
        masked_latents, masked_posterior = self.encode(self.masked_pixels(reference))
        reference_latents, reference_posterior = self.encode(reference)
        return Conditions(reference_pixels=reference, mask=keep, masked=masked_latents, reference=reference_latents,
                          posteriors=(masked_posterior, reference_posterior))

    def masked_pixels(self, reference: torch.Tensor) -> torch.Tensor:
        """The pixels with the mouth zeroed, float64 as upstream's float32 pixels times its float64 mask."""
        return self.mask.masked(reference)

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """The scaled latent video ``(1, 4, f, l, l)`` sampled from the VAE posterior of ``pixels``, and that
        posterior. The sample is ``mean + std * noise`` as diffusers', with the noise from :func:`draw_noise`."""
        vae = self.models.vae
        moments = in_calls(lambda part: vae.encode(part).latent_dist.parameters,
                           pixels.to(self.models.device, self.models.dtype), self.images_per_call)
        posterior = DiagonalGaussianDistribution(moments)
        sample = posterior.mean + posterior.std * draw_noise(self.generator, posterior.mean.shape).to(posterior.mean)
        return frames_to_video((sample - vae.config.shift_factor) * vae.config.scaling_factor), posterior

    def initial_latents(self, frames: int) -> torch.Tensor:
        """The latents ``(1, 4, frames, l, l)`` every chunk starts from: the job's noise frame on every frame."""
        return self.initial_noise.repeat(1, 1, frames, 1, 1) * self.scheduler.init_noise_sigma

    def sampler(self, conditions: Conditions, audio: torch.Tensor) -> "ChunkSampler":
        """The denoising steps of one chunk (a fresh DeepCache when it is on)."""
        return ChunkSampler(self, conditions, audio)

    @torch.inference_mode()
    def denoise(self, conditions: Conditions, audio: torch.Tensor,
                on_step: Optional[StepObserver] = None) -> torch.Tensor:
        """The final latents ``(1, 4, f, l, l)`` of the chunk: every DDIM step from :meth:`initial_latents`."""
        sampler = self.sampler(conditions, audio)
        latents = self.initial_latents(conditions.mask.shape[2])
        for index in range(len(self.timesteps)):
            noise, latents = sampler.step(index, latents)
            if on_step is not None:
                on_step(index, noise, latents)
        return latents

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The decoded faces ``(f, 3, r, r)`` of a latent video, not clamped."""
        vae = self.models.vae
        return in_calls(lambda part: vae.decode(part).sample,
                        video_to_frames(latents / vae.config.scaling_factor + vae.config.shift_factor),
                        self.images_per_call)

    def paste(self, decoded: torch.Tensor, conditions: Conditions) -> torch.Tensor:
        """The decoded faces inside the mouth mask, the chunk's reference pixels outside it (aligned space)."""
        return paste_mouth(decoded, conditions.reference_pixels, self.mask)


class ChunkSampler:
    """The DDIM steps of one chunk: its UNet input channels and audio batch, and its own DeepCache.

    Steps run in order from 0 (a DeepCache step reuses the last full step, 0, 3, 6, ... of this chunk); each may
    start from any latents, so a step can be checked on its own.
    """

    def __init__(self, denoiser: ChunkDenoiser, conditions: Conditions, audio: torch.Tensor):
        models, settings = denoiser.models, denoiser.settings
        frames = conditions.mask.shape[2]
        if audio.ndim != 3 or len(audio) != frames:
            raise ValueError(f"audio must be ({frames}, tokens, width) for {frames} faces, got {tuple(audio.shape)}")
        self.scheduler, self.guidance = denoiser.scheduler, settings.guidance
        self.batch = 2 if settings.cfg else 1
        self.channels = conditions.channels(self.batch)
        self.audio = guidance_audio_embeds(audio.to(models.device, models.dtype), settings.guidance)
        unet = models.unet
        self._predict = DeepCache(unet, DEEPCACHE_INTERVAL) if settings.deepcache else (
            lambda _index, sample, t, audio_embeds: unet(sample, t, audio_embeds))

    @torch.inference_mode()
    def step(self, index: int, latents: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Step ``index`` from ``latents`` (1, 4, f, l, l): ``(noise prediction before guidance, next latents)``."""
        t = self.scheduler.timesteps[index]
        noisy = self.scheduler.scale_model_input(torch.cat([latents] * self.batch), t)
        noise = self._predict(index, torch.cat([noisy, self.channels], dim=1), t, self.audio)
        return noise, self.scheduler.step(guide(noise, self.guidance), t, latents, eta=0.0).prev_sample
