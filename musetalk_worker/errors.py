"""The one error type the engine and the worker raise for anything a caller can fix.

Every failure a user can cause or act on carries a code from a closed set, so
the worker can return it as ``error_code`` and callers can branch on it without
parsing messages. Messages say what was wrong and what to do.
"""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    """The closed set of error codes a job can end with."""

    INVALID_INPUT = "invalid_input"
    DOWNLOAD_FAILED = "download_failed"
    UNSUPPORTED_MEDIA = "unsupported_media"
    NO_FACE = "no_face"
    TOO_LONG = "too_long"
    UPLOAD_FAILED = "upload_failed"
    OUT_OF_MEMORY = "out_of_memory"
    MODELS_MISSING = "models_missing"
    INTERNAL = "internal"
    CANCELLED = "cancelled"


class LipSyncError(Exception):
    """A failure with a code from :class:`ErrorCode` and an actionable message."""

    def __init__(self, code: ErrorCode, message: str, stage: str | None = None):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.stage = stage

    def __str__(self) -> str:
        return self.message
