"""Build-time downloader: fetches the files ``weights.lock.json`` pins and proves every byte.

    python -m builder.fetch_weights --dest /models                       # the default set
    python -m builder.fetch_weights --dest /models --components v15,v1,s3fd
    python -m builder.fetch_weights --dest /models --verify              # check, download nothing
    python -m builder.fetch_weights --dest /models --convert-unet        # also write the UNets as safetensors
    python -m builder.fetch_weights --dest /models --components default,latentsync-1.6 \
        --convert-unet latentsync-1.6 --remove-converted-sources         # LatentSync as fp16 safetensors only
    python -m builder.fetch_weights --dest /models --components default,gfpgan \
        --convert-unet gfpgan --remove-converted-sources                 # GFPGAN (face restoration) as safetensors

Hugging Face files are resolved by huggingface_hub at the pinned commit (a HEAD
on ``{HF_ENDPOINT}/{repo}/resolve/{commit}/{path}``, whose answer must name that
commit and, for large files, the locked SHA-256) and then streamed from the
address it gives; plain URLs are streamed directly, or from a mirror laid out as
``{mirror}/{host}/{path}``. Every file is hashed while it streams into
``<name>.part`` and renamed only when its size and SHA-256 match the lock; a
mismatch deletes it and fails. Transient failures (connection drops, timeouts,
408/429/5xx) are retried with exponential backoff, resuming the ``.part`` file
with a Range request where the server allows it. Files already present with the
right hash are skipped.

Entries that hold the same bytes (same SHA-256) at different paths, such as the
VAE in ``sd-vae/`` and in each ``latentsync-*/sd-vae-ft-mse/``, are fetched
once and the other paths are made hard links to it: every model folder stays
self-contained while the bytes are stored once (a Docker layer stores a hard
link as a link, and BuildKit's COPY keeps hard links). A copy already in the
models folder is reused, so adding a component downloads only what is new.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import http.client
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Literal, Mapping, Optional, Sequence, Tuple

import tenacity
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from musetalk_worker.weights import (
    LOCK_FILE,
    Conversion,
    HFSource,
    LockError,
    WeightFile,
    check_file,
    file_sha256,
    load_lock,
    read_conversions,
    record_conversion,
    verify_models,
)

from .pth_to_safetensors import ConversionError, convert

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
PART_SUFFIX = ".part"
URL_MIRROR_ENV = "WEIGHTS_URL_MIRROR"
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class FetchOptions:
    """How to fetch.

    Attributes:
        dest: the models folder to fill.
        lock_path: the lock; the project's ``weights.lock.json`` by default.
        components: the components to fetch; the lock's default set when None.
        jobs: files downloaded at the same time.
        hf_endpoint: the Hugging Face endpoint (a mirror); None uses ``HF_ENDPOINT``
            or huggingface.co, as huggingface_hub decides.
        url_mirror: a base URL serving the plain-URL files as ``{base}/{host}/{path}``.
        attempts: tries per file before giving up on transient failures.
        retry_wait_s: the first backoff; it doubles per attempt up to ``retry_wait_max_s``.
        retry_wait_max_s: the longest backoff.
        timeout_s: socket timeout of each request.
        convert_unet: the components whose entries that name a conversion are also
            written as safetensors (those fetched; empty: none).
        remove_converted_sources: delete a converted entry's own file once the
            conversion is recorded (the image then holds only the safetensors).
        progress: progress bars; None shows them only when stderr is a terminal.
    """

    dest: Path
    lock_path: Path = LOCK_FILE
    components: Optional[Tuple[str, ...]] = None
    jobs: int = 4
    hf_endpoint: Optional[str] = None
    url_mirror: Optional[str] = None
    attempts: int = 6
    retry_wait_s: float = 1.0
    retry_wait_max_s: float = 30.0
    timeout_s: float = 60.0
    convert_unet: Tuple[str, ...] = ()
    remove_converted_sources: bool = False
    progress: Optional[bool] = None


class FetchError(Exception):
    """A file could not be fetched; the message names it, says why and what to do."""


class HashMismatch(FetchError):
    """The bytes received are not the locked ones."""

    def __init__(self, path: str, url: str, expected: str, actual: str, resumed: bool):
        super().__init__(
            f"{path}: SHA-256 mismatch for the bytes from {url}: expected {expected}, got {actual}. "
            "The download was deleted. The source serves other bytes than the lock pins: check the "
            "mirror, or if upstream replaced the file on purpose, update its pin (README.md (The image))."
        )
        self.expected = expected
        self.actual = actual
        self.resumed = resumed


class _Transient(Exception):
    """A failure worth retrying: the network, the server being busy, a connection cut short."""


@dataclasses.dataclass(frozen=True)
class FileOutcome:
    """What happened to one file."""

    path: str
    status: Literal["downloaded", "present", "linked", "converted", "failed"]
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class FetchReport:
    """What happened to every file of a run."""

    outcomes: Tuple[FileOutcome, ...]

    @property
    def failed(self) -> Tuple[FileOutcome, ...]:
        """The files that could not be fetched or converted."""
        return tuple(o for o in self.outcomes if o.status == "failed")

    @property
    def ok(self) -> bool:
        """True when no file failed."""
        return not self.failed

    def count(self, status: str) -> int:
        """How many files ended with this status."""
        return sum(o.status == status for o in self.outcomes)


@dataclasses.dataclass(frozen=True)
class _Target:
    url: str
    headers: Mapping[str, str]


def fetch_weights(options: FetchOptions) -> FetchReport:
    """Fetch (and optionally convert) every file of the chosen components into ``options.dest``.

    Raises:
        LockError: the lock is unreadable or a component name is unknown.
    """
    lock = load_lock(options.lock_path)
    files = lock.select(options.components)
    options.dest.mkdir(parents=True, exist_ok=True)
    # A converted entry is fetched on its own: its file may be gone (its conversion stands in for it),
    # so it can be no other path's copy.
    groups: Dict[str, List[WeightFile]] = {}
    for wf in files:
        groups.setdefault(wf.path if wf.converted_path else wf.sha256, []).append(wf)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, options.jobs)) as pool:
        outcomes = [o for group in pool.map(lambda g: _fetch_group(g, options), groups.values()) for o in group]
    fetched_ok = {o.path for o in outcomes if o.status != "failed"}
    outcomes += [
        _convert_or_fail(wf, options) for wf in files
        if wf.converted_path and wf.component in options.convert_unet and wf.path in fetched_ok
    ]
    return FetchReport(tuple(outcomes))


def _fetch_group(group: Sequence[WeightFile], options: FetchOptions) -> List[FileOutcome]:
    """Fetch entries that hold the same bytes: one copy is fetched (or found), the others link to it."""
    if len(group) == 1:
        return [_fetch_or_fail(group[0], options)]
    kept = next((wf for wf in group if _holds_locked_bytes(options.dest / wf.path, wf)), None)
    if kept is None:
        kept = group[0]
        first = _fetch_or_fail(kept, options)
    else:
        logger.info("%s: present with the locked SHA-256", kept.path)
        first = FileOutcome(kept.path, "present")
    outcomes = [first]
    for wf in group:
        if wf is kept:
            continue
        if first.status == "failed":
            detail = f"{wf.path}: not fetched, as it holds the same bytes as {kept.path}, which failed"
            outcomes.append(FileOutcome(wf.path, "failed", detail))
            continue
        try:
            outcomes.append(link_file(wf, options.dest / kept.path, options.dest))
        except OSError as e:
            detail = (f"{wf.path}: could not hard-link it to {kept.path} under {options.dest}: {e}; the models "
                      "folder must be on a file system with hard links")
            outcomes.append(FileOutcome(wf.path, "failed", detail))
    return outcomes


def _holds_locked_bytes(path: Path, wf: WeightFile) -> bool:
    return path.is_file() and path.stat().st_size == wf.size and file_sha256(path) == wf.sha256


def link_file(wf: WeightFile, source: Path, dest: Path) -> FileOutcome:
    """Make ``dest/wf.path`` a hard link to ``source``, a verified file with the same locked bytes."""
    final = dest / wf.path
    if final.is_file() and os.path.samefile(final, source):
        logger.info("%s: present, a hard link to %s", wf.path, source.relative_to(dest))
        return FileOutcome(wf.path, "present")
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + PART_SUFFIX)
    part.unlink(missing_ok=True)
    os.link(source, part)
    os.replace(part, final)
    logger.info("%s: hard-linked to %s (same SHA-256, stored once)", wf.path, source.relative_to(dest))
    return FileOutcome(wf.path, "linked")


def _fetch_or_fail(wf: WeightFile, options: FetchOptions) -> FileOutcome:
    try:
        return fetch_file(wf, options)
    except FetchError as e:
        return FileOutcome(wf.path, "failed", str(e))
    except OSError as e:
        detail = f"{wf.path}: could not write it under {options.dest}: {e}; check free space and permissions"
        return FileOutcome(wf.path, "failed", detail)


def fetch_file(wf: WeightFile, options: FetchOptions) -> FileOutcome:
    """Make ``dest/wf.path`` hold the locked bytes, downloading only if it does not already.

    Raises:
        FetchError: the file could not be fetched, or its bytes are not the locked ones.
    """
    dest = options.dest
    problem = check_file(dest, wf, read_conversions(dest), check_hash=True)
    if problem is not None and problem.path == wf.converted_path:
        # A derived file that does not match is remade from the source; never trusted.
        logger.warning("%s; deleting it", problem.describe())
        (dest / problem.path).unlink()
        problem = check_file(dest, wf, {}, check_hash=True)
    if problem is None:
        logger.info("%s: present with the locked SHA-256", wf.path)
        return FileOutcome(wf.path, "present")
    if problem.kind != "missing":
        logger.warning("%s; downloading it again", problem.describe())

    final = dest / wf.path
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + PART_SUFFIX)
    with tqdm(total=wf.size, unit="B", unit_scale=True, unit_divisor=1024, desc=wf.path,
              disable=not _show_progress(options), leave=True) as bar:
        for fresh_start in (False, True):
            try:
                _download_with_retries(wf, part, options, bar)
                break
            except HashMismatch as e:
                if fresh_start or not e.resumed:
                    raise
                logger.warning("%s: a partial file left by an earlier run did not lead to the locked "
                               "SHA-256; downloading it again from the start", wf.path)
    os.replace(part, final)
    logger.info("%s: downloaded, %d bytes, SHA-256 %s", wf.path, wf.size, wf.sha256)
    return FileOutcome(wf.path, "downloaded")


def _download_with_retries(wf: WeightFile, part: Path, options: FetchOptions, bar: tqdm) -> None:
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(max(1, options.attempts)),
        wait=tenacity.wait_exponential(multiplier=options.retry_wait_s, max=options.retry_wait_max_s),
        retry=tenacity.retry_if_exception_type(_Transient),
        before_sleep=lambda state: logger.warning(
            "%s: attempt %d failed (%s); retrying in %.2f s",
            wf.path, state.attempt_number, state.outcome.exception(), state.upcoming_sleep,
        ),
        reraise=True,
    )
    try:
        retrying(_download_once, wf, part, options, bar)
    except _Transient as e:
        kept = f"the partial file {part} is kept and a new run resumes it" if part.exists() else "nothing was kept"
        raise FetchError(
            f"{wf.path}: gave up after {options.attempts} attempts from {wf.source.describe()}: {e}; "
            f"{kept}. Check the network or the mirror and run again."
        ) from None


def _download_once(wf: WeightFile, part: Path, options: FetchOptions, bar: tqdm) -> None:
    """One attempt: resolve the source, then stream it into ``part``, resuming what is there."""
    target = _resolve(wf, options)
    have = part.stat().st_size if part.exists() else 0
    if have > wf.size:
        part.unlink()
        have = 0
    digest = hashlib.sha256()
    if have:
        with open(part, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    resumed = have > 0
    bar.reset(total=wf.size)
    bar.update(have)

    if have < wf.size:
        headers = dict(target.headers)
        if have:
            headers["Range"] = f"bytes={have}-"
        with _open(wf, target.url, headers, options) as response:
            if have and response.status != 206:
                logger.info("%s: the server ignored the range request; starting from byte 0", wf.path)
                digest, have, resumed = hashlib.sha256(), 0, False
                bar.reset(total=wf.size)
            elif have:
                _check_content_range(response, have, wf)
                logger.info("%s: resuming at byte %d", wf.path, have)
            with open(part, "ab" if have else "wb") as out:
                have = _stream(response, out, digest, have, wf, target.url, bar, part)
        if have < wf.size:
            raise _Transient(f"the connection ended after {have} of {wf.size} bytes")

    actual = digest.hexdigest()
    if actual != wf.sha256:
        part.unlink()
        raise HashMismatch(wf.path, target.url, wf.sha256, actual, resumed)


def _stream(response: http.client.HTTPResponse, out: BinaryIO, digest: hashlib._Hash, have: int,
            wf: WeightFile, url: str, bar: tqdm, part: Path) -> int:
    """Append the response body to ``out`` and the digest; returns the bytes now in the part file."""
    while True:
        try:
            chunk = response.read(_CHUNK)
        except (http.client.HTTPException, OSError) as e:
            out.flush()
            raise _Transient(f"the transfer broke after {have} of {wf.size} bytes ({e!r})") from None
        if not chunk:
            return have
        have += len(chunk)
        if have > wf.size:
            out.close()
            part.unlink()
            raise FetchError(
                f"{wf.path}: {url} sent more than the locked {wf.size} bytes; the download was deleted. "
                "The source serves another file: check the mirror or update the pin (README.md (The image))."
            )
        out.write(chunk)
        digest.update(chunk)
        bar.update(len(chunk))


def _check_content_range(response: http.client.HTTPResponse, have: int, wf: WeightFile) -> None:
    value = response.headers.get("Content-Range", "")
    if not value.startswith(f"bytes {have}-"):
        raise _Transient(f"asked for bytes from {have} but the server sent range {value!r}")


@contextlib.contextmanager
def _open(wf: WeightFile, url: str, headers: Mapping[str, str],
          options: FetchOptions) -> Iterator[http.client.HTTPResponse]:
    request = urllib.request.Request(url, headers=dict(headers))
    try:
        response = _OPENER.open(request, timeout=options.timeout_s)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code in TRANSIENT_STATUS:
            raise _Transient(f"HTTP {e.code} from {url}") from None
        raise FetchError(
            f"{wf.path}: HTTP {e.code} {e.reason} from {url}; check the lock's source or the mirror"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise _Transient(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
    with response:
        yield response


class _DropAuthOnCrossOriginRedirect(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but a token for the Hub never goes to the storage host it redirects to."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 (urllib's hook)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


_OPENER = urllib.request.build_opener(_DropAuthOnCrossOriginRedirect())


def _origin(url: str) -> Tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def _resolve(wf: WeightFile, options: FetchOptions) -> _Target:
    if isinstance(wf.source, HFSource):
        return _resolve_hf(wf, wf.source, options)
    url = wf.source.url
    if options.url_mirror:
        parts = urllib.parse.urlsplit(url)
        query = f"?{parts.query}" if parts.query else ""
        url = f"{options.url_mirror.rstrip('/')}/{parts.netloc}{parts.path}{query}"
    return _Target(url, {"User-Agent": "musetalk-worker-builder"})


def _resolve_hf(wf: WeightFile, src: HFSource, options: FetchOptions) -> _Target:
    """Ask the Hub (through huggingface_hub) where the pinned file is and check what it says."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import FileMetadataError, HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(src.repo, src.path, repo_type=src.repo_type, revision=src.revision, endpoint=options.hf_endpoint)
    try:
        meta = get_hf_file_metadata(url, timeout=options.timeout_s, endpoint=options.hf_endpoint)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in TRANSIENT_STATUS:
            raise _Transient(f"HTTP {status} from {url}") from None
        raise FetchError(
            f"{wf.path}: the Hub refused {src.describe()} (HTTP {status}: {e}); check the repo, revision and "
            "path in the lock, the HF_ENDPOINT mirror, or set HF_TOKEN if the repo needs one"
        ) from None
    except FileMetadataError as e:
        raise FetchError(f"{wf.path}: {url} did not answer like a Hugging Face Hub ({e}); check HF_ENDPOINT") from None
    except OfflineModeIsEnabled:
        raise FetchError(f"{wf.path}: HF_HUB_OFFLINE is set, so the Hub cannot be asked; unset it to download") \
            from None
    except httpx2.TransportError as e:
        raise _Transient(f"cannot reach {url}: {e}") from None

    if meta.commit_hash != src.revision:
        raise FetchError(
            f"{wf.path}: the Hub answered commit {meta.commit_hash} for the pinned revision {src.revision} "
            f"({url}); a mirror must serve the pinned commit"
        )
    # Large (LFS) files carry their SHA-256 as ETag: a wrong pin is caught before any byte moves.
    if meta.etag and len(meta.etag) == 64 and meta.etag != wf.sha256:
        raise FetchError(
            f"{wf.path}: the Hub reports SHA-256 {meta.etag} for {src.describe()}, the lock expects "
            f"{wf.sha256}; nothing was downloaded. Fix the pin (README.md (The image)) or the mirror."
        )
    if meta.size is not None and meta.size != wf.size:
        raise FetchError(
            f"{wf.path}: the Hub reports {meta.size} bytes for {src.describe()}, the lock expects {wf.size}; "
            "nothing was downloaded. Fix the pin (README.md (The image)) or the mirror."
        )
    headers = build_hf_headers()
    if _origin(meta.location) != _origin(url):
        headers.pop("authorization", None)
    return _Target(meta.location, headers)


