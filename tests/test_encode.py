"""The video encoder: codec choice (NVENC or libx264) and the mp4 it writes, with the real ffmpeg."""

from __future__ import annotations

import logging
import os
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import ffprobe
from musetalk_worker import ErrorCode, LipSyncError
from musetalk_worker import encode
from musetalk_worker.encode import VideoEncoder, choose_video_codec

# Where an NVIDIA driver is loaded, NVENC may really work and "auto" may rightly pick it.
NVIDIA_DRIVER = Path("/dev/nvidiactl").exists()


@pytest.fixture(autouse=True)
def fresh_choice():
    # The choice is cached per process; each test makes (and logs) its own.
    encode._nvenc_problem.cache_clear()
    encode._chosen.cache_clear()
    yield
    encode._nvenc_problem.cache_clear()
    encode._chosen.cache_clear()


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "tone.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
                    "-ar", "16000", str(path)], check=True)
    return path


def _real_ffmpeg_lists_nvenc() -> bool:
    out = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True, check=True).stdout
    return any(line.split()[1:2] == ["h264_nvenc"] for line in out.splitlines())


@pytest.mark.skipif(NVIDIA_DRIVER, reason="an NVIDIA driver is loaded: NVENC may work here")
def test_auto_falls_back_to_libx264_without_nvenc(caplog):
    caplog.set_level(logging.INFO, logger="musetalk_worker.encode")
    assert choose_video_codec("auto") == "libx264"
    assert choose_video_codec("auto") == "libx264"
    problem = encode._nvenc_problem()
    if _real_ffmpeg_lists_nvenc():
        # Debian's ffmpeg lists h264_nvenc everywhere: the trial itself must have failed,
        # and at loading the driver, i.e. after this ffmpeg accepted every NVENC option we pass
        # (a bad option value fails before the driver is loaded).
        assert problem == "trial encode failed: Cannot load libcuda.so.1"
    else:
        assert problem == "this ffmpeg was built without it"
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"video encoder: libx264 (h264_nvenc is not usable: {problem})"]  # once, with the reason


@pytest.mark.skipif(NVIDIA_DRIVER, reason="an NVIDIA driver is loaded: NVENC may work here")
def test_asking_for_nvenc_where_it_does_not_work_says_what_to_set(tmp_path, speech):
    with pytest.raises(LipSyncError) as caught:
        choose_video_codec("h264_nvenc")
    assert caught.value.code == ErrorCode.INTERNAL and caught.value.stage == "encode"
    assert str(caught.value).startswith("h264_nvenc cannot encode on this machine (")
    assert "set MUSETALK_VIDEO_ENCODER=auto (falls back to libx264) or libx264" in str(caught.value)
    out = tmp_path / "out.mp4"
    with pytest.raises(LipSyncError):
        VideoEncoder(out, 64, 48, Fraction(25), speech, codec="h264_nvenc")
    assert not out.exists()


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="use one of auto, libx264, h264_nvenc"):
        choose_video_codec("nvenc")


def _fake_ffmpeg(folder: Path, lists_nvenc: bool) -> Path:
    """An ``ffmpeg`` that lists (or not) h264_nvenc and whose trial encodes succeed.

    Only for the one case this machine cannot show: a GPU whose NVENC works. It
    records its arguments and the bytes it was fed, one line per call.
    """
    log = folder / "calls.txt"
    listing = " V....D h264_nvenc           NVIDIA NVENC H.264 encoder (codec h264)" if lists_nvenc else ""
    script = folder / "ffmpeg"
    script.write_text(f"""#!/bin/sh
if [ "$2" = "-encoders" ]; then
  echo " V....D libx264              libx264 H.264 / AVC / MPEG-4 AVC / MPEG-4 part 10 (codec h264)"
  echo "{listing}"
  exit 0
fi
echo "$* | $(wc -c | tr -d ' ')" >> {log}
""")
    script.chmod(0o755)
    return log


def test_auto_picks_nvenc_where_the_trial_succeeds(tmp_path, monkeypatch, caplog):
    # Simulated: a fake ffmpeg stands in for a machine whose NVENC works.
    log = _fake_ffmpeg(tmp_path, lists_nvenc=True)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    caplog.set_level(logging.INFO, logger="musetalk_worker.encode")
    assert choose_video_codec("auto") == "h264_nvenc"
    assert choose_video_codec("h264_nvenc") == "h264_nvenc"
    (trial,) = log.read_text().splitlines()  # one trial for both calls
    args, fed = trial.split(" | ")
    assert "-c:v h264_nvenc -preset p4 -rc vbr -cq 18 -b:v 0 -profile:v high" in args
    assert "-pix_fmt yuv420p" in args and args.endswith("-f null -")
    assert int(fed) == 256 * 256 * 3 * 3  # three bgr24 frames on stdin
    assert "video encoder: h264_nvenc (NVENC trial encode succeeded)" in [r.getMessage() for r in caplog.records]


