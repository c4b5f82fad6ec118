"""HLS from the one encode, published to S3 while it is made: the real ffmpeg and a real moto_server.

docs/streaming.md 5.5 T1 (the playlist and segments as a player sees them) and
T2 (segment 0 is public before the last frame is written).
"""

from __future__ import annotations

import math
import re
import subprocess
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import requests
from botocore.exceptions import ClientError

from conftest import ffprobe
from servers import MOTO_KEY_ID, MOTO_SECRET, MotoS3, free_port
from musetalk_worker import ErrorCode, LipSyncError
from musetalk_worker import encode
from musetalk_worker.encode import HlsOutput, VideoEncoder
from musetalk_worker.fetch import S3Access, s3_client
from musetalk_worker.hls import SegmentPublisher, target_duration
from musetalk_worker.options import StreamOptions, WorkerSettings

FPS = 25
SECONDS = 3
WIDTH, HEIGHT = 160, 120
EXPIRES_IN = 600


@pytest.fixture(scope="module")
def speech(media_dir, tmp_path_factory) -> Path:
    """3 s of the shared English speech, as the worker gets it (16 kHz mono wav)."""
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-ss", "2", "-t", str(SECONDS), "-i",
                    str(media_dir / "eng.wav"), "-ar", "16000", "-ac", "1", str(path)], check=True)
    return path


def _frame(i: int) -> np.ndarray:
    """A BGR frame with a bar moving across it and a per-frame noise patch (no two frames alike)."""
    frame = np.full((HEIGHT, WIDTH, 3), (40, 90, 200), np.uint8)
    frame[:, (3 * i) % WIDTH:(3 * i) % WIDTH + 12] = 255
    frame[40:80, 40:80] = np.random.default_rng(i).integers(0, 256, (40, 40, 3), np.uint8)
    return frame


def _expected_durations(options: StreamOptions, frames: int) -> list[float]:
    """Segment lengths: each starts at the first frame at or past its nominal start."""
    starts, n = [0], 1
    while True:
        start = math.ceil((options.first_seconds + (n - 1) * options.segment_seconds) * FPS - 1e-9)
        if start >= frames:
            break
        starts.append(start)
        n += 1
    return [(end - start) / FPS for start, end in zip(starts, starts[1:] + [frames])]


def _client(endpoint: str):
    """The client the worker builds for its BUCKET_* settings (SigV4 presigning, path addressing, retries)."""
    settings = WorkerSettings(bucket_endpoint_url=endpoint, bucket_access_key_id=MOTO_KEY_ID,
                              bucket_secret_access_key=MOTO_SECRET, bucket_region="us-east-1")
    return s3_client(S3Access.for_job(None, settings), settings)


def _publisher(moto_s3: MotoS3, bucket: str, folder: Path, options: StreamOptions, **kwargs) -> SegmentPublisher:
    return SegmentPublisher(HlsOutput(folder, options), _client(moto_s3.endpoint), bucket, "jobs/j1/", EXPIRES_IN,
                            **kwargs)


def _get(url: str) -> requests.Response:
    reply = requests.get(url, timeout=10)
    assert reply.status_code == 200, (url, reply.status_code, reply.text[:200])
    return reply


def _parse(playlist: str) -> tuple[dict[str, str], Optional[str], list[tuple[float, str]]]:
    """(tags with their values, the MAP URI, [(EXTINF duration, URI)]) of a media playlist."""
    tags, segments, duration, init = {}, [], None, None
    for line in playlist.splitlines():
        if line.startswith("#EXTINF:"):
            duration = float(line[len("#EXTINF:"):].rstrip(","))
        elif line.startswith("#EXT-X-MAP:"):
            init = re.fullmatch(r'#EXT-X-MAP:URI="([^"]+)"', line).group(1)
        elif line.startswith("#"):
            name, _, value = line.partition(":")
            tags[name] = value
        elif line:
            segments.append((duration, line))
    return tags, init, segments


def _presigned(url: str) -> bool:
    return url.startswith("http://127.0.0.1:") and "X-Amz-Signature=" in url and f"X-Amz-Expires={EXPIRES_IN}" in url


def _video_packets(source: str, *input_options: str) -> list[str]:
    """(size, md5) of every video packet, copied without decoding: equal lists mean one encode."""
    out = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", *input_options, "-i", source, "-map", "0:v",
                          "-c", "copy", "-f", "framemd5", "-"], capture_output=True, text=True, check=True).stdout
    return [",".join(part.strip() for part in line.split(",")[-2:]) for line in out.splitlines()
            if not line.startswith("#")]


