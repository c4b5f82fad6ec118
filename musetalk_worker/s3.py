"""Reaching S3: whose credentials, which endpoint, and the address check for user-given hosts.

``S3Access`` says how one job reaches S3 (the job's own ``output.credentials``
or the worker's ``BUCKET_*`` settings) and ``s3_client`` builds the boto3
client for it; inputs (``fetch``) and the result (``upload``) both use them. A
job-given endpoint is user input, so it goes through ``public_addresses``, the
same check ``fetch`` applies to https:// downloads.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Optional
from urllib.parse import urlparse

import boto3
from botocore.config import Config as BotoConfig
from runpod.serverless.utils.rp_ssrf import is_safe_address

from .errors import ErrorCode, LipSyncError
from .options import WorkerSettings
from .schema import S3Credentials

CONNECT_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class S3Access:
    """How to reach S3: the job's credentials if it gave some, else the worker's."""

    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    access_key_id: Optional[str] = dataclasses.field(default=None, repr=False)
    secret_access_key: Optional[str] = dataclasses.field(default=None, repr=False)
    session_token: Optional[str] = dataclasses.field(default=None, repr=False)
    # An endpoint named by a job is user input, so it gets the URL address check.
    from_job: bool = False

    @classmethod
    def for_job(cls, credentials: Optional[S3Credentials], settings: WorkerSettings) -> "S3Access":
        """The job's own credentials (endpoint omitted = AWS S3), else RunPod's ``BUCKET_*`` settings."""
        if credentials is None:
            return cls(
                endpoint_url=settings.bucket_endpoint_url,
                region=settings.bucket_region,
                access_key_id=settings.bucket_access_key_id,
                secret_access_key=settings.bucket_secret_access_key,
            )
        token = credentials.session_token.get_secret_value() if credentials.session_token else None
        return cls(
            endpoint_url=credentials.endpoint_url,
            region=credentials.region or settings.bucket_region,
            access_key_id=credentials.access_key_id.get_secret_value(),
            secret_access_key=credentials.secret_access_key.get_secret_value(),
            session_token=token,
            from_job=True,
        )

    def secrets(self) -> tuple[str, ...]:
        """The values that must never appear in output or logs."""
        return tuple(s for s in (self.access_key_id, self.secret_access_key, self.session_token) if s)


def s3_client(access: S3Access, settings: WorkerSettings):
    """A boto3 S3 client for ``access``; a job-given endpoint must pass the address check."""
    if access.from_job and access.endpoint_url:
        parsed = urlparse(access.endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise LipSyncError(
                ErrorCode.INVALID_INPUT,
                "'output.credentials.endpoint_url' must be an http:// or https:// URL.",
                stage="validate",
            )
        public_addresses(parsed.hostname, parsed.port or 443, "output.credentials.endpoint_url",
                         shown_url(access.endpoint_url), settings)
    config = BotoConfig(
        signature_version="s3v4",
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=settings.download_timeout_s,
        # S3-compatible stores (MinIO, R2, moto) are addressed by path; AWS picks its own.
        s3={"addressing_style": "path" if access.endpoint_url else "auto"},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=access.endpoint_url,
        region_name=access.region,
        aws_access_key_id=access.access_key_id,
        aws_secret_access_key=access.secret_access_key,
        aws_session_token=access.session_token,
        config=config,
    )


def public_addresses(host: str, port: int, field: str, shown: str, settings: WorkerSettings) -> list[str]:
    """The addresses of ``host``; all must be public unless private URLs are allowed.

    Raises:
        LipSyncError: ``download_failed`` (the host does not resolve),
            ``invalid_input`` (an address is private, loopback, link-local or
            metadata and MUSETALK_ALLOW_PRIVATE_URLS is off).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise LipSyncError(
            ErrorCode.DOWNLOAD_FAILED, f"'{field}': the host of {shown} does not resolve; check the URL.",
            stage="download",
        ) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not settings.allow_private_urls:
        for address in addresses:
            if not is_safe_address(address):
                raise LipSyncError(
                    ErrorCode.INVALID_INPUT,
                    f"refusing to fetch '{field}' from {shown}: the host resolves to {address}, a private, "
                    "loopback, link-local or metadata address. Use a public URL, or set "
                    "MUSETALK_ALLOW_PRIVATE_URLS=true on the worker for self-hosted storage.",
                    stage="download",
                )
    return addresses


def shown_url(url: str) -> str:
    """scheme://host[:port]/path: no user-info, no query (signatures), no fragment."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{host}{port}{parsed.path}"
