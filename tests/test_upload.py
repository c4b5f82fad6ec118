"""Delivering results: S3 upload against moto_server (single and multipart, content
type, presigned URL), the local-file and inline fallbacks, and upload failures."""

from __future__ import annotations

import base64
import dataclasses
import os
import subprocess
from pathlib import Path

import pytest
import requests
from boto3.s3.transfer import TransferConfig

from musetalk_worker.errors import ErrorCode, LipSyncError
from musetalk_worker.options import WorkerSettings
from musetalk_worker.schema import OutputSpec, S3Credentials
from musetalk_worker.upload import deliver, plan_delivery, upload_video
from servers import MOTO_KEY_ID, MOTO_SECRET, free_port

MIB = 1024 * 1024


@pytest.fixture
def video(tmp_path) -> Path:
    """A real, tiny mp4."""
    path = tmp_path / "result.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=25:duration=0.2",
                    "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


@pytest.fixture
def s3_settings(moto_s3) -> WorkerSettings:
    return WorkerSettings(bucket_endpoint_url=moto_s3.endpoint, bucket_access_key_id=MOTO_KEY_ID,
                          bucket_secret_access_key=MOTO_SECRET, bucket_region="us-east-1",
                          bucket_name=moto_s3.bucket("results"), output_dir=None)


def test_plans():
    settings = WorkerSettings(bucket_name="env-bucket", output_prefix="out/", presign_expiry_s=600)
    plan = plan_delivery(None, settings, "job/1 x")
    assert (plan.kind, plan.bucket, plan.key, plan.expires_in) == ("s3", "env-bucket", "out/job_1_x.mp4", 600)
    plan = plan_delivery(OutputSpec(bucket="mine", key="a/b.mp4", expires_in=60), settings, "j")
    assert (plan.bucket, plan.key, plan.expires_in) == ("mine", "a/b.mp4", 60)
    assert plan_delivery(OutputSpec(prefix=""), settings, "j").key == "j.mp4"
    assert plan_delivery(None, WorkerSettings(output_dir=Path("/tmp/o")), "j").local_path == Path("/tmp/o/j.mp4")
    assert plan_delivery(None, WorkerSettings(output_dir=None), "j").kind == "inline"


def test_credentials_without_a_bucket_are_invalid():
    spec = OutputSpec(credentials=S3Credentials(access_key_id="AKIAEXAMPLE1", secret_access_key="very-secret-value"))
    with pytest.raises(LipSyncError) as info:
        plan_delivery(spec, WorkerSettings(output_dir=None), "j")
    assert info.value.code is ErrorCode.INVALID_INPUT and "give 'output.bucket'" in info.value.message


def test_job_credentials_stay_out_of_repr():
    spec = OutputSpec(bucket="b1x", credentials=S3Credentials(access_key_id="AKIAEXAMPLE1",
                                                             secret_access_key="very-secret-value"))
    plan = plan_delivery(spec, WorkerSettings(), "j")
    assert "very-secret-value" not in repr(plan) and "AKIAEXAMPLE1" not in repr(plan)
    assert "very-secret-value" not in repr(WorkerSettings(bucket_secret_access_key="very-secret-value"))


def test_upload_and_presigned_download(moto_s3, s3_settings, video):
    plan = plan_delivery(OutputSpec(prefix="clips/", expires_in=900), s3_settings, "job-1")
    out = deliver(video, plan, s3_settings)
    assert out["delivery"] == "s3" and (out["bucket"], out["key"]) == ("results", "clips/job-1.mp4")
    assert out["url_expires_in"] == 900 and out["size_bytes"] == video.stat().st_size
    head = moto_s3.client().head_object(Bucket="results", Key="clips/job-1.mp4")
    assert head["ContentType"] == "video/mp4"
    got = requests.get(out["video_url"], timeout=10)
    assert got.status_code == 200 and got.content == video.read_bytes()
    assert MOTO_SECRET not in str(out)


