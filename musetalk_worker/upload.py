"""Delivering the finished video.

Where it goes is decided when the job is validated (``plan_delivery``), so a
job whose output cannot be delivered fails before the GPU works on it:

1. a bucket (``output.bucket`` or ``BUCKET_NAME``): uploaded as ``video/mp4``
   (multipart above 64 MiB) and returned as a presigned URL plus the key;
2. no bucket, and an output folder (local runs): the file is moved there and
   its path returned;
3. no bucket on RunPod: returned inline as base64 when small enough for
   RunPod's result limit, otherwise an ``upload_failed`` error that says how to
   configure a bucket.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
import shutil
from pathlib import Path
from typing import Optional

from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from .errors import ErrorCode, LipSyncError
from .options import WorkerSettings
from .s3 import S3Access, failure_reason, s3_client, shown_url
from .schema import OutputSpec

logger = logging.getLogger(__name__)

VIDEO_TYPE = "video/mp4"
TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024)

_CONFIGURE_BUCKET = (
    "configure a bucket: set BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY and "
    "BUCKET_NAME on the endpoint, or give output.bucket and output.credentials in the job"
)


@dataclasses.dataclass(frozen=True)
class DeliveryPlan:
    """Where one job's video goes: ``s3`` (bucket + key), ``local_file`` or ``inline``."""

    kind: str
    bucket: Optional[str] = None
    key: Optional[str] = None
    expires_in: int = 0
    local_path: Optional[Path] = None
    access: S3Access = dataclasses.field(default_factory=S3Access)

    @property
    def stream_prefix(self) -> str:
        """Where a streamed job's HLS objects go: beside the mp4, in a folder named for it.

        ``lipsync/job-1.mp4`` streams to ``lipsync/job-1/index.m3u8``, so a client
        that owns the bucket can presign the playlist as soon as it knows the job id.
        """
        stem = self.key[: -len(Path(self.key).suffix)] if Path(self.key).suffix else self.key
        return f"{stem}/"


def plan_delivery(spec: Optional[OutputSpec], settings: WorkerSettings, job_id: str) -> DeliveryPlan:
    """Decides where the result of job ``job_id`` goes; no network is used.

    Raises:
        LipSyncError(invalid_input): the job names a key, prefix or
            credentials but no bucket is known.
    """
    spec = spec or OutputSpec()
    bucket = spec.bucket or settings.bucket_name
    name = f"{_safe_name(job_id)}.mp4"
    if bucket:
        prefix = spec.prefix if spec.prefix is not None else settings.output_prefix
        return DeliveryPlan(
            kind="s3",
            bucket=bucket,
            key=spec.key or f"{prefix}{name}",
            expires_in=spec.expires_in or settings.presign_expiry_s,
            access=S3Access.for_job(spec.credentials, settings),
        )
    if spec.stream is not None:
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            f"'output.stream' needs a bucket to publish the stream in: {_CONFIGURE_BUCKET}, or leave "
            "'output.stream' out.",
            stage="validate",
        )
    if spec.key is not None or spec.prefix is not None or spec.credentials is not None:
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            "'output' names a key, prefix or credentials but no bucket: give 'output.bucket' "
            "(or set BUCKET_NAME on the worker).",
            stage="validate",
        )
    if settings.output_dir is not None:
        return DeliveryPlan(kind="local_file", local_path=settings.output_dir / name)
    return DeliveryPlan(kind="inline")


def deliver(video: Path, plan: DeliveryPlan, settings: WorkerSettings) -> dict:
    """Sends ``video`` where ``plan`` says and returns the output fields describing it.

    Raises:
        LipSyncError(upload_failed): the bucket cannot be reached or refuses the
            upload, or the video is too large to return inline.
    """
    size = video.stat().st_size
    if plan.kind == "s3":
        return {"delivery": "s3", **upload_video(video, plan, settings), "size_bytes": size}
    if plan.kind == "local_file":
        plan.local_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(video), plan.local_path)
        return {
            "delivery": "local_file",
            "video_path": str(plan.local_path),
            "size_bytes": size,
            "note": "No bucket is configured and this is a local run, so the video was written to disk on "
            f"this machine (MUSETALK_OUTPUT_DIR). On RunPod, {_CONFIGURE_BUCKET}.",
        }
    if size > settings.max_inline_result_bytes:
        raise LipSyncError(
            ErrorCode.UPLOAD_FAILED,
            f"the video is {size / 1e6:.1f} MB, more than the {settings.max_inline_result_bytes / 1e6:.1f} MB "
            f"that fit in a RunPod result (MUSETALK_MAX_INLINE_RESULT_BYTES); {_CONFIGURE_BUCKET}.",
            stage="upload",
        )
    return {
        "delivery": "inline",
        "video_base64": base64.b64encode(video.read_bytes()).decode("ascii"),
        "size_bytes": size,
        "note": f"No bucket is configured, so the video is inline (base64). For long videos, {_CONFIGURE_BUCKET}.",
    }


def upload_video(
    video: Path, plan: DeliveryPlan, settings: WorkerSettings, transfer: TransferConfig = TRANSFER
) -> dict:
    """Uploads ``video`` to ``plan.bucket``/``plan.key`` and presigns a GET for it.

    Returns ``video_url``, ``bucket``, ``key`` and ``url_expires_in`` (seconds).
    """
    where = f"s3://{plan.bucket}/{plan.key}"
    try:
        client = s3_client(plan.access, settings)
        client.upload_file(str(video), plan.bucket, plan.key, ExtraArgs={"ContentType": VIDEO_TYPE}, Config=transfer)
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": plan.bucket, "Key": plan.key}, ExpiresIn=plan.expires_in
        )
    except (ClientError, BotoCoreError, S3UploadFailedError) as err:
        raise LipSyncError(
            ErrorCode.UPLOAD_FAILED,
            f"could not upload the result to {where}{_at(plan.access)}: {failure_reason(err)}. Check the bucket name, "
            "endpoint and credentials (BUCKET_* variables or output.bucket / output.credentials).",
            stage="upload",
        ) from None
    except LipSyncError as err:
        # A job-given endpoint on a refused address is reported at the upload stage.
        raise LipSyncError(err.code, err.message, stage="upload") from None
    logger.info("uploaded %s (%d bytes)", where, video.stat().st_size)
    return {"video_url": url, "bucket": plan.bucket, "key": plan.key, "url_expires_in": plan.expires_in}


def _at(access: S3Access) -> str:
    return f" at {shown_url(access.endpoint_url)}" if access.endpoint_url else ""


def _safe_name(job_id: str) -> str:
    # Job ids become object keys and file names: keep them to a harmless alphabet.
    return re.sub(r"[^A-Za-z0-9._-]", "_", job_id)[:128] or "job"
