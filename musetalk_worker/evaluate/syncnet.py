"""SyncNet (Chung & Zisserman, "Out of time", 2016): the audio and lip towers of the Oxford VGG release.

Only the layout has to match the original ``syncnet_v2.model``: the module
names (``netcnnaud``, ``netfcaud``, ``netcnnlip``, ``netfclip``) and the
position of every layer in its ``nn.Sequential`` are the keys of that state
dict. The towers map

- audio: 13 MFCCs x 20 steps (0.2 s at 100 Hz), ``[N, 1, 13, 20]``, and
- video: 5 face crops of 224x224, BGR in 0..255 unnormalised, ``[N, 3, 5, 224, 224]``,

to 1024-d embeddings whose Euclidean distance is small when the two are in sync.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import ErrorCode, LipSyncError

# Where the weights live in a models folder (the lock component ``syncnet_v2``).
SYNCNET_WEIGHTS = "syncnet/syncnet_v2.model"
EMBEDDING_DIM = 1024

# One conv stage: (out channels, kernel, stride, padding, pool after it as (kernel, stride, padding) or None).
# A pool of kernel 1 and stride 1 is kept where the original has one: it holds a place in the Sequential.
_Stage = Tuple[int, Sequence[int], Sequence[int], Sequence[int], Union[None, Tuple[Sequence[int], Sequence[int], Sequence[int]]]]

_AUDIO_STAGES: List[_Stage] = [
    (64, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1), (0, 0))),
    (192, (3, 3), (1, 1), (1, 1), ((3, 3), (1, 2), (0, 0))),
    (384, (3, 3), (1, 1), (1, 1), None),
    (256, (3, 3), (1, 1), (1, 1), None),
    (256, (3, 3), (1, 1), (1, 1), ((3, 3), (2, 2), (0, 0))),
    (512, (5, 4), (1, 1), (0, 0), None),
]

_LIP_STAGES: List[_Stage] = [
    (96, (5, 7, 7), (1, 2, 2), (0, 0, 0), ((1, 3, 3), (1, 2, 2), (0, 0, 0))),
    (256, (1, 5, 5), (1, 2, 2), (0, 1, 1), ((1, 3, 3), (1, 2, 2), (0, 1, 1))),
    (256, (1, 3, 3), (1, 1, 1), (0, 1, 1), None),
    (256, (1, 3, 3), (1, 1, 1), (0, 1, 1), None),
    (256, (1, 3, 3), (1, 1, 1), (0, 1, 1), ((1, 3, 3), (1, 2, 2), (0, 0, 0))),
    (512, (1, 6, 6), (1, 1, 1), (0, 0, 0), None),
]


def _tower(stages: Sequence[_Stage], in_channels: int, dims: int) -> nn.Sequential:
    conv, norm, pool = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d)
    layers: List[nn.Module] = []
    for out_channels, kernel, stride, padding, pooling in stages:
        layers += [conv(in_channels, out_channels, kernel, stride, padding), norm(out_channels), nn.ReLU()]
        if pooling is not None:
            layers.append(pool(*pooling))
        in_channels = out_channels
    return nn.Sequential(*layers)


def _head(dim: int = EMBEDDING_DIM) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, dim))


class SyncNet(nn.Module):
    """The two SyncNet towers; ``embed_audio`` and ``embed_lips`` give one embedding per window."""

    def __init__(self):
        super().__init__()
        self.netcnnaud = _tower(_AUDIO_STAGES, 1, dims=2)
        self.netfcaud = _head()
        self.netcnnlip = _tower(_LIP_STAGES, 3, dims=3)
        self.netfclip = _head()

    def embed_audio(self, mfcc: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, 1024] of MFCC windows [N, 1, 13, 20]."""
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def embed_lips(self, frames: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, 1024] of face-crop windows [N, 3, 5, 224, 224] (BGR, 0..255)."""
        return self.netfclip(self.netcnnlip(frames).flatten(1))


def load_syncnet(path: Path, device: Union[str, torch.device] = "cpu") -> SyncNet:
    """SyncNet with the weights of ``path`` (the original ``syncnet_v2.model`` state dict), in eval mode.

    The 2016 file predates BatchNorm's ``num_batches_tracked`` counters; those are the only keys it may lack.

    Raises:
        LipSyncError(models_missing): the file is missing, or is not a SyncNet state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise LipSyncError(
            ErrorCode.MODELS_MISSING,
            f"SyncNet weights '{path}' are missing; fetch the lock component 'syncnet_v2' with "
            f"`python -m builder.fetch_weights --components syncnet_v2 --dest <models>` (it is off by default).",
            stage="load",
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = SyncNet()
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise LipSyncError(
            ErrorCode.MODELS_MISSING,
            f"'{path}' is not a SyncNet state dict (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})",
            stage="load",
        )
    return net.to(device).eval().requires_grad_(False)