def _convert_or_fail(wf: WeightFile, options: FetchOptions) -> FileOutcome:
    assert wf.converted_path is not None
    try:
        return convert_file(wf, options)
    except (ConversionError, OSError) as e:
        return FileOutcome(
            wf.converted_path, "failed",
            f"{wf.converted_path}: converting {wf.path} failed: {e}. Fetch without --convert-unet for "
            f"{wf.component} to keep the file as published.",
        )


def convert_file(wf: WeightFile, options: FetchOptions) -> FileOutcome:
    """Write and record the safetensors conversion of a verified lock entry (skipped if recorded and intact).

    Raises:
        ConversionError: the source is not a plain state dict.
    """
    assert wf.converted_path is not None
    dest = options.dest
    target = dest / wf.converted_path
    recorded = read_conversions(dest).get(wf.converted_path)
    if (recorded is not None and recorded.source_sha256 == wf.sha256 and target.is_file()
            and target.stat().st_size == recorded.size and file_sha256(target) == recorded.sha256):
        logger.info("%s: conversion present and intact", wf.converted_path)
        outcome = FileOutcome(wf.converted_path, "present")
    else:
        result = convert(dest / wf.path, target, {"source": wf.path, "source_sha256": wf.sha256},
                         cast_to=wf.converted_dtype)
        record_conversion(dest, Conversion(wf.converted_path, result.size, result.sha256, wf.path, wf.sha256))
        logger.info("%s: converted from %s, %d tensors, %d bytes, SHA-256 %s",
                    wf.converted_path, wf.path, result.tensors, result.size, result.sha256)
        outcome = FileOutcome(wf.converted_path, "converted", result.sha256)
    if options.remove_converted_sources:
        (dest / wf.path).unlink(missing_ok=True)
    return outcome