def test_auto_skips_the_trial_when_ffmpeg_lacks_nvenc(tmp_path, monkeypatch):
    log = _fake_ffmpeg(tmp_path, lists_nvenc=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert choose_video_codec("auto") == "libx264"
    assert encode._nvenc_problem() == "this ffmpeg was built without it"
    assert not log.exists()


def _frames(width: int, height: int, count: int) -> list[np.ndarray]:
    """Orange-blue frames (BGR 255, 128, 0) with a white square moving across them."""
    frames = []
    for i in range(count):
        frame = np.empty((height, width, 3), np.uint8)
        frame[:] = (255, 128, 0)
        frame[4:12, 2 * i:2 * i + 8] = 255
        frames.append(frame)
    return frames


def _decode(path: Path, width: int, height: int, pix_fmt: str, channels: int) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", pix_fmt,
                          "pipe:1"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, channels)


@pytest.mark.parametrize("size, stored", [((64, 48), (64, 48)), ((65, 47), (66, 48))])
def test_libx264_writes_every_frame_with_the_audio(tmp_path, speech, size, stored):
    width, height = size
    out = tmp_path / "out.mp4"
    with VideoEncoder(out, width, height, Fraction(25), speech, crf=18, codec="libx264") as encoder:
        assert encoder.codec == "libx264"
        for frame in _frames(width, height, 10):
            encoder.write(frame)
    info = ffprobe(out)
    video = next(s for s in info["streams"] if s["codec_type"] == "video")
    audio = next(s for s in info["streams"] if s["codec_type"] == "audio")
    assert (video["codec_name"], video["pix_fmt"], video["profile"]) == ("h264", "yuv420p", "High")
    assert (video["width"], video["height"]) == stored  # odd sizes padded to even
    assert int(video["nb_read_frames"]) == 10 and video["r_frame_rate"] == "25/1"
    assert audio["codec_name"] == "aac" and float(info["format"]["duration"]) == pytest.approx(1.0, abs=0.05)
    data = out.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # +faststart: playable while downloading
    rgb = _decode(out, *stored, "rgb24", 3)
    assert rgb.shape[0] == 10
    # BGR (255, 128, 0) in, RGB (0, 128, 255) out: the channels are not swapped.
    assert rgb[:, 30:40, 30:40].mean(axis=(0, 1, 2)) == pytest.approx([0, 128, 255], abs=8)
    if stored != size:
        # The added column and row are black (luma; chroma is shared with the frame's edge).
        luma = _decode(out, *stored, "gray", 1)[..., 0]
        assert luma[:, :height, width - 1].min() > 80
        assert luma[:, :, width].max() < 20 and luma[:, height, :].max() < 20


def test_a_frame_of_the_wrong_size_is_refused(tmp_path, speech):
    with VideoEncoder(tmp_path / "out.mp4", 64, 48, Fraction(25), speech, codec="libx264") as encoder:
        with pytest.raises(ValueError, match="expected"):
            encoder.write(np.zeros((48, 65, 3), np.uint8))
        encoder.write(np.zeros((48, 64, 3), np.uint8))
    assert encoder.frames_written == 1


def test_abort_removes_the_unfinished_file(tmp_path, speech):
    out = tmp_path / "out.mp4"
    encoder = VideoEncoder(out, 64, 48, Fraction(25), speech, codec="libx264")
    for frame in _frames(64, 48, 5):
        encoder.write(frame)
    encoder.abort()
    assert not out.exists()
    # Leaving the block on an exception aborts too, and the exception goes on.
    with pytest.raises(RuntimeError, match="stop"):
        with VideoEncoder(out, 64, 48, Fraction(25), speech, codec="libx264") as encoder:
            encoder.write(_frames(64, 48, 1)[0])
            raise RuntimeError("stop")
    assert not out.exists()


def test_an_ffmpeg_failure_is_reported_on_close(tmp_path, speech):
    # An output ffmpeg cannot write (a folder): close() raises with ffmpeg's reason.
    folder = tmp_path / "out.mp4"
    folder.mkdir()
    encoder = VideoEncoder(folder, 64, 48, Fraction(25), speech, codec="libx264")
    with pytest.raises(LipSyncError, match="ffmpeg failed to encode the video") as caught:
        for frame in _frames(64, 48, 3):
            encoder.write(frame)
        encoder.close()
    assert caught.value.code == ErrorCode.INTERNAL