def test_large_files_go_multipart(moto_s3, s3_settings, tmp_path):
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(11 * MIB))
    plan = plan_delivery(OutputSpec(key="big.mp4"), s3_settings, "j")
    # The real threshold is 64 MiB; 5 MiB (S3's smallest part) keeps the test small.
    upload_video(big, plan, s3_settings, TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB))
    head = moto_s3.client().head_object(Bucket="results", Key="big.mp4")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # a 3-part multipart upload
    assert head["ContentType"] == "video/mp4" and head["ContentLength"] == 11 * MIB


def test_job_bucket_and_credentials(moto_s3, video):
    moto_s3.bucket("job-bucket")
    spec = OutputSpec(bucket="job-bucket", credentials=S3Credentials(
        endpoint_url=moto_s3.endpoint, access_key_id=MOTO_KEY_ID, secret_access_key=MOTO_SECRET, region="us-east-1"))
    refused = WorkerSettings()
    with pytest.raises(LipSyncError) as info:
        deliver(video, plan_delivery(spec, refused, "j"), refused)
    assert info.value.code is ErrorCode.INVALID_INPUT and info.value.stage == "upload"
    assert "MUSETALK_ALLOW_PRIVATE_URLS" in info.value.message
    allowed = WorkerSettings(allow_private_urls=True)
    out = deliver(video, plan_delivery(spec, allowed, "j"), allowed)
    assert requests.get(out["video_url"], timeout=10).content == video.read_bytes()


def test_unreachable_bucket_fails_clearly(video):
    endpoint = f"http://127.0.0.1:{free_port()}"
    settings = WorkerSettings(bucket_endpoint_url=endpoint, bucket_access_key_id=MOTO_KEY_ID,
                              bucket_secret_access_key=MOTO_SECRET, bucket_name="results")
    with pytest.raises(LipSyncError) as info:
        deliver(video, plan_delivery(None, settings, "j"), settings)
    message = info.value.message
    assert info.value.code is ErrorCode.UPLOAD_FAILED and info.value.stage == "upload"
    assert message.startswith(f"could not upload the result to s3://results/musetalk/j.mp4 at {endpoint}")
    assert "Check the bucket name, endpoint and credentials" in message and MOTO_SECRET not in message


def test_missing_bucket_fails_clearly(moto_s3, video):
    settings = WorkerSettings(bucket_endpoint_url=moto_s3.endpoint, bucket_access_key_id=MOTO_KEY_ID,
                              bucket_secret_access_key=MOTO_SECRET, bucket_name="no-such-bucket")
    with pytest.raises(LipSyncError) as info:
        deliver(video, plan_delivery(None, settings, "j"), settings)
    assert info.value.code is ErrorCode.UPLOAD_FAILED and "NoSuchBucket" in info.value.message


def test_local_file_when_no_bucket_on_a_local_run(video, tmp_path):
    settings = WorkerSettings(output_dir=tmp_path / "outputs")
    data = video.read_bytes()
    out = deliver(video, plan_delivery(None, settings, "local_test"), settings)
    assert out["delivery"] == "local_file" and Path(out["video_path"]).read_bytes() == data
    assert out["video_path"] == str(tmp_path / "outputs" / "local_test.mp4")
    assert "local run" in out["note"] and "BUCKET_ENDPOINT_URL" in out["note"]


def test_inline_only_when_small_enough(video):
    settings = WorkerSettings(output_dir=None)
    out = deliver(video, plan_delivery(None, settings, "j"), settings)
    assert out["delivery"] == "inline" and base64.b64decode(out["video_base64"]) == video.read_bytes()
    small = dataclasses.replace(settings, max_inline_result_bytes=100)
    with pytest.raises(LipSyncError) as info:
        deliver(video, plan_delivery(None, small, "j"), small)
    assert info.value.code is ErrorCode.UPLOAD_FAILED
    assert "fit in a RunPod result" in info.value.message
    assert "set BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY and BUCKET_NAME" \
        in info.value.message


def test_default_inline_result_fits_the_result_limit():
    encoded = 4 * -(-WorkerSettings().max_inline_result_bytes // 3)
    assert encoded + 10_000 < 10_000_000