def _decoded_frames(url: str) -> int:
    out = subprocess.run(["ffprobe", "-v", "error", "-live_start_index", "0", "-count_frames", "-select_streams", "v",
                          "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", url],
                         capture_output=True, text=True, check=True).stdout
    # The HLS demuxer shows the stream twice (in its program and on its own).
    return int(out.split()[0])


@pytest.mark.parametrize("options", [
    StreamOptions(segment_seconds=1.0, first_segment_seconds=0.5, low_latency_encoder=True),
    StreamOptions(segment_seconds=1.5, first_segment_seconds=0, low_latency_encoder=False),
], ids=["first-0.5-then-1-zerolatency", "all-1.5-default-x264"])
def test_the_published_playlist_plays_the_same_packets_as_the_mp4(tmp_path, speech, moto_s3, options):
    bucket = moto_s3.bucket(f"hls-t1-{int(options.segment_seconds * 10)}")
    # Characters the tee muxer would read as syntax, to show the paths are escaped.
    folder = tmp_path / "hls: [a]|b'c=d"
    mp4 = tmp_path / "full.mp4"
    frames = FPS * SECONDS
    with _publisher(moto_s3, bucket, folder, options) as publisher, \
            VideoEncoder(mp4, WIDTH, HEIGHT, Fraction(FPS), speech, codec="libx264",
                         hls=publisher.hls) as encoder:
        for i in range(frames):
            encoder.write(_frame(i))
    expected = _expected_durations(options, frames)
    assert publisher.failed is None and publisher.segments == len(expected)

    reply = _get(publisher.playlist_url)
    assert reply.headers["Content-Type"] == "application/vnd.apple.mpegurl"
    assert reply.headers["Cache-Control"] == "no-cache"
    lines = reply.text.splitlines()
    assert lines[0] == "#EXTM3U" and lines[-1] == "#EXT-X-ENDLIST" and lines.count("#EXT-X-ENDLIST") == 1
    tags, init, segments = _parse(reply.text)
    assert tags["#EXT-X-VERSION"] == "7" and tags["#EXT-X-PLAYLIST-TYPE"] == "EVENT"
    assert tags["#EXT-X-START"] == "TIME-OFFSET=0,PRECISE=YES" and "#EXT-X-INDEPENDENT-SEGMENTS" in tags
    target = int(tags["#EXT-X-TARGETDURATION"])
    assert target == target_duration(options) == math.ceil(max(options.first_seconds, options.segment_seconds))
    assert all(round(duration) <= target for duration, _ in segments)

    # Lengths: the first about first_seconds, the others segment_seconds, within one frame; the last may be shorter.
    durations = [duration for duration, _ in segments]
    assert durations == pytest.approx(expected, abs=1e-3)
    assert durations[0] == pytest.approx(options.first_seconds, abs=1 / FPS)
    assert all(abs(d - options.segment_seconds) <= 1 / FPS for d in durations[1:-1])
    assert durations[-1] <= options.segment_seconds + 1 / FPS
    assert sum(durations) == pytest.approx(SECONDS, abs=1e-3)

    # Every URI is presigned and serves exactly what ffmpeg wrote.
    assert _presigned(publisher.playlist_url) and _presigned(init)
    init_reply = _get(init)
    assert init_reply.content == (folder / "init.mp4").read_bytes()
    for index, (_, url) in enumerate(segments):
        assert _presigned(url) and f"/{bucket}/jobs/j1/seg_{index:05d}.m4s?" in url
        segment = _get(url)
        assert segment.headers["Content-Type"] == "video/iso.segment"
        assert "immutable" in segment.headers["Cache-Control"]
        local = (folder / f"seg_{index:05d}.m4s").read_bytes()
        assert segment.content == local
        # Each segment opens (after the init segment) with a keyframe, so a player can start at any
        # of them, and carries its stretch of the audio too.
        joined = tmp_path / f"joined_{index}.mp4"
        joined.write_bytes(init_reply.content + local)
        packets = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "packet=codec_type,flags",
                                  "-of", "csv=p=0", str(joined)], capture_output=True, text=True, check=True).stdout
        kinds = [line.split(",") for line in packets.split()]
        flags = [flag for kind, flag in kinds if kind == "video"]
        assert flags[0].startswith("K") and not any(f.startswith("K") for f in flags[1:])
        assert len(flags) == round(expected[index] * FPS)
        assert sum(kind == "audio" for kind, _ in kinds) >= 0.9 * expected[index] * 16000 / 1024

    # A player reading the presigned playlist from the start decodes every frame the mp4 has,
    # and the video packets of both are byte for byte the same: one encode.
    probed = ffprobe(mp4)
    video = next(s for s in probed["streams"] if s["codec_type"] == "video")
    assert int(video["nb_read_frames"]) == frames == _decoded_frames(publisher.playlist_url)
    mp4_packets = _video_packets(str(mp4))
    assert len(mp4_packets) == frames and _video_packets(publisher.playlist_url, "-live_start_index", "0") == mp4_packets
    data = mp4.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # the mp4 is still faststart


