"""One serverless job from start to end, with one error shape.

``Worker.start`` loads the engine once (with a warm-up) and keeps any failure
for the fitness check. ``Worker.run`` then takes each job through the stages
``validate`` -> ``download`` -> ``probe`` -> the engine's stages -> ``upload``
inside its own scratch folder, which is removed whatever happens. Every
failure comes back as ``{"error": str, "error_code": str, "stage": str}`` (a
string ``error`` makes RunPod mark the job FAILED); a CUDA out-of-memory or
fault also sets ``refresh_worker`` so RunPod restarts the process after the job.
Secrets given with a job or in the environment are removed from every message.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from .decode import MediaInfo, probe_inputs
from .errors import ErrorCode, LipSyncError
from .fetch import S3Access, fetch_input, parse_input
from .options import EngineOptions, WorkerSettings
from .schema import parse_job
from .upload import deliver, plan_delivery
from .weights import verify_models

logger = logging.getLogger(__name__)

Report = Callable[[dict], None]

_WORKER_STAGES = ("validate", "download", "probe", "upload")
# Engine stages whose progress is reported every ~10 % (the long one).
_STEPPED_STAGES = ("generate",)


class Engine(Protocol):
    """What the worker needs of ``LipSyncPipeline``."""

    def __call__(self, source: MediaInfo, audio: MediaInfo, output: Path, options: EngineOptions, *,
                 progress: Optional[Callable[[str, int, int], None]] = None,
                 workdir: Optional[Path] = None) -> Any: ...


@dataclasses.dataclass
class Worker:
    """The loaded engine plus the settings every job runs under."""

    settings: WorkerSettings
    engine: Optional[Engine] = None
    load_error: Optional[str] = None

    @classmethod
    def start(cls, settings: WorkerSettings) -> "Worker":
        """Loads the models once and warms them up; a failure is kept, not raised.

        A worker that could not load still starts, so the fitness check (on
        RunPod) and every job (locally) can say why.
        """
        started = time.perf_counter()
        missing = _weights_problem(settings)
        if missing:
            logger.error("the models folder does not match the weights lock: %s", missing)
            return cls(settings, load_error=missing)
        try:
            from .pipeline import LipSyncPipeline

            engine = LipSyncPipeline.from_models(settings.models_dir, device=settings.device,
                                                 landmarks=settings.landmarks, cache_dir=settings.avatar_cache_dir,
                                                 cache_max_bytes=settings.avatar_cache_bytes,
                                                 acceleration=settings.acceleration,
                                                 video_encoder=settings.video_encoder)
            loaded = time.perf_counter()
            engine.warm_up()
        except LipSyncError as err:
            logger.error("the engine did not load: %s", err.message)
            return cls(settings, load_error=err.message)
        except Exception as err:  # noqa: BLE001 - any load failure must reach the fitness check
            logger.exception("the engine did not load")
            return cls(settings, load_error=f"loading the models from {settings.models_dir} failed: "
                                            f"{type(err).__name__}: {err}")
        logger.info("engine ready: models loaded in %.1f s, warm-up %.1f s",
                    loaded - started, time.perf_counter() - loaded)
        return cls(settings, engine=engine)

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

    def handle(self, job: dict) -> dict:
        """RunPod's handler: runs ``job["input"]`` and reports progress to RunPod."""
        import runpod

        def report(value: dict) -> None:
            runpod.serverless.progress_update(job, value)

        return self.run(job.get("input"), str(job.get("id") or "job"), report)

    def run(self, raw_input: Any, job_id: str, report: Optional[Report] = None) -> dict:
        """Runs one job and returns its output, or an error dict; never raises."""
        progress = _Progress(report)
        secrets = _secrets(raw_input, self.settings)
        scratch: Optional[Path] = None
        try:
            progress.stage("validate")
            job = parse_job(raw_input)
            options = job.engine_options()
            refs = [parse_input(name, getattr(job, name), self.settings) for name in ("source", "audio")]
            plan = plan_delivery(job.output, self.settings, job_id)
            if self.engine is None:
                raise LipSyncError(ErrorCode.MODELS_MISSING, self.load_error or "the engine is not loaded",
                                   stage="load")

            self.settings.temp_dir.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix="job-", dir=self.settings.temp_dir))
            progress.stage("download")
            access = S3Access.for_job(job.output.credentials if job.output else None, self.settings)
            source, audio = (fetch_input(ref, scratch, self.settings, access) for ref in refs)

            progress.stage("probe")
            # Probed once here; the engine takes the MediaInfo pair and does not probe again.
            source_info, audio_info = check_media(source, audio, self.settings)

            workdir = scratch / "engine"
            workdir.mkdir()
            result = self.engine(source_info, audio_info, scratch / "result.mp4", options,
                                 progress=progress.engine, workdir=workdir)

            progress.stage("upload")
            delivered = deliver(Path(result.path), plan, self.settings)
            progress.stage("done")
            return {
                **delivered,
                "duration_s": round(result.duration_s, 3),
                "frames": result.frames,
                "fps": result.fps,
                "fps_fraction": result.fps_fraction,
                "width": result.width,
                "height": result.height,
                "frames_without_face": result.frames_without_face,
                "avatar_cache_hit": result.cache_hit,
                "version": options.version,
                "timings": {**progress.timings, **{k: round(v, 3) for k, v in result.timings.items()},
                            "total": progress.total()},
            }
        except LipSyncError as err:
            refresh = err.code is ErrorCode.OUT_OF_MEMORY
            return _failure(err.code, err.message, err.stage or progress.current, secrets, refresh=refresh)
        except Exception as err:  # noqa: BLE001 - the worker must survive any failure
            return self._unexpected(err, progress.current, secrets)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

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
    """What is missing or wrong in the models folder against the lock, or None (also when not checked)."""
    if settings.weights_lock is None:
        return None
    components = ["v15", "vae", "whisper", "face_parsing"]
    if settings.landmarks == "dwpose":
        components += ["dwpose", "s3fd"]
    report = verify_models(settings.models_dir, settings.weights_lock, components, settings.verify_weight_hashes)
    return None if report.ok else report.describe()


