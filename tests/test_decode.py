"""Decoding: the containers, image and audio formats the engine accepts, made with real ffmpeg."""

from __future__ import annotations

import subprocess
from fractions import Fraction

import numpy as np
import pytest

from musetalk_worker import ErrorCode, LipSyncError
from musetalk_worker.decode import iter_video_frames, load_audio, probe, read_image


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


@pytest.mark.parametrize(
    "suffix, codec",
    [("mp4", "libx264"), ("mov", "libx264"), ("mkv", "libx264"), ("webm", "libvpx-vp9"), ("avi", "mpeg4")],
)
def test_video_containers_stream_every_frame_at_the_exact_rate(tmp_path, suffix, codec):
    path = tmp_path / f"clip.{suffix}"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x64:rate=30000/1001:duration=0.5", "-c:v", codec,
            "-pix_fmt", "yuv420p", str(path))
    info = probe(path)
    assert (info.kind, info.width, info.height) == ("video", 96, 64)
    assert info.fps == Fraction(30000, 1001)
    frames = list(iter_video_frames(info))
    assert len(frames) == 15  # 0.5 s at 29.97 fps, rounded up by ffmpeg's duration cut
    assert all(f.shape == (64, 96, 3) and f.dtype == np.uint8 for f in frames)
    assert len(list(iter_video_frames(info, max_frames=4))) == 4


def test_rotated_phone_video_is_decoded_upright(tmp_path):
    plain, path = tmp_path / "landscape.mp4", tmp_path / "portrait.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x64:rate=25:duration=0.2", "-c:v", "libx264", "-crf", "0", str(plain))
    # Phones store the picture as shot plus a rotation in the container; ffmpeg 5.1 writes one on a stream copy.
    _ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(path))
    info = probe(path)
    assert (info.width, info.height) == (64, 96)
    upright = next(iter_video_frames(info))
    stored = next(iter_video_frames(probe(plain)))
    assert upright.shape == (96, 64, 3)
    assert min(np.abs(upright.astype(int) - np.rot90(stored, k).astype(int)).mean() for k in (1, -1)) < 1


@pytest.mark.parametrize("suffix", ["png", "jpg", "webp"])
def test_still_images(tmp_path, suffix):
    path = tmp_path / f"face.{suffix}"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=80x60", "-frames:v", "1", str(path))
    info = probe(path)
    assert (info.kind, info.width, info.height) == ("image", 80, 60)
    assert read_image(path).shape == (60, 80, 3)


@pytest.mark.parametrize(
    "suffix, args",
    [("wav", []), ("mp3", ["-c:a", "libmp3lame"]), ("m4a", ["-c:a", "aac"]), ("ogg", ["-c:a", "libvorbis"]),
     ("flac", [])],
)
def test_audio_formats_become_16k_mono(tmp_path, suffix, args):
    path = tmp_path / f"speech.{suffix}"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=1", "-ac", "2", *args, str(path))
    info = probe(path)
    assert info.kind == "audio" and info.audio_channels == 2
    samples = load_audio(info)
    assert samples.dtype == np.float32 and samples.ndim == 1
    # Lossy codecs add priming samples; the length stays within a few tens of milliseconds.
    assert abs(len(samples) - 16000) < 0.06 * 16000
    spectrum = np.abs(np.fft.rfft(samples[2000:14000]))
    assert abs(np.argmax(spectrum) * 16000 / 12000 - 440) < 3, "the tone survives the resampling"


def test_a_video_with_sound_can_be_the_audio(tmp_path):
    path = tmp_path / "talk.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=25:duration=0.5", "-f", "lavfi",
            "-i", "sine=frequency=300:sample_rate=48000:duration=0.5", "-c:v", "libx264", "-c:a", "aac",
            "-shortest", str(path))
    info = probe(path)
    assert info.kind == "video" and info.has_audio
    assert abs(len(load_audio(info)) - 8000) < 1000


def test_an_image_has_no_audio(tmp_path):
    path = tmp_path / "face.png"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32", "-frames:v", "1", str(path))
    with pytest.raises(LipSyncError) as caught:
        load_audio(probe(path))
    assert caught.value.code == ErrorCode.UNSUPPORTED_MEDIA and "no audio" in str(caught.value)


@pytest.mark.parametrize("content", [b"", b"\x00" * 4096, b"PK\x03\x04 not really a zip", b"plain words\n" * 40])
def test_non_media_bytes_are_refused(tmp_path, content):
    path = tmp_path / "upload.bin"
    path.write_bytes(content)
    with pytest.raises(LipSyncError) as caught:
        probe(path)
    assert caught.value.code == ErrorCode.UNSUPPORTED_MEDIA
    assert "upload.bin" in str(caught.value)
    # The worker's scratch folder is none of the caller's business (the local API returns this message).
    assert str(tmp_path) not in str(caught.value)
