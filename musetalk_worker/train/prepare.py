"""``train prepare``: every clip of a folder, at 25 fps, through the MuseTalk engine's own preparation, into a cache.

Per frame with a face the cache holds what training needs: the 256x256 crop
(BGR uint8, the loss's target), its two VAE latents (mouth blanked + whole, as
the engine's :class:`LatentEncoder` makes them), the frame's Whisper audio
prompt (the engine's :class:`AudioPrompts`), the 68 landmarks and the face box
(the engine's box arithmetic). Frames go to ``shards/<clip>-NNNN.safetensors``
of at most ``shard_frames`` frames, so memory stays bounded by one shard
whatever the length of a clip; ``manifest.json`` records each finished clip,
and a clip already there is skipped on the next run (resume). Frames without
a face, and clips without any, are reported and left out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from ..decode import MediaInfo, iter_video_frames, load_audio, probe
from ..errors import LipSyncError
from ..engines.musetalk import boxes as box_math
from ..engines.musetalk.audio import AudioEncoder
from ..engines.musetalk.latents import LatentEncoder, crop_face
from ..faces import FaceAnalyzer

logger = logging.getLogger(__name__)

FPS = Fraction(25)
MANIFEST = "manifest.json"
SHARDS = "shards"
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """How clips are prepared (the v1.5 defaults of the engine's face box)."""

    batch_size: int = 8
    shard_frames: int = 256
    bbox_shift: int = 0
    extra_margin: int = 10

    def __post_init__(self) -> None:
        for name in ("batch_size", "shard_frames"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class ShardWriter:
    """Collects one clip's frames and writes them as shards of at most ``shard_frames``."""

    def __init__(self, out: Path, clip: str, shard_frames: int):
        self._dir = Path(out) / SHARDS
        self._dir.mkdir(parents=True, exist_ok=True)
        self._clip = clip
        self._size = shard_frames
        self._rows: Dict[str, List[torch.Tensor]] = {}
        self.shards: List[dict] = []

    def add(self, **rows: torch.Tensor) -> None:
        """Appends frames: each keyword a tensor with one row per frame (``frame``, ``crop``, ``latent``, ...)."""
        for key, value in rows.items():
            self._rows.setdefault(key, []).append(value)
        while self._pending() >= self._size:
            self._flush(self._size)

    def close(self) -> List[dict]:
        """Writes what is left; returns the shards as ``{"file", "frames"}``."""
        if self._pending():
            self._flush(self._pending())
        return self.shards

    def _pending(self) -> int:
        return sum(len(t) for t in self._rows.get("frame", []))

    def _flush(self, count: int) -> None:
        joined = {k: torch.cat(v) for k, v in self._rows.items()}
        name = f"{self._clip}-{len(self.shards):04d}.safetensors"
        save_file({k: v[:count].contiguous() for k, v in joined.items()}, str(self._dir / name))
        self._rows = {k: [v[count:]] for k, v in joined.items()}
        self.shards.append({"file": f"{SHARDS}/{name}", "frames": count})


class DatasetPreparer:
    """The engine's face analyzer, VAE and audio encoder, loaded once; :meth:`run` prepares a folder."""

    def __init__(self, faces: FaceAnalyzer, vae: torch.nn.Module, audio: AudioEncoder,
                 options: PrepareOptions = PrepareOptions()):
        self.faces = faces
        self.latents = LatentEncoder(vae)
        self.audio = audio
        self.options = options

    def run(self, videos: Path, out: Path, progress: bool = True) -> dict:
        """Prepares every video in ``videos`` (sorted, recursively) not yet in ``out``'s manifest; returns it.

        Raises:
            LipSyncError(invalid_input): ``videos`` holds no video file.
        """
        from tqdm import tqdm

        videos, out = Path(videos), Path(out)
        files = sorted(p for p in videos.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
        if not files:
            raise LipSyncError("invalid_input", f"no video files ({', '.join(VIDEO_SUFFIXES)}) in {videos}")
        manifest = read_manifest(out) or {"format": FORMAT, "fps": str(FPS), "clips": {}}
        todo = [p for p in files if _clip_id(p.relative_to(videos)) not in manifest["clips"]]
        infos = {p: _probe(p) for p in todo}
        total = sum(i.estimated_frames for i in infos.values() if isinstance(i, MediaInfo))
        with tqdm(total=total, unit="frame", desc="prepare", disable=not progress) as bar:
            for path in todo:
                clip = _clip_id(path.relative_to(videos))
                info = infos[path]
                entry = (self._clip(info, out, clip, bar) if isinstance(info, MediaInfo)
                         else {"status": "skipped", "reason": info})
                entry["source"] = str(path.relative_to(videos))
                if entry["status"] == "skipped":
                    logger.warning("%s left out: %s", entry["source"], entry["reason"])
                elif entry["faceless_frames"]:
                    logger.warning("%s: %d of %d frames have no face and are left out", entry["source"],
                                   len(entry["faceless_frames"]), entry["frames"])
                manifest["clips"][clip] = entry
                _write_manifest(out, manifest)
        return manifest

    def _clip(self, info: MediaInfo, out: Path, clip: str, bar) -> dict:
        samples = load_audio(info)
        prompts = self.audio.prompts(samples, FPS)
        writer = ShardWriter(out, clip, self.options.shard_frames)
        faceless: List[int] = []
        seen = 0
        batch: List[np.ndarray] = []
        # Frames past the end of the audio have no prompt: decoding stops there.
        for frame in iter_video_frames(info, max_frames=len(prompts) or 1, fps=FPS):
            batch.append(frame)
            if len(batch) == self.options.batch_size:
                faceless += self._batch(batch, seen, prompts, writer)
                seen += len(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            faceless += self._batch(batch, seen, prompts, writer)
            seen += len(batch)
            bar.update(len(batch))
        shards = writer.close()
        kept = sum(s["frames"] for s in shards)
        if kept == 0:
            for shard in shards:
                os.remove(out / shard["file"])
            return {"status": "skipped", "reason": f"no face in any of its {seen} frames" if seen else "no frames",
                    "frames": seen}
        return {"status": "ok", "frames": seen, "kept": kept, "faceless_frames": faceless, "shards": shards}

    def _batch(self, frames: List[np.ndarray], first: int, prompts, writer: ShardWriter) -> List[int]:
        """Prepares one batch into ``writer``; returns the indices of its frames without a face."""
        options = self.options
        height, width = frames[0].shape[:2]
        found = []
        for i, detection in enumerate(self.faces.detect(frames)):
            if detection is None:
                continue
            box = box_math.with_margin(box_math.face_box(detection.landmarks, detection.detector_box,
                                                         options.bbox_shift), options.extra_margin, height)
            x1, y1, x2, y2 = box_math.clip_box(box, width, height)
            if x2 > x1 and y2 > y1:
                found.append((i, (x1, y1, x2, y2), detection.landmarks))
        faceless = sorted(set(range(first, first + len(frames))) - {first + i for i, _, _ in found})
        if found:
            crops = [crop_face(frames[i], box) for i, box, _ in found]
            index = torch.tensor([first + i for i, _, _ in found], dtype=torch.int64)
            writer.add(
                frame=index,
                crop=torch.from_numpy(np.stack(crops)),
                latent=self.latents.encode(crops),
                prompt=prompts[first:first + len(frames)][[i for i, _, _ in found]].float().cpu(),
                landmarks=torch.from_numpy(np.stack([lm for _, _, lm in found]).astype(np.float32)),
                box=torch.tensor([box for _, box, _ in found], dtype=torch.int32),
            )
        return faceless


def read_manifest(out: Path) -> Optional[dict]:
    """The cache's manifest, or None where there is none yet."""
    path = Path(out) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _write_manifest(out: Path, manifest: dict) -> None:
    # Written to a temporary file and renamed, so an interrupted run never leaves half a manifest.
    tmp = Path(out) / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, Path(out) / MANIFEST)


def _probe(path: Path):
    """The clip's MediaInfo, or why it cannot be used."""
    try:
        info = probe(path)
    except LipSyncError as e:
        return str(e)
    if info.kind != "video":
        return f"not a video ({info.kind})"
    if not info.has_audio:
        return "no audio stream"
    return info


def _clip_id(relative: Path) -> str:
    """A file-name-safe, unique id of a clip from its path inside the videos folder."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(relative.with_suffix("")))
