"""The blender against PIL's masked paste (what upstream MuseTalk calls), on the CPU.

The same torch code runs on a GPU; ``test_parity.test_gpu_float16_path`` checks it there.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from PIL import Image

from musetalk_worker.engines.musetalk.blend import FaceBlender, visible_part
from musetalk_worker.engines.musetalk.masks import BlendMask
from musetalk_worker.engines.musetalk.store import SourceStore

WIDTH, HEIGHT = 160, 120


def _reference(frame: np.ndarray, face: np.ndarray, mask: BlendMask) -> np.ndarray:
    """Upstream's way: cv2 resize, then PIL pastes the face through the mask (parts outside the frame dropped)."""
    x1, y1, x2, y2 = mask.box
    resized = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    image = Image.fromarray(frame[:, :, ::-1].copy())
    image.paste(Image.fromarray(resized[:, :, ::-1].copy()), (x1, y1), Image.fromarray(mask.alpha))
    return np.asarray(image)[:, :, ::-1]


def _case(rng, box):
    frame = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    face = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    alpha = rng.integers(0, 256, (y2 - y1, x2 - x1), dtype=np.uint8)
    return frame, face, BlendMask(box, alpha)


def _blend_batch(frames, faces, masks):
    sources = []
    for frame, mask in zip(frames, masks):
        part = None if mask is None else visible_part(mask.box, WIDTH, HEIGHT)
        sources.append(None if part is None else frame[part[1] : part[3], part[0] : part[2]])
    batch = FaceBlender(torch.device("cpu")).blend(sources, torch.from_numpy(np.stack(faces)), masks, WIDTH, HEIGHT)
    return [batch.paste(k, frame.copy()) for k, frame in enumerate(frames)]


def test_a_batch_of_different_boxes_matches_pil_within_one_level():
    rng = np.random.default_rng(0)
    # Smaller than the 256 px face (shrunk) inside the frame and past its left and top edges;
    # larger (enlarged) past its right and bottom edges.
    boxes = [(20, 10, 90, 100), (-30, -20, 70, 80), (100, 60, 400, 340)]
    cases = [_case(rng, box) for box in boxes]
    blended = _blend_batch(*zip(*cases))
    for (frame, face, mask), out in zip(cases, blended):
        expected = _reference(frame, face, mask)
        difference = np.abs(out.astype(int) - expected.astype(int))
        assert difference.max() <= 1
        assert (difference > 0).mean() < 0.05, "float and fixed-point resizing should rarely round apart"
        x1, y1, x2, y2 = visible_part(mask.box, WIDTH, HEIGHT)
        outside = np.ones((HEIGHT, WIDTH), bool)
        outside[y1:y2, x1:x2] = False
        np.testing.assert_array_equal(out[outside], frame[outside])
        assert not np.array_equal(out[y1:y2, x1:x2], frame[y1:y2, x1:x2])


def test_frames_without_a_mask_or_outside_the_frame_pass_through():
    rng = np.random.default_rng(1)
    frame, face, mask = _case(rng, (10, 10, 50, 50))
    gone = BlendMask((WIDTH + 5, 0, WIDTH + 40, 30), np.full((30, 35), 255, np.uint8))
    out = _blend_batch([frame, frame, frame], [face, face, face], [None, mask, gone])
    np.testing.assert_array_equal(out[0], frame)
    np.testing.assert_array_equal(out[2], frame)
    assert np.abs(out[1].astype(int) - _reference(frame, face, mask).astype(int)).max() <= 1


def test_a_full_mask_gives_the_resized_face_and_an_empty_one_the_frame():
    rng = np.random.default_rng(2)
    frame, face, _ = _case(rng, (0, 0, 1, 1))
    box = (30, 20, 94, 84)
    full = BlendMask(box, np.full((64, 64), 255, np.uint8))
    empty = BlendMask(box, np.zeros((64, 64), np.uint8))
    with_full, with_empty = _blend_batch([frame, frame], [face, face], [full, empty])
    resized = cv2.resize(face, (64, 64), interpolation=cv2.INTER_LINEAR)
    assert np.abs(with_full[20:84, 30:94].astype(int) - resized.astype(int)).max() <= 1
    np.testing.assert_array_equal(with_empty, frame)


def test_the_store_reads_just_the_pixels_of_a_box(tmp_path):
    rng = np.random.default_rng(3)
    store = SourceStore(tmp_path, HEIGHT, WIDTH)
    frames = [rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(3)]
    for frame in frames:
        store.add(frame)
    try:
        for i, box in enumerate([(0, 0, WIDTH, HEIGHT), (5, 7, 40, 100), (WIDTH - 1, HEIGHT - 1, WIDTH, HEIGHT)]):
            x1, y1, x2, y2 = box
            np.testing.assert_array_equal(store.pixels(i, box), frames[i][y1:y2, x1:x2])
    finally:
        store.close()
