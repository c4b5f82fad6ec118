"""Bringing a job's inputs into its scratch folder.

Four forms are accepted for ``source`` and ``audio``:

* ``https://`` / ``http://`` URLs, fetched SSRF-safely: every address the host
  resolves to (and every redirect hop) must be public, and the connection is
  pinned to the checked address so a second DNS answer cannot swap it. The
  address check and the pinning adapter are runpod 1.12's own (``rp_ssrf``);
  the bytes are counted while streaming against a cap, and connection errors,
  timeouts, HTTP 5xx and 429 are retried with backoff (4xx and refused
  addresses are not).
* ``s3://bucket/key`` objects, read with boto3 using the job's credentials or
  RunPod's ``BUCKET_*`` variables (the client and its endpoint check are in
  ``s3``).
* ``data:<type>;base64,<data>`` URIs, up to a size that keeps the request under
  RunPod's 10 MB ``/run`` body.
* Paths inside ``MUSETALK_LOCAL_INPUT_DIR``, only when the worker sets it.

``parse_input`` does every check that needs no network, so a bad job fails
before anything is downloaded; ``fetch_input`` then brings the bytes. What is
shown in messages and logs never includes a URL's query (presigned signatures),
its user-info or the data of a ``data:`` URI.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import logging
import mimetypes
import re
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import unquote, urljoin, urlparse

import requests
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from runpod.serverless.utils.rp_ssrf import PinnedIPAdapter
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from .errors import ErrorCode, LipSyncError
from .options import WorkerSettings
from .s3 import CONNECT_TIMEOUT_S, S3Access, public_addresses, s3_client, shown_url

logger = logging.getLogger(__name__)

ACCEPTED_FORMS = (
    "an https:// or http:// URL, an s3://bucket/key object or a data:<type>;base64,<data> URI"
)
_MAX_REDIRECTS = 5
_CHUNK = 1024 * 1024
_TRANSFER = TransferConfig(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024)
_EXTENSION = re.compile(r"^\.[a-z0-9]{1,5}$")


@dataclasses.dataclass(frozen=True)
class InputRef:
    """One checked input: its field, its form and a description safe to show.

    ``kind`` is ``url``, ``s3``, ``data`` or ``local``. ``value`` (the URL, the
    s3 address or the local path) and ``payload`` (decoded ``data:`` bytes)
    stay out of ``repr``.
    """

    field: str
    kind: str
    shown: str
    suffix: str = ""
    value: str = dataclasses.field(default="", repr=False)
    payload: bytes = dataclasses.field(default=b"", repr=False)


# --------------------------------------------------------------------------- #
# Checking an input without touching the network.
# --------------------------------------------------------------------------- #

def parse_input(field: str, value: str, settings: WorkerSettings) -> InputRef:
    """Checks the form of one input (``source`` or ``audio``).

    Raises:
        LipSyncError(invalid_input): an unknown scheme, a malformed URL or
            ``data:`` URI, inline data over the limit, or a local path while
            local files are off (or outside the allowed folder).
    """
    scheme = value.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value) else ""
    if scheme in ("http", "https"):
        parsed = urlparse(value)
        if not parsed.hostname:
            raise _invalid(field, f"'{field}' URL has no host; send {ACCEPTED_FORMS}.")
        try:
            shown = shown_url(value)  # reading the port checks it
        except ValueError:
            raise _invalid(field, f"'{field}' URL has an invalid port.") from None
        return InputRef(field, "url", shown, _suffix_of(parsed.path), value=value)
    if scheme == "s3":
        parsed = urlparse(value)
        key = parsed.path.lstrip("/")
        if not parsed.netloc or not key:
            raise _invalid(field, f"'{field}' must look like s3://bucket/key (got {value[:80]!r}).")
        return InputRef(field, "s3", f"s3://{parsed.netloc}/{key}", _suffix_of(key), value=value)
    if scheme == "data":
        return _parse_data_uri(field, value, settings)
    if scheme in ("", "file"):
        return _parse_local(field, value, settings)
    raise _invalid(field, f"'{field}' uses the unsupported scheme '{scheme}:'; send {ACCEPTED_FORMS}.")


def _parse_data_uri(field: str, value: str, settings: WorkerSettings) -> InputRef:
    header, comma, data = value[len("data:"):].partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise _invalid(field, f"'{field}' data: URI must carry base64 content: data:<type>;base64,<data>.")
    media_type = header[: -len(";base64")].split(";")[0].strip().lower()
    # Line-wrapped base64 (as some encoders write it) is still base64.
    data = "".join(data.split())
    limit = settings.max_inline_input_bytes
    # Checked on the encoded length first, so an oversized payload is never decoded.
    if len(data) * 3 // 4 > limit:
        raise _invalid(
            field,
            f"'{field}' inline data is about {_mb(len(data) * 3 // 4)}; inline data is limited to {_mb(limit)} "
            f"per input (MUSETALK_MAX_INLINE_INPUT_BYTES) so the request stays under RunPod's 10 MB /run limit. "
            "Send larger files as an https:// URL or an s3:// object.",
        )
    try:
        payload = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(field, f"'{field}' data: URI content is not valid base64.") from None
    if not payload:
        raise _invalid(field, f"'{field}' data: URI is empty.")
    suffix = (mimetypes.guess_extension(media_type) or "") if media_type else ""
    return InputRef(field, "data", f"data:{media_type or 'unknown'} ({len(payload)} bytes)",
                    suffix if _EXTENSION.match(suffix) else "", payload=payload)


def _parse_local(field: str, value: str, settings: WorkerSettings) -> InputRef:
    root = settings.local_input_dir
    if root is None:
        raise _invalid(
            field,
            f"'{field}' is not a URL ({value[:80]!r}); send {ACCEPTED_FORMS}. Local file paths are accepted "
            "only when the worker sets MUSETALK_LOCAL_INPUT_DIR (local runs).",
        )
    raw = unquote(urlparse(value).path) if value.lower().startswith("file:") else value
    path = (root / raw).resolve()
    if not path.is_relative_to(root):
        raise _invalid(field, f"'{field}' path {value!r} is outside the allowed folder {root}.")
    if not path.is_file():
        raise _invalid(field, f"'{field}' file {value!r} does not exist in {root}.")
    return InputRef(field, "local", str(path), path.suffix.lower(), value=str(path))


# --------------------------------------------------------------------------- #
# Fetching.
# --------------------------------------------------------------------------- #

def fetch_input(ref: InputRef, dest_dir: Path, settings: WorkerSettings, access: S3Access) -> Path:
    """Brings one checked input to a file and returns its path.

    Downloads land in ``dest_dir`` as ``<field><suffix>``; a local file is used
    where it is (never copied or removed).

    Raises:
        LipSyncError: ``download_failed`` (unreachable, HTTP error, too large,
            missing object), ``invalid_input`` (a refused address).
    """
    if ref.kind == "local":
        return Path(ref.value)
    dest = Path(dest_dir) / f"{ref.field}{ref.suffix}"
    if ref.kind == "data":
        dest.write_bytes(ref.payload)
    elif ref.kind == "s3":
        _download_s3(ref, dest, settings, access)
    else:
        _download_url(ref, dest, settings)
    logger.info("fetched %s from %s (%d bytes)", ref.field, ref.shown, dest.stat().st_size)
    return dest


class _Transient(Exception):
    """A failure worth another attempt: connection trouble, a timeout, HTTP 5xx or 429."""


def _download_url(ref: InputRef, dest: Path, settings: WorkerSettings) -> None:
    attempts = max(1, settings.download_attempts)
    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.5, max=8),
        retry=retry_if_exception_type(_Transient),
        before_sleep=lambda state: logger.warning(
            "download of %s failed (%s); attempt %d of %d",
            ref.shown, state.outcome.exception(), state.attempt_number + 1, attempts,
        ),
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                _get_once(ref, dest, settings)
    except _Transient as err:
        raise LipSyncError(
            ErrorCode.DOWNLOAD_FAILED,
            f"could not download '{ref.field}' from {ref.shown} after {attempts} attempts: {err}. "
            "Check that the server is up and reachable from the internet, then retry the job.",
            stage="download",
        ) from None


def _get_once(ref: InputRef, dest: Path, settings: WorkerSettings) -> None:
    url = ref.value
    for _ in range(_MAX_REDIRECTS + 1):
        with _pinned_get(ref, url, settings) as response:
            if response.is_redirect:
                # Each hop goes through the address check again in _pinned_get.
                url = urljoin(url, response.headers["Location"])
                continue
            _check_status(ref, response)
            _save_capped(ref, response, dest, settings.max_download_bytes)
            return
    raise LipSyncError(
        ErrorCode.DOWNLOAD_FAILED,
        f"'{ref.field}' URL {ref.shown} redirects more than {_MAX_REDIRECTS} times.",
        stage="download",
    )


@contextlib.contextmanager
def _pinned_get(ref: InputRef, url: str, settings: WorkerSettings) -> Iterator[requests.Response]:
    """GET ``url`` on a connection pinned to a checked address of its host."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise _invalid(ref.field, f"'{ref.field}' URL {ref.shown} redirects to a non-http address.", "download")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = public_addresses(parsed.hostname, port, ref.field, ref.shown, settings)
    last_error: Exception | None = None
    # A host may resolve to several addresses (IPv6 + IPv4); try each checked one.
    for address in addresses:
        session = requests.Session()
        # Environment proxies would resolve the host themselves and undo the pinning.
        session.trust_env = False
        adapter = PinnedIPAdapter(address)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        try:
            try:
                response = session.get(url, stream=True, allow_redirects=False,
                                       timeout=(CONNECT_TIMEOUT_S, settings.download_timeout_s))
            except requests.ConnectionError as err:
                last_error = err
                continue
            except requests.Timeout as err:
                raise _Transient(f"timed out ({_reason(err)})") from None
            except requests.RequestException as err:
                raise LipSyncError(
                    ErrorCode.DOWNLOAD_FAILED, f"could not download '{ref.field}' from {ref.shown}: {_reason(err)}.",
                    stage="download",
                ) from None
            with response:
                yield response
            return
        finally:
            session.close()
    raise _Transient(f"connection failed ({_reason(last_error)})")


