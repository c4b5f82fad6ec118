"""LatentSync alignment and paste-back against upstream: every alignment and restore array of every fixture case.

Bounds (../shared/parity/latentsync/README.md): landmarks, points, boxes, masks and the restore box exact;
matrices and the smoothing state max abs <= 1e-4; crops and faces exact or 1 level on <= 0.1 % of pixels;
masked pixels <= 1e-6; pasted faces and the restore's input <= 1e-3; restored frames within 1 level with
>= 99.5 % exact and nothing outside the restore box changed. The alignment's smoothing runs once over a case's
source frames in order; looped cases index the source's faces and matrices with the fixture's ``loop_index``.

Plus: the three points from the 68-point landmarks against those from the 106, and unit checks of the pieces
(SVD, inverse, erosion, the region restore against the whole frame, the aligner's order guard, float16 matrices).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest
import torch

from latentsync_fixtures import fixture_cases, fixture_dirs, load
from musetalk_worker.engines.latentsync.align import (
    FaceAligner, FaceGeometry, MouthMask, fit_similarity, inverse_3x3, points_from_68, points_from_106,
    reference_pixels, resize_faces, round_landmarks, svd_2x2, warp_faces,
)
from musetalk_worker.engines.latentsync.restore import (
    center_erosion, paste_mouth, resize_to_crop, restore_box, restore_frames, restore_region, union_box,
)

CASES = fixture_cases()


@dataclasses.dataclass(frozen=True)
class Aligned:
    """One case's alignment of its source frames, computed as the engine will."""

    geometry: FaceGeometry
    points: np.ndarray  # (T, 3, 2)
    matrices: torch.Tensor  # (T, 2, 3)
    biases: np.ndarray  # (T, 2)
    crops: np.ndarray  # (T, h, w, 3)
    faces: np.ndarray  # (T, 3, r, r)


def _settings(folder: Path, case: str) -> dict:
    return load(folder).cases[case]


def _source_count(folder: Path, case: str) -> int:
    settings = _settings(folder, case)
    return min(settings["num_output_frames"], settings["video_frames"])


@functools.lru_cache(maxsize=None)
def _aligned(folder: Path, case: str) -> Aligned:
    fixture = load(folder)
    count = _source_count(folder, case)
    geometry = FaceGeometry(_settings(folder, case)["resolution"])
    aligner = FaceAligner(geometry)
    points = np.stack([points_from_106(lmk) for lmk in fixture.input("landmarks_106")[:count]])
    matrices, biases = [], []
    for index, frame_points in enumerate(points):
        matrices.append(aligner.fit(frame_points, index))
        biases.append(aligner.bias.numpy().copy())
    matrices = torch.stack(matrices)
    crops = warp_faces(torch.from_numpy(fixture.input("frames")[:count]), matrices, geometry).numpy()
    return Aligned(geometry, points, matrices, np.stack(biases), crops, resize_faces(crops, geometry))


def _source_array(folder: Path, case: str, name: str) -> np.ndarray:
    """The per-source-frame version of ``name`` (``faces_src``/``boxes_src`` where the case loops)."""
    fixture = load(folder)
    return fixture.array(case, f"{name}_src") if fixture.has(case, f"{name}_src") else fixture.array(case, name)


