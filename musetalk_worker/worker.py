"""One serverless job from start to end, with one error shape.

``Worker.start`` loads the engines it is told to preload once (with a warm-up)
and keeps any failure for the fitness check; another model loads at its first
job. ``Worker.run`` then takes each job through the stages
``validate`` -> ``download`` -> ``probe`` -> the engine's stages -> ``upload``
inside its own scratch folder, which is removed whatever happens. Every
failure comes back as ``{"error": str, "error_code": str, "stage": str}`` (a
string ``error`` makes RunPod mark the job FAILED); a CUDA out-of-memory or
fault also sets ``refresh_worker`` so RunPod restarts the process after the job.
Secrets given with a job or in the environment are removed from every message.

A job may carry an ``adapter`` (``{"url", "sha256"}``): it is fetched like the
media, its SHA-256 checked, and the engine runs with it for that job only. A
job with ``"task": "train_adapter"`` instead fetches its ``videos``, prepares
and fits a LoRA (``train``), sends one progress update per evaluation and
delivers ``adapter.safetensors`` where a video would go.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from .allocator import return_freed_memory
from .decode import MediaInfo, probe_inputs
from .encode import HlsOutput
from .engine import Engine, load_engine
from .errors import ErrorCode, LipSyncError
from .fetch import fetch_input, parse_input
from .hls import SegmentPublisher
from .options import LATENTSYNC_VERSIONS, StreamOptions, WorkerSettings
from .s3 import S3Access, s3_client
from .schema import TrainAdapterInput, parse_task
from .upload import DeliveryPlan, deliver, plan_delivery
from .weights import file_sha256, load_lock, present_components, verify_models

logger = logging.getLogger(__name__)

Report = Callable[[dict], None]

_WORKER_STAGES = ("validate", "download", "probe", "upload")
# Engine stages whose progress is reported every ~10 % (the long one).
_STEPPED_STAGES = ("generate",)


@dataclasses.dataclass
class Worker:
    """The loaded engines (by model name) plus the settings every job runs under."""

    settings: WorkerSettings
    engines: Dict[str, Engine] = dataclasses.field(default_factory=dict)
    load_errors: Dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def start(cls, settings: WorkerSettings) -> "Worker":
        """Loads the preloaded models once and warms them up; a failure is kept, not raised.

        A worker that could not load still starts, so the fitness check (on
        RunPod) and every job (locally) can say why.
        """
        worker = cls(settings)
        missing = _weights_problem(settings)
        if missing:
            logger.error("the models folder does not match the weights lock: %s", missing)
            worker.load_errors = {model: missing for model in settings.preload_models}
            return worker
        for model in settings.preload_models:
            try:
                worker.engine(model)
            except LipSyncError:
                pass  # kept in load_errors for the fitness check and the jobs
        return worker

    @property
    def load_error(self) -> Optional[str]:
        """Why a preloaded model did not load (all such reasons), or None."""
        return " ".join(self.load_errors.values()) or None

    def engine(self, model: str) -> Engine:
        """The loaded engine of ``model``, loading (and warming up) it on first use.

        Raises:
            LipSyncError(models_missing): it did not load (now or before); the message says why.
        """
        if model in self.engines:
            return self.engines[model]
        if model in self.load_errors:
            raise LipSyncError(ErrorCode.MODELS_MISSING, self.load_errors[model], stage="load")
        started = time.perf_counter()
        try:
            engine = load_engine(model, self.settings.engine_config())
            loaded = time.perf_counter()
            engine.warm_up()
        except LipSyncError as err:
            logger.error("the %s engine did not load: %s", model, err.message)
            self.load_errors[model] = err.message
            raise LipSyncError(ErrorCode.MODELS_MISSING, err.message, stage="load") from None
        except Exception as err:  # noqa: BLE001 - any load failure must reach the fitness check
            logger.exception("the %s engine did not load", model)
            self.load_errors[model] = (f"loading the {model} models from {self.settings.models_dir} failed: "
                                       f"{type(err).__name__}: {err}")
            raise LipSyncError(ErrorCode.MODELS_MISSING, self.load_errors[model], stage="load") from None
        logger.info("%s engine ready: models loaded in %.1f s, warm-up %.1f s",
                    model, loaded - started, time.perf_counter() - loaded)
        self.engines[model] = engine
        return engine

    def fitness_problems(self) -> list[str]:
        """Why this worker must not take jobs: missing weights, or no GPU where one is expected."""
        problems = [self.load_error] if self.load_error else []
        if self.settings.device != "cpu":
            import torch

            if not torch.cuda.is_available():
                problems.append(
                    f"a GPU was expected (MUSETALK_DEVICE={self.settings.device}) but CUDA sees none: check the "
                    "endpoint's GPU types and allowed CUDA versions, or set MUSETALK_DEVICE=cpu."
                )
        return problems

    def check_fitness(self) -> None:
        """Raises RuntimeError with every problem found (RunPod then stops the worker)."""
        problems = self.fitness_problems()
        if problems:
            raise RuntimeError("MuseTalk worker is not fit to run: " + " ".join(problems))

    def handle(self, job: dict, cancel: Optional[threading.Event] = None) -> dict:
        """RunPod's handler: runs ``job["input"]`` and reports progress to RunPod.

        Setting ``cancel`` (from another thread) stops the job within one batch.
        Every progress update has reached RunPod when this returns, so none can
        overtake the result (runpod-python#250).
        """
        from .runpod_progress import ProgressSender

        with ProgressSender(job) as sender:
            return self.run(job.get("input"), str(job.get("id") or "job"), sender.send, cancel)

    def run(self, raw_input: Any, job_id: str, report: Optional[Report] = None,
            cancel: Optional[threading.Event] = None) -> dict:
        """Runs one job and returns its output, or an error dict; never raises.

        Setting ``cancel`` stops the job at its next stage or batch (a
        ``cancelled`` error); its scratch is removed as for any failure.
        """
        progress = _Progress(report, cancel)
        secrets = _secrets(raw_input, self.settings)
        scratch: Optional[Path] = None
        try:
            progress.stage("validate")
            job = parse_task(raw_input)
            if isinstance(job, TrainAdapterInput):
                scratch = Path(tempfile.mkdtemp(prefix="train-", dir=_mkdir(self.settings.temp_dir)))
                from .training_job import run_training_job

                return run_training_job(self, job, job_id, scratch, progress)
            options = job.engine_options()
            # A job naming a prepared avatar has no source to fetch.
            names = ("audio",) if job.avatar_id else ("source", "audio")
            refs = {name: parse_input(name, getattr(job, name), self.settings) for name in names}
            if job.adapter is not None:
                refs["adapter"] = parse_input("adapter", job.adapter.url, self.settings)
            plan = plan_delivery(job.output, self.settings, job_id)
            engine = self.engine(job.model)

            self.settings.temp_dir.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix="job-", dir=self.settings.temp_dir))
            progress.stage("download")
            # A job-given endpoint is resolved and checked once, and every connection of the job
            # (its s3:// inputs, the stream, the result) goes to that one address.
            access = S3Access.for_job(job.output.credentials if job.output else None, self.settings)
            access = access.pinned(self.settings)
            if plan.kind == "s3":
                plan = dataclasses.replace(plan, access=access)
            fetched = {name: fetch_input(ref, scratch, self.settings, access) for name, ref in refs.items()}
            extra = {}
            if job.adapter is not None:
                extra["adapter"] = _checked_adapter(fetched["adapter"], job.adapter.sha256)

            progress.stage("probe")
            # Probed once here; the engine takes the MediaInfo pair and does not probe again.
            source_info, audio_info = check_media(fetched.get("source"), fetched["audio"], self.settings)

            workdir = scratch / "engine"
            workdir.mkdir()
            stream = job.output.stream_options() if job.output else None
            with self._stream(stream, plan, scratch, progress) as publisher:
                result = engine(source_info, audio_info, scratch / "result.mp4", options,
                                     avatar_id=job.avatar_id, progress=progress.engine, workdir=workdir,
                                     hls=publisher.hls if publisher else None, **extra)

            progress.stage("upload")
            delivered = deliver(Path(result.path), plan, self.settings)
            progress.end()
            # No "done" update: the result says so, and an update is one more post that must not
            # arrive after it (runpod-python#250).
            output = {
                **delivered,
                "duration_s": round(result.duration_s, 3),
                "frames": result.frames,
                "fps": result.fps,
                "fps_fraction": result.fps_fraction,
                "width": result.width,
                "height": result.height,
                "frames_without_face": result.frames_without_face,
                "avatar_cache_hit": result.cache_hit,
                "model": result.model,
                "version": result.version,
                "timings": {**progress.timings, **{k: round(v, 3) for k, v in result.timings.items()},
                            "total": progress.total()},
            }
            if result.avatar_id is not None:
                output["avatar_id"] = result.avatar_id
            if publisher is not None:
                output.update(_stream_fields(publisher))
                output["timings"]["first_segment"] = round(publisher.first_segment_at - progress.started, 3)
            return output
        except LipSyncError as err:
            refresh = err.code is ErrorCode.OUT_OF_MEMORY
            return _failure(err.code, err.message, err.stage or progress.current, secrets, refresh=refresh)
        except Exception as err:  # noqa: BLE001 - the worker must survive any failure
            return self._unexpected(err, progress.current, secrets)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            return_freed_memory()

    @contextlib.contextmanager
    def _stream(self, stream: Optional[StreamOptions], plan: DeliveryPlan, scratch: Path,
                progress: "_Progress") -> Iterator[Optional[SegmentPublisher]]:
        """Publishes the HLS stream the encoder writes while the block runs (nothing without ``stream``).

        The first public segment is announced as progress with its playlist URL.
        When the block ends normally the playlist is ended; on a failure it is
        ended at its last good segment so players stop cleanly; a cancelled
        job's uploads are deleted.
        """
        if stream is None:
            yield None
            return
        hls = HlsOutput(scratch / "hls", stream)
        hls.folder.mkdir()
        publisher = SegmentPublisher(
            hls, s3_client(plan.access, self.settings), plan.bucket, plan.stream_prefix, plan.expires_in,
            on_first_segment=lambda url: progress.send({"stage": "streaming", "stream_url": url}),
        )
        progress.watch(publisher)
        publisher.start()
        try:
            yield publisher
        except BaseException as err:
            if isinstance(err, LipSyncError) and err.code is ErrorCode.CANCELLED:
                publisher.delete_uploaded()
            else:
                publisher.abort()
            raise
        publisher.finish()

    def _unexpected(self, err: Exception, stage: str, secrets: tuple[str, ...]) -> dict:
        if _is_out_of_memory(err):
            logger.error("out of memory in stage %s: %s", stage, _redact(str(err), secrets))
            return _failure(
                ErrorCode.OUT_OF_MEMORY,
                f"the worker ran out of memory in stage '{stage}'; it will restart. Retry with a smaller "
                "batch_size, a shorter clip or a lower-resolution source, or use a GPU with more memory.",
                stage, secrets, refresh=True,
            )
        logger.error("unexpected failure in stage %s:\n%s", stage, _redact(traceback.format_exc(), secrets))
        cuda_fault = "CUDA" in str(err) or "cuDNN" in str(err)
        return _failure(
            ErrorCode.INTERNAL,
            f"unexpected error in stage '{stage}': {type(err).__name__}: {str(err)[:500]}. The worker logged "
            "the details; retry the job, and report it if it happens again.",
            stage, secrets, refresh=cuda_fault,
        )


def _weights_problem(settings: WorkerSettings) -> Optional[str]:
    """What is missing or wrong in the models folder against the lock, or None (also when not checked).

    MuseTalk's files must all be there when it is preloaded; each LatentSync
    version and GFPGAN are optional, and checked in full when any of their files is there.
    """
    if settings.weights_lock is None:
        return None
    lock = load_lock(settings.weights_lock)
    components = []
    if "musetalk" in settings.preload_models:
        components += ["v15", "vae", "whisper", "face_parsing"]
        if settings.landmarks == "dwpose":
            components += ["dwpose", "s3fd"]
    # Optional models (LatentSync's versions, GFPGAN) are checked when the image has them; a lock
    # without one (a custom lock) offers nothing to check.
    optional = [name for name in (*(f"latentsync-{v}" for v in LATENTSYNC_VERSIONS), "gfpgan")
                if name in lock.components]
    components += present_components(settings.models_dir, lock, optional)
    report = verify_models(settings.models_dir, lock, components, settings.verify_weight_hashes)
    return None if report.ok else report.describe()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _checked_adapter(path: Path, sha256: str) -> Path:
    """The fetched adapter file, once its SHA-256 is the job's (the engine checks what it holds).

    Raises:
        LipSyncError(invalid_input): another SHA-256 (a wrong hash, or a file changed on the way).
    """
    digest = file_sha256(path)
    if digest != sha256:
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            f"'adapter' file has SHA-256 {digest}, not the job's {sha256}: the URL points at another file, or "
            "it changed on the way. Send the SHA-256 of the adapter.safetensors to use.",
            stage="download",
        )
    return path


def check_media(source: Optional[Path], audio: Path,
                settings: WorkerSettings) -> tuple[Optional[MediaInfo], MediaInfo]:
    """Probes both inputs (:func:`decode.probe_inputs`) and applies the worker's limits before the engine runs.

    ``source`` is None for a job that names a prepared avatar (nothing to probe).

    Raises:
        LipSyncError: ``unsupported_media`` (not media, audio as ``source``, no
            sound in ``audio``), ``too_long`` (over a duration limit),
            ``invalid_input`` (source larger than the resolution limit).
    """
    src, aud = probe_inputs(source, audio)
    if src is not None and (src.width > settings.max_source_width or src.height > settings.max_source_height):
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            f"'source' is {src.width}x{src.height}; the largest allowed is {settings.max_source_width}x"
            f"{settings.max_source_height} (MUSETALK_MAX_SOURCE_WIDTH / _HEIGHT). Downscale it.",
            stage="probe",
        )
    if src is not None and src.kind == "video" and src.duration_s > settings.max_source_s:
        raise LipSyncError(
            ErrorCode.TOO_LONG,
            f"'source' video is {src.duration_s:.1f} s long; the limit is {settings.max_source_s:g} s "
            "(MUSETALK_MAX_SOURCE_SECONDS). Trim it.",
            stage="probe",
        )
    if aud.duration_s > settings.max_audio_s:
        raise LipSyncError(
            ErrorCode.TOO_LONG,
            f"'audio' is {aud.duration_s:.1f} s long; the limit is {settings.max_audio_s:g} s "
            "(MUSETALK_MAX_AUDIO_SECONDS). Split it into shorter jobs.",
            stage="probe",
        )
    return src, aud


class _Progress:
    """Times the worker's stages and reports each stage start and every ~10 % of generation.

    It is also where a running job learns that it must stop: at each stage
    and engine batch it raises when the job was cancelled, or when the
    stream it publishes (``watch``) failed to upload.
    """

    def __init__(self, report: Optional[Report], cancel: Optional[threading.Event] = None):
        self._report = report
        self._cancel = cancel
        self._publisher: Optional[SegmentPublisher] = None
        # time.monotonic, the clock of the publisher's first_segment_at.
        self.started = time.monotonic()
        self._stage_started = self.started
        self._next_percent: dict[str, int] = {}
        self.current = ""
        self.timings: dict[str, float] = {}

    def stage(self, name: str) -> None:
        self.check()
        self.end()
        self.current = name
        self._next_percent[name] = 10
        self.send({"stage": name})

    def end(self) -> None:
        """Ends the current stage's timing (the engine times its own stages, only the worker's count here)."""
        now = time.monotonic()
        if self.current in _WORKER_STAGES:
            self.timings[self.current] = round(now - self._stage_started, 3)
        self._stage_started = now

    def engine(self, stage: str, done: int, total: int) -> None:
        # The engine reports every batch of each pass, so a cancelled job stops within one batch.
        self.check()
        # An engine may interleave stages batch by batch: announce each one once.
        if stage not in self._next_percent:
            self.stage(stage)
        self.current = stage
        if stage in _STEPPED_STAGES and total > 0:
            percent = min(100, done * 100 // total)
            if percent >= self._next_percent[stage]:
                self._next_percent[stage] = percent // 10 * 10 + 10
                self.send({"stage": stage, "percent": percent, "done": done, "total": total})

    def watch(self, publisher: SegmentPublisher) -> None:
        """Makes a failed segment upload stop the job at its next batch."""
        self._publisher = publisher

    def check(self) -> None:
        """Raises ``cancelled`` once the job was asked to stop, ``upload_failed`` once its stream failed."""
        if self._cancel is not None and self._cancel.is_set():
            raise LipSyncError(ErrorCode.CANCELLED, "the job was cancelled (RunPod stopped it); nothing was "
                               "delivered.", stage=self.current)
        if self._publisher is not None and self._publisher.failed is not None:
            self._publisher.finish()  # raises the upload failure, naming the object

    def total(self) -> float:
        return round(time.monotonic() - self.started, 3)

    def send(self, value: dict) -> None:
        """Reports ``value``; a failure to report is logged, never raised."""
        if self._report is None:
            return
        try:
            self._report(value)
        except Exception:  # noqa: BLE001 - a lost progress message must not fail the job
            logger.warning("progress update failed", exc_info=True)


def _stream_fields(publisher: SegmentPublisher) -> dict:
    """The result's description of a published stream."""
    return {
        "stream_url": publisher.playlist_url,
        "stream_key": publisher.playlist_key,
        "stream_segments": publisher.segments,
    }


def _failure(code: ErrorCode, message: str, stage: str, secrets: tuple[str, ...], *, refresh: bool = False) -> dict:
    message = _redact(message, secrets)
    logger.warning("job failed (%s, stage %s): %s", code.value, stage, message)
    result = {"error": message, "error_code": code.value, "stage": stage}
    if refresh:
        result["refresh_worker"] = True
    return result


def _secrets(raw_input: Any, settings: WorkerSettings) -> tuple[str, ...]:
    """Credential values of the job (read before validation, so even a bad job's are known) and the worker."""
    found = list(S3Access.for_job(None, settings).secrets())
    output = raw_input.get("output") if isinstance(raw_input, dict) else None
    credentials = output.get("credentials") if isinstance(output, dict) else None
    if isinstance(credentials, dict):
        found += [v for k, v in credentials.items() if k not in ("endpoint_url", "region") and isinstance(v, str)]
    # Very short values would redact ordinary words; real keys are long.
    return tuple(s for s in found if len(s) >= 8)


def _redact(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "[redacted]")
    return text


def _is_out_of_memory(err: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError is matched by name so this module needs no torch import.
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err)
