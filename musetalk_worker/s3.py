"""Reaching S3: whose credentials, which endpoint, and the address check for user-given hosts.

``S3Access`` says how one job reaches S3 (the job's own ``output.credentials``
or the worker's ``BUCKET_*`` settings) and ``s3_client`` builds the boto3
client for it; inputs (``fetch``) and the result (``upload``) both use them.

A job-given endpoint is user input, so it gets the check ``fetch`` applies to
https:// downloads (``public_addresses``) and, like them, is pinned: its host
is resolved once (``S3Access.pinned``), every address must be public unless
MUSETALK_ALLOW_PRIVATE_URLS is set, and every connection of the client goes to
the checked address, so a second DNS answer (rebinding) cannot move it. TLS
still sends the endpoint's host name (SNI) and checks the certificate against
it, and SigV4 still signs that name as the Host. The worker's own endpoint
(``BUCKET_ENDPOINT_URL``) is its operator's configuration, trusted as it is.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from typing import Callable, Optional
from urllib.parse import urlparse

import boto3
import botocore.session
from botocore.config import Config as BotoConfig
from botocore.httpsession import URLLib3Session
from runpod.serverless.utils.rp_ssrf import is_safe_address
from urllib3 import PoolManager
from urllib3.connection import HTTPConnection

from .errors import ErrorCode, LipSyncError
from .options import WorkerSettings
from .schema import S3Credentials

CONNECT_TIMEOUT_S = 10.0
_ENDPOINT_FIELD = "output.credentials.endpoint_url"

# socket.getaddrinfo, or a stand-in with its signature and answer shape.
Resolver = Callable[..., list]


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
    # The checked address a job-given endpoint's connections go to (set by ``pinned``).
    pinned_address: Optional[str] = None

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

    def pinned(self, settings: WorkerSettings, resolve: Resolver = socket.getaddrinfo) -> "S3Access":
        """This access with a job-given endpoint resolved once and its address checked.

        Every client made from the returned access connects only to
        ``pinned_address``, whatever the name resolves to later; pin once per
        job to use one address throughout. Anything else (no endpoint, the
        worker's own, already pinned) is returned as it is.

        Raises:
            LipSyncError: ``invalid_input`` (not an http(s) URL, or an address
                refused by ``public_addresses``), ``download_failed`` (the host
                does not resolve).
        """
        # The worker's own endpoint (BUCKET_ENDPOINT_URL) is its operator's configuration and AWS's
        # is botocore's choice: both are trusted as they are, and resolved per connection as usual.
        if not (self.from_job and self.endpoint_url) or self.pinned_address:
            return self
        parsed = urlparse(self.endpoint_url)
        try:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
        except ValueError:  # a port outside 0-65535
            port = None
        if parsed.scheme not in ("http", "https") or not parsed.hostname or port is None:
            raise LipSyncError(
                ErrorCode.INVALID_INPUT, f"'{_ENDPOINT_FIELD}' must be an http:// or https:// URL.", stage="validate"
            )
        addresses = public_addresses(parsed.hostname, port, _ENDPOINT_FIELD, shown_url(self.endpoint_url),
                                     settings, resolve)
        # One address serves the client, with no fallback to the others, so IPv4 goes first: pods
        # often have no IPv6 route.
        ipv4 = [address for address in addresses if ":" not in address]
        return dataclasses.replace(self, pinned_address=(ipv4 or addresses)[0])


def s3_client(access: S3Access, settings: WorkerSettings):
    """A boto3 S3 client for ``access``.

    A job-given endpoint is pinned first (``S3Access.pinned``, here unless the
    caller has done it), and all of the client's requests then go to
    ``pinned_address``.

    Raises:
        LipSyncError: as ``S3Access.pinned``.
    """
    access = access.pinned(settings)
    config = BotoConfig(
        signature_version="s3v4",
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=settings.download_timeout_s,
        # S3-compatible stores (MinIO, R2, moto) are addressed by path; AWS picks its own.
        s3={"addressing_style": "path" if access.endpoint_url else "auto"},
    )
    core = botocore.session.Session()
    client = boto3.session.Session(botocore_session=core).client(
        "s3",
        endpoint_url=access.endpoint_url,
        region_name=access.region,
        aws_access_key_id=access.access_key_id,
        aws_secret_access_key=access.secret_access_key,
        aws_session_token=access.session_token,
        config=config,
    )
    if access.pinned_address:
        session = _PinnedSession(
            access.pinned_address,
            # The trust store botocore would pick for its own session: AWS_CA_BUNDLE (or ca_bundle in
            # the AWS config), then REQUESTS_CA_BUNDLE, else its bundled roots.
            verify=core.get_config_variable("ca_bundle") or os.environ.get("REQUESTS_CA_BUNDLE", True),
            timeout=(config.connect_timeout, config.read_timeout),
            max_pool_connections=config.max_pool_connections,
            # botocore's own sessions get urllib3's defaults (Nagle off); URLLib3Session alone gets none.
            socket_options=HTTPConnection.default_socket_options,
        )
        # before-send is botocore's documented hook for answering a signed request: a response
        # returned here replaces botocore's own send, whose connections would resolve the name again.
        client.meta.events.register("before-send.s3", lambda request, **_: session.send(request))
    return client


class _PinnedPoolManager(PoolManager):
    """A urllib3 pool manager whose pools all dial one address.

    Pools are still found by the URL's host; only the socket goes to
    ``address``, while TLS sends that host as SNI and matches the certificate
    against it (``server_hostname``).
    """

    def __init__(self, address: str, **connection_pool_kw) -> None:
        super().__init__(**connection_pool_kw)
        self._address = address

    def _new_pool(self, scheme, host, port, request_context=None):
        # urllib3 documents _new_pool as the method to override for custom pools.
        context = dict(self.connection_pool_kw if request_context is None else request_context)
        # urllib3 drops server_hostname (with the other TLS settings) for http:// pools.
        context["server_hostname"] = host
        return super()._new_pool(scheme, self._address, port, context)


class _PinnedSession(URLLib3Session):
    """botocore's HTTP session (error types, 100-continue pools), dialling one address.

    It is built with no proxies: a proxy would resolve the host itself and undo
    the pinning.
    """

    def __init__(self, address: str, **kwargs) -> None:
        super().__init__(**kwargs)
        # URLLib3Session takes no pool-manager class; its own is swapped for a pinned one with the
        # same settings and botocore's pool classes.
        manager = _PinnedPoolManager(address, **self._manager.connection_pool_kw)
        manager.pool_classes_by_scheme = self._manager.pool_classes_by_scheme
        self._manager = manager

    def send(self, request):
        """Sends a signed botocore request through the pinned pools."""
        # SigV4 signs the URL's host and leaves the header to the HTTP client, which would name the
        # pinned address instead; so the signed value is sent explicitly.
        if "Host" not in request.headers:
            request.headers["Host"] = _host_header(request.url)
        return super().send(request)


def _host_header(url: str) -> str:
    # As SigV4 signs it (botocore.auth._host_from_url): the default port left out.
    parsed = urlparse(url)
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    default_port = 443 if parsed.scheme == "https" else 80
    return host if parsed.port in (None, default_port) else f"{host}:{parsed.port}"


def public_addresses(host: str, port: int, field: str, shown: str, settings: WorkerSettings,
                     resolve: Resolver = socket.getaddrinfo) -> list[str]:
    """The addresses ``resolve`` gives for ``host``; all must be public unless private URLs are allowed.

    Raises:
        LipSyncError: ``download_failed`` (the host does not resolve),
            ``invalid_input`` (an address is private, loopback, link-local or
            metadata and MUSETALK_ALLOW_PRIVATE_URLS is off).
    """
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
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


def failure_reason(err: Exception) -> str:
    """An S3 client error as one short line, for messages (botocore's carry newlines and whole XML bodies)."""
    return re.sub(r"\s+", " ", str(err))[:300]


def shown_url(url: str) -> str:
    """scheme://host[:port]/path: no user-info, no query (signatures), no fragment."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.scheme}://{host}{port}{parsed.path}"