def _assert_uint8_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Exact, or 1 level on at most 0.1 % of the values."""
    assert actual.shape == expected.shape, what
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1, f"{what}: max diff {diff.max()}"
    assert (diff > 0).mean() <= 1e-3, f"{what}: {(diff > 0).mean():.3%} of values differ"


def _heavy(folder: Path, case: str) -> List[int]:
    return list(_settings(folder, case)["heavy_frame_index"])


def _mask(folder: Path, case: str) -> MouthMask:
    return MouthMask.load(load(folder).models / "mask.png", _settings(folder, case)["resolution"])


@pytest.mark.parametrize("folder,case", CASES)
def test_landmarks_and_points(folder, case):
    fixture = load(folder)
    count = _source_count(folder, case)
    np.testing.assert_array_equal(round_landmarks(fixture.input("landmarks_106")[:count]),
                                  fixture.array(case, "landmarks_rounded"))
    np.testing.assert_array_equal(_aligned(folder, case).points, fixture.array(case, "landmarks3"))


@pytest.mark.parametrize("folder,case", CASES)
def test_matrices_and_smoothing(folder, case):
    fixture = load(folder)
    aligned = _aligned(folder, case)
    np.testing.assert_allclose(aligned.matrices.numpy(), fixture.array(case, "affine_matrices"), rtol=0, atol=1e-4)
    np.testing.assert_allclose(aligned.biases, fixture.array(case, "smooth_bias"), rtol=0, atol=1e-4)
    loop_index = fixture.array(case, "loop_index")
    np.testing.assert_allclose(aligned.matrices[loop_index].numpy(), fixture.array(case, "affine_matrices_out"),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("folder,case", CASES)
def test_crops_faces_and_boxes(folder, case):
    fixture = load(folder)
    aligned = _aligned(folder, case)
    _assert_uint8_close(aligned.crops, fixture.array(case, "crops_raw"), "crops_raw")
    _assert_uint8_close(aligned.faces, _source_array(folder, case, "faces"), "faces (source frames)")
    loop_index = fixture.array(case, "loop_index")
    _assert_uint8_close(aligned.faces[loop_index], fixture.array(case, "faces"), "faces (output frames)")
    for name in ("boxes", "boxes_src"):
        if fixture.has(case, name):
            boxes = fixture.array(case, name)
            np.testing.assert_array_equal(boxes, np.tile(aligned.geometry.box, (len(boxes), 1)))


@pytest.mark.parametrize("folder,case", CASES)
def test_mask_and_masked_pixels(folder, case):
    fixture = load(folder)
    mask = _mask(folder, case)
    assert mask.pixels.dtype == torch.float64
    np.testing.assert_array_equal(mask.pixels.numpy(), fixture.array(case, "mask"))
    np.testing.assert_array_equal(mask.keep.numpy(), fixture.array(case, "masks"))
    faces = torch.from_numpy(fixture.array(case, "faces")[_heavy(folder, case)])
    masked = mask.masked(reference_pixels(faces))
    assert masked.dtype == torch.float64
    np.testing.assert_allclose(masked.numpy(), fixture.array(case, "masked_pixel_values"), rtol=0, atol=1e-6)


@pytest.mark.parametrize("folder,case", CASES)
def test_paste_and_restore_input(folder, case):
    fixture = load(folder)
    faces = torch.from_numpy(fixture.array(case, "faces")[_heavy(folder, case)])
    pasted = paste_mouth(torch.from_numpy(fixture.array(case, "decoded")), reference_pixels(faces),
                         _mask(folder, case))
    np.testing.assert_allclose(pasted.numpy(), fixture.array(case, "pasted"), rtol=0, atol=1e-3)
    resized = resize_to_crop(torch.from_numpy(fixture.array(case, "pasted")), _aligned(folder, case).geometry)
    np.testing.assert_allclose(resized.numpy(), fixture.array(case, "restore_face_in"), rtol=0, atol=1e-3)


@pytest.mark.parametrize("folder,case", CASES)
def test_restore_box(folder, case):
    fixture = load(folder)
    frame_size = fixture.input("frames").shape[1:3]
    geometry = _aligned(folder, case).geometry
    matrices = torch.from_numpy(fixture.array(case, "affine_matrices_out"))
    box = union_box([restore_box(m, geometry, frame_size) for m in matrices])
    np.testing.assert_array_equal(box, fixture.array(case, "restored_box"))


@pytest.mark.parametrize("folder,case", CASES)
def test_restored_frames(folder, case):
    fixture = load(folder)
    heavy = _heavy(folder, case)
    restored_index = list(fixture.array(case, "restored_index"))
    frames_to_check = [k for k, frame in enumerate(heavy) if frame in restored_index]
    assert frames_to_check, "no restored frame of this case has its decoded face in the fixture"
    outputs = [heavy[k] for k in frames_to_check]
    source = fixture.input("frames")[fixture.array(case, "loop_index")[outputs]]
    pasted = torch.from_numpy(fixture.array(case, "pasted")[frames_to_check])
    matrices = torch.from_numpy(fixture.array(case, "affine_matrices_out")[outputs])
    out, _ = restore_frames(source, pasted, matrices, _aligned(folder, case).geometry)

    x0, y0, x1, y1 = fixture.array(case, "restored_box")
    expected = fixture.array(case, "restored_crop")[[restored_index.index(t) for t in outputs]]
    diff = np.abs(out[:, y0:y1, x0:x1].astype(np.int16) - expected)
    assert diff.max() <= 1, f"restored_crop: max diff {diff.max()}"
    assert (diff == 0).mean() >= 0.995, f"restored_crop: only {(diff == 0).mean():.3%} exact"
    outside = np.ones(source.shape[1:3], bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(out[:, outside], source[:, outside])


@pytest.mark.parametrize("folder", [pytest.param(f, id=f.name) for f in fixture_dirs()] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no LatentSync parity fixture"))])
def test_points_from_68_equal_points_from_106(folder):
    """The production path (68 points from DWPose/dlib) gives the crop points the 106-point detector gives."""
    fixture = load(folder)
    from_68 = np.stack([points_from_68(lmk) for lmk in fixture.input("landmarks_68")])
    from_106 = np.stack([points_from_106(lmk) for lmk in fixture.input("landmarks_106")])
    np.testing.assert_array_equal(from_68, from_106)


def test_svd_2x2_is_an_svd_close_to_torch():
    rng = np.random.default_rng(0)
    matrices = np.concatenate([rng.normal(size=(200, 2, 2)), rng.normal(size=(50, 2, 2)) * 100,
                               [[[1, 0], [0, 1]], [[0, 1], [1, 0]], [[2, 0], [0, 0]], [[0, 0], [3, 1]]]])
    for a in matrices.astype(np.float32):
        u, vt = svd_2x2(a)
        sigma = u.T.astype(np.float64) @ a @ vt.T
        scale = max(1.0, np.abs(a).max())
        assert abs(sigma[0, 1]) + abs(sigma[1, 0]) <= 1e-5 * scale, a
        assert sigma[0, 0] >= sigma[1, 1] - 1e-5 * scale and sigma[1, 1] >= -1e-5 * scale, a
        np.testing.assert_allclose(u.T @ u, np.eye(2), atol=1e-6)
        np.testing.assert_allclose(vt @ vt.T, np.eye(2), atol=1e-6)
        tu, _, tvt = torch.linalg.svd(torch.from_numpy(a))
        if abs(sigma[0, 0] - sigma[1, 1]) > 1e-3 * scale:  # distinct singular values: unique up to signs
            np.testing.assert_allclose(np.abs(u), np.abs(tu.numpy()), atol=1e-5)
            np.testing.assert_allclose(np.abs(vt), np.abs(tvt.numpy()), atol=1e-5)


def test_inverse_3x3_close_to_torch():
    rng = np.random.default_rng(1)
    matrices = torch.from_numpy(rng.normal(size=(100, 3, 3)).astype(np.float32))
    matrices[:, 2] = torch.tensor([0.0, 0.0, 1.0])
    matrices[:, :2, :2] += 3 * torch.eye(2)
    np.testing.assert_allclose(inverse_3x3(matrices).numpy(), torch.linalg.inv(matrices).numpy(), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("w_edge", [0, 1, 2, 5])
def test_center_erosion_equals_cv2(w_edge):
    rng = np.random.default_rng(w_edge)
    mask = np.zeros((40, 50), np.float32)
    mask[5:33, 8:45] = rng.uniform(0.5, 1.0, size=(28, 37))
    mask[0:3, 0:4] = 1.0  # touching the border: cv2 ignores what lies outside the image
    expected = cv2.erode(mask, np.ones((2 * w_edge, 2 * w_edge), np.uint8))
    actual = center_erosion(torch.from_numpy(mask)[None, None], w_edge)[0, 0].numpy()
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("scale", [0.1, 0.15, 0.25, 1.5])
def test_region_restore_equals_whole_frame(scale):
    """Large faces (scale < 1/3: the bilinear footprint reaches past the 3 px margin), small ones, faces cut by
    the frame's edge: restoring the box alone equals restoring the whole frame, and nothing outside it changes."""
    geometry = FaceGeometry(64)
    rng = np.random.default_rng(int(scale * 100))
    height, width = int(110 / scale) + 40, int(80 / scale) + 40
    for _ in range(4):
        frame = rng.integers(0, 256, size=(1, height, width, 3), dtype=np.uint8)
        angle = rng.uniform(-0.5, 0.5)
        shift = rng.uniform(-15, 5, size=2)  # some faces stick out of the frame's top or left
        matrix = torch.tensor([[[scale * np.cos(angle), scale * np.sin(angle), shift[0]],
                                [-scale * np.sin(angle), scale * np.cos(angle), shift[1]]]], dtype=torch.float32)
        pasted = torch.from_numpy(rng.uniform(-1.1, 1.1, size=(1, 3, 64, 64)).astype(np.float32))
        out, (x0, y0, x1, y1) = restore_frames(frame, pasted, matrix, geometry)
        whole = restore_region(torch.from_numpy(frame), resize_to_crop(pasted, geometry), matrix,
                               (0, 0, width, height), (height, width)).numpy()
        np.testing.assert_array_equal(out, whole)
        outside = np.ones((height, width), bool)
        outside[y0:y1, x0:x1] = False
        changed = (whole[0] != frame[0]).any(axis=-1)
        assert changed.any() and not changed[outside].any()


