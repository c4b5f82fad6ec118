"""The server's one error shape, ``{"error", "error_code", "stage"}``, and the HTTP status of each code."""

from __future__ import annotations

from typing import Mapping, Optional

from fastapi.responses import JSONResponse

from ..errors import ErrorCode

# Codes the server adds to the worker's ErrorCode set, for what only HTTP can go wrong.
TOO_LARGE = "too_large"
QUEUE_FULL = "queue_full"
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
NOT_FOUND = "not_found"
UNAVAILABLE = "unavailable"

_STATUS = {
    ErrorCode.INVALID_INPUT.value: 400,  # 422 when the job schema refused it, see status_for
    ErrorCode.DOWNLOAD_FAILED.value: 400,
    ErrorCode.UNSUPPORTED_MEDIA.value: 415,
    ErrorCode.NO_FACE.value: 422,
    ErrorCode.TOO_LONG.value: 413,
    ErrorCode.UPLOAD_FAILED.value: 500,
    ErrorCode.OUT_OF_MEMORY.value: 503,
    ErrorCode.MODELS_MISSING.value: 503,
    ErrorCode.INTERNAL.value: 500,
    # Nobody reads it (the client left); nginx's "client closed request" for the log.
    ErrorCode.CANCELLED.value: 499,
    TOO_LARGE: 413,
    QUEUE_FULL: 429,
    UNAUTHORIZED: 401,
    FORBIDDEN: 403,
    NOT_FOUND: 404,
    UNAVAILABLE: 503,
}


class ServeError(Exception):
    """A request the server refuses before (or instead of) running a job."""

    def __init__(self, code: str, message: str, stage: str = "request",
                 headers: Optional[Mapping[str, str]] = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.stage = stage
        self.headers = dict(headers or {})


def status_for(code: str, stage: str) -> int:
    """The HTTP status of an error: a schema refusal (stage ``validate``) is 422, other bad input 400."""
    if code == ErrorCode.INVALID_INPUT.value and stage == "validate":
        return 422
    return _STATUS.get(code, 500)


def error_response(code: str, message: str, stage: str, headers: Optional[Mapping[str, str]] = None) -> JSONResponse:
    """The JSON error body with its status; never a traceback."""
    return JSONResponse({"error": message, "error_code": code, "stage": stage},
                        status_code=status_for(code, stage), headers=dict(headers or {}))


def from_job_failure(failure: Mapping[str, str]) -> JSONResponse:
    """The response for the error dict :meth:`Worker.run` returned."""
    return error_response(failure["error_code"], failure["error"], failure["stage"])
