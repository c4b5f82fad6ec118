"""Encoding: frames streamed into one ffmpeg process, audio muxed in the same pass."""

from __future__ import annotations

import dataclasses
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
from .options import VIDEO_CODECS, StreamOptions

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


def _video_args(codec: str, crf: int, stream: Optional[StreamOptions] = None) -> list[str]:
    """ffmpeg's video filter and encoder arguments for ``codec`` at quality ``crf``.

    With ``stream``, also what its segments need: a keyframe (IDR) at every
    segment start and, if asked, no encoder look-ahead.
    """
    # yuv420p needs even sizes: odd frames get one black row/column.
    args = ["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-pix_fmt", "yuv420p"]
    if codec == "h264_nvenc":
        # Constant-quality VBR is NVENC's counterpart of CRF (same 0-51 scale).
        # cq 0 means "automatic" to NVENC, so CRF 0 (lossless in x264) becomes 1.
        # Older ffmpeg (4.4 in the image) keeps its 2 Mb/s default as the
        # average bit rate in CQ mode; -b:v 0 leaves the rate to the quality
        # target (newer ffmpeg drops it itself). High profile, as libx264 uses
        # for yuv420p (NVENC defaults to Main, which has no 8x8 transform).
        args += ["-c:v", "h264_nvenc", "-preset", NVENC_PRESET, "-rc", "vbr", "-cq", str(max(int(crf), 1)),
                 "-b:v", "0", "-profile:v", "high"]
        if stream is not None:
            # NVENC makes forced keyframes plain I-frames unless told; a player
            # joining at a segment needs an IDR there.
            args += ["-forced-idr", "1"]
            if stream.low_latency_encoder:
                args += ["-tune", "ll", "-zerolatency", "1", "-delay", "0", "-bf", "0"]
    else:
        # -threads 0: x264 picks its own count (1.5 per CPU in its affinity mask;
        # a container's CPU quota is not seen). Stated explicitly because the
        # encode runs beside the GPU stages, which leave the CPUs mostly idle, so
        # the encoder should have all of them; a fixed count would either starve
        # big machines or oversubscribe small ones.
        args += ["-c:v", "libx264", "-preset", X264_PRESET, "-crf", str(crf), "-threads", "0"]
        if stream is not None:
            # No scene-cut keyframes: segments must cut only where forced.
            args += ["-sc_threshold", "0"]
            if stream.low_latency_encoder:
                # Look-ahead and B-frames hold back ~0.7 s of frames at a real-time
                # feed (docs/streaming.md 2.2): a segment would close that much later.
                args += ["-tune", "zerolatency"]
    if stream is not None:
        # Keyframes at 0, first_seconds, then every segment_seconds (at the first
        # frame at or past each): the HLS muxer cuts only at keyframes.
        # +global_header: the tee muxer, unlike mp4 alone, does not ask for it,
        # and x264 would then repeat SPS/PPS in-band at every keyframe (measured)
        # instead of keeping them once in the mp4's and init.mp4's avcC.
        first, every = _seconds(stream.first_seconds), _seconds(stream.segment_seconds)
        args += ["-force_key_frames", f"expr:gte(t,if(eq(n_forced,0),0,{first}+(n_forced-1)*{every}))",
                 "-flags", "+global_header"]
    return args


@dataclasses.dataclass(frozen=True)
class HlsOutput:
    """Where and how :class:`VideoEncoder` also writes HLS (fMP4 segments) beside its mp4.

    ``folder`` receives ``init.mp4``, ``seg_00000.m4s``... and ffmpeg's own
    playlist (``playlist``), which lists a segment only once it is complete.
    """

    folder: Path
    options: StreamOptions

    INIT_NAME = "init.mp4"
    SEGMENT_PATTERN = "seg_%05d.m4s"
    PLAYLIST_NAME = "ffmpeg.m3u8"

    def __post_init__(self) -> None:
        # ffmpeg's HLS muxer reads every % in the segment path as a pattern
        # (and copies "%%" through as two characters), so no escape exists.
        if "%" in str(self.folder):
            raise ValueError(f"HLS folder {self.folder}: ffmpeg cannot write segments under a path with '%'")

    @property
    def playlist(self) -> Path:
        """ffmpeg's playlist: relative segment names with their durations."""
        return self.folder / self.PLAYLIST_NAME


