"""Face restoration's alignment maths against OpenCV: five points, the similarity, the warps, the smoothing."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from musetalk_worker.restoration.align import (
    ALIGNED_SIZE, FFHQ_512, SMOOTH_RADIUS, AlignmentTrack, context_window, five_points, similarity,
)
from musetalk_worker.restoration.warp import Placement, region_weight, warp_in, warp_out

WIDTH, HEIGHT = 640, 480


def _face_points(rng, scale=0.8, angle=0.2, centre=(330.0, 250.0), noise=1.5) -> np.ndarray:
    """The template's five points moved to a face in a frame (rotated, scaled, shifted), with landmark noise."""
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = (FFHQ_512 - FFHQ_512.mean(0)) @ rotation.T + np.array(centre)
    return points + rng.normal(0, noise, points.shape)


def _smooth_frame(rng) -> np.ndarray:
    noise = rng.integers(0, 256, (HEIGHT, WIDTH, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 4) * 3 - 255, 0, 255).astype(np.uint8)


def test_five_points_are_the_eye_centres_the_nose_tip_and_the_mouth_corners():
    landmarks = np.arange(136, dtype=np.float32).reshape(68, 2)
    points = five_points(landmarks)
    np.testing.assert_allclose(points[0], landmarks[36:42].mean(0))
    np.testing.assert_allclose(points[1], landmarks[42:48].mean(0))
    np.testing.assert_array_equal(points[2:], landmarks[[30, 48, 54]])


def test_the_similarity_is_opencvs_partial_affine_estimate():
    rng = np.random.default_rng(0)
    for _ in range(5):
        points = _face_points(rng, scale=rng.uniform(0.5, 2), angle=rng.uniform(-0.6, 0.6))
        ours = similarity(points, FFHQ_512)
        # facefusion's call: RANSAC with a threshold (100 px) that keeps all five points as inliers, so
        # OpenCV's Levenberg-Marquardt refinement ends at the least-squares fit over all of them.
        theirs, inliers = cv2.estimateAffinePartial2D(points, FFHQ_512, method=cv2.RANSAC,
                                                      ransacReprojThreshold=100)
        assert inliers.all()
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-3)
        # Without landmark noise every method agrees, LMEDS (facexlib's) included.
        exact = _face_points(rng, scale=1.3, angle=-0.4, noise=0)
        lmeds, _ = cv2.estimateAffinePartial2D(exact, FFHQ_512, method=cv2.LMEDS)
        np.testing.assert_allclose(similarity(exact, FFHQ_512), lmeds, rtol=1e-5, atol=1e-3)
        # A similarity: a rotation times one scale, no shear, no reflection.
        a, b = ours[0, 0], ours[1, 0]
        np.testing.assert_allclose(ours[:, :2], [[a, -b], [b, a]])


def test_the_warps_in_and_out_match_opencvs_within_one_level():
    rng = np.random.default_rng(1)
    frame = _smooth_frame(rng)
    # Large enough that the aligned square reaches past the frame's left and top edges.
    points = _face_points(rng, scale=1.1, angle=0.3, centre=(180.0, 170.0))
    ours = similarity(points, FFHQ_512)
    theirs, _ = cv2.estimateAffinePartial2D(points, FFHQ_512, method=cv2.RANSAC, ransacReprojThreshold=100)
    region = (100, 120, 300, 320)
    window = context_window(ours, region, WIDTH, HEIGHT)
    x1, y1, x2, y2 = window
    assert window[0] == 0 and window[1] == 0 and window[2] <= WIDTH and window[3] <= HEIGHT
    placement = Placement(ours, window, region)

    pixels = torch.from_numpy(frame[y1:y2, x1:x2]).permute(2, 0, 1).unsqueeze(0).float()
    aligned = warp_in(pixels, [placement], ALIGNED_SIZE)
    expected = cv2.warpAffine(frame, theirs, (ALIGNED_SIZE, ALIGNED_SIZE), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)
    got = aligned[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1

    back, coords = warp_out(aligned, [placement], region[3] - region[1], region[2] - region[0])
    expected_back = cv2.warpAffine(expected, theirs, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                   borderMode=cv2.BORDER_REPLICATE)[region[1]:region[3], region[0]:region[2]]
    got_back = back[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)
    assert np.abs(got_back.astype(int) - expected_back.astype(int)).max() <= 1
    # The round trip returns the frame, up to two bilinear resamplings of a smooth image.
    original = frame[region[1]:region[3], region[0]:region[2]].astype(int)
    assert np.abs(got_back.astype(int) - original).mean() < 1.0
    # The aligned coordinates of the region's pixels are the similarity's.
    np.testing.assert_allclose(coords[0, 7, 11].numpy(), ours @ [region[0] + 11, region[1] + 7, 1], atol=1e-3)


def test_the_face_weight_covers_the_square_and_fades_at_its_edge_and_the_mouth_weight_is_inside_it():
    ys, xs = torch.meshgrid(torch.arange(-40.0, 552.0, 4), torch.arange(-40.0, 552.0, 4), indexing="ij")
    coords = torch.stack([xs, ys], -1).unsqueeze(0)
    face, mouth = region_weight(coords, "face")[0, 0], region_weight(coords, "mouth")[0, 0]
    inside = (xs > 40) & (xs < 470) & (ys > 40) & (ys < 470)
    outside = (xs < 0) | (xs > 511) | (ys < 0) | (ys > 511)
    assert bool((face[inside] == 1).all()) and bool((face[outside] == 0).all())
    assert bool((mouth <= face).all())
    mouth_centre = (xs - 257).abs().le(20) & (ys - 380).abs().le(10)
    assert bool((mouth[mouth_centre] == 1).all())
    assert bool((mouth[ys < 290] == 0).all()), "the eyes and nose stay the source's"


def _track(points):
    return AlignmentTrack(lambda i: points[i], lambda: len(points))


def test_smoothing_follows_steady_motion_without_lag_and_removes_jitter():
    rng = np.random.default_rng(2)
    truth = [_face_points(rng, centre=(200.0 + 4 * i, 240.0), noise=0) for i in range(30)]
    moving = _track(truth)
    for i in range(30):  # a quadratic fit reproduces linear motion exactly, at the edges too
        np.testing.assert_allclose(moving.matrix(i), similarity(truth[i], FFHQ_512), atol=1e-9)
    noisy = [p + rng.normal(0, 2.0, p.shape) for p in truth]
    track = _track(noisy)
    raw = [np.abs(similarity(noisy[i], FFHQ_512) - similarity(truth[i], FFHQ_512))[:, 2].mean() for i in range(30)]
    smooth = [np.abs(track.matrix(i) - similarity(truth[i], FFHQ_512))[:, 2].mean() for i in range(30)]
    assert np.mean(smooth) < 0.7 * np.mean(raw)


@pytest.mark.parametrize("gap", ["no face", "cut"])
def test_smoothing_restarts_at_a_frame_without_a_face_and_at_a_cut(gap):
    rng = np.random.default_rng(3)
    first = [_face_points(rng, centre=(200.0, 240.0)) for _ in range(10)]
    second = [_face_points(rng, centre=(450.0, 200.0), scale=0.6) for _ in range(10)]
    points = first + ([None] if gap == "no face" else []) + second
    track = _track(points)
    after = len(first) + (1 if gap == "no face" else 0)
    # The frames around the break are smoothed over their own side only.
    np.testing.assert_allclose(track.matrix(len(first) - 1), _track(first).matrix(len(first) - 1))
    np.testing.assert_allclose(track.matrix(after), _track(second).matrix(0))
    assert SMOOTH_RADIUS >= 1