def _check_status(ref: InputRef, response: requests.Response) -> None:
    status = response.status_code
    if status == 429 or status >= 500:
        raise _Transient(f"HTTP {status} {response.reason}")
    if status >= 400:
        raise LipSyncError(
            ErrorCode.DOWNLOAD_FAILED,
            f"'{ref.field}' URL {ref.shown} answered HTTP {status} {response.reason}; check the URL "
            "(and that a presigned URL has not expired).",
            stage="download",
        )


def _save_capped(ref: InputRef, response: requests.Response, dest: Path, limit: int) -> None:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(ref, limit)
    written = 0
    try:
        with open(dest, "wb") as out:
            for chunk in response.iter_content(_CHUNK):
                written += len(chunk)
                # Counted while streaming: Content-Length may be absent or wrong.
                if written > limit:
                    raise _too_large(ref, limit)
                out.write(chunk)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
        raise _Transient(f"the transfer broke off ({_reason(err)})") from None


def _download_s3(ref: InputRef, dest: Path, settings: WorkerSettings, access: S3Access) -> None:
    parsed = urlparse(ref.value)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    client = s3_client(access, settings)
    try:
        size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        if size > settings.max_download_bytes:
            raise _too_large(ref, settings.max_download_bytes)
        client.download_file(bucket, key, str(dest), Config=_TRANSFER)
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket"):
            problem = "does not exist"
        elif code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            problem = "cannot be read with the given credentials (access denied)"
        else:
            problem = f"could not be read ({code or 'error'})"
        raise LipSyncError(
            ErrorCode.DOWNLOAD_FAILED,
            f"'{ref.field}' {ref.shown} {problem}; check the bucket, key and credentials "
            "(BUCKET_* variables or output.credentials).",
            stage="download",
        ) from None
    except BotoCoreError as err:
        raise LipSyncError(
            ErrorCode.DOWNLOAD_FAILED,
            f"could not read '{ref.field}' {ref.shown}: {err}. Check the S3 endpoint and credentials.",
            stage="download",
        ) from None


