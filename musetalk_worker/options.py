"""Every setting of the engine, in one place.

``EngineOptions`` is what one job may choose; ``LIMITS`` documents the ranges the
worker's input schema enforces, so the CLI, the handler and the engine agree.
Defaults that depend on the model version (extra margin, parsing mode) are left
as ``None`` and filled in by :meth:`EngineOptions.resolved`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Sequence, Tuple

from .errors import ErrorCode, LipSyncError

Version = Literal["v15", "v1"]
ParsingMode = Literal["jaw", "raw", "neck"]
Box = Tuple[int, int, int, int]

VERSIONS: Tuple[str, ...] = ("v15", "v1")
PARSING_MODES: Tuple[str, ...] = ("jaw", "raw", "neck")

# Inclusive ranges for the numeric options: (min, max).
LIMITS = {
    "bbox_shift": (-100, 100),
    "extra_margin": (0, 100),
    "left_cheek_width": (0, 256),
    "right_cheek_width": (0, 256),
    "batch_size": (1, 256),
    "fps": (1.0, 120.0),
    "crf": (0, 51),
}

# Per version: (extra_margin, parsing_mode) used when the job does not choose.
_VERSION_DEFAULTS = {"v15": (10, "jaw"), "v1": (0, "raw")}


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """What one lip-sync job may choose.

    Attributes:
        version: ``v15`` (MuseTalk 1.5, default) or ``v1`` (MuseTalk 1.0).
        bbox_shift: moves the top of the face box down (positive) or up
            (negative) in pixels; MuseTalk 1.5 was trained with 0.
        extra_margin: pixels added below the chin; default 10 for v15, 0 for v1.
        parsing_mode: blend mask shape, ``jaw`` (v15 default), ``raw`` (v1
            default) or ``neck``.
        left_cheek_width, right_cheek_width: cheek bands of the ``jaw`` mask.
        batch_size: frames per UNet/VAE batch.
        fps: frame rate of the video made from a still image (ignored for videos).
        fp16: compute in float16 (CUDA only).
        crf: libx264 quality, lower is better (18 is visually lossless).
        boxes: precomputed face boxes (x1, y1, x2, y2), one per source frame or
            a single box for every frame; skips face detection.
    """

    version: Version = "v15"
    bbox_shift: int = 0
    extra_margin: Optional[int] = None
    parsing_mode: Optional[ParsingMode] = None
    left_cheek_width: int = 90
    right_cheek_width: int = 90
    batch_size: int = 8
    fps: float = 25.0
    fp16: bool = False
    crf: int = 18
    boxes: Optional[Sequence[Box]] = None

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            _invalid("version", self.version, f"one of {', '.join(VERSIONS)}")
        if self.parsing_mode is not None and self.parsing_mode not in PARSING_MODES:
            _invalid("parsing_mode", self.parsing_mode, f"one of {', '.join(PARSING_MODES)}")
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                _invalid(name, value, f"a number from {low} to {high}")
            if isinstance(low, int) and not float(value).is_integer():
                _invalid(name, value, f"a whole number from {low} to {high}")
            if not low <= value <= high:
                _invalid(name, value, f"from {low} to {high}")
        if self.boxes is not None:
            object.__setattr__(self, "boxes", tuple(_check_box(b) for b in self.boxes))
            if not self.boxes:
                _invalid("boxes", "[]", "at least one box [x1, y1, x2, y2]")

    def resolved(self) -> "EngineOptions":
        """Returns a copy with the version-dependent defaults filled in."""
        margin, mode = _VERSION_DEFAULTS[self.version]
        return dataclasses.replace(
            self,
            extra_margin=margin if self.extra_margin is None else int(self.extra_margin),
            parsing_mode=mode if self.parsing_mode is None else self.parsing_mode,
        )


def _check_box(box: Sequence[int]) -> Box:
    values = list(box)
    if len(values) != 4 or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        _invalid("boxes", box, "boxes of four whole numbers [x1, y1, x2, y2]")
    x1, y1, x2, y2 = values
    if x1 < 0 or y1 < 0 or x2 <= x1 or y2 <= y1:
        _invalid("boxes", box, "0 <= x1 < x2 and 0 <= y1 < y2")
    return (x1, y1, x2, y2)


def _invalid(name: str, value: object, allowed: str) -> None:
    raise LipSyncError(
        ErrorCode.INVALID_INPUT, f"'{name}' is {value!r}; it must be {allowed}.", stage="validate"
    )
