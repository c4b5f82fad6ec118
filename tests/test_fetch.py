"""Fetching inputs against real loopback servers: HTTP (SSRF checks, retries,
size caps, timeouts), moto's S3, data: URIs and local files."""

from __future__ import annotations

import base64
import dataclasses
import math
import os
import time
from pathlib import Path

import pytest

from musetalk_worker.errors import ErrorCode, LipSyncError
from musetalk_worker.fetch import fetch_input, parse_input
from musetalk_worker.options import WorkerSettings
from musetalk_worker.s3 import S3Access
from musetalk_worker.schema import S3Credentials
from servers import MOTO_KEY_ID, MOTO_SECRET, drop_connection, send_bytes

PAYLOAD = os.urandom(50_000)
PRIVATE_OK = WorkerSettings(allow_private_urls=True)
NO_S3 = S3Access()


def _fetch(value: str, tmp_path: Path, settings: WorkerSettings = PRIVATE_OK, access: S3Access = NO_S3) -> Path:
    return fetch_input(parse_input("source", value, settings), tmp_path, settings, access)


def _fails(code: ErrorCode, value: str, tmp_path: Path, settings: WorkerSettings = PRIVATE_OK,
           access: S3Access = NO_S3) -> LipSyncError:
    with pytest.raises(LipSyncError) as info:
        _fetch(value, tmp_path, settings, access)
    assert info.value.code is code, info.value.message
    return info.value


# ----------------------------------------------------------------------------- parsing (no network)

def test_url_is_shown_without_credentials_or_signature():
    ref = parse_input("source", "https://user:pw@cdn.example.com/clips/Face.MP4?X-Amz-Signature=abc#t", PRIVATE_OK)
    assert (ref.kind, ref.shown, ref.suffix) == ("url", "https://cdn.example.com/clips/Face.MP4", ".mp4")
    assert "abc" not in repr(ref) and "pw" not in repr(ref)


@pytest.mark.parametrize("value, expected", [
    ("ftp://host/a.mp4", "unsupported scheme 'ftp:'"),
    ("s3://bucket-only", "must look like s3://bucket/key"),
    ("http:///nohost.mp4", "URL has no host"),
    ("http://example.com:99999/a.mp4", "URL has an invalid port"),
    ("data:video/mp4,AAAA", "must carry base64 content"),
    ("data:video/mp4;base64,not base64!", "not valid base64"),
    ("face.mp4", "Local file paths are accepted only when the worker sets MUSETALK_LOCAL_INPUT_DIR"),
])
def test_malformed_inputs_are_invalid(value, expected):
    with pytest.raises(LipSyncError) as info:
        parse_input("source", value, WorkerSettings())
    assert info.value.code is ErrorCode.INVALID_INPUT and info.value.stage == "validate"
    assert expected in info.value.message


def test_inline_limit_keeps_two_inputs_under_the_run_body_limit():
    limit = WorkerSettings().max_inline_input_bytes
    encoded = 4 * math.ceil(limit / 3)
    assert 2 * (encoded + len("data:video/mp4;base64,")) + 10_000 < 10_000_000


def test_inline_data_round_trips(tmp_path):
    path = _fetch("data:video/mp4;base64," + base64.b64encode(PAYLOAD).decode(), tmp_path)
    assert path == tmp_path / "source.mp4" and path.read_bytes() == PAYLOAD
    wrapped = "\n".join(base64.encodebytes(PAYLOAD).decode().splitlines())
    assert _fetch("data:video/mp4;base64," + wrapped, tmp_path).read_bytes() == PAYLOAD
    # An unknown media type only loses the file suffix; ffprobe reads the content.
    assert _fetch("data:audio/wav;base64," + base64.b64encode(PAYLOAD).decode(), tmp_path).name == "source"


def test_oversize_inline_data_is_refused_before_decoding():
    settings = WorkerSettings(max_inline_input_bytes=1000)
    value = "data:video/mp4;base64," + "A" * 4000
    with pytest.raises(LipSyncError) as info:
        parse_input("audio", value, settings)
    message = info.value.message
    assert info.value.code is ErrorCode.INVALID_INPUT
    assert "'audio' inline data is about 0.0 MB; inline data is limited to 0.0 MB" in message
    assert "10 MB /run limit" in message and "s3://" in message


