"""The serverless ``train_adapter`` task: fetch the videos, prepare them with the loaded MuseTalk engine's
face, VAE and audio models, fit a LoRA (one progress update per evaluation), deliver ``adapter.safetensors``.

It runs inside :meth:`Worker.run <musetalk_worker.worker.Worker.run>`, which validates the job, owns its
scratch folder and turns any failure into the worker's error shape.
"""

from __future__ import annotations

import base64
import dataclasses
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .decode import probe
from .errors import ErrorCode, LipSyncError
from .fetch import fetch_input, parse_input
from .options import WorkerSettings
from .s3 import S3Access, failure_reason, s3_client
from .schema import TrainAdapterInput
from .upload import DeliveryPlan, plan_delivery

if TYPE_CHECKING:
    from .worker import Worker, _Progress


def run_training_job(worker: "Worker", job: TrainAdapterInput, job_id: str, scratch: Path,
                     progress: "_Progress") -> dict:
    """Runs ``job`` on ``worker``'s MuseTalk engine in ``scratch``; returns the result (where the adapter went,
    its SHA-256, the losses and the evaluation before and after).

    Raises:
        LipSyncError: a video that is not a talking face with sound, too long, or without a face anywhere;
            a failed upload.
    """
    import torch

    from .train.adapter import ADAPTER_FILE, sha256_file
    from .train.fit import fit
    from .train.prepare import VIDEO_SUFFIXES, DatasetPreparer, PrepareOptions

    options = job.fit_options()
    refs = [parse_input(f"videos.{i}", url, worker.settings) for i, url in enumerate(job.videos)]
    plan = _adapter_plan(plan_delivery(job.output, worker.settings, job_id), job)
    engine = worker.engine("musetalk")

    progress.stage("download")
    access = S3Access.for_job(job.output.credentials if job.output else None, worker.settings).pinned(worker.settings)
    if plan.kind == "s3":
        plan = dataclasses.replace(plan, access=access)
    videos = scratch / "videos"
    videos.mkdir()
    for i, ref in enumerate(refs):
        path = fetch_input(ref, scratch, worker.settings, access)
        suffix = path.suffix.lower() if path.suffix.lower() in VIDEO_SUFFIXES else ".mp4"
        path.rename(videos / f"clip{i:03d}{suffix}")

    progress.stage("probe")
    for i, path in enumerate(sorted(videos.iterdir())):
        info = probe(path)
        if info.kind != "video" or not info.has_audio:
            raise LipSyncError(ErrorCode.UNSUPPORTED_MEDIA, f"'videos.{i}' is {info.kind} without "
                               f"{'a picture' if info.kind == 'audio' else 'sound'}: training needs videos of a "
                               "talking face with its speech.", stage="probe")
        if info.duration_s > worker.settings.max_source_s:
            raise LipSyncError(ErrorCode.TOO_LONG, f"'videos.{i}' is {info.duration_s:.1f} s long; the limit is "
                               f"{worker.settings.max_source_s:g} s (MUSETALK_MAX_SOURCE_SECONDS). Cut it into "
                               "shorter clips.", stage="probe")

    progress.stage("prepare")
    started = time.perf_counter()
    preparer = DatasetPreparer(engine.faces, engine.vae(torch.float32), engine.audio_encoder, PrepareOptions())
    manifest = preparer.run(videos, scratch / "cache", progress=False)
    clips = manifest["clips"].values()
    left_out = {c["source"]: c["reason"] for c in clips if c["status"] != "ok"}
    if not any(c["status"] == "ok" for c in clips):
        raise LipSyncError(ErrorCode.INVALID_INPUT, "no video of 'videos' has a face to train on: "
                           + "; ".join(f"{k}: {v}" for k, v in left_out.items()), stage="prepare")

    prepared = time.perf_counter()
    progress.stage("train")

    def emit(line: dict) -> None:
        progress.check()
        if "eval" in line and "adapter" not in line:  # one line per evaluation; the summary is the result
            progress.send({"stage": "train", "step": line["step"], "steps": options.steps,
                           **({"loss": line["loss"]} if "loss" in line else {}), "eval": line["eval"]})

    out = scratch / "adapter"
    summary = fit(scratch / "cache", worker.settings.models_dir, out, options, device=worker.settings.device,
                  emit=emit)

    trained = time.perf_counter()
    progress.stage("upload")
    path = out / ADAPTER_FILE
    digest, size = sha256_file(path), path.stat().st_size
    delivered = deliver_adapter(path, plan, worker.settings)
    progress.end()
    return {
        **delivered, "adapter_sha256": digest, "size_bytes": size,
        "steps": summary["steps"], "loss_start": summary["loss_start"], "loss_end": summary["loss_end"],
        "eval": summary["eval"], "rank": options.rank,
        "alpha": options.alpha if options.alpha is not None else float(options.rank), "version": options.version,
        "clips": sum(c["status"] == "ok" for c in clips), "frames": sum(c.get("kept", 0) for c in clips),
        "left_out": left_out,
        "timings": {**progress.timings, "prepare": round(prepared - started, 3),
                    "train": round(trained - prepared, 3), "total": progress.total()},
    }