def test_aligner_state_runs_once_in_source_order():
    geometry = FaceGeometry(256)
    points = [np.array([[85.0, 111.0], [148.0, 113.0], [110.0, 158.0]]) + [2 * k, k] for k in range(3)]
    raw = [fit_similarity(p, geometry.template) for p in points]
    aligner = FaceAligner(geometry)
    first = aligner.fit(points[0], 0)
    torch.testing.assert_close(first[:, 2], raw[0][0][:, 2] + raw[0][1], rtol=0, atol=0)
    second = aligner.fit(points[1], 2)  # frame 1 had no face: the state skips it
    smoothed = raw[0][1] * 0.2 + raw[1][1] * 0.8
    torch.testing.assert_close(aligner.bias, smoothed, rtol=0, atol=0)
    torch.testing.assert_close(second[:, 2], raw[1][0][:, 2] + smoothed, rtol=0, atol=0)
    assert not torch.equal(smoothed, raw[1][1])
    with pytest.raises(ValueError, match="once, in order"):
        aligner.fit(points[2], 2)
    # A new job starts without state: its first frame is not smoothed.
    torch.testing.assert_close(FaceAligner(geometry).fit(points[1], 0)[:, 2], raw[1][0][:, 2] + raw[1][1],
                               rtol=0, atol=0)