def test_local_files_only_inside_the_allowed_folder(tmp_path):
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "face.png").write_bytes(PAYLOAD)
    (tmp_path / "secret.txt").write_text("no")
    settings = WorkerSettings(local_input_dir=tmp_path / "inputs")
    ref = parse_input("source", "face.png", settings)
    assert fetch_input(ref, tmp_path, settings, NO_S3) == tmp_path / "inputs" / "face.png"
    assert parse_input("source", f"file://{tmp_path}/inputs/face.png", settings).value == ref.value
    for outside in ("../secret.txt", str(tmp_path / "secret.txt")):
        with pytest.raises(LipSyncError, match="outside the allowed folder"):
            parse_input("source", outside, settings)
    with pytest.raises(LipSyncError, match="does not exist"):
        parse_input("source", "missing.png", settings)


# ----------------------------------------------------------------------------- HTTP

def test_http_download(http_server, tmp_path):
    url = http_server.add("/clips/face.mp4", PAYLOAD)
    path = _fetch(url + "?token=abc", tmp_path)
    assert path == tmp_path / "source.mp4" and path.read_bytes() == PAYLOAD


def test_loopback_url_is_refused_without_the_setting(http_server, tmp_path):
    url = http_server.add("/private.mp4", PAYLOAD)
    error = _fails(ErrorCode.INVALID_INPUT, url, tmp_path, WorkerSettings())
    assert "resolves to 127.0.0.1, a private, loopback, link-local or metadata address" in error.message
    assert "MUSETALK_ALLOW_PRIVATE_URLS=true" in error.message and error.stage == "download"
    assert http_server.hits["/private.mp4"] == 0, "the refused address must never be contacted"
    assert _fetch(url, tmp_path).read_bytes() == PAYLOAD


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://10.1.2.3/a.mp4",
    "http://100.64.0.1/a.mp4",  # carrier-grade NAT
    "http://[::ffff:192.168.0.1]/a.mp4",  # IPv4-mapped IPv6
    "http://[fe80::1]/a.mp4",
])
def test_non_public_addresses_are_refused(url, tmp_path):
    _fails(ErrorCode.INVALID_INPUT, url, tmp_path, WorkerSettings())


def _redirect(location: str):
    def handle(h):
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return handle


def test_redirects_are_followed_and_each_hop_checked(http_server, tmp_path):
    # Every hop goes through the same scheme and address check as the first URL (the
    # address part cannot be shown with loopback servers, which are all private).
    http_server.add("/target.wav", PAYLOAD)
    assert _fetch(http_server.route("/moved", _redirect("/target.wav")), tmp_path).read_bytes() == PAYLOAD
    error = _fails(ErrorCode.INVALID_INPUT, http_server.route("/to-ftp", _redirect("ftp://example.com/a")), tmp_path)
    assert "redirects to a non-http address" in error.message and error.stage == "download"
    error = _fails(ErrorCode.DOWNLOAD_FAILED, http_server.route("/loop", _redirect("/loop")), tmp_path)
    assert "redirects more than 5 times" in error.message
    assert http_server.hits["/loop"] == 6


def test_404_is_not_retried(http_server, tmp_path):
    error = _fails(ErrorCode.DOWNLOAD_FAILED, http_server.url("/missing.mp4"), tmp_path)
    assert "answered HTTP 404" in error.message
    assert http_server.hits["/missing.mp4"] == 1


def test_dropped_connections_are_retried_then_fail_clearly(http_server, tmp_path):
    url = http_server.route("/drop.mp4", drop_connection)
    error = _fails(ErrorCode.DOWNLOAD_FAILED, url, tmp_path)
    assert error.message.startswith(f"could not download 'source' from {url} after 3 attempts: connection failed")
    assert http_server.hits["/drop.mp4"] == 3


def test_transfer_cut_short_is_retried_then_fails_clearly(http_server, tmp_path):
    def cut_short(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(PAYLOAD)))
        h.end_headers()
        h.wfile.write(PAYLOAD[:1000])
        h.wfile.flush()
        drop_connection(h)

    error = _fails(ErrorCode.DOWNLOAD_FAILED, http_server.route("/cut.mp4", cut_short), tmp_path)
    assert "after 3 attempts: the transfer broke off (IncompleteRead(1000 bytes read, 49000 more expected))" \
        in error.message
    assert http_server.hits["/cut.mp4"] == 3


@pytest.mark.parametrize("status", [503, 429])
def test_transient_statuses_are_retried(http_server, tmp_path, status):
    path = f"/flaky-{status}.mp4"

    def flaky(h):
        if http_server.hits[path] < 3:
            h.send_response(status)
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            send_bytes(h, PAYLOAD, "video/mp4")

    assert _fetch(http_server.route(path, flaky), tmp_path).read_bytes() == PAYLOAD
    assert http_server.hits[path] == 3