def check_media(source: Path, audio: Path, settings: WorkerSettings) -> tuple[MediaInfo, MediaInfo]:
    """Probes both inputs (:func:`decode.probe_inputs`) and applies the worker's limits before the engine runs.

    Raises:
        LipSyncError: ``unsupported_media`` (not media, audio as ``source``, no
            sound in ``audio``), ``too_long`` (over a duration limit),
            ``invalid_input`` (source larger than the resolution limit).
    """
    src, aud = probe_inputs(source, audio)
    if src.width > settings.max_source_width or src.height > settings.max_source_height:
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            f"'source' is {src.width}x{src.height}; the largest allowed is {settings.max_source_width}x"
            f"{settings.max_source_height} (MUSETALK_MAX_SOURCE_WIDTH / _HEIGHT). Downscale it.",
            stage="probe",
        )
    if src.kind == "video" and src.duration_s > settings.max_source_s:
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
    """Times the worker's stages and reports each stage start and every ~10 % of generation."""

    def __init__(self, report: Optional[Report]):
        self._report = report
        self._started = time.perf_counter()
        self._stage_started = self._started
        self._next_percent: dict[str, int] = {}
        self.current = ""
        self.timings: dict[str, float] = {}

    def stage(self, name: str) -> None:
        now = time.perf_counter()
        # The engine times its own stages (LipSyncResult.timings); only the worker's are timed here.
        if self.current in _WORKER_STAGES:
            self.timings[self.current] = round(now - self._stage_started, 3)
        self.current, self._stage_started = name, now
        self._next_percent[name] = 10
        self._send({"stage": name})

    def engine(self, stage: str, done: int, total: int) -> None:
        # An engine may interleave stages batch by batch: announce each one once.
        if stage not in self._next_percent:
            self.stage(stage)
        self.current = stage
        if stage in _STEPPED_STAGES and total > 0:
            percent = min(100, done * 100 // total)
            if percent >= self._next_percent[stage]:
                self._next_percent[stage] = percent // 10 * 10 + 10
                self._send({"stage": stage, "percent": percent, "done": done, "total": total})

    def total(self) -> float:
        return round(time.perf_counter() - self._started, 3)

    def _send(self, value: dict) -> None:
        if self._report is None:
            return
        try:
            self._report(value)
        except Exception:  # noqa: BLE001 - a lost progress message must not fail the job
            logger.warning("progress update failed", exc_info=True)


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
