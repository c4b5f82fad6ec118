"""The architecture of LatentSync's UNet3D: upstream's ``configs/unet/stage2*.yaml`` ``model:`` section, typed.

The defaults are LatentSync 1.5/1.6's (``stage2.yaml`` and ``stage2_512.yaml`` have the same ``model:`` section;
only the training resolution in ``data:`` differs). :meth:`UNetConfig.from_yaml` reads an upstream config file
and replaces the defaults with what its ``model:`` section sets. Keys that upstream accepts but that would need
code this engine does not have (a ``scale_shift`` time embedding, linear projections, ...) must keep the one
value every LatentSync config uses; anything else is an error naming the key, never silently dropped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import yaml

from ...errors import ErrorCode, LipSyncError

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock3D", "DownBlock3D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock3D", "UpBlock3D")
# Upstream's temporal transformer builds its GroupNorm with 32 groups whatever norm_num_groups says.
MOTION_NORM_GROUPS = 32


@dataclasses.dataclass(frozen=True)
class MotionModuleConfig:
    """``motion_module_kwargs`` of a Vanilla (AnimateDiff) temporal module."""

    num_attention_heads: int = 8
    num_transformer_block: int = 1
    attention_block_types: Tuple[str, ...] = ("Temporal_Self", "Temporal_Self")
    temporal_position_encoding: bool = True
    temporal_position_encoding_max_len: int = 24
    temporal_attention_dim_div: int = 1


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The UNet3D's architecture; field names are upstream's config keys.

    ``attention_head_dim`` keeps upstream's misleading name: it is the number of attention heads (8), the head
    width being ``channels // 8``.
    """

    in_channels: int = 13
    out_channels: int = 4
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    up_block_types: Tuple[str, ...] = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    layers_per_block: int = 2
    attention_head_dim: int = 8
    cross_attention_dim: int = 384
    add_audio_layer: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    use_motion_module: bool = True
    motion_module_resolutions: Tuple[int, ...] = (1, 2, 4, 8)
    motion_module_mid_block: bool = False
    motion_module_decoder_only: bool = False
    motion_module_kwargs: MotionModuleConfig = MotionModuleConfig()

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        if not (len(self.down_block_types) == len(self.up_block_types) == levels):
            raise ValueError(f"down_block_types, up_block_types and block_out_channels must have the same length, "
                             f"got {len(self.down_block_types)}, {len(self.up_block_types)} and {levels}")
        for key, names, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                    ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
            for name in names:
                if name not in allowed:
                    raise ValueError(f"{key}: unknown block type {name!r} (one of {', '.join(allowed)})")
        groups = [self.norm_num_groups, self.attention_head_dim]
        if self.use_motion_module:
            groups += [MOTION_NORM_GROUPS, self.motion_module_kwargs.num_attention_heads]
        for channels in self.block_out_channels:
            if any(channels % g for g in groups):
                raise ValueError(f"block_out_channels: {channels} is not a multiple of the norm groups and "
                                 f"attention heads {sorted(set(groups))}")
        for name in self.motion_module_kwargs.attention_block_types:
            if name != "Temporal_Self":
                raise ValueError(f"motion_module_kwargs.attention_block_types: {name!r} is not supported "
                                 f"(only Temporal_Self)")

    @property
    def time_embed_dim(self) -> int:
        """The width of the time embedding every resnet receives."""
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_yaml(cls, path: Path) -> "UNetConfig":
        """The ``model:`` section of an upstream UNet config file over the defaults.

        Raises:
            LipSyncError: ``MODELS_MISSING`` when the file cannot be read, has no ``model:`` section, or sets a
                key this engine does not know or a value it cannot run, naming the key.
        """
        path = Path(path)
        try:
            model = (yaml.safe_load(path.read_text()) or {}).get("model")
        except (OSError, yaml.YAMLError, AttributeError) as e:
            raise _config_error(path, f"cannot be read as a YAML mapping ({e})") from e
        if not isinstance(model, Mapping):
            raise _config_error(path, "has no 'model:' section")
        try:
            return _build(cls, model, "model")
        except ValueError as e:
            raise _config_error(path, str(e)) from e


# Upstream options every LatentSync config leaves at these values; other values need code this engine lacks.
_FIXED: Dict[str, Any] = {
    "act_fn": "silu",
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock3DCrossAttn",
    "mid_block_scale_factor": 1,
    "resnet_time_scale_shift": "default",
    "use_linear_projection": False,
    "use_inflated_groupnorm": False,
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "upcast_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "motion_module_type": "Vanilla",
    "cross_frame_attention_mode": None,
}
# Upstream keys that change nothing at inference: the latent size comes with the input, and the weights
# (not their initialisation) come from the checkpoint.
_IGNORED = {"sample_size", "zero_initialize"}


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """``cls`` (a config dataclass) from ``values``, each coerced to the type of the field's default."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: Dict[str, Any] = {}
    for key, value in values.items():
        if key in _IGNORED:
            continue
        if key in _FIXED:
            if value != _FIXED[key]:
                raise ValueError(f"{where}.{key} is {value!r}; only {_FIXED[key]!r} is supported")
            continue
        if key not in fields:
            raise ValueError(f"{where}.{key} is not a LatentSync UNet setting")
        kwargs[key] = _coerce(value, fields[key].default, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, where: str) -> Any:
    if dataclasses.is_dataclass(default):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return _build(type(default), value, where)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(v, default[0], f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        # PyYAML reads upstream's `1e-5` (no dot) as a string; OmegaConf, which upstream uses, as a float.
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    return value


def _config_error(path: Path, problem: str) -> LipSyncError:
    return LipSyncError(
        ErrorCode.MODELS_MISSING,
        f"LatentSync UNet config {path} {problem}. Use an upstream configs/unet/stage2*.yaml of LatentSync 1.5/1.6.",
        stage="load",
    )