def _show_progress(options: FetchOptions) -> bool:
    return sys.stderr.isatty() if options.progress is None else options.progress


def _parse_args(argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, FetchOptions]:
    parser = argparse.ArgumentParser(
        prog="python -m builder.fetch_weights",
        description="Download the model weights pinned in weights.lock.json, verifying size and SHA-256.",
    )
    parser.add_argument("--lock", type=Path, default=LOCK_FILE, help="the lock file (default: %(default)s)")
    parser.add_argument("--dest", type=Path, required=True, help="the models folder to fill or verify")
    parser.add_argument("--components", action="append",
                        help="components, comma-separated or repeated; 'default' is the lock's default set "
                             "and 'all' every component (default: default)")
    parser.add_argument("--verify", action="store_true",
                        help="download nothing: check size and SHA-256 of every file and list what is missing or wrong")
    parser.add_argument("--jobs", type=int, default=4, help="parallel downloads (default: %(default)s)")
    parser.add_argument("--hf-endpoint", default=None,
                        help="Hugging Face endpoint or mirror (default: $HF_ENDPOINT, else huggingface.co)")
    parser.add_argument("--url-mirror", default=os.environ.get(URL_MIRROR_ENV) or None,
                        help=f"base URL serving the plain-URL files as BASE/HOST/PATH (default: ${URL_MIRROR_ENV})")
    parser.add_argument("--attempts", type=int, default=6, help="tries per file (default: %(default)s)")
    parser.add_argument("--retry-wait", type=float, default=1.0,
                        help="first backoff in seconds, doubling per attempt up to 30 (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds (default: %(default)s)")
    parser.add_argument("--convert-unet", nargs="?", const="all", default="", metavar="COMPONENTS",
                        help="also write the UNets of these components (comma-separated; 'all' when no value is "
                             "given) as safetensors, e.g. musetalkV15/unet.safetensors, and record their hashes; "
                             "LatentSync's are cast to fp16 (latentsync-*/latentsync_unet.safetensors); gfpgan's "
                             "params_ema becomes gfpgan/GFPGANv1.4.safetensors, which the worker loads")
    parser.add_argument("--remove-converted-sources", action="store_true",
                        help="with --convert-unet: delete each converted UNet's .pth/.pt once its conversion is "
                             "recorded")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: only on a terminal)")
    args = parser.parse_args(argv)
    components = None
    if args.components:
        components = _names(",".join(args.components))
    options = FetchOptions(
        dest=args.dest.resolve(),
        lock_path=args.lock.resolve(),
        components=components,
        jobs=args.jobs,
        hf_endpoint=args.hf_endpoint,
        url_mirror=args.url_mirror,
        attempts=args.attempts,
        retry_wait_s=args.retry_wait,
        timeout_s=args.timeout,
        convert_unet=_names(args.convert_unet),
        remove_converted_sources=args.remove_converted_sources,
        progress=args.progress,
    )
    return args, options


