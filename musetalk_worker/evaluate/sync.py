"""LSE-D, LSE-C and the audio-video offset from SyncNet embeddings (the Wav2Lip / SyncNet protocol).

For every video window i and every shift s in -vshift..+vshift the distance
between the lip embedding of window i and the audio embedding of window i+s
is taken (audio windows before the start or past the end count as zero
vectors, as in the original). The distances are averaged over i per shift:

- LSE-D: the smallest mean distance (lower is better synced),
- LSE-C: the median of the mean distances minus that minimum (higher is more confident),
- offset: vshift minus the index of the minimum, so offset k means the lips of
  frame t match the audio of frame t-k (the picture lags the sound by k frames).
"""

from __future__ import annotations

import dataclasses
from typing import List

import torch
import torch.nn.functional as F

VSHIFT = 15


@dataclasses.dataclass(frozen=True)
class SyncScores:
    """The SyncNet scores of one clip; ``mean_distances[j]`` is for offset ``vshift - j``."""

    offset: int
    lse_d: float
    lse_c: float
    windows: int
    mean_distances: List[float]

    def as_dict(self) -> dict:
        """The scores as JSON-ready values, without the per-offset curve."""
        return {"lse_d": self.lse_d, "lse_c": self.lse_c, "offset": self.offset, "windows": self.windows}


def sync_scores(lips: torch.Tensor, audio: torch.Tensor, vshift: int = VSHIFT) -> SyncScores:
    """Scores of lip embeddings [N, D] against audio embeddings [N, D] of the same windows."""
    if lips.shape != audio.shape or lips.ndim != 2 or len(lips) == 0:
        raise ValueError(f"need two [N, D] embeddings of the same shape, got {tuple(lips.shape)} and {tuple(audio.shape)}")
    lips, audio = lips.float(), audio.float()
    padded = F.pad(audio, (0, 0, vshift, vshift))
    shifts = 2 * vshift + 1
    # distances[i, j]: lips of window i against audio of window i + j - vshift.
    windows = padded.unfold(0, shifts, 1).permute(0, 2, 1)  # [N, shifts, D]
    # pairwise_distance adds its eps to the difference, as the original scores do.
    distances = F.pairwise_distance(lips.unsqueeze(1).expand_as(windows).reshape(-1, lips.shape[1]),
                                    windows.reshape(-1, lips.shape[1])).view(len(lips), shifts)
    mean = distances.mean(dim=0)
    minimum, index = torch.min(mean, dim=0)
    return SyncScores(
        offset=vshift - int(index),
        lse_d=float(minimum),
        lse_c=float(torch.median(mean) - minimum),
        windows=len(lips),
        mean_distances=[float(d) for d in mean],
    )