def test_fp16_matrix_rounds_to_float16():
    geometry = FaceGeometry(512)
    points = np.array([[620.0, 410.0], [760.0, 415.0], [690.0, 520.0]])
    exact = FaceAligner(geometry).fit(points, 0)
    rounded = FaceAligner(geometry, fp16_matrix=True).fit(points, 0)
    assert rounded.dtype == torch.float32
    torch.testing.assert_close(rounded, exact.half().float(), rtol=0, atol=0)
    assert not torch.equal(rounded, exact)


@pytest.mark.gpu
@pytest.mark.parametrize("folder,case", CASES)
def test_gpu_warp_and_restore(folder, case):
    """The same warp and restore on CUDA (float32) against the fixture, with a looser bound than the CPU's:
    crops and restored pixels within 1 level on >= 99 % (CUDA's interpolation kernels round differently)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: the CUDA warp and restore cannot run here")
    fixture = load(folder)
    aligned = _aligned(folder, case)
    count = _source_count(folder, case)
    frames = torch.from_numpy(fixture.input("frames")[:count]).cuda()
    crops = warp_faces(frames, aligned.matrices, aligned.geometry).cpu().numpy()
    diff = np.abs(crops.astype(np.int16) - fixture.array(case, "crops_raw"))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99
    heavy = _heavy(folder, case)
    source = fixture.input("frames")[fixture.array(case, "loop_index")[heavy]]
    pasted = torch.from_numpy(fixture.array(case, "pasted")).cuda()
    matrices = torch.from_numpy(fixture.array(case, "affine_matrices_out")[heavy])
    on_gpu, _ = restore_frames(source, pasted, matrices, aligned.geometry)
    on_cpu, _ = restore_frames(source, pasted.cpu(), matrices, aligned.geometry)
    diff = np.abs(on_gpu.astype(np.int16) - on_cpu)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99
