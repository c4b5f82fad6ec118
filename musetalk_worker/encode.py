"""Encoding: frames streamed into one ffmpeg process, audio muxed in the same pass."""

from __future__ import annotations

import functools
import logging
import re
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import ErrorCode, LipSyncError
from .options import VIDEO_CODECS

logger = logging.getLogger(__name__)

# libx264's "veryfast" preset encodes several times faster than the default
# "medium" at a slightly larger file for the same CRF; users pay for GPU seconds.
X264_PRESET = "veryfast"
# NVENC's middle preset (ffmpeg's default), NVIDIA's balance of speed and
# quality; not tuned here (no GPU with NVENC was at hand to measure).
NVENC_PRESET = "p4"
# Opening NVENC loads the driver and creates a CUDA context, which takes
# seconds; a hung driver must not hang the worker.
_TRIAL_TIMEOUT_S = 20


def choose_video_codec(preference: str = "auto") -> str:
    """The H.264 encoder ffmpeg should use: ``libx264`` or ``h264_nvenc``.

    ``auto`` picks ``h264_nvenc`` only when this ffmpeg lists it and a short
    trial encode succeeds (many builds list it on machines whose GPU has no
    NVENC, e.g. an H100, or that have no NVIDIA driver; they fail only when the
    encoder opens), else ``libx264``. The trial runs once per process.

    Raises:
        LipSyncError: ``h264_nvenc`` was asked for and does not work here.
        ValueError: ``preference`` is not one of ``VIDEO_CODECS``.
    """
    if preference not in VIDEO_CODECS:
        raise ValueError(f"video codec {preference!r}: use one of {', '.join(VIDEO_CODECS)}")
    if preference == "libx264":
        return _chosen("libx264", "as configured")
    problem = _nvenc_problem()
    if preference == "h264_nvenc" and problem:
        raise LipSyncError(
            ErrorCode.INTERNAL,
            f"h264_nvenc cannot encode on this machine ({problem}); "
            "set MUSETALK_VIDEO_ENCODER=auto (falls back to libx264) or libx264.",
            stage="encode",
        )
    if problem:
        return _chosen("libx264", f"h264_nvenc is not usable: {problem}")
    return _chosen("h264_nvenc", "as configured" if preference == "h264_nvenc" else "NVENC trial encode succeeded")


@functools.cache
def _chosen(codec: str, why: str) -> str:
    # Cached so that each choice is logged once per process, not once per job.
    logger.info("video encoder: %s (%s)", codec, why)
    return codec


