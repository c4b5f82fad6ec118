"""Publishing HLS segments to S3 while ffmpeg still writes them.

:class:`~musetalk_worker.encode.VideoEncoder` with an
:class:`~musetalk_worker.encode.HlsOutput` writes fMP4 segments and its own
playlist to a local folder. :class:`SegmentPublisher` watches that playlist on
a thread of its own and, for each segment ffmpeg lists (complete, thanks to
ffmpeg's ``temp_file`` flag), uploads it and then overwrites the bucket's
``index.m3u8``. The encoder never waits for the network: ffmpeg keeps writing
segments locally while an upload is under way.

The published playlist is not ffmpeg's: a private bucket needs every URI
presigned (a relative URI would resolve against the playlist URL without its
signature), and players need ``EXT-X-START`` to begin at the start instead of
near the live edge (docs/streaming.md 2.5, 2.6).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable, Optional

from botocore.exceptions import BotoCoreError, ClientError

from .encode import HlsOutput
from .errors import ErrorCode, LipSyncError
from .options import StreamOptions
from .s3 import failure_reason, shown_url

logger = logging.getLogger(__name__)

PLAYLIST_NAME = "index.m3u8"
PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
SEGMENT_TYPE = "video/iso.segment"
INIT_TYPE = "video/mp4"
# Segments (and init.mp4) never change once written; the playlist is overwritten at every publish.
SEGMENT_CACHE = "public, max-age=31536000, immutable"
PLAYLIST_CACHE = "no-cache"
# How often ffmpeg's playlist is read: a new segment waits at most this long.
POLL_S = 0.02

_UPLOAD_ERRORS = (ClientError, BotoCoreError, OSError)


def target_duration(options: StreamOptions) -> int:
    """``EXT-X-TARGETDURATION`` for a stream made with ``options``, fixed before the first segment.

    A segment ends at the first frame at or past its nominal end, so it
    overruns by less than one frame; players compare the *rounded* segment
    duration with the target (RFC 8216 4.3.3.1), so the ceiling of the longest
    nominal length covers every segment at any frame rate above 2 fps.
    """
    return max(1, math.ceil(max(options.first_seconds, options.segment_seconds)))


class SegmentPublisher:
    """Uploads the segments of an :class:`HlsOutput` as ffmpeg lists them, with a presigned EVENT playlist.

    Objects go to ``<prefix>index.m3u8``, ``<prefix>init.mp4`` and
    ``<prefix>seg_00000.m4s``...; ``playlist_url`` (a presigned GET of the
    playlist, valid across its overwrites) is known from the start. Uploads run
    only on the publisher's thread, in order: ``init.mp4`` before the first
    segment, each segment before the playlist that lists it. The first time a
    playlist lists a segment, ``on_first_segment(playlist_url)`` is called once,
    from that thread (an exception it raises is logged, publishing goes on).

    A failed upload stops the thread and is kept in ``failed``; the public
    playlist is then ended at the last good segment. Lifecycle: ``start()``,
    then after the encoder closed ``finish()``; on a failed job ``abort()``; on
    a cancelled one ``delete_uploaded()``. As a context manager it starts on
    entry and, on exit, finishes (or aborts when leaving on an exception).

    Args:
        hls: the folder and options the encoder writes to.
        client: a ready boto3 S3 client.
        bucket: the bucket to publish in.
        prefix: key prefix of every object, e.g. ``"lipsync/job-1/"``.
        expires_in: lifetime of the presigned URLs, in seconds.
        on_first_segment: called with ``playlist_url`` once segment 0 is public.
    """

    def __init__(self, hls: HlsOutput, client, bucket: str, prefix: str, expires_in: int,
                 on_first_segment: Optional[Callable[[str], None]] = None):
        self.hls = hls
        self.bucket = bucket
        self.prefix = prefix
        self.target_duration = target_duration(hls.options)
        self._client = client
        self._expires_in = expires_in
        self._on_first_segment = on_first_segment
        self.playlist_key = prefix + PLAYLIST_NAME
        self.playlist_url = self._presigned(self.playlist_key)
        self.first_segment_at: Optional[float] = None
        self.failed: Optional[Exception] = None
        self._current_key: Optional[str] = None  # the object being uploaded
        self._failed_key: Optional[str] = None
        self._init_url: Optional[str] = None
        # (duration, presigned URL) of each public segment, in order.
        self._published: list[tuple[float, str]] = []
        self._ended = False
        self._uploaded: dict[str, None] = {}  # keys in upload order, each once
        self._end: Optional[str] = None  # "finish" or "abort", set once before _stop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hls-publisher", daemon=True)

    @property
    def segments(self) -> int:
        """How many segments the public playlist lists."""
        return len(self._published)

    def start(self) -> "SegmentPublisher":
        """Starts watching ffmpeg's playlist; returns ``self``."""
        self._thread.start()
        return self

    def finish(self) -> None:
        """Publishes the segments not yet public and ends the playlist (``EXT-X-ENDLIST``).

        Call after the encoder closed, so ffmpeg's playlist lists every segment.

        Raises:
            LipSyncError(upload_failed): an upload failed, now or earlier; the
                message names the object and what to check.
        """
        self._stop_thread("finish")
        if self.failed is None:
            return
        if not isinstance(self.failed, _UPLOAD_ERRORS):
            raise self.failed
        raise LipSyncError(
            ErrorCode.UPLOAD_FAILED,
            f"could not publish the stream: uploading s3://{self.bucket}/{self._failed_key} at "
            f"{shown_url(self._client.meta.endpoint_url)} failed: {failure_reason(self.failed)}. Check the bucket name, "
            "endpoint and credentials (BUCKET_* variables or output.bucket / output.credentials), and that "
            "they allow PutObject.",
            stage="upload",
        ) from None

    def abort(self) -> None:
        """Stops publishing; a playlist already public is ended at its last good segment. Never raises."""
        self._stop_thread("abort")

    def delete_uploaded(self) -> None:
        """Stops publishing and deletes every object this publisher uploaded (a cancelled job).

        A deletion the store refuses is logged, not raised: the job is ending anyway.
        """
        self.abort()
        keys = list(self._uploaded)
        # DeleteObjects takes at most 1000 keys per call.
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            try:
                reply = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True})
            except (ClientError, BotoCoreError) as err:
                logger.warning("could not delete %d stream objects under s3://%s/%s: %s",
                               len(batch), self.bucket, self.prefix, failure_reason(err))
                continue
            for error in reply.get("Errors", []):
                logger.warning("could not delete s3://%s/%s: %s", self.bucket, error.get("Key"), error.get("Message"))

    def __enter__(self) -> "SegmentPublisher":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()

    def _stop_thread(self, end: str) -> None:
        if self._end is None:
            self._end = end
            self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.wait(POLL_S):
                self._publish_listed(final=False)
            if self._end == "finish":
                self._publish_listed(final=True)
                logger.info("stream: %d segments published at s3://%s/%s", self.segments, self.bucket,
                            self.playlist_key)
                return
        except Exception as err:  # noqa: BLE001 - kept for finish() to raise on the job's thread
            self.failed, self._failed_key = err, self._current_key
            logger.warning("stream publishing stopped after %d segments: %s", self.segments, failure_reason(err))
        if self._published and not self._ended:
            # Players of a stream that will not grow any more should end, not wait.
            try:
                self._put_playlist(final=True)
            except _UPLOAD_ERRORS as err:
                logger.warning("could not end the public playlist s3://%s/%s: %s",
                               self.bucket, self.playlist_key, failure_reason(err))

    def _publish_listed(self, final: bool) -> None:
        """Uploads each segment ffmpeg lists and this publisher has not, then the playlist listing it."""
        new = _listed(self.hls)[len(self._published):]
        if final and not new:
            self._put_playlist(final=True)
        for index, (duration, name) in enumerate(new):
            if self._end == "abort":
                return
            if self._init_url is None:
                self._init_url = self._put_file(self.hls.INIT_NAME, INIT_TYPE)
            url = self._put_file(name, SEGMENT_TYPE)
            self._published.append((duration, url))
            self._put_playlist(final=final and index == len(new) - 1)
            if self.first_segment_at is None:
                self._first_segment_public()

    def _first_segment_public(self) -> None:
        self.first_segment_at = time.monotonic()
        logger.info("stream: first segment public at s3://%s/%s", self.bucket, self.playlist_key)
        if self._on_first_segment is not None:
            try:
                self._on_first_segment(self.playlist_url)
            except Exception:  # noqa: BLE001 - a reporting hook must not stop the stream
                logger.exception("on_first_segment failed")

    def _put_file(self, name: str, content_type: str) -> str:
        """Uploads ``name`` from the HLS folder (streamed from disk) and returns its presigned URL."""
        key = self.prefix + name
        self._mark_uploading(key)
        with open(self.hls.folder / name, "rb") as body:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType=content_type,
                                    CacheControl=SEGMENT_CACHE)
        return self._presigned(key)

    def _put_playlist(self, final: bool) -> None:
        lines = [
            "#EXTM3U",
            "#EXT-X-VERSION:7",
            f"#EXT-X-TARGETDURATION:{self.target_duration}",
            "#EXT-X-MEDIA-SEQUENCE:0",
            "#EXT-X-PLAYLIST-TYPE:EVENT",
            "#EXT-X-START:TIME-OFFSET=0,PRECISE=YES",
            "#EXT-X-INDEPENDENT-SEGMENTS",
        ]
        if self._init_url is not None:
            lines.append(f'#EXT-X-MAP:URI="{self._init_url}"')
        for duration, url in self._published:
            lines += [f"#EXTINF:{duration:.6f},", url]
        if final:
            lines.append("#EXT-X-ENDLIST")
        self._mark_uploading(self.playlist_key)
        self._client.put_object(Bucket=self.bucket, Key=self.playlist_key, Body="\n".join(lines).encode() + b"\n",
                                ContentType=PLAYLIST_TYPE, CacheControl=PLAYLIST_CACHE)
        self._ended = final

    def _mark_uploading(self, key: str) -> None:
        # Recorded before the PUT: one that timed out may still have been stored.
        self._current_key = key
        self._uploaded[key] = None

    def _presigned(self, key: str) -> str:
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self._expires_in)


def _listed(hls: HlsOutput) -> list[tuple[float, str]]:
    """(duration, file name) of each segment in ffmpeg's playlist; none before it exists."""
    try:
        text = hls.playlist.read_text()
    except FileNotFoundError:
        return []
    entries, duration = [], None
    for line in text.splitlines():
        if line.startswith("#EXTINF:"):
            duration = float(line[len("#EXTINF:"):].split(",")[0])
        elif line and not line.startswith("#") and duration is not None:
            entries.append((duration, line.strip()))
            duration = None
    return entries
