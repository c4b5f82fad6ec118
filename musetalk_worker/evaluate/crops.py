"""SyncNet's face crops: the face track's boxes smoothed over time, a padded square, 224x224.

As the SyncNet pipeline (``run_pipeline.py``'s ``crop_video``): per frame the
box's half-size s = max(w, h) / 2 and its centre, each median-filtered over 13
frames; the crop spans s above the centre to s * 1.8 below it and s * 1.4 to
either side (crop scale 0.4), on the frame padded with grey (110), resized to
224x224 (bilinear). Frames where the face stage found no face get a box
interpolated from their neighbours, as the original's tracker does for missed
detections.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
from scipy.signal import medfilt

CROP_SIZE = 224
CROP_SCALE = 0.4
_SMOOTHING = 13
_PAD_VALUE = 110

Box = Tuple[float, float, float, float]


def smoothed_tracks(boxes: Sequence[Optional[Box]]) -> np.ndarray:
    """Per frame (centre x, centre y, half-size), interpolated where a box is None and median-filtered.

    Raises:
        ValueError: no frame has a box.
    """
    found = [i for i, b in enumerate(boxes) if b is not None]
    if not found:
        raise ValueError("no frame has a face")
    known = np.array([boxes[i] for i in found], np.float64)
    frames = np.arange(len(boxes))
    # np.interp holds the first/last box beyond the ends, where the original's track simply starts later.
    x1, y1, x2, y2 = (np.interp(frames, found, known[:, k]) for k in range(4))
    tracks = np.stack([(x1 + x2) / 2, (y1 + y2) / 2, np.maximum(x2 - x1, y2 - y1) / 2], axis=1)
    # scipy's medfilt pads with zeros at the ends, as the original does.
    return np.stack([medfilt(tracks[:, k], kernel_size=_SMOOTHING) for k in range(3)], axis=1)


def syncnet_crop(frame: np.ndarray, track: np.ndarray) -> np.ndarray:
    """The 224x224 BGR face crop of one frame for its smoothed (centre x, centre y, half-size)."""
    cx, cy, half = (float(v) for v in track)
    pad = int(half * (1 + 2 * CROP_SCALE))
    padded = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(_PAD_VALUE,) * 3)
    cx, cy = cx + pad, cy + pad
    face = padded[int(cy - half): int(cy + half * (1 + 2 * CROP_SCALE)),
                  int(cx - half * (1 + CROP_SCALE)): int(cx + half * (1 + CROP_SCALE))]
    return cv2.resize(face, (CROP_SIZE, CROP_SIZE))