def _names(value: str) -> Tuple[str, ...]:
    return tuple(n.strip() for n in value.split(",") if n.strip())


def _expand_components(options: FetchOptions) -> FetchOptions:
    """Replace the words ``default`` (the lock's default set) and ``all`` by component names.

    Raises:
        LockError: a name to convert is not a component of the lock (one to fetch is refused later).
    """
    lock = load_lock(options.lock_path)

    def expand(chosen: Sequence[str]) -> Tuple[str, ...]:
        names: List[str] = []
        for name in chosen:
            names += {"default": list(lock.default_components), "all": list(lock.components)}.get(name, [name])
        return tuple(dict.fromkeys(names))

    convert_unet = expand(options.convert_unet)
    lock.select(convert_unet)
    components = None if options.components is None else expand(options.components)
    return dataclasses.replace(options, components=components, convert_unet=convert_unet)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (0 ok, 1 files missing/wrong/failed, 2 bad lock or arguments)."""
    args, options = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        options = _expand_components(options)
        if args.verify:
            report = verify_models(options.dest, options.lock_path, options.components, check_hashes=True)
            print(report.describe())
            return 0 if report.ok else 1
        with logging_redirect_tqdm():
            result = fetch_weights(options)
    except LockError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for outcome in result.failed:
        print(f"FAILED {outcome.detail}", file=sys.stderr)
    print(
        f"{result.count('downloaded')} downloaded, {result.count('present')} already present, "
        f"{result.count('linked')} linked to the same bytes, {result.count('converted')} converted, "
        f"{len(result.failed)} failed, in {options.dest}"
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