class VideoEncoder:
    """Writes BGR frames to an H.264/AAC mp4 through one ffmpeg process.

    No frame is written to disk as an image, and the video is encoded once.
    The audio file is muxed as AAC for its whole length. Odd frame sizes are
    padded by one pixel (yuv420p needs even sizes). ``codec`` is ``auto``,
    ``libx264`` or ``h264_nvenc``, resolved by :func:`choose_video_codec`
    (``self.codec`` is the one used); ``crf`` is the quality (NVENC: ``-cq``).

    With ``hls``, the same encoded packets also go to an HLS folder as the
    frames arrive (ffmpeg's tee muxer: one encode, two outputs); see
    :class:`HlsOutput` and :class:`musetalk_worker.hls.SegmentPublisher`.

    Use as a context manager; leaving the block normally finishes the file,
    leaving on an exception kills ffmpeg.
    """

    def __init__(self, output: Path, width: int, height: int, fps: Fraction, audio: Path, crf: int = 18,
                 codec: str = "auto", hls: Optional[HlsOutput] = None):
        self.codec = choose_video_codec(codec)
        self.output = Path(output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.hls = hls
        self._frame_shape = (height, width, 3)
        self._stderr = tempfile.TemporaryFile()
        cmd = [
            "ffmpeg", "-nostdin", "-y", "-v", "error",
            "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{width}x{height}", "-r", _rate(fps), "-i", "pipe:0",
            "-i", str(audio),
            "-map", "0:v:0", "-map", "1:a:0",
            *_video_args(self.codec, crf, hls.options if hls else None),
            "-c:a", "aac", "-b:a", "192k",
            *_output_args(self.output, hls),
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


def _output_args(mp4: Path, hls: Optional[HlsOutput]) -> list[str]:
    """The muxer arguments: a faststart mp4, and with ``hls`` the same packets as HLS too."""
    if hls is None:
        return ["-movflags", "+faststart", str(mp4)]
    hls.folder.mkdir(parents=True, exist_ok=True)
    options = hls.options
    segments = str(hls.folder / hls.SEGMENT_PATTERN)
    # temp_file: ffmpeg writes *.tmp and renames, so a listed segment (and the
    # playlist itself) is always complete. onfail=abort: a failing output stops
    # the encode instead of leaving one output silently short.
    hls_options = ":".join([
        "f=hls", f"hls_init_time={_seconds(options.first_seconds)}", f"hls_time={_seconds(options.segment_seconds)}",
        "hls_playlist_type=event", "hls_segment_type=fmp4", "hls_flags=independent_segments+temp_file",
        f"hls_fmp4_init_filename={hls.INIT_NAME}",
        f"hls_segment_filename={_tee_escaped(segments, 2)}",
        "onfail=abort",
    ])
    mp4_slave = f"[f=mp4:movflags=+faststart:onfail=abort]{_tee_escaped(str(mp4), 1)}"
    return ["-f", "tee", f"{mp4_slave}|[{hls_options}]{_tee_escaped(str(hls.playlist), 1)}"]


def _seconds(value: float) -> str:
    # Fixed-point: ffmpeg's duration options do not parse exponents ("1e-05"),
    # and the muxer and the keyframe expression must get the same value.
    return f"{value:.6f}"


def _tee_escaped(text: str, levels: int) -> str:
    # The tee muxer unescapes its argument once to split the outputs, and an
    # option value inside [...] once more; paths may hold any of these characters.
    for _ in range(levels):
        text = re.sub(r"([\\'\[\]|:=])", r"\\\1", text)
    return text


def _rate(fps: Fraction) -> str:
    fps = Fraction(fps)
    return f"{fps.numerator}/{fps.denominator}"