def _adapter_plan(plan: DeliveryPlan, job: TrainAdapterInput) -> DeliveryPlan:
    """The video's plan, for an adapter file: a generated key or file name ends in ``.safetensors``."""
    if plan.kind == "s3" and not (job.output and job.output.key):
        return dataclasses.replace(plan, key=str(Path(plan.key).with_suffix(".safetensors")))
    if plan.kind == "local_file":
        return dataclasses.replace(plan, local_path=plan.local_path.with_suffix(".safetensors"))
    return plan


def deliver_adapter(path: Path, plan: DeliveryPlan, settings: WorkerSettings) -> dict:
    """Sends the adapter file where ``plan`` says: ``adapter_url`` (presigned), ``adapter_path`` or, with
    neither a bucket nor an output folder, ``adapter_base64`` when it fits in a result.

    Raises:
        LipSyncError(upload_failed): the bucket refuses it, or it is too large to return inline.
    """
    if plan.kind == "s3":
        where = f"s3://{plan.bucket}/{plan.key}"
        try:
            client = s3_client(plan.access, settings)
            client.upload_file(str(path), plan.bucket, plan.key, ExtraArgs={"ContentType": "application/octet-stream"})
            url = client.generate_presigned_url("get_object", Params={"Bucket": plan.bucket, "Key": plan.key},
                                                ExpiresIn=plan.expires_in)
        except LipSyncError as err:
            raise LipSyncError(err.code, err.message, stage="upload") from None
        except Exception as err:  # noqa: BLE001 - boto3's errors, named
            raise LipSyncError(ErrorCode.UPLOAD_FAILED, f"could not upload the adapter to {where}: "
                               f"{failure_reason(err)}.", stage="upload") from None
        return {"delivery": "s3", "adapter_url": url, "bucket": plan.bucket, "key": plan.key,
                "url_expires_in": plan.expires_in}
    if plan.kind == "local_file":
        plan.local_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), plan.local_path)
        return {"delivery": "local_file", "adapter_path": str(plan.local_path)}
    size = path.stat().st_size
    if size > settings.max_inline_result_bytes:
        raise LipSyncError(
            ErrorCode.UPLOAD_FAILED,
            f"the adapter is {size / 1e6:.1f} MB, more than the {settings.max_inline_result_bytes / 1e6:.1f} MB that "
            "fit in a RunPod result; configure a bucket (BUCKET_* variables, or output.bucket and "
            "output.credentials in the job).", stage="upload")
    return {"delivery": "inline", "adapter_base64": base64.b64encode(path.read_bytes()).decode("ascii")}