# --------------------------------------------------------------------------- #
# Helpers.
# --------------------------------------------------------------------------- #

def _suffix_of(path: str) -> str:
    suffix = Path(path).suffix.lower()
    return suffix if _EXTENSION.match(suffix) else ""


def _reason(err: Optional[BaseException]) -> str:
    # requests nests the useful part ("Connection refused", "RemoteDisconnected") deep inside.
    text = str(err) if err else "no address answered"
    match = re.search(r"(Connection refused|Connection reset by peer|Remote end closed connection[^'\")]*|"
                      r"RemoteDisconnected[^'\")]*|IncompleteRead\([^)]*\)|timed out|Read timed out)", text)
    return match.group(1) if match else text[:200]


def _too_large(ref: InputRef, limit: int) -> LipSyncError:
    return LipSyncError(
        ErrorCode.DOWNLOAD_FAILED,
        f"'{ref.field}' at {ref.shown} is larger than the {_mb(limit)} download limit; send a shorter or "
        "smaller file (the limit is MUSETALK_MAX_DOWNLOAD_BYTES).",
        stage="download",
    )


def _mb(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB"


def _invalid(field: str, message: str, stage: str = "validate") -> LipSyncError:
    return LipSyncError(ErrorCode.INVALID_INPUT, message, stage=stage)
