"""Face boxes: from 68 landmarks to the box MuseTalk crops, and the blending square.

The arithmetic follows upstream exactly (integer landmarks, the nose-bridge
point as the top anchor, the detector box as fallback), because the crop
decides what the UNet sees and must match what MuseTalk was trained on.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

Box = Tuple[int, int, int, int]

# iBUG index of the nose-bridge point the box's upper half is measured from.
_NOSE_BRIDGE = 29
# The blending square is this much larger than the face box.
_BLEND_EXPAND = 1.5


def face_box(landmarks: np.ndarray, detector_box: Sequence[int], bbox_shift: int = 0) -> Box:
    """The face box (x1, y1, x2, y2) MuseTalk crops, before any extra margin.

    The box spans the landmarks horizontally and from the chin up to as far
    above the (shifted) nose bridge as the chin is below it, clipped at the top
    of the frame. If that box is empty or starts left of the frame, the
    detector's box is used instead.
    """
    points = np.asarray(landmarks).astype(np.int32)
    anchor_y = int(points[_NOSE_BRIDGE, 1]) + int(bbox_shift)
    bottom = int(points[:, 1].max())
    top = max(0, anchor_y - (bottom - anchor_y))
    x1, x2 = int(points[:, 0].min()), int(points[:, 0].max())
    if bottom - top <= 0 or x2 - x1 <= 0 or x1 < 0:
        return tuple(int(v) for v in detector_box)
    return (x1, top, x2, bottom)


def with_margin(box: Box, extra_margin: int, frame_height: int) -> Box:
    """Extends the box ``extra_margin`` pixels below the chin, within the frame (v1.5)."""
    x1, y1, x2, y2 = box
    return (x1, y1, x2, min(y2 + extra_margin, frame_height))


def blend_square(box: Box) -> Tuple[Box, int]:
    """The square around the face box that blending works in, and its half side.

    It may extend past the frame; the parts outside count as black.
    """
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    half = int(max(x2 - x1, y2 - y1) // 2 * _BLEND_EXPAND)
    return (cx - half, cy - half, cx + half, cy + half), half


def clip_box(box: Box, width: int, height: int) -> Box:
    """The part of ``box`` inside a ``width`` x ``height`` frame."""
    x1, y1, x2, y2 = box
    return (max(x1, 0), max(y1, 0), min(x2, width), min(y2, height))
