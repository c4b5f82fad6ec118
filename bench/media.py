"""Synthetic benchmark media: a talking-head video and speech of any size and length.

The video is the real face of ``../shared/media/yongen.jpeg`` (so face
detection and landmarks work), scaled to cover the requested size, cropped
around the face, with a slow pan so that no two consecutive frames are the
same. The speech is ``../shared/media/eng.wav`` (60 s, 16 kHz mono) looped::

    python -m bench.media --out DIR --width 352 --height 608 --seconds 60 --fps 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Tuple

from . import MEDIA

FACE_IMAGE = MEDIA / "yongen.jpeg"
SPEECH = MEDIA / "eng.wav"
# Centre of the face in yongen.jpeg as fractions of its width and height (dlib's
# detector box (222, 297, 452, 529) in the 736x1308 image).
FACE_CENTRE = (0.46, 0.32)
# Scale beyond "just covers the frame", to leave room to pan.
_PAN_ROOM = 1.06
# Pan amplitude as a fraction of the frame size, and its periods in seconds
# (different in x and y so the motion does not repeat every few frames).
_PAN_AMPLITUDE = 0.02
_PAN_PERIODS_S = (3.0, 4.1)


def make_video(path: Path, *, width: int, height: int, seconds: float, fps: float, crf: int = 18) -> Path:
    """Writes an H.264 mp4 of exactly ``round(seconds * fps)`` frames of a face, ``width`` x ``height``.

    Raises:
        ValueError: odd sizes (H.264 4:2:0 needs even ones) or a non-positive length or rate.
    """
    if width % 2 or height % 2 or width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive and even, not {width}x{height}")
    if seconds <= 0 or fps <= 0:
        raise ValueError(f"seconds and fps must be positive, not {seconds} and {fps}")
    frames = round(seconds * fps)
    rate = Fraction(fps).limit_denominator(1001)
    image_width, image_height = _image_size(FACE_IMAGE)
    scale = max(width / image_width, height / image_height) * _PAN_ROOM
    scaled_width, scaled_height = _even(image_width * scale), _even(image_height * scale)
    amp_x, amp_y = round(_PAN_AMPLITUDE * width), round(_PAN_AMPLITUDE * height)
    # Centre the crop on the face, as far as the scaled image allows with the pan.
    x0 = _clamp(FACE_CENTRE[0] * scaled_width - width / 2, amp_x, scaled_width - width - amp_x)
    y0 = _clamp(FACE_CENTRE[1] * scaled_height - height / 2, amp_y, scaled_height - height - amp_y)
    period_x, period_y = _PAN_PERIODS_S
    video_filter = (
        f"scale={scaled_width}:{scaled_height}:flags=lanczos,"
        f"crop={width}:{height}:"
        f"x='{x0:.1f}+{amp_x}*sin(2*PI*t/{period_x})':y='{y0:.1f}+{amp_y}*sin(2*PI*t/{period_y})',"
        "setsar=1"
    )
    _ffmpeg(
        "-loop", "1", "-framerate", str(rate), "-i", str(FACE_IMAGE), "-vf", video_filter,
        "-frames:v", str(frames), "-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf),
        "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(path),
    )
    return Path(path)


def make_speech(path: Path, *, seconds: float) -> Path:
    """Writes ``seconds`` of speech as 16 kHz mono 16-bit WAV (eng.wav, looped when longer)."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, not {seconds}")
    _ffmpeg("-stream_loop", "-1", "-i", str(SPEECH), "-t", f"{seconds:.6f}", "-ac", "1", "-ar", "16000",
            "-c:a", "pcm_s16le", str(path))
    return Path(path)


def make_job_media(folder: Path, *, width: int, height: int, seconds: float, fps: float) -> Tuple[Path, Path]:
    """A face video and speech of the same length in ``folder``; files already made are reused."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{width}x{height}-{seconds:g}s-{fps:g}fps"
    video, speech = folder / f"face-{stem}.mp4", folder / f"speech-{seconds:g}s.wav"
    if not video.exists():
        partial = video.with_name("partial-" + video.name)
        make_video(partial, width=width, height=height, seconds=seconds, fps=fps)
        partial.replace(video)
    if not speech.exists():
        partial = speech.with_name("partial-" + speech.name)
        make_speech(partial, seconds=seconds)
        partial.replace(speech)
    return video, speech


def _image_size(path: Path) -> Tuple[int, int]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=width,height",
         "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout
    stream = json.loads(out)["streams"][0]
    return int(stream["width"]), int(stream["height"])


def _ffmpeg(*args: str) -> None:
    done = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def _even(value: float) -> int:
    return 2 * round(value / 2)


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the video and the speech")
    parser.add_argument("--width", type=int, default=352)
    parser.add_argument("--height", type=int, default=608)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--fps", type=float, default=25.0)
    args = parser.parse_args(argv)
    video, speech = make_job_media(args.out.resolve(), width=args.width, height=args.height, seconds=args.seconds,
                                   fps=args.fps)
    print(video)
    print(speech)
    return 0


if __name__ == "__main__":
    sys.exit(main())
