"""Reading media: probe what a file is, stream video frames, load audio.

Everything goes through ffmpeg/ffprobe run with argument lists (never a shell),
so any container and codec ffmpeg reads works. Video frames are streamed from
one ffmpeg process through a pipe, one frame at a time, so memory does not grow
with the length of the video. Frame rates are kept as exact fractions
(29.97 fps stays 30000/1001).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import cv2
import librosa
import numpy as np

from .errors import ErrorCode, LipSyncError

AUDIO_SAMPLE_RATE = 16000

# Demuxers ffprobe reports for single pictures.
_IMAGE_FORMATS = {"image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "tiff_pipe"}
# ffmpeg renders any text file as "video" through its text-art decoders; that is never a face.
_TEXT_ART_CODECS = {"ansi", "bintext", "xbin", "idf"}


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    """What ffprobe says about a file.

    ``kind`` is ``video``, ``image`` or ``audio``; ``width``/``height`` are the
    displayed size (rotation applied); ``fps`` is exact; ``duration_s`` is 0 for
    images.
    """

    path: Path
    kind: str
    width: int = 0
    height: int = 0
    fps: Fraction = Fraction(0)
    duration_s: float = 0.0
    has_audio: bool = False
    audio_channels: int = 0
    audio_sample_rate: int = 0

    @property
    def estimated_frames(self) -> int:
        """Frame count implied by duration and fps (ffprobe's count is often absent)."""
        return int(round(self.duration_s * float(self.fps))) if self.kind == "video" else 1


def probe(path: Path) -> MediaInfo:
    """Says whether ``path`` is a video, a still image or audio, with its properties.

    Raises:
        LipSyncError(unsupported_media): ffprobe cannot read it, or it holds
            neither a picture nor sound.
    """
    path = Path(path)
    cmd = ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LipSyncError(
            ErrorCode.UNSUPPORTED_MEDIA,
            # ffmpeg names the file by its full path: the caller knows it only by its name.
            f"'{path.name}' is not a media file ffmpeg can read "
            f"({_last_line(proc.stderr.replace(str(path), path.name))}). "
            "Send a video (mp4, mov, webm, mkv, avi), an image (png, jpg, webp) or audio "
            "(wav, mp3, m4a, ogg, flac).",
            stage="probe",
        )
    data = json.loads(proc.stdout or "{}")
    streams = data.get("streams", [])
    fmt = data.get("format", {})
    video = next(
        (s for s in streams if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")),
        None,
    )
    if video is not None and video.get("codec_name") in _TEXT_ART_CODECS:
        video = None
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    duration = _float(fmt.get("duration")) or _float((video or audio or {}).get("duration"))
    audio_fields = {}
    if audio is not None:
        audio_fields = dict(
            has_audio=True,
            audio_channels=int(audio.get("channels") or 1),
            audio_sample_rate=int(audio.get("sample_rate") or 0),
        )
    if video is not None:
        width, height = int(video.get("width") or 0), int(video.get("height") or 0)
        if _rotation(video) in (90, 270):
            width, height = height, width
        if width <= 0 or height <= 0:
            raise LipSyncError(
                ErrorCode.UNSUPPORTED_MEDIA, f"'{path.name}' has a video stream with no picture size.", stage="probe"
            )
        if fmt.get("format_name") in _IMAGE_FORMATS or not duration:
            return MediaInfo(path, "image", width, height)
        fps = _frame_rate(video)
        if fps <= 0:
            raise LipSyncError(
                ErrorCode.UNSUPPORTED_MEDIA,
                f"'{path.name}' has no usable frame rate; re-encode it with a constant frame rate.",
                stage="probe",
            )
        return MediaInfo(path, "video", width, height, fps, duration or 0.0, **audio_fields)
    if audio is not None:
        return MediaInfo(path, "audio", duration_s=duration or 0.0, **audio_fields)
    raise LipSyncError(
        ErrorCode.UNSUPPORTED_MEDIA,
        f"'{path.name}' holds neither a picture nor sound; send a video, an image or an audio file.",
        stage="probe",
    )


def probe_inputs(source: Union[Path, MediaInfo, None],
                 audio: Union[Path, MediaInfo]) -> Tuple[Optional[MediaInfo], MediaInfo]:
    """Probes a job's two inputs and refuses a pair that cannot make a lip-sync.

    An input given as a ``MediaInfo`` (already probed) is only checked, so a
    caller that probed once can hand the result on without a second ffprobe.
    ``source`` is None for a job that names a prepared avatar instead.

    Raises:
        LipSyncError(unsupported_media): either file is not media (see
            :func:`probe`), ``source`` is audio only, or ``audio`` has no sound.
    """
    source_info = source if source is None or isinstance(source, MediaInfo) else probe(source)
    if source_info is not None and source_info.kind == "audio":
        raise LipSyncError(
            ErrorCode.UNSUPPORTED_MEDIA,
            "'source' is an audio file with no picture; send a face video or a still image as 'source' "
            "and the speech as 'audio'.",
            stage="probe",
        )
    audio_info = audio if isinstance(audio, MediaInfo) else probe(audio)
    if not audio_info.has_audio or audio_info.duration_s <= 0:
        what = {"image": "an image without an audio track", "video": "a video without an audio track"}.get(
            audio_info.kind, "an audio track of no length")
        raise LipSyncError(
            ErrorCode.UNSUPPORTED_MEDIA,
            f"'audio' has no sound (it is {what}); send speech audio (wav, mp3, m4a, ogg, flac) or a video "
            "with sound.",
            stage="probe",
        )
    return source_info, audio_info


def read_image(path: Path) -> np.ndarray:
    """Loads a still image as a BGR uint8 array, applying its EXIF orientation."""
    frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if frame is None:
        raise LipSyncError(
            ErrorCode.UNSUPPORTED_MEDIA, f"'{Path(path).name}' could not be read as an image (png, jpg, webp).",
            stage="decode",
        )
    return frame


def iter_video_frames(info: MediaInfo, max_frames: Optional[int] = None,
                      fps: Optional[Fraction] = None) -> Iterator[np.ndarray]:
    """Yields the frames of a video as BGR uint8 arrays, one at a time.

    Frames are passed through as stored (no frame-rate conversion), so the
    output keeps the source's timing, unless ``fps`` asks for that rate
    (frames dropped or repeated as ffmpeg's ``fps`` filter does, for an engine
    trained at one rate). ``max_frames`` stops decoding early.
    """
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(info.path), "-map", "0:v:0"]
    if fps is not None:
        cmd += ["-vf", f"fps={fps.numerator}/{fps.denominator}"]
    if max_frames is not None:
        cmd += ["-frames:v", str(max_frames)]
    cmd += ["-fps_mode", "passthrough" if fps is None else "cfr", "-f", "rawvideo", "-pix_fmt", "bgr24", "pipe:1"]
    frame_bytes = info.width * info.height * 3
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while True:
            buf = proc.stdout.read(frame_bytes)
            if len(buf) < frame_bytes:
                break
            yield np.frombuffer(buf, np.uint8).reshape(info.height, info.width, 3)
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        code = proc.wait()
    if code != 0:
        raise LipSyncError(
            ErrorCode.UNSUPPORTED_MEDIA,
            f"ffmpeg could not decode '{info.path.name}': {_last_line(stderr)}. Re-encode it as H.264 mp4.",
            stage="decode",
        )


def load_audio(info: MediaInfo) -> np.ndarray:
    """Decodes the first audio stream to 16 kHz mono float32.

    ffmpeg decodes at the file's own rate and channel count; the downmix and
    resampling are librosa's (``to_mono``, soxr), exactly what upstream's
    ``librosa.load(sr=16000)`` does.
    """
    if not info.has_audio:
        raise LipSyncError(
            ErrorCode.UNSUPPORTED_MEDIA, f"'{info.path.name}' has no audio stream; send speech audio.", stage="decode"
        )
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(info.path), "-map", "0:a:0",
           "-f", "f32le", "-acodec", "pcm_f32le", "pipe:1"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise LipSyncError(
            ErrorCode.UNSUPPORTED_MEDIA,
            f"ffmpeg could not decode the audio of '{info.path.name}': {_last_line(proc.stderr.decode(errors='replace'))}.",
            stage="decode",
        )
    samples = np.frombuffer(proc.stdout, np.float32)
    channels = max(info.audio_channels, 1)
    samples = samples[: len(samples) // channels * channels].reshape(-1, channels).T
    mono = librosa.to_mono(samples) if channels > 1 else samples[0]
    if info.audio_sample_rate and info.audio_sample_rate != AUDIO_SAMPLE_RATE:
        mono = librosa.resample(mono, orig_sr=info.audio_sample_rate, target_sr=AUDIO_SAMPLE_RATE, res_type="soxr_hq")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _frame_rate(stream: dict) -> Fraction:
    for key in ("avg_frame_rate", "r_frame_rate"):
        try:
            rate = Fraction(stream.get(key) or "0/0")
        except (ValueError, ZeroDivisionError):
            continue
        if rate > 0:
            return rate.limit_denominator(1001)
    return Fraction(0)


def _rotation(stream: dict) -> int:
    for side in stream.get("side_data_list", []) or []:
        if "rotation" in side:
            return int(abs(float(side["rotation"]))) % 360
    return int(abs(float(stream.get("tags", {}).get("rotate", 0)))) % 360


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no details"