def test_segment_zero_is_public_before_the_last_frame_is_written(tmp_path, speech, moto_s3):
    # Frames arrive in real time (25 fps), as from a GPU that generates just fast enough.
    options = StreamOptions(segment_seconds=1.0, first_segment_seconds=0.5, low_latency_encoder=True)
    bucket = moto_s3.bucket("hls-t2")
    calls = []
    publisher = _publisher(moto_s3, bucket, tmp_path / "hls", options,
                           on_first_segment=lambda url: calls.append((url, threading.current_thread().name)))
    # An outside observer: when does a HEAD of segment 0 first succeed?
    seen: list[float] = []
    watching = threading.Event()

    def watch() -> None:
        client = moto_s3.client()
        while not watching.is_set():
            try:
                client.head_object(Bucket=bucket, Key="jobs/j1/seg_00000.m4s")
                seen.append(time.monotonic())
                return
            except ClientError:
                time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    written = []
    try:
        with publisher, VideoEncoder(tmp_path / "full.mp4", WIDTH, HEIGHT, Fraction(FPS), speech,
                                     codec="libx264", hls=publisher.hls) as encoder:
            start = time.monotonic()
            for i in range(FPS * SECONDS):
                time.sleep(max(0.0, start + i / FPS - time.monotonic()))
                encoder.write(_frame(i))
                written.append(time.monotonic())
            segments_while_encoding = publisher.segments
    finally:
        watching.set()
        watcher.join()
    last_frame = written[-1]
    assert publisher.first_segment_at is not None and seen
    assert publisher.first_segment_at < last_frame and seen[0] < last_frame
    # Segment 0 closes when frame 13 (the keyframe at 0.52 s) is encoded; without look-ahead
    # it is public soon after that frame is written (a generous bound for a loaded 2-core machine).
    closing = written[round(_expected_durations(options, FPS * SECONDS)[0] * FPS)]
    after_closing = publisher.first_segment_at - closing
    assert 0 < after_closing < 0.5, after_closing
    assert calls == [(publisher.playlist_url, "hls-publisher")]
    assert segments_while_encoding >= 2 and publisher.segments == 4
    print(f"\nsegment 0 public {publisher.first_segment_at - start:.3f} s after the first frame, "
          f"{after_closing:.3f} s after its closing frame, {last_frame - publisher.first_segment_at:.3f} s "
          f"before the last frame; head_object saw it at {seen[0] - start:.3f} s; "
          f"{segments_while_encoding} segments public when the last frame was written")


@pytest.mark.parametrize("store", ["missing-bucket", "no-server"])
def test_a_failed_upload_fails_finish_with_the_object_and_what_to_check(tmp_path, speech, moto_s3, store):
    options = StreamOptions()
    # "no-server": nothing listens on that port (a stopped store): EndpointConnectionError after retries.
    client = _client(moto_s3.endpoint if store == "missing-bucket" else f"http://127.0.0.1:{free_port()}")
    publisher = SegmentPublisher(HlsOutput(tmp_path / "hls", options), client, "no-such-bucket", "jobs/j1/",
                                 EXPIRES_IN).start()
    mp4 = tmp_path / "full.mp4"
    # The encode itself is not held up: it finishes and the mp4 is whole.
    with VideoEncoder(mp4, WIDTH, HEIGHT, Fraction(FPS), speech, codec="libx264", hls=publisher.hls) as encoder:
        for i in range(FPS * SECONDS):
            encoder.write(_frame(i))
    assert int(ffprobe(mp4)["streams"][0]["nb_read_frames"]) == FPS * SECONDS
    with pytest.raises(LipSyncError) as caught:
        publisher.finish()
    error = caught.value
    assert error.code == ErrorCode.UPLOAD_FAILED and error.stage == "upload"
    message = str(error)
    assert message.startswith("could not publish the stream: uploading s3://no-such-bucket/jobs/j1/init.mp4 at "
                              f"{client.meta.endpoint_url} failed: ")
    assert ("NoSuchBucket" if store == "missing-bucket" else "Could not connect to the endpoint URL") in message
    assert "Check the bucket name, endpoint and credentials" in message
    assert MOTO_SECRET not in message and MOTO_KEY_ID not in message and "Signature" not in message
    assert publisher.failed is not None and publisher.segments == 0 and publisher.first_segment_at is None


