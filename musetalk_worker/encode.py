"""Encoding: frames streamed into one ffmpeg process, audio muxed in the same pass."""

from __future__ import annotations

import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import ErrorCode, LipSyncError

# libx264's "veryfast" preset encodes several times faster than the default
# "medium" at a slightly larger file for the same CRF; users pay for GPU seconds.
X264_PRESET = "veryfast"


class VideoEncoder:
    """Writes BGR frames to an H.264/AAC mp4 through one ffmpeg process.

    No frame is written to disk as an image, and the video is encoded once.
    The audio file is muxed as AAC for its whole length. Odd frame sizes are
    padded by one pixel (yuv420p needs even sizes).

    Use as a context manager; leaving the block normally finishes the file,
    leaving on an exception kills ffmpeg.
    """

    def __init__(self, output: Path, width: int, height: int, fps: Fraction, audio: Path, crf: int = 18):
        self.output = Path(output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._frame_shape = (height, width, 3)
        self._stderr = tempfile.TemporaryFile()
        cmd = [
            "ffmpeg", "-nostdin", "-y", "-v", "error",
            "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}", "-r", _rate(fps), "-i", "pipe:0",
            "-i", str(audio),
            "-map", "0:v:0", "-map", "1:a:0",
            "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",
            "-c:v", "libx264", "-preset", X264_PRESET, "-crf", str(crf), "-pix_fmt", "yuv420p",
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
