"""LatentSync from media files to a lip-synced mp4; models loaded once, one call per job.

A job is one streaming pass, 16 output frames (one chunk) at a time, so memory
stays flat whatever the length:

1. **Audio**: whisper features of the whole speech (small); the output has as
   many 25 fps frames as the audio lasts.
2. **Source** (:mod:`.source`): frames decoded at 25 fps as the chunks need
   them, each fitted to the face template once, in order (the alignment
   smooths over frames), and spilled to a file; the output runs forwards, then
   backwards over them until the audio ends. With an avatar cache the whole
   source is prepared and kept: a later job with the same source (or its
   ``avatar_id``) decodes and detects nothing.
3. **Per chunk**: warp and resize the faces, denoise them (DDIM, guidance,
   DeepCache), paste the mouth, warp back into the frames (``paste``), with
   ``restore`` run GFPGAN on the new faces, encode. Frames without a face pass
   through unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from ...avatar_cache import AvatarCache, open_avatar
from ...decode import MediaInfo, load_audio, probe_inputs
from ...device import half_dtype, resolve_device, warm_up_pays
from ...encode import HlsOutput, VideoEncoder, choose_video_codec
from ...engine import LipSyncResult, Progress
from ...errors import ErrorCode, LipSyncError
from ...faces import FaceAnalyzer, load_face_analyzer
from ...options import Acceleration, EngineConfig, LatentSyncOptions
from ...restoration.align import SMOOTH_RADIUS, context_window
from ...restoration.network import FaceRestorer, installed_restorer, missing_weights
from ...restoration.warp import Placement, mix_restored, restore_regions
from ...timing import StageTimer
from .align import FaceAligner, FaceGeometry, resize_faces, warp_faces
from .audio import AudioFeatures, audio_frame_count
from .denoise import ChunkDenoiser, DenoiseSettings
from .models import UNET_CHECKPOINT, LatentSyncModels
from .restore import restore_frames
from .source import FPS, AlignedSource

logger = logging.getLogger(__name__)

ENGINE = "latentsync"  # its avatar cache entries' engine
CHUNK = 16  # frames per UNet call, as trained (the motion modules attend across them)
# The face size each version was trained at.
RESOLUTIONS = {"1.6": 512, "1.5": 256}


class LatentSyncPipeline:
    """LatentSync 1.6 / 1.5 behind the engine interface (:mod:`musetalk_worker.engine`).

    Each version's models load at its first job (or at start, with
    ``EngineConfig.versions``) and stay loaded, in float32 and, once a job asks
    for ``fp16``, in half precision too. ``cache``: the avatar cache, or None.
    """

    def __init__(self, models_dir: Path, device: torch.device, faces: FaceAnalyzer,
                 acceleration: Acceleration = Acceleration(), video_codec: str = "libx264",
                 restorer: Optional[FaceRestorer] = None, cache: Optional[AvatarCache] = None):
        self.models_dir = Path(models_dir)
        self.restorer = restorer
        self.cache = cache
        self.device = device
        self.faces = faces
        self.acceleration = acceleration
        self.video_codec = video_codec
        self._models: Dict[Tuple[str, torch.dtype], LatentSyncModels] = {}

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LatentSyncPipeline":
        """Loads the face back-end, and the versions ``config.versions`` names (others load at first use)."""
        device = resolve_device(config.device)
        restorer = installed_restorer(config.models_dir, device, config.acceleration.restore_dtype,
                                      config.acceleration.restore_batch)
        cache = AvatarCache(config.cache_dir, config.cache_max_bytes) if config.cache_dir is not None else None
        pipe = cls(config.models_dir, device, load_face_analyzer(config.landmarks, config.models_dir, device),
                   config.acceleration, choose_video_codec(config.video_encoder), restorer, cache)
        for version in config.versions:
            pipe.models(version, pipe._dtype(bool(config.fp16)))
        return pipe

    def model_folder(self, version: str) -> Path:
        """The LatentSync model folder of ``version``: the models folder itself when it is one, else its
        ``latentsync-<version>/``.

        Raises:
            LipSyncError(models_missing): this image does not hold ``version``.
        """
        if any((self.models_dir / UNET_CHECKPOINT).with_suffix(s).is_file() for s in (".pt", ".safetensors")):
            return self.models_dir
        folder = self.models_dir / f"latentsync-{version}"
        if not folder.is_dir():
            raise LipSyncError(
                ErrorCode.MODELS_MISSING,
                f"LatentSync {version} is not installed: {folder} does not exist. Build the image with "
                f"--build-arg WEIGHT_COMPONENTS=default,latentsync-{version}, or fetch it with `python -m "
                f"builder.fetch_weights --components latentsync-{version} --dest {self.models_dir}`.",
                stage="load",
            )
        return folder

    def models(self, version: str, dtype: torch.dtype) -> LatentSyncModels:
        """The loaded models of ``version`` in ``dtype`` (loaded now if they are not yet)."""
        if (version, dtype) not in self._models:
            folder = self.model_folder(version)
            self._models[(version, dtype)] = LatentSyncModels.load(folder, self.device, dtype,
                                                                   resolution=_resolution(folder, version))
        return self._models[(version, dtype)]

    def warm_up(self) -> None:
        """Runs each loaded version once on one grey face (one step), so a job pays no kernel set-up.

        Nothing runs where no first call pays set-up (the CPU: :func:`device.warm_up_pays`).
        """
        if not warm_up_pays(self.device):
            return
        for (version, dtype), models in list(self._models.items()):
            denoiser = ChunkDenoiser(models, DenoiseSettings(steps=1, guidance=1.5, deepcache=False),
                                     torch.Generator().manual_seed(0))
            size = models.resolution
            faces = torch.full((1, 3, size, size), 127, dtype=torch.uint8, device=self.device)
            width = models.audio.encoder.dims.n_audio_state
            denoiser(faces, torch.zeros(1, 50, width, device=self.device, dtype=dtype))
        if self.restorer is not None:
            self.restorer.warm_up()

    def __call__(
        self,
        source: Union[Path, MediaInfo, None],
        audio: Union[Path, MediaInfo],
        output: Path,
        options: LatentSyncOptions = LatentSyncOptions(),
        *,
        avatar_id: Optional[str] = None,
        progress: Optional[Progress] = None,
        workdir: Optional[Path] = None,
        hls: Optional[HlsOutput] = None,
        adapter: Optional[Path] = None,
    ) -> LipSyncResult:
        """Makes ``output`` (mp4, 25 fps, as long as ``audio``): the source's face speaking ``audio``.

        Without ``source``, ``avatar_id`` (a result's ``avatar_id``) takes the
        prepared source from the avatar cache.

        Raises:
            LipSyncError: bad media, no face in any frame, a version this image lacks, an ``adapter``
                (LoRA adapters are MuseTalk's), an ``avatar_id`` the cache does not hold, or one prepared
                by MuseTalk or for another face size.
        """
        if adapter is not None:
            raise LipSyncError(ErrorCode.INVALID_INPUT, "'adapter' works with model 'musetalk' only: LoRA adapters "
                               "are fitted on MuseTalk's UNet. Leave it out for model 'latentsync'.", stage="validate")
        if options.restore and self.restorer is None:
            raise missing_weights(self.models_dir)
        report = progress or (lambda stage, done, total: None)
        timer = StageTimer(self.device)
        models = self.models(options.version, self._dtype(options.fp16))

        report("decode", 0, 1)
        with timer("decode"):
            source_info, audio_info = probe_inputs(source, audio)
            samples = load_audio(audio_info)
            total = audio_frame_count(len(samples))
        if total == 0:
            raise LipSyncError(ErrorCode.INVALID_INPUT, f"the audio lasts {len(samples) / 16000:.3f} s, shorter "
                               "than one 25 fps frame; send longer speech.", stage="decode")
        with timer("audio"):
            features = models.audio.features(samples)
        geometry = FaceGeometry(models.resolution)
        settings = DenoiseSettings(steps=options.steps, guidance=options.guidance, deepcache=options.deepcache)
        denoiser = ChunkDenoiser(models, settings, torch.Generator().manual_seed(options.seed))

        avatar = None if source_info is not None else self._avatar(avatar_id, models.resolution, options.version)
        with tempfile.TemporaryDirectory(prefix="latentsync-", dir=workdir) as scratch, \
                self._source(source_info, avatar, geometry, options.version, Path(scratch), timer) as (frames, key), \
                VideoEncoder(Path(output), frames.width, frames.height, FPS, audio_info.path,
                             options.crf, self.video_codec, hls=hls) as encoder:
            report("generate", 0, total)
            for start in range(0, total, CHUNK):
                stop = min(start + CHUNK, total)
                for frame in self._chunk(frames, features, denoiser, geometry, start, stop, options, timer):
                    with timer("encode"):
                        encoder.write(np.ascontiguousarray(frame[..., ::-1]))
                report("generate", stop, total)
            if frames.faces == 0:
                raise LipSyncError(ErrorCode.NO_FACE, "no face was found in any frame of the source; send a video "
                                   "or image where the face is visible and frontal.", stage="prepare")
            report("encode", 0, 1)
            with timer("encode"):
                encoder.close()
        report("encode", 1, 1)
        return LipSyncResult(
            path=Path(output), frames=total, fps=float(FPS), fps_fraction=f"{FPS.numerator}/{FPS.denominator}",
            duration_s=round(len(samples) / 16000, 3), width=frames.width, height=frames.height,
            source_frames=len(frames), frames_without_face=len(frames) - frames.faces, timings=timer.totals(),
            model="latentsync", version=options.version,
            cache_hit=None if self.cache is None else frames.from_cache, avatar_id=key,
        )

    def _avatar(self, avatar_id: Optional[str], resolution: int, version: str) -> AlignedSource:
        """The source prepared as ``avatar_id``, aligned for faces of ``resolution`` pixels.

        Raises:
            LipSyncError(invalid_input): see :func:`open_avatar`; or the avatar's faces are of another size.
        """
        avatar = open_avatar(self.cache, avatar_id, AlignedSource.open, ENGINE)
        if avatar.meta.get("resolution") != resolution:
            avatar.close(delete=False)
            made = avatar.meta.get("version")
            raise LipSyncError(
                ErrorCode.INVALID_INPUT,
                f"'avatar_id' {avatar_id!r} was prepared with LatentSync {made} "
                f"({avatar.meta.get('resolution')}-pixel faces); 'version' {version} works at {resolution}. Send "
                f"'version': '{made}', or the 'source' to prepare it for {version}.",
                stage="validate",
            )
        return avatar

    @contextlib.contextmanager
    def _source(self, info: Optional[MediaInfo], avatar: Optional[AlignedSource], geometry: FaceGeometry,
                version: str, scratch: Path, timer: StageTimer) -> Iterator[Tuple[AlignedSource, Optional[str]]]:
        """The job's aligned source and its avatar id (None without a cache).

        ``avatar`` is an opened cache entry (a job given an avatar id); else the
        source is looked up in the cache, and on a miss prepared as the chunks
        ask. With a cache the rest of the source is prepared once the block
        ends without an error, and the entry kept.
        """
        if self.cache is None:
            frames = AlignedSource.prepare(info, self.faces, FaceAligner(geometry), scratch, timer)
            try:
                yield frames, None
            finally:
                frames.close()
            return
        if avatar is None:
            with timer("cache"):
                key = self.cache.key(info.path, self._preparation_settings(geometry))
                avatar = self.cache.open(key, AlignedSource.open, ENGINE)
        if avatar is not None:
            try:
                yield avatar, avatar.folder.name
            finally:
                avatar.close(delete=False)
            return
        with self.cache.making(key, ENGINE) as folder:
            frames = AlignedSource.prepare(info, self.faces, FaceAligner(geometry), folder, timer)
            # What a job given this avatar's id needs to know of how it was prepared.
            frames.meta = {"resolution": geometry.resolution, "version": version}
            try:
                yield frames, key
                frames.finish()
                with timer("cache"):
                    frames.save()
            finally:
                frames.close(delete=False)

    def _preparation_settings(self, geometry: FaceGeometry) -> Dict[str, object]:
        """Everything besides the source's bytes that changes a prepared source."""
        return {"engine": ENGINE, "faces": self.faces.name, "resolution": geometry.resolution,
                "device": self.device.type}

    def _chunk(self, frames: AlignedSource, features: AudioFeatures, denoiser: ChunkDenoiser,
               geometry: FaceGeometry, start: int, stop: int, options: LatentSyncOptions,
               timer: StageTimer) -> List[np.ndarray]:
        """Output frames ``start:stop`` (RGB): faces warped, denoised, pasted, warped back and restored."""
        sources = [frames.output_source(i) for i in range(start, stop)]
        with timer("read"):
            pictures = [frames[j] for j in sources]
        with_face = [k for k, j in enumerate(sources) if frames.matrix(j) is not None]
        if not with_face:
            return pictures
        with timer("align"):
            matrices = torch.stack([frames.matrix(sources[k]) for k in with_face])
            batch = np.stack([pictures[k] for k in with_face])
            crops = warp_faces(torch.from_numpy(batch).to(self.device), matrices.to(self.device), geometry)
            faces = torch.from_numpy(resize_faces(crops.cpu().numpy(), geometry))
        with timer("audio"):
            audio = features.chunk(start, stop)[with_face]
        with timer.device("generate"):
            pasted = denoiser(faces.to(self.device), audio.to(self.device, denoiser.models.dtype))
        with timer.device("paste"):
            restored, box = restore_frames(batch, pasted.float(), matrices.to(self.device), geometry)
        # A weight of 0 takes nothing of the restored face: skip the network, same frames as restore off.
        if options.restore and options.restore_weight > 0:
            with timer.device("restore"):
                restored = self._restore_faces(restored, [sources[k] for k in with_face], box, frames, options)
        for position, k in enumerate(with_face):
            pictures[k] = restored[position]
        return pictures

    def _restore_faces(self, restored: np.ndarray, sources: List[int], box: Tuple[int, int, int, int],
                       frames: AlignedSource, options: LatentSyncOptions) -> np.ndarray:
        """GFPGAN on the new faces (RGB frames, B x H x W x 3) inside ``box``, the region the paste changed.

        Each face is aligned to GFPGAN's template by its source frame's smoothed five points; the restored
        pixels replace ``restore_weight`` times the region weight (the aligned face, or its mouth) of the
        pasted ones.
        """
        height, width = restored.shape[1:3]
        placements = []
        for j in sources:
            frames.ensure(j + SMOOTH_RADIUS)  # the smoothing looks that far ahead
            to_aligned = frames.track.matrix(j)
            placements.append(Placement(to_aligned, context_window(to_aligned, box, width, height), box))
        rows, cols = box[3] - box[1], box[2] - box[0]
        window_h = max(p.window[3] - p.window[1] for p in placements)
        window_w = max(p.window[2] - p.window[0] for p in placements)
        windows = np.zeros((len(placements), window_h, window_w, 3), np.uint8)
        for i, p in enumerate(placements):
            x1, y1, x2, y2 = p.window
            windows[i, : y2 - y1, : x2 - x1] = restored[i, y1:y2, x1:x2, ::-1]  # restore_regions takes BGR
        pixels, share = restore_regions(self.restorer, torch.from_numpy(windows).to(self.device), placements,
                                        rows, cols, options.restore_region)
        x1, y1, x2, y2 = box
        pasted = torch.from_numpy(np.ascontiguousarray(restored[:, y1:y2, x1:x2, ::-1])).to(self.device).float()
        mixed = mix_restored(pasted, pixels, share, options.restore_weight)
        out = restored.copy()
        out[:, y1:y2, x1:x2] = mixed.to(torch.uint8).cpu().numpy()[..., ::-1]
        return out

    def _dtype(self, fp16: bool) -> torch.dtype:
        return half_dtype(self.device, self.acceleration.half_dtype) if fp16 else torch.float32


def _resolution(folder: Path, version: str) -> Optional[int]:
    """A model folder's own yaml says its resolution; the built-in architecture is trained at the version's."""
    return None if any((folder / "configs" / "unet").glob("*.yaml")) else RESOLUTIONS[version]
