"""The lip-sync score: SyncNet's layout, its MFCCs, the offset/confidence math, crops, and the scorer end to end."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from musetalk_worker.errors import LipSyncError
from musetalk_worker.evaluate import __main__ as cli
from musetalk_worker.evaluate.crops import CROP_SIZE, smoothed_tracks, syncnet_crop
from musetalk_worker.evaluate.mfcc import mfcc
from musetalk_worker.evaluate.score import Scorer, ScoreOptions
from musetalk_worker.evaluate.sync import sync_scores
from musetalk_worker.evaluate.syncnet import SyncNet, load_syncnet
from musetalk_worker.faces import FaceDetection

SYNCNET_V2_BYTES = 54_573_114


def _conv_bn(prefix, index, out_ch, in_ch, kernel):
    """Keys and shapes of a conv (weight, bias) at ``index`` and its batch norm right after it."""
    keys = {f"{prefix}.{index}.weight": (out_ch, in_ch, *kernel), f"{prefix}.{index}.bias": (out_ch,)}
    for name in ("weight", "bias", "running_mean", "running_var"):
        keys[f"{prefix}.{index + 1}.{name}"] = (out_ch,)
    return keys


def _original_layout():
    """syncnet_v2.model's tensors as the Oxford release's SyncNetModel.S defines them (written out by hand)."""
    keys = {}
    # Audio tower: conv indices 0, 4, 8, 11, 14, 18 (pools after the 1st, 2nd and 5th conv).
    for index, out_ch, in_ch, kernel in [(0, 64, 1, (3, 3)), (4, 192, 64, (3, 3)), (8, 384, 192, (3, 3)),
                                         (11, 256, 384, (3, 3)), (14, 256, 256, (3, 3)), (18, 512, 256, (5, 4))]:
        keys.update(_conv_bn("netcnnaud", index, out_ch, in_ch, kernel))
    for index, out_ch, in_ch, kernel in [(0, 96, 3, (5, 7, 7)), (4, 256, 96, (1, 5, 5)), (8, 256, 256, (1, 3, 3)),
                                         (11, 256, 256, (1, 3, 3)), (14, 256, 256, (1, 3, 3)),
                                         (18, 512, 256, (1, 6, 6))]:
        keys.update(_conv_bn("netcnnlip", index, out_ch, in_ch, kernel))
    for head in ("netfcaud", "netfclip"):
        keys.update({f"{head}.0.weight": (512, 512), f"{head}.0.bias": (512,), f"{head}.3.weight": (1024, 512),
                     f"{head}.3.bias": (1024,)})
        keys.update({f"{head}.1.{n}": (512,) for n in ("weight", "bias", "running_mean", "running_var")})
    return keys


def test_syncnet_state_dict_has_the_original_keys_and_shapes():
    state = SyncNet().state_dict()
    ours = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert ours == _original_layout()
    # The float32 tensors fill the released file but for its pickle framing (a few KiB).
    tensor_bytes = sum(v.numel() * 4 for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert 0 < SYNCNET_V2_BYTES - tensor_bytes < 32 * 1024


def test_syncnet_embeds_windows_of_the_protocol_sizes():
    net = SyncNet().eval()
    with torch.no_grad():
        assert net.embed_audio(torch.zeros(2, 1, 13, 20)).shape == (2, 1024)
        assert net.embed_lips(torch.zeros(2, 3, 5, 224, 224)).shape == (2, 1024)


def test_load_syncnet_takes_a_2016_state_dict_and_refuses_others(tmp_path):
    torch.manual_seed(0)
    original = {k: v for k, v in SyncNet().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(original, tmp_path / "syncnet_v2.model")
    loaded = load_syncnet(tmp_path / "syncnet_v2.model")
    assert not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in original.items())

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.model")
    with pytest.raises(LipSyncError, match="not a SyncNet"):
        load_syncnet(tmp_path / "other.model")
    with pytest.raises(LipSyncError, match="syncnet_v2"):
        load_syncnet(tmp_path / "missing.model")


def test_mfcc_matches_python_speech_features():
    t = np.arange(1200) / 16000
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 3100 * t * t * 20)).astype(np.float32)
    # python_speech_features.mfcc(int16 of the same samples, 16000), columns 0 and 5, computed once.
    expected = np.array([
        [20.433314, 22.106534], [9.598949, -9.779282], [-39.104052, 29.190069], [9.255072, -36.50483],
        [-14.039773, -2.358267], [-41.191978, -52.273869], [-10.898754, -12.071994], [-16.196179, -29.707581],
        [-11.511421, 5.101196], [19.556569, 7.129715], [16.966425, 19.078945], [13.975972, 20.648304],
        [17.646211, 7.92744]])
    features = mfcc(samples)
    assert features.shape == (13, 6)  # 1 + ceil((1200 - 400) / 160)
    np.testing.assert_allclose(features[:, [0, 5]], expected, atol=1e-5)
    assert mfcc(np.zeros(16000, np.float32)).shape == (13, 99)  # 1 + ceil(15600 / 160)


@pytest.mark.parametrize("shift", [-9, 0, 4, 15])
def test_embeddings_shifted_by_k_report_offset_k(shift):
    generator = torch.Generator().manual_seed(1)
    audio = torch.randn(80, 256, generator=generator)
    lips = torch.roll(audio, shift, dims=0) + 0.1 * torch.randn(80, 256, generator=generator)
    scores = sync_scores(lips, audio)
    assert scores.offset == shift
    assert scores.lse_c > 0.5 * statistics_median(scores.mean_distances)
    assert len(scores.mean_distances) == 31


def test_shuffled_embeddings_have_confidence_near_zero():
    generator = torch.Generator().manual_seed(2)
    audio = torch.randn(200, 1024, generator=generator)
    synced = sync_scores(audio + 0.1 * torch.randn(200, 1024, generator=generator), audio)
    shuffled = sync_scores(audio[torch.randperm(200, generator=generator)], audio)
    assert synced.lse_c > 0.9 * statistics_median(synced.mean_distances)
    assert shuffled.lse_c < 0.05 * statistics_median(shuffled.mean_distances)
    assert shuffled.lse_d > 10 * synced.lse_d


def statistics_median(values):
    return float(np.median(values))


def test_tracks_fill_missing_boxes_and_crop_pads_with_grey():
    boxes = [(10, 20, 50, 80)] * 3 + [None] * 2 + [(10, 20, 50, 80)] * 20
    tracks = smoothed_tracks(boxes)
    assert tracks.shape == (25, 3)
    # Inside the track (away from medfilt's zero-padded ends) the box is the same everywhere.
    np.testing.assert_allclose(tracks[6:-6], [[30, 50, 30]] * 13)
    frame = np.full((100, 60, 3), 200, np.uint8)
    crop = syncnet_crop(frame, tracks[10])
    assert crop.shape == (CROP_SIZE, CROP_SIZE, 3)
    assert (crop[0, 0] == 110).all() and (crop[CROP_SIZE // 2, CROP_SIZE // 2] == 200).all()
    with pytest.raises(ValueError):
        smoothed_tracks([None, None])


class _FixedFace:
    """A face analyzer that finds the same face in every frame (tests need no detector)."""

    name = "fixed"

    def __init__(self, width: int, height: int):
        x = np.linspace(width * 0.25, width * 0.75, 68)
        y = np.linspace(height * 0.3, height * 0.7, 68)
        self._face = FaceDetection(np.stack([x, y], 1).astype(np.float32),
                                   (int(width * 0.2), int(height * 0.2), int(width * 0.8), int(height * 0.75)))

    def detect(self, frames):
        return [self._face for _ in frames]


@pytest.fixture(scope="module")
def tiny_video(media_dir, tmp_path_factory) -> Path:
    """1.2 s of the shared face video at 176x304, with its speech."""
    path = tmp_path_factory.mktemp("evaluate") / "tiny.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(media_dir / "yongen.mp4"), "-i", str(media_dir / "yongen.wav"),
                    "-t", "1.2", "-vf", "scale=176:304", "-c:v", "libx264", "-crf", "18", "-c:a", "aac", "-shortest",
                    str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def random_syncnet(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("syncnet") / "syncnet_v2.model"
    torch.save(SyncNet().state_dict(), path)
    return path


def test_scorer_scores_a_video_and_its_mouth_region(tiny_video, random_syncnet, tmp_path):
    scorer = Scorer(load_syncnet(random_syncnet), _FixedFace(176, 304), ScoreOptions(batch_size=8))
    scores = scorer.sync(tiny_video)
    assert scores.windows == 30 - 5  # 1.2 s at 25 fps, less the last window as the original
    assert -15 <= scores.offset <= 15 and scores.lse_d > 0 and scores.lse_c >= 0

    same = scorer.mouth(tiny_video, tiny_video)
    assert same.psnr == math.inf and same.l1 == 0 and same.frames == 30
    brighter = tmp_path / "brighter.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(tiny_video), "-vf", "eq=brightness=0.1", "-c:v", "libx264",
                    "-crf", "18", "-an", str(brighter)], check=True)
    changed = scorer.mouth(brighter, tiny_video)
    assert 5 < changed.psnr < 40 and 0.01 < changed.l1 < 0.3


def test_cli_prints_one_json_line(tiny_video, random_syncnet, tmp_path, capsys):
    code = cli.main([str(tiny_video), "--models", str(tmp_path), "--syncnet", str(random_syncnet), "--landmarks", "dlib",
                     "--device", "cpu", "--reference", str(tiny_video)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1
    result = json.loads(out[0])
    assert set(result) == {"video", "lse_d", "lse_c", "offset", "windows", "mouth"}
    assert result["mouth"]["psnr"] is None and result["mouth"]["l1"] == 0  # identical: no finite PSNR


def test_cli_names_missing_weights(tiny_video, tmp_path, capsys):
    assert cli.main([str(tiny_video), "--models", str(tmp_path), "--landmarks", "dlib", "--device", "cpu"]) == 2
    assert "syncnet_v2" in capsys.readouterr().err
