"""LatentSync's UNet3D (upstream ``UNet3DConditionModel``), its strict loader, and DeepCache.

The module graph and state-dict keys are upstream's, so an upstream checkpoint loads with every key checked:
``latentsync_unet.pt`` (``{"state_dict", "global_step"}``) or a ``.safetensors`` file of the same keys.

Input ``sample`` (B, 13, F, H, W) = noisy latent 4 + mask 1 + masked-image latent 4 + reference latent 4;
``encoder_hidden_states`` (B·F, tokens, cross_attention_dim) = the audio tokens of each frame, sample-major
(with CFG: the F null-audio rows first); output the noise prediction (B, 4, F, H, W).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import nn

from ...errors import ErrorCode, LipSyncError
from .resnet import FrameConv
from .unet_blocks import DownBlock, MidBlock, UpBlock
from .unet_config import UNetConfig

logger = logging.getLogger(__name__)

# How many offending keys a loading error lists per kind.
_LISTED_KEYS = 5


class LatentSyncUNet(nn.Module):
    """The UNet3D for ``config``: conv_in, time embedding, 4 down blocks, mid block, 4 up blocks, output head."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        levels = len(channels)
        motion = config.use_motion_module
        self.conv_in = FrameConv(config.in_channels, channels[0], 3, padding=1)
        self.time_proj = Timesteps(channels[0], config.flip_sin_to_cos, config.freq_shift)
        self.time_embedding = TimestepEmbedding(channels[0], config.time_embed_dim)

        # Motion modules go where the block's downsampling factor 2**level is in motion_module_resolutions.
        self.down_blocks = nn.ModuleList()
        out = channels[0]
        for i, kind in enumerate(config.down_block_types):
            prev, out = out, channels[i]
            self.down_blocks.append(DownBlock(
                config, prev, out, with_attention=kind == "CrossAttnDownBlock3D",
                with_motion=motion and 2 ** i in config.motion_module_resolutions
                and not config.motion_module_decoder_only,
                downsample=i < levels - 1))
        self.mid_block = MidBlock(config, channels[-1], with_motion=motion and config.motion_module_mid_block)
        self.up_blocks = nn.ModuleList()
        reversed_channels = channels[::-1]
        out = reversed_channels[0]
        for i, kind in enumerate(config.up_block_types):
            prev, out = out, reversed_channels[i]
            self.up_blocks.append(UpBlock(
                config, prev, skip_channels=reversed_channels[min(i + 1, levels - 1)], out_channels=out,
                with_attention=kind == "CrossAttnUpBlock3D",
                with_motion=motion and 2 ** (levels - 1 - i) in config.motion_module_resolutions,
                upsample=i < levels - 1))
        # Not inflated, like the resnets' norms: statistics over all frames of a sample.
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = FrameConv(channels[0], config.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights."""
        return self.conv_in.weight.dtype

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, int, float],
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The noise prediction (B, out_channels, F, H, W) of the whole UNet."""
        return self.forward_cached(sample, timestep, encoder_hidden_states)[0]

    def forward_cached(self, sample: torch.Tensor, timestep: Union[torch.Tensor, int, float],
                       encoder_hidden_states: torch.Tensor, cached: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """DeepCache's two kinds of step: ``(noise prediction, deep features)``.

        The deep features are the hidden state entering the last layer of the last up block (everything but the
        time embedding, ``conv_in``, that layer and the output head depends only on them). Without ``cached``
        the whole UNet runs and they are returned to be kept; with ``cached`` (from an earlier step of the same
        chunk) only the cheap part runs, on ``cached`` and the fresh ``conv_in`` skip, and ``cached`` comes back.
        """
        self._check_inputs(sample, encoder_hidden_states, cached)
        temb = self._time_embedding(timestep, sample)
        skip = self.conv_in(sample)
        deep = self._deep_features(skip, temb, encoder_hidden_states) if cached is None else cached
        final = self.up_blocks[-1]
        hidden = final.layer(len(final.resnets) - 1, deep, skip, temb, encoder_hidden_states)
        return self.conv_out(F.silu(self.conv_norm_out(hidden))), deep

    def _time_embedding(self, timestep: Union[torch.Tensor, int, float], sample: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(sample.shape[0])
        # The sinusoidal features are float32 whatever the weights are.
        return self.time_embedding(self.time_proj(t).to(self.dtype))

    def _deep_features(self, skip: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = [skip]
        hidden = skip
        for block in self.down_blocks:
            hidden, block_skips = block(hidden, temb, audio)
            skips.extend(block_skips)
        hidden = self.mid_block(hidden, temb, audio)
        for block in self.up_blocks[:-1]:
            hidden = block(hidden, skips, temb, audio)
        final = self.up_blocks[-1]
        for i in range(len(final.resnets) - 1):
            hidden = final.layer(i, hidden, skips.pop(), temb, audio)
        return hidden

    def _check_inputs(self, sample: torch.Tensor, audio: torch.Tensor, cached: Optional[torch.Tensor]) -> None:
        config = self.config
        if sample.ndim != 5 or sample.shape[1] != config.in_channels:
            raise ValueError(f"sample must be (batch, {config.in_channels}, frames, height, width), "
                             f"got {tuple(sample.shape)}")
        b, _, frames, h, w = sample.shape
        motion = config.motion_module_kwargs
        if config.use_motion_module and motion.temporal_position_encoding \
                and frames > motion.temporal_position_encoding_max_len:
            raise ValueError(f"{frames} frames exceed the motion modules' position encoding "
                             f"({motion.temporal_position_encoding_max_len} frames)")
        if audio.ndim != 3 or audio.shape[0] != b * frames or audio.shape[2] != config.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must be ({b}·{frames}, tokens, {config.cross_attention_dim}), "
                             f"got {tuple(audio.shape)}")
        if cached is not None and (cached.shape[0], *cached.shape[2:]) != (b, frames, h, w):
            raise ValueError(f"the cached features {tuple(cached.shape)} are not of this sample {tuple(sample.shape)}")


class DeepCache:
    """DeepCache as upstream runs it (DeepCache 0.1.1, ``skip_mode`` uniform, ``cache_branch_id`` 0).

    Step indices 0, ``interval``, 2·``interval``, … run the whole UNet and keep its deep features
    (:meth:`LatentSyncUNet.forward_cached`); the others run only the time embedding, ``conv_in``, the last layer of
    the last up block and the output head on the kept features. With ``interval`` 3 and 20 steps the full steps
    are 0, 3, 6, 9, 12, 15 and 18. The index counts the denoising steps of one chunk from 0, as upstream's does:
    every chunk starts with a full step, so nothing cached crosses chunks.
    """

    def __init__(self, unet: LatentSyncUNet, interval: int = 3):
        if interval < 1:
            raise ValueError(f"the DeepCache interval must be at least 1, got {interval}")
        self.unet = unet
        self.interval = interval
        self._features: Optional[torch.Tensor] = None
        self._full_step: Optional[int] = None

    def is_full_step(self, step_index: int) -> bool:
        """Whether step ``step_index`` of a chunk runs the whole UNet."""
        return step_index % self.interval == 0

    def __call__(self, step_index: int, sample: torch.Tensor, timestep: Union[torch.Tensor, int, float],
                 encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The noise prediction of step ``step_index``, full or from the features of the last full step."""
        if self.is_full_step(step_index):
            noise, self._features = self.unet.forward_cached(sample, timestep, encoder_hidden_states)
            self._full_step = step_index
            return noise
        needed = step_index - step_index % self.interval
        if self._full_step != needed:
            raise RuntimeError(f"DeepCache step {step_index} reuses full step {needed} of the same chunk, "
                               f"which has not run (last full step: {self._full_step})")
        return self.unet.forward_cached(sample, timestep, encoder_hidden_states, self._features)[0]


def load_unet(path: Path, config: UNetConfig, device: torch.device, dtype: torch.dtype) -> LatentSyncUNet:
    """The UNet for ``config`` with the weights of ``path``, in eval mode on ``device`` in ``dtype``.

    ``path`` names the checkpoint, e.g. ``latentsync_unet.pt``; a ``.safetensors`` file of the same stem beside it
    is read instead when it exists. Every key must be there with the model's shape, and no other key.

    Raises:
        LipSyncError: ``MODELS_MISSING`` when no file exists, it cannot be read, or its keys or shapes differ
            from the config's UNet (naming the file and the first offending keys).
    """
    path = Path(path)
    candidates = [path.with_suffix(".safetensors"), path]
    weights = next((p for p in candidates if p.is_file()), None)
    if weights is None:
        raise _load_error(f"the LatentSync UNet checkpoint {path} is missing")
    state = _read_state_dict(weights)
    # Building on the meta device skips a random initialisation of 1.27 G elements.
    with torch.device("meta"):
        unet = LatentSyncUNet(config)
    problems = _mismatches(unet.state_dict(), state)
    if problems:
        raise _load_error(f"the LatentSync UNet checkpoint {weights} does not match its config: "
                          f"{'; '.join(problems)}")
    unet.load_state_dict(state, strict=True, assign=True)
    logger.info("loaded the LatentSync UNet from %s", weights)
    return unet.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _read_state_dict(weights: Path) -> Mapping[str, torch.Tensor]:
    try:
        if weights.suffix == ".safetensors":
            return load_safetensors(str(weights))
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, SafetensorError) as e:
        raise _load_error(f"the LatentSync UNet checkpoint {weights} cannot be read ({e})") from e
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise _load_error(f"the LatentSync UNet checkpoint {weights} holds no 'state_dict'")
    return state


def _mismatches(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> List[str]:
    """What differs between the model's keys and shapes and a state dict's, the first few of each kind."""
    def listed(kind: str, entries: List[str]) -> List[str]:
        if not entries:
            return []
        more = f" and {len(entries) - _LISTED_KEYS} more" if len(entries) > _LISTED_KEYS else ""
        return [f"{len(entries)} {kind}: {', '.join(entries[:_LISTED_KEYS])}{more}"]

    shape: Dict[str, Tuple[int, ...]] = {k: tuple(v.shape) for k, v in found.items()}
    missing = [f"{k} {tuple(v.shape)}" for k, v in expected.items() if k not in shape]
    unexpected = [f"{k} {s}" for k, s in shape.items() if k not in expected]
    misshaped = [f"{k} {shape[k]} (the config needs {tuple(v.shape)})"
                 for k, v in expected.items() if k in shape and shape[k] != tuple(v.shape)]
    return (listed("missing keys", missing) + listed("unexpected keys", unexpected)
            + listed("mis-shaped tensors", misshaped))


def _load_error(problem: str) -> LipSyncError:
    return LipSyncError(
        ErrorCode.MODELS_MISSING,
        f"{problem}. Use a LatentSync 1.5/1.6 UNet checkpoint (latentsync_unet.pt from ByteDance/LatentSync-1.5 "
        f"or -1.6) with the configs/unet/stage2*.yaml it was trained with.",
        stage="load",
    )
