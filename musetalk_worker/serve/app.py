"""The HTTP routes: ``GET /``, ``GET /health``, ``POST /generate``, ``POST /shutdown``.

Models load on the device thread right after the port opens (``/health``
answers 503 until they are ready); a load failure stops the server. Each
``/generate`` request takes a place in the queue, streams its files into a
scratch folder of its own, runs as one worker job from that folder
(:meth:`Worker.run`: the job schema, the limits, the error dicts), and answers
the mp4 from disk; the folder is removed once the response is sent, or at once
on a failure. A client that disconnects sets its job's cancel event, so the
device moves on within one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import shutil
import tempfile
import threading
import tomllib
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import ErrorCode
from ..options import WorkerSettings
from ..worker import Worker
from .errors import FORBIDDEN, NOT_FOUND, UNAUTHORIZED, UNAVAILABLE, ServeError, error_response, from_job_failure
from .fields import FILE_FIELDS, REFUSED_FIELDS, describe_options, typed_fields
from .jobs import DeviceQueue
from .receive import ReceivedForm, UploadLimits, receive_form
from .settings import ServeOptions, is_loopback

logger = logging.getLogger(__name__)

RESULT_HEADER = "X-Lipsync-Result"
# Output fields about where the worker put the file: the response body is the file.
_DELIVERY_FIELDS = ("delivery", "video_path", "note")
_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


class LipSyncServer:
    """The server's state: the loaded worker, the device queue, and how to stop."""

    def __init__(self, settings: WorkerSettings, options: ServeOptions, stop: Callable[[], None]):
        self.settings = settings
        self.options = options
        self.queue = DeviceQueue(options.queue)
        self.limits = UploadLimits(file_bytes=settings.max_download_bytes)
        self.worker: Optional[Worker] = None
        self.load_failure: Optional[str] = None
        self._stop = stop

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(self._load())
        yield
        await loading
        self.queue.close()

    async def _load(self) -> None:
        worker = await self.queue.run(Worker.start, self.settings)
        if worker.load_error:
            logger.error("the models did not load, stopping: %s", worker.load_error)
            self.load_failure = worker.load_error
            self._stop()
            return
        self.worker = worker
        logger.info("ready: %s loaded from %s", ", ".join(worker.engines), self.settings.models_dir)

    def describe(self) -> Dict[str, Any]:
        models = describe_options()
        for name, model in models.items():
            model["loaded"] = self.worker is not None and name in self.worker.engines
        return {
            "name": "musetalk-worker",
            "version": _version(),
            "ready": self.worker is not None,
            "endpoints": {"POST /generate": "multipart: the files source and audio (and adapter, a LoRA's "
                          "adapter.safetensors, MuseTalk only), any job option as a field; answers video/mp4 with "
                          f"the job's result as JSON in {RESULT_HEADER}",
                          "GET /health": "200 when ready, 503 while loading",
                          "POST /shutdown": "stops after the jobs already taken (loopback clients only)"},
            "models": models,
            "limits": {"file_bytes": self.limits.file_bytes, "audio_s": self.settings.max_audio_s,
                       "source_video_s": self.settings.max_source_s,
                       "source_size": [self.settings.max_source_width, self.settings.max_source_height],
                       "waiting_jobs": self.queue.places - 1},
        }

    async def generate(self, request: Request) -> Response:
        worker = self._ready_worker()
        async with self.queue.place():
            self.settings.temp_dir.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="serve-", dir=self.settings.temp_dir))
            handed_over = False
            try:
                form = await receive_form(request.headers.get("content-type"), request.stream(), folder, self.limits)
                job = _job_input(form)
                output = await self._run(request, self._job_worker(worker, folder), job, folder.name)
                if "error" in output:
                    return from_job_failure(output)
                video = Path(output["video_path"])
                described = {k: v for k, v in output.items() if k not in _DELIVERY_FIELDS}
                handed_over = True
                return _ResultFile(video, folder, {RESULT_HEADER: json.dumps(described, separators=(",", ":"))})
            finally:
                if not handed_over:
                    shutil.rmtree(folder, ignore_errors=True)

    def _ready_worker(self) -> Worker:
        if self.worker is None:
            raise ServeError(UNAVAILABLE, "the models are still loading; retry when GET /health answers 200.",
                             headers={"Retry-After": "5"})
        return self.worker

    def _job_worker(self, worker: Worker, folder: Path) -> Worker:
        """The loaded worker with this request's folder as its input, scratch and output folder."""
        settings = dataclasses.replace(worker.settings, local_input_dir=folder, temp_dir=folder,
                                       output_dir=folder / "result")
        return Worker(settings, engines=worker.engines, load_errors=worker.load_errors)

    async def _run(self, request: Request, worker: Worker, job: Dict[str, Any], job_id: str) -> Dict[str, Any]:
        """Runs the job on the device thread; the client leaving cancels it (the worker then cleans up)."""
        cancel = threading.Event()
        work = asyncio.ensure_future(self.queue.run_job(worker.run, job, job_id, None, cancel))
        gone = asyncio.ensure_future(_disconnected(request.receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if gone.done():
                logger.info("the client of job %s disconnected: cancelling it", job_id)
                cancel.set()
            # Awaited even when cancelled: the folder is removed only after the job has let go of it.
            return await work
        finally:
            gone.cancel()

    def shutdown(self, request: Request) -> JSONResponse:
        if not is_loopback(request.client.host if request.client else None):
            raise ServeError(FORBIDDEN, "/shutdown is accepted from this machine (loopback) only.")
        self.queue.stop_taking()
        logger.info("shutdown asked: finishing the jobs already taken")
        return JSONResponse({"status": "stopping"}, status_code=202, background=BackgroundTask(self._stop))


class _ResultFile(FileResponse):
    """The mp4 streamed from disk; its request folder goes once it is sent, or once sending failed."""

    def __init__(self, video: Path, folder: Path, headers: Dict[str, str]):
        super().__init__(video, media_type="video/mp4", filename="lipsync.mp4", headers=headers)
        self._folder = folder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)


def _job_input(form: ReceivedForm) -> Dict[str, Any]:
    """The worker's job input for a received form: the files by their names in the folder, options typed."""
    refused = [name for name in (*REFUSED_FIELDS, *FILE_FIELDS) if name in form.fields]
    if refused:
        problems = [f"'{name}' must be a file part (-F {name}=@file)" if name in FILE_FIELDS
                    else f"'{name}' cannot be set here: the video comes back in the response"
                    for name in refused]
        raise _invalid("; ".join(problems) + ".")
    needed = ["audio"] if "avatar_id" in form.fields else ["source", "audio"]
    missing = [name for name in needed if name not in form.files]
    if missing:
        raise _invalid(" ".join(f"'{name}' is missing: send it as a file part (-F {name}=@file)." for name in missing))
    job = {name: path.name for name, path in form.files.items()}
    if "adapter" in job:
        # The bytes received are the adapter meant: its hash is taken from them, not asked for.
        job["adapter"] = {"url": job["adapter"], "sha256": form.sha256["adapter"]}
    return {**job, **typed_fields(form.fields)}


def _invalid(message: str) -> ServeError:
    return ServeError(ErrorCode.INVALID_INPUT.value, "Invalid job input: " + message, stage="validate")


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone (after the body, the server's receive only reports that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _version() -> Optional[str]:
    """The project's version, from pyproject.toml (None where the file is not shipped, as in the image)."""
    try:
        return tomllib.loads(_PYPROJECT.read_text())["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None


class BearerAuth:
    """ASGI middleware: every request must carry ``Authorization: Bearer <token>``."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                response = error_response(UNAUTHORIZED, "send the server's token as 'Authorization: Bearer <token>'.",
                                          "request", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: WorkerSettings, options: ServeOptions, stop: Callable[[], None]) -> FastAPI:
    """The FastAPI app; ``stop`` ends the server (uvicorn lets the requests in progress finish)."""
    server = LipSyncServer(settings, options, stop)
    # No generated docs: /generate reads its multipart body itself, and GET / describes the options.
    app = FastAPI(title="musetalk-worker", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    if options.token is not None:
        app.add_middleware(BearerAuth, token=options.token)

    @app.exception_handler(ServeError)
    async def _refused(request: Request, err: ServeError) -> JSONResponse:
        return error_response(err.code, err.message, err.stage, err.headers)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        code = NOT_FOUND if err.status_code == 404 else ErrorCode.INVALID_INPUT.value
        return JSONResponse({"error": f"{request.method} {request.url.path}: {err.detail}", "error_code": code,
                             "stage": "request"}, status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unexpected failure serving %s %s", request.method, request.url.path)
        return error_response(ErrorCode.INTERNAL.value, f"unexpected error: {type(err).__name__}. The server logged "
                              "the details.", "request")

    @app.get("/")
    async def index() -> Dict[str, Any]:
        return server.describe()

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.worker is None or server.queue.closed:
            return JSONResponse({"status": "stopping" if server.queue.closed else "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await server.generate(request)

    @app.post("/shutdown")
    async def shutdown(request: Request) -> JSONResponse:
        return server.shutdown(request)

    return app
