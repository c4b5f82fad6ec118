"""LatentSync from media files to a lip-synced mp4; models loaded once, one call per job.

A job is one streaming pass, 16 output frames (one chunk) at a time, so memory
stays flat whatever the length:

1. **Audio**: whisper features of the whole speech (small); the output has as
   many 25 fps frames as the audio lasts.
2. **Source**: frames decoded at 25 fps as the chunks need them, each fitted
   to the face template once, in order (the alignment smooths over frames),
   and spilled to a scratch file; the output runs forwards, then backwards
   over them until the audio ends.
3. **Per chunk**: warp and resize the faces, denoise them (DDIM, guidance,
   DeepCache), paste the mouth, warp back into the frames (``paste``), with
   ``restore`` run GFPGAN on the new faces, encode. Frames without a face pass
   through unchanged.
"""

from __future__ import annotations

import logging
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Dict, Generator, List, Optional, Tuple, Union

import numpy as np
import torch

from ...decode import MediaInfo, iter_video_frames, load_audio, probe_inputs, read_image
from ...device import half_dtype, resolve_device, warm_up_pays
from ...encode import HlsOutput, VideoEncoder, choose_video_codec
from ...engine import LipSyncResult, Progress
from ...errors import ErrorCode, LipSyncError
from ...faces import FaceAnalyzer, load_face_analyzer
from ...frame_spill import FrameSpill
from ...options import Acceleration, EngineConfig, LatentSyncOptions
from ...restoration.align import SMOOTH_RADIUS, AlignmentTrack, context_window, five_points
from ...restoration.network import FaceRestorer, installed_restorer, missing_weights
from ...restoration.warp import Placement, mix_restored, restore_regions
from ...timing import StageTimer
from .align import FaceAligner, FaceGeometry, points_from_68, resize_faces, warp_faces
from .audio import AudioFeatures, audio_frame_count
from .denoise import ChunkDenoiser, DenoiseSettings
from .models import UNET_CHECKPOINT, LatentSyncModels
from .restore import restore_frames

logger = logging.getLogger(__name__)

FPS = Fraction(25)
CHUNK = 16  # frames per UNet call, as trained (the motion modules attend across them)
# The face size each version was trained at.
RESOLUTIONS = {"1.6": 512, "1.5": 256}


class LatentSyncPipeline:
    """LatentSync 1.6 / 1.5 behind the engine interface (:mod:`musetalk_worker.engine`).

    Each version's models load at its first job (or at start, with
    ``EngineConfig.versions``) and stay loaded, in float32 and, once a job asks
    for ``fp16``, in half precision too.
    """

    def __init__(self, models_dir: Path, device: torch.device, faces: FaceAnalyzer,
                 acceleration: Acceleration = Acceleration(), video_codec: str = "libx264",
                 restorer: Optional[FaceRestorer] = None):
        self.models_dir = Path(models_dir)
        self.restorer = restorer
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
        pipe = cls(config.models_dir, device, load_face_analyzer(config.landmarks, config.models_dir, device),
                   config.acceleration, choose_video_codec(config.video_encoder), restorer)
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

        Raises:
            LipSyncError: bad media, no face in any frame, a version this image lacks, an ``adapter``
                (LoRA adapters are MuseTalk's).
        """
        if adapter is not None:
            raise LipSyncError(ErrorCode.INVALID_INPUT, "'adapter' works with model 'musetalk' only: LoRA adapters "
                               "are fitted on MuseTalk's UNet. Leave it out for model 'latentsync'.", stage="validate")
        if avatar_id is not None or source is None:
            raise LipSyncError(ErrorCode.INVALID_INPUT, "LatentSync needs the 'source' (avatar ids are MuseTalk's).",
                               stage="validate")
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

        with tempfile.TemporaryDirectory(prefix="latentsync-", dir=workdir) as scratch, \
                _AlignedSource(source_info, self.faces, FaceAligner(geometry), Path(scratch), timer) as frames, \
                VideoEncoder(Path(output), source_info.width, source_info.height, FPS, audio_info.path,
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
            duration_s=round(len(samples) / 16000, 3), width=source_info.width, height=source_info.height,
            source_frames=len(frames), frames_without_face=len(frames) - frames.faces, timings=timer.totals(),
            model="latentsync", version=options.version,
        )

    def _chunk(self, frames: "_AlignedSource", features: AudioFeatures, denoiser: ChunkDenoiser,
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
                       frames: "_AlignedSource", options: LatentSyncOptions) -> np.ndarray:
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


class _AlignedSource:
    """The source's 25 fps frames (RGB) with their alignment, prepared in order as output frames need them.

    Frames go to a scratch file; only their matrices (24 bytes each) stay in
    memory. Output frame ``i`` is source frame ``i`` until the source is used
    up, then the output runs backwards and forwards over it (ping-pong).
    """

    BATCH = 8  # frames per face-detector call

    def __init__(self, info: MediaInfo, faces: FaceAnalyzer, aligner: FaceAligner, scratch: Path, timer: StageTimer):
        self._faces, self._aligner, self._timer = faces, aligner, timer
        self._frames = FrameSpill(scratch / "frames.bin", info.height, info.width)
        self._matrices: List[Optional[torch.Tensor]] = []
        # GFPGAN's five points per frame (None without a face), and their smoothed alignment.
        self._points: List[Optional[np.ndarray]] = []
        self.track = AlignmentTrack(lambda i: self._points[i], lambda: len(self))
        # Generators both, so an early end can close the decoder.
        decoded = iter_video_frames(info, fps=FPS) if info.kind == "video" else (f for f in [read_image(info.path)])
        self._decoded: Optional[Generator[np.ndarray, None, None]] = decoded
        self.faces = 0

    def __enter__(self) -> "_AlignedSource":
        return self

    def __exit__(self, *exc) -> None:
        if self._decoded is not None:
            self._decoded.close()
        self._frames.close()

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._frames[index]

    def matrix(self, index: int) -> Optional[torch.Tensor]:
        """Source frame ``index``'s (2, 3) alignment matrix, or None when it has no face."""
        return self._matrices[index]

    def ensure(self, index: int) -> None:
        """Prepares source frames up to ``index`` (or the source's end)."""
        while self._decoded is not None and len(self) <= index:
            self._prepare_batch()

    def output_source(self, index: int) -> int:
        """The source frame of output frame ``index``, preparing source frames up to it when needed."""
        self.ensure(index)
        if len(self) == 0:
            raise LipSyncError(ErrorCode.UNSUPPORTED_MEDIA, "the source video has no frames to decode.",
                               stage="decode")
        count = len(self)
        if self._decoded is not None or index < count:
            return index
        k = index % (2 * count)
        return k if k < count else 2 * count - 1 - k

    def _prepare_batch(self) -> None:
        with self._timer("decode"):
            batch = [frame for _, frame in zip(range(self.BATCH), self._decoded)]
        if len(batch) < self.BATCH:
            self._decoded.close()
            self._decoded = None
        if not batch:
            return
        with self._timer("faces"):
            detections = self._faces.detect(batch)
        for frame, detection in zip(batch, detections):
            index = self._frames.append(frame[..., ::-1])
            if detection is None:
                self._matrices.append(None)
                self._points.append(None)
                continue
            self._matrices.append(self._aligner.fit(points_from_68(detection.landmarks), index))
            self._points.append(five_points(detection.landmarks))
            self.faces += 1