@functools.cache
def _nvenc_problem() -> Optional[str]:
    """None when h264_nvenc encodes here, else why not (one ffmpeg line)."""
    try:
        listed = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True,
                                timeout=_TRIAL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"ffmpeg -encoders failed: {e}"
    if not any(line.split()[1:2] == ["h264_nvenc"] for line in listed.stdout.splitlines()):
        return "this ffmpeg was built without it"
    # The same input and settings as a real job (bgr24 on stdin, pad, yuv420p),
    # so a setting this driver or build refuses also fails here.
    width, height, frames = 256, 256, 3
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-v", "error",
           "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}", "-r", "25", "-i", "pipe:0",
           *_video_args("h264_nvenc", 18), "-f", "null", "-"]
    try:
        trial = subprocess.run(cmd, input=bytes(width * height * 3 * frames), capture_output=True,
                               timeout=_TRIAL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"trial encode failed: {e}"
    if trial.returncode != 0:
        lines = trial.stderr.decode(errors="replace").strip().splitlines()
        # "[h264_nvenc @ 0x55d2c0d54800] Cannot load libcuda.so.1" -> the message only.
        first = re.sub(r"^\[[^]]*\]\s*", "", lines[0]) if lines else f"exit code {trial.returncode}"
        return f"trial encode failed: {first}"
    return None


def _video_args(codec: str, crf: int) -> list[str]:
    """ffmpeg's video filter and encoder arguments for ``codec`` at quality ``crf``."""
    # yuv420p needs even sizes: odd frames get one black row/column.
    args = ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-pix_fmt", "yuv420p"]
    if codec == "h264_nvenc":
        # Constant-quality VBR is NVENC's counterpart of CRF (same 0-51 scale).
        # cq 0 means "automatic" to NVENC, so CRF 0 (lossless in x264) becomes 1.
        # Older ffmpeg (4.4 in the image) keeps its 2 Mb/s default as the
        # average bit rate in CQ mode; -b:v 0 leaves the rate to the quality
        # target (newer ffmpeg drops it itself). High profile, as libx264 uses
        # for yuv420p (NVENC defaults to Main, which has no 8x8 transform).
        return args + ["-c:v", "h264_nvenc", "-preset", NVENC_PRESET, "-rc", "vbr", "-cq", str(max(int(crf), 1)),
                       "-b:v", "0", "-profile:v", "high"]
    # -threads 0: x264 picks its own count (1.5 per CPU in its affinity mask;
    # a container's CPU quota is not seen). Stated explicitly because the
    # encode runs beside the GPU stages, which leave the CPUs mostly idle, so
    # the encoder should have all of them; a fixed count would either starve
    # big machines or oversubscribe small ones.
    return args + ["-c:v", "libx264", "-preset", X264_PRESET, "-crf", str(crf), "-threads", "0"]


class VideoEncoder:
    """Writes BGR frames to an H.264/AAC mp4 through one ffmpeg process.

    No frame is written to disk as an image, and the video is encoded once.
    The audio file is muxed as AAC for its whole length. Odd frame sizes are
    padded by one pixel (yuv420p needs even sizes). ``codec`` is ``auto``,
    ``libx264`` or ``h264_nvenc``, resolved by :func:`choose_video_codec`
    (``self.codec`` is the one used); ``crf`` is the quality (NVENC: ``-cq``).

    Use as a context manager; leaving the block normally finishes the file,
    leaving on an exception kills ffmpeg.
    """

    def __init__(self, output: Path, width: int, height: int, fps: Fraction, audio: Path, crf: int = 18,
                 codec: str = "auto"):
        self.codec = choose_video_codec(codec)
        self.output = Path(output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._frame_shape = (height, width, 3)
        self._stderr = tempfile.TemporaryFile()
        cmd = [
            "ffmpeg", "-nostdin", "-y", "-v", "error",
            "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}", "-r", _rate(fps), "-i", "pipe:0",
            "-i", str(audio),
            "-map", "0:v:0", "-map", "1:a:0",
            *_video_args(self.codec, crf),
            "-c:a", "aac", "-b:a", "192k",
            "-movflags", "+faststart",
            str(self.output),
        ]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=self._stderr)
        self._closed = False
        self.frames_written = 0

    def write(self, frame: np.ndarray) -> None:
        """Appends one BGR uint8 frame of the size given at construction."""
        if frame.shape != self._frame_shape:
            raise ValueError(f"frame of shape {frame.shape}, expected {self._frame_shape}")
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame).data)
        except BrokenPipeError:
            self._proc.wait()
            raise self._failure() from None
        self.frames_written += 1

    def close(self) -> None:
        """Finishes the file; raises if ffmpeg failed. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        try:
            self._proc.stdin.close()
        except BrokenPipeError:
            pass
        code = self._proc.wait()
        if code != 0:
            raise self._failure()
        self._stderr.close()

    def abort(self) -> None:
        """Stops ffmpeg and removes the unfinished file."""
        self._closed = True
        self._proc.kill()
        self._proc.wait()
        self._stderr.close()
        if self.output.is_file():
            self.output.unlink()

    def __enter__(self) -> "VideoEncoder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _failure(self) -> LipSyncError:
        self._stderr.seek(0)
        detail = self._stderr.read().decode(errors="replace").strip().splitlines()
        self._stderr.close()
        return LipSyncError(
            ErrorCode.INTERNAL,
            f"ffmpeg failed to encode the video: {detail[-1] if detail else 'no details'}",
            stage="encode",
        )


def _rate(fps: Fraction) -> str:
    fps = Fraction(fps)
    return f"{fps.numerator}/{fps.denominator}"