def test_abort_ends_the_playlist_and_delete_uploaded_removes_everything(tmp_path, speech, moto_s3):
    options = StreamOptions(segment_seconds=1.0, first_segment_seconds=0.5)
    bucket = moto_s3.bucket("hls-abort")
    client = _client(moto_s3.endpoint)
    publisher = _publisher(moto_s3, bucket, tmp_path / "hls", options).start()
    encoder = VideoEncoder(tmp_path / "full.mp4", WIDTH, HEIGHT, Fraction(FPS), speech, codec="libx264",
                           hls=publisher.hls)
    # 40 frames: segments 0 (frames 0-12) and 1 (13-37) close; frames 38-39 never become a segment.
    for i in range(40):
        encoder.write(_frame(i))
    deadline = time.monotonic() + 20
    while publisher.segments < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert publisher.segments == 2
    # The job fails here: ffmpeg is killed and the stream stops at its last good segment.
    encoder.abort()
    publisher.abort()
    playlist = _get(publisher.playlist_url).text
    assert playlist.splitlines()[-1] == "#EXT-X-ENDLIST"
    _, init, segments = _parse(playlist)
    assert [d for d, _ in segments] == pytest.approx([0.52, 1.0])
    assert _decoded_frames(publisher.playlist_url) == 38
    publisher.abort()  # a second abort changes nothing
    assert _get(publisher.playlist_url).text == playlist

    listed = client.list_objects_v2(Bucket=bucket, Prefix="jobs/j1/")
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "jobs/j1/index.m3u8", "jobs/j1/init.mp4", "jobs/j1/seg_00000.m4s", "jobs/j1/seg_00001.m4s"]
    # A cancelled job leaves nothing behind.
    publisher.delete_uploaded()
    assert client.list_objects_v2(Bucket=bucket, Prefix="jobs/j1/")["KeyCount"] == 0
    assert requests.get(publisher.playlist_url, timeout=10).status_code == 404


@pytest.mark.parametrize("segment, first, target", [(1.0, 0.5, 1), (1.5, 0, 2), (1.0, 2.5, 3), (4.0, 0.5, 4)])
def test_target_duration_covers_the_longest_segment(segment, first, target):
    assert target_duration(StreamOptions(segment_seconds=segment, first_segment_seconds=first)) == target


def test_an_hls_folder_with_a_percent_sign_is_refused(tmp_path):
    # ffmpeg's HLS muxer would read it as part of the segment name pattern.
    with pytest.raises(ValueError, match="'%'"):
        HlsOutput(tmp_path / "100%", StreamOptions())


def _ffmpeg_lists_nvenc() -> bool:
    out = subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True, check=True).stdout
    return any(line.split()[1:2] == ["h264_nvenc"] for line in out.splitlines())


@pytest.mark.skipif(Path("/dev/nvidiactl").exists(), reason="an NVIDIA driver is loaded: NVENC may open here")
@pytest.mark.skipif(not _ffmpeg_lists_nvenc(), reason="this ffmpeg was built without h264_nvenc")
@pytest.mark.parametrize("low_latency", [True, False])
def test_ffmpeg_accepts_the_nvenc_stream_settings(low_latency):
    # No GPU here: ffmpeg checks every option value before it loads the driver, so failing at
    # the driver means it took them all (a bad value such as "-tune lowlat" fails earlier).
    args = encode._video_args("h264_nvenc", 18, StreamOptions(low_latency_encoder=low_latency))
    assert "-forced-idr 1" in " ".join(args)
    assert ("-tune ll -zerolatency 1 -delay 0 -bf 0" in " ".join(args)) == low_latency
    run = subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-v", "error", "-f", "lavfi", "-i",
                          "testsrc2=size=64x64:rate=25:duration=0.2", *args, "-f", "null", "-"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "Cannot load libcuda.so.1" in run.stderr, run.stderr
