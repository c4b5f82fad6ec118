"""Face alignment for restoration: five landmarks onto the FFHQ-512 template, smoothed over time.

GFPGAN was trained on FFHQ-aligned 512 px faces, so the face it sees must sit
where FFHQ's alignment puts it: the eye centres, the nose tip and the mouth
corners (five points taken from the 68 iBUG landmarks the face stage already
finds, as facefusion's ``5/68`` set) are mapped onto facexlib's FFHQ-512
template by a least-squares similarity (rotation, uniform scale, shift).

Landmarks jitter from frame to frame, and a restorer fed a jittering crop
flickers (GFPGAN #533), so the points are smoothed along the source frames
before the similarity is fitted: a centred local quadratic fit (a
Savitzky-Golay filter of width ``2 * SMOOTH_RADIUS + 1``), which follows real
head motion without lag. It restarts at frames without a face and at cuts.
The same matrix warps the face into the square and the result back, so the
smoothing can never misplace pasted pixels; it only steadies what GFPGAN sees.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import numpy as np

Box = Tuple[int, int, int, int]

ALIGNED_SIZE = 512
# facexlib's FFHQ-512 five-point template (x, y): left eye, right eye (image left first), nose tip,
# left and right mouth corner.
FFHQ_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
     [201.26117, 371.41043], [313.08905, 371.15118]],
    dtype=np.float64,
)
# Frames on each side of a frame that its smoothed points are fitted over.
SMOOTH_RADIUS = 3
# Between two frames whose points move more than this share of the face's size (RMS distance of the
# five points from their centre), or whose size changes by more than CUT_SCALE, the smoothing restarts:
# that is a cut or a new face, and averaging across it would blend two faces' positions.
CUT_SHIFT = 0.7
CUT_SCALE = 1.2


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """The five template points (5, 2) of 68 iBUG landmarks (x, y in pixels), in the template's order."""
    points = np.asarray(landmarks, dtype=np.float64)
    return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])


def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (no reflection) that maps ``source`` points onto ``target`` points, least squares.

    The closed form of the fit ``cv2.estimateAffinePartial2D`` refines to when every point is an inlier.
    """
    src, dst = np.asarray(source, np.float64), np.asarray(target, np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    p, q = src - src_mean, dst - dst_mean
    norm = float((p**2).sum())
    a = float((p * q).sum()) / norm
    b = float((p[:, 0] * q[:, 1] - p[:, 1] * q[:, 0]).sum()) / norm
    rotation = np.array([[a, -b], [b, a]])
    return np.hstack([rotation, (dst_mean - rotation @ src_mean)[:, None]])


def invert(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a 2x3 affine matrix."""
    full = np.vstack([np.asarray(matrix, np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def context_window(to_aligned: np.ndarray, box: Box, width: int, height: int) -> Box:
    """The frame rectangle that holds the aligned square of ``to_aligned`` and ``box``, clipped to the frame.

    These are the pixels GFPGAN's input is sampled from (it needs the forehead, hair and
    background around the face, not only MuseTalk's box).
    """
    corners = np.array([[-0.5, -0.5, 1], [ALIGNED_SIZE - 0.5, -0.5, 1],
                        [-0.5, ALIGNED_SIZE - 0.5, 1], [ALIGNED_SIZE - 0.5, ALIGNED_SIZE - 0.5, 1]])
    frame = corners @ invert(to_aligned).T
    x1, y1 = math.floor(frame[:, 0].min()), math.floor(frame[:, 1].min())
    x2, y2 = math.ceil(frame[:, 0].max()) + 1, math.ceil(frame[:, 1].max()) + 1
    bx1, by1, bx2, by2 = box
    return (max(min(x1, bx1), 0), max(min(y1, by1), 0), min(max(x2, bx2), width), min(max(y2, by2), height))


class AlignmentTrack:
    """The smoothed frame-to-FFHQ-512 similarity of each source frame, computed once per frame.

    ``points(i)`` gives source frame ``i``'s five points (None without a face) and
    ``count()`` how many source frames there are so far; a frame's matrix needs
    the frames up to ``i + SMOOTH_RADIUS`` (or the source's end) to be there.
    """

    def __init__(self, points: Callable[[int], Optional[np.ndarray]], count: Callable[[], int]):
        self._points, self._count = points, count
        self._matrices: Dict[int, np.ndarray] = {}

    def matrix(self, index: int) -> np.ndarray:
        """The 2x3 similarity from source frame ``index`` onto the template (the frame must have a face)."""
        if index not in self._matrices:
            self._matrices[index] = similarity(self._smoothed(index), FFHQ_512)
        return self._matrices[index]

    def _smoothed(self, index: int) -> np.ndarray:
        centre = self._points(index)
        if centre is None:
            raise ValueError(f"source frame {index} has no face to align")
        neighbours = {0: centre}
        for step in (-1, 1):
            previous = centre
            for offset in range(1, SMOOTH_RADIUS + 1):
                j = index + step * offset
                if not 0 <= j < self._count():
                    break
                current = self._points(j)
                if current is None or is_cut(previous, current):
                    break
                neighbours[step * offset] = previous = current
        offsets = sorted(neighbours)
        return local_quadratic(np.array(offsets, np.float64), np.stack([neighbours[o] for o in offsets]))


def is_cut(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two consecutive frames' five points are too far apart to be the same face moving."""
    size_a = float(np.sqrt(((a - a.mean(0)) ** 2).sum(1).mean()))
    size_b = float(np.sqrt(((b - b.mean(0)) ** 2).sum(1).mean()))
    shift = float(np.linalg.norm(a.mean(0) - b.mean(0)))
    return shift > CUT_SHIFT * max(size_a, size_b) or max(size_a, size_b) > CUT_SCALE * min(size_a, size_b)


def local_quadratic(offsets: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The value at offset 0 of a least-squares polynomial (degree 2, less with fewer samples) through
    ``values`` [n, ...] at ``offsets`` [n]: a Savitzky-Golay filter that also works on cut-short windows."""
    degree = min(2, len(offsets) - 1)
    vandermonde = offsets[:, None] ** np.arange(degree + 1)[None, :]
    flat = values.reshape(len(offsets), -1)
    coefficients = np.linalg.lstsq(vandermonde, flat, rcond=None)[0]
    return coefficients[0].reshape(values.shape[1:])