def test_declared_size_over_the_cap(http_server, tmp_path):
    url = http_server.add("/big.mp4", PAYLOAD)
    error = _fails(ErrorCode.DOWNLOAD_FAILED, url, tmp_path, dataclasses.replace(PRIVATE_OK, max_download_bytes=10_000))
    assert "larger than the 0.0 MB download limit" in error.message and "MUSETALK_MAX_DOWNLOAD_BYTES" in error.message
    assert http_server.hits["/big.mp4"] == 1


def test_undeclared_size_is_capped_while_streaming(http_server, tmp_path):
    def no_length(h):
        # HTTP/1.0-style body delimited by closing the connection: no Content-Length to trust.
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        for _ in range(50):
            h.wfile.write(PAYLOAD[:1000])

    settings = dataclasses.replace(PRIVATE_OK, max_download_bytes=20_000)
    error = _fails(ErrorCode.DOWNLOAD_FAILED, http_server.route("/stream.mp4", no_length), tmp_path, settings)
    assert "larger than" in error.message
    assert _fetch(http_server.url("/stream.mp4"), tmp_path).stat().st_size == 50_000


def test_slow_server_times_out_and_is_retried(http_server, tmp_path):
    def slow(h):
        time.sleep(1.5)
        send_bytes(h, PAYLOAD, "video/mp4")

    settings = dataclasses.replace(PRIVATE_OK, download_timeout_s=0.3, download_attempts=2)
    error = _fails(ErrorCode.DOWNLOAD_FAILED, http_server.route("/slow.mp4", slow), tmp_path, settings)
    assert "after 2 attempts: timed out" in error.message
    assert http_server.hits["/slow.mp4"] == 2


def test_unresolvable_host(tmp_path):
    error = _fails(ErrorCode.DOWNLOAD_FAILED, "https://no-such-host.invalid/a.mp4", tmp_path)
    assert "does not resolve" in error.message


# ----------------------------------------------------------------------------- S3

def test_s3_object_with_worker_credentials(moto_s3, tmp_path):
    bucket = moto_s3.bucket("inputs-env")
    moto_s3.client().put_object(Bucket=bucket, Key="clips/face.mp4", Body=PAYLOAD)
    settings = WorkerSettings(bucket_endpoint_url=moto_s3.endpoint, bucket_access_key_id=MOTO_KEY_ID,
                              bucket_secret_access_key=MOTO_SECRET, bucket_region="us-east-1")
    access = S3Access.for_job(None, settings)
    assert _fetch(f"s3://{bucket}/clips/face.mp4", tmp_path, settings, access).read_bytes() == PAYLOAD
    error = _fails(ErrorCode.DOWNLOAD_FAILED, f"s3://{bucket}/clips/nothing.mp4", tmp_path, settings, access)
    assert f"s3://{bucket}/clips/nothing.mp4 does not exist" in error.message
    small = dataclasses.replace(settings, max_download_bytes=1000)
    assert "larger than" in _fails(ErrorCode.DOWNLOAD_FAILED, f"s3://{bucket}/clips/face.mp4", tmp_path, small,
                                   access).message


def test_s3_object_with_job_credentials_and_endpoint_check(moto_s3, tmp_path):
    bucket = moto_s3.bucket("inputs-job")
    moto_s3.client().put_object(Bucket=bucket, Key="a.wav", Body=PAYLOAD)
    credentials = S3Credentials(endpoint_url=moto_s3.endpoint, access_key_id=MOTO_KEY_ID,
                                secret_access_key=MOTO_SECRET, region="us-east-1")
    refused = WorkerSettings()
    error = _fails(ErrorCode.INVALID_INPUT, f"s3://{bucket}/a.wav", tmp_path, refused,
                   S3Access.for_job(credentials, refused))
    assert "output.credentials.endpoint_url" in error.message
    access = S3Access.for_job(credentials, PRIVATE_OK)
    assert MOTO_SECRET not in repr(access)
    assert _fetch(f"s3://{bucket}/a.wav", tmp_path, PRIVATE_OK, access).read_bytes() == PAYLOAD


def test_unreachable_s3_endpoint(tmp_path):
    from servers import free_port

    settings = WorkerSettings(bucket_endpoint_url=f"http://127.0.0.1:{free_port()}", bucket_access_key_id="a" * 16,
                              bucket_secret_access_key="b" * 32, bucket_region="us-east-1")
    error = _fails(ErrorCode.DOWNLOAD_FAILED, "s3://b/k.mp4", tmp_path, settings, S3Access.for_job(None, settings))
    assert "Could not connect to the endpoint URL" in error.message
