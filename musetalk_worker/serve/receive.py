"""A multipart upload received straight to disk: files written as they arrive, counted against their limit.

Starlette's own form parser spools files in memory (up to 1 MB each) and then
in the system's temp folder, and learns a file's size only once it is whole.
Here each file part is written into the request's scratch folder chunk by
chunk, and a file over its limit stops being written at once; the rest of the
body is read and dropped (up to the whole request's bound), so the client can
still read the 413 instead of a reset connection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO, Dict, List, Optional

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from ..errors import ErrorCode
from .errors import TOO_LARGE, ServeError
from .fields import FILE_FIELDS, HASHED_FILES

# Kept from an upload's file name (ffprobe reads the content, the suffix only helps people reading logs).
_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,8}$")


@dataclasses.dataclass(frozen=True)
class UploadLimits:
    """What one request may send.

    Attributes:
        file_bytes: the largest file part (the worker's ``MUSETALK_MAX_DOWNLOAD_BYTES``).
        field_bytes: the largest text field (``boxes`` for a long video is the big one).
        fields: how many text fields.
    """

    file_bytes: int
    field_bytes: int = 1024 * 1024
    fields: int = 64

    @property
    def request_bytes(self) -> int:
        """The most a whole request can need: every file, every field, and room for the part headers."""
        return len(FILE_FIELDS) * self.file_bytes + self.fields * self.field_bytes + 64 * 1024


@dataclasses.dataclass
class ReceivedForm:
    """The text fields as sent, the path each file part was written to, and the SHA-256 of each of
    :data:`HASHED_FILES` received."""

    fields: Dict[str, str]
    files: Dict[str, Path]
    sha256: Dict[str, str]


@dataclasses.dataclass
class _Part:
    name: str = ""
    disposition: bytes = b""
    is_file: bool = False
    text: bytearray = dataclasses.field(default_factory=bytearray)
    file: Optional[BinaryIO] = None
    path: Optional[Path] = None
    size: int = 0
    # One of HASHED_FILES is hashed as it arrives: the event loop never reads a whole file back for it.
    digest: Optional[Any] = None


class _Receiver:
    """The parser's callbacks: headers to parts, part data to text or to a file in ``folder``."""

    def __init__(self, folder: Path, limits: UploadLimits):
        self.folder = folder
        self.limits = limits
        self.form = ReceivedForm({}, {}, {})
        self.too_large: Optional[str] = None  # the first over-limit part's message
        self._part = _Part()
        self._header_name = b""
        self._header_value = b""
        self._opened: List[BinaryIO] = []

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value_data, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data,
                "on_part_end": self._end}

    def _begin(self) -> None:
        self._part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._part.disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._part.disposition)
        if b"name" not in params:
            raise _bad_form("a part of the form has no name (its Content-Disposition needs name=\"...\").")
        part = self._part
        part.name = params[b"name"].decode("utf-8", "replace")
        part.is_file = b"filename" in params
        if part.name in self.form.fields or part.name in self.form.files:
            raise _bad_form(f"the form has '{part.name}' more than once; send each field once.")
        if part.is_file:
            if part.name not in FILE_FIELDS:
                raise _bad_form(f"'{part.name}' is a file; only {', '.join(FILE_FIELDS)} are files, every "
                                "job option is a text field.")
            suffix = Path(params[b"filename"].decode("utf-8", "replace")).suffix
            part.path = self.folder / f"{part.name}{suffix.lower() if _SUFFIX.match(suffix) else ''}"
            part.digest = hashlib.sha256() if part.name in HASHED_FILES else None
            part.file = open(part.path, "wb")  # noqa: SIM115 - closed at the part's end or in close()
            self._opened.append(part.file)
        elif len(self.form.fields) >= self.limits.fields:
            raise _bad_form(f"the form has more than {self.limits.fields} fields.")

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        part.size += end - start
        if part.is_file:
            if part.size > self.limits.file_bytes:
                self._refuse_file(part)
            elif part.file is not None:
                part.file.write(data[start:end])
                if part.digest is not None:
                    part.digest.update(data[start:end])
        elif part.size > self.limits.field_bytes:
            raise ServeError(TOO_LARGE, f"the form field '{part.name}' is over {self.limits.field_bytes} bytes.",
                             stage="upload")
        else:
            part.text += data[start:end]

    def _refuse_file(self, part: _Part) -> None:
        """Stops writing an over-limit file and drops what was written; the body is still read to its end."""
        if part.file is not None:
            part.file.close()
            part.path.unlink(missing_ok=True)
            part.file = None
            self.too_large = self.too_large or (
                f"'{part.name}' is over the {_mib(self.limits.file_bytes)} limit per file "
                "(MUSETALK_MAX_DOWNLOAD_BYTES). Send a shorter or smaller file.")

    def _end(self) -> None:
        part = self._part
        if not part.is_file:
            try:
                self.form.fields[part.name] = part.text.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad_form(f"the form field '{part.name}' is not UTF-8 text.") from None
        elif part.file is not None:
            part.file.close()
            self.form.files[part.name] = part.path
            if part.digest is not None:
                self.form.sha256[part.name] = part.digest.hexdigest()

    def close(self) -> None:
        for file in self._opened:
            file.close()


async def receive_form(content_type: Optional[str], body: AsyncIterator[bytes], folder: Path,
                       limits: UploadLimits) -> ReceivedForm:
    """Parses a ``multipart/form-data`` body into ``folder`` (files) and a dict (text fields).

    Raises:
        ServeError: not multipart or malformed (``invalid_input``, 400), a file
            or field over its limit or the body over the request's bound
            (``too_large``, 413).
    """
    kind, params = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise _bad_form("send multipart/form-data (e.g. curl -F source=@face.jpg -F audio=@speech.wav).")
    receiver = _Receiver(folder, limits)
    parser = MultipartParser(params[b"boundary"], receiver.callbacks())
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > limits.request_bytes:
                raise ServeError(TOO_LARGE, receiver.too_large or (
                    f"the request is over {_mib(limits.request_bytes)}: the files ({', '.join(FILE_FIELDS)}) of "
                    f"at most {_mib(limits.file_bytes)} each (MUSETALK_MAX_DOWNLOAD_BYTES) and a few option "
                    "fields."),
                    stage="upload")
            parser.write(chunk)
        parser.finalize()
    except FormParserError:
        raise _bad_form("the multipart body is malformed.") from None
    finally:
        receiver.close()
    if receiver.too_large:
        raise ServeError(TOO_LARGE, receiver.too_large, stage="upload")
    return receiver.form


def _bad_form(message: str) -> ServeError:
    return ServeError(ErrorCode.INVALID_INPUT.value, "Invalid form: " + message, stage="upload")


def _mib(size: int) -> str:
    return f"{size / 2**20:g} MiB"
