"""A models folder (standard layout) with seeded random weights of the real architectures.

Benchmarks need the real models' shapes, not their weights: the time and
memory of a forward pass depend only on the architecture. This builds what the
engine loads, at the real sizes (MuseTalk's 850 M-parameter UNet,
sd-vae-ft-mse's VAE, whisper-tiny, BiSeNet), or shrunk (``--tiny``) for tests::

    python -m bench.random_models --dest DIR [--tiny] [--with-dwpose] [--latentsync 1.5,1.6] [--seed 0]

``--latentsync`` adds each named LatentSync version's folder as the image holds
it (``latentsync-<version>/``): its 1.27 G-parameter UNet3D (upstream's stage2
architecture, as the image stores it: float16 safetensors), OpenAI whisper-tiny's encoder checkpoint
(``whisper/tiny.pt``), the VAE (a link to the one above) and a mouth mask of
upstream's shape (the lower half of the face, to be regenerated). ``--tiny``
shrinks the UNet3D too (a ``configs/unet`` yaml says so, and the resolution).

With ``--with-dwpose`` it adds S3FD and DWPose checkpoints for the ``dwpose``
face back-end (needs mmpose). The S3FD body is random but its prediction heads
are set so that every frame has a face: with random heads no face would be
found and every job would stop with ``no_face``. DWPose's landmarks are random,
so the face boxes are arbitrary; the detection and landmark timings are real.

Files that exist are kept (a build that stops midway leaves no partial file),
so a second run costs nothing. The output is never meant for real jobs: it is
written under ``~/.cache/musetalk-worker/`` by default, never into the repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import zlib
from pathlib import Path
from typing import Callable, Dict, Sequence

import torch

logger = logging.getLogger("bench.random_models")

# Written last; says what the folder holds so that a tiny and a real build never mix.
MARKER = "BENCH_MODELS.json"

# MuseTalk's musetalk.json (v1.5 and v1.0 share it): the SD-1.5 UNet with 8 input channels
# (masked + reference latents) and whisper-tiny's width as the cross-attention width.
UNET_CONFIG: Dict[str, object] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/sd-vae-ft-mse's config.
VAE_CONFIG: Dict[str, object] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

# openai/whisper-tiny's shape. The engine uses the encoder only, and needs its
# 4 layers (5 hidden states) and width 384 exactly.
WHISPER_CONFIG: Dict[str, object] = {
    "d_model": 384,
    "encoder_layers": 4,
    "decoder_layers": 4,
    "encoder_attention_heads": 6,
    "decoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "vocab_size": 51865,
    "max_source_positions": 1500,
    "max_target_positions": 448,
}

# --tiny: the same block types with few channels; the encoder's width and depth
# stay (the engine depends on them), the unused decoder and vocabulary shrink.
_TINY_UNET = {"block_out_channels": [32, 64, 64, 64], "layers_per_block": 1}
_TINY_VAE = {"block_out_channels": [32, 64, 64, 64], "layers_per_block": 1}
_TINY_WHISPER = {
    "decoder_layers": 1,
    "decoder_ffn_dim": 384,
    "vocab_size": 64,
    "pad_token_id": 1,
    "bos_token_id": 2,
    "eos_token_id": 3,
    "decoder_start_token_id": 2,
    "begin_suppress_tokens": None,
    "suppress_tokens": None,
}

# --tiny LatentSync: the same blocks with 32/64 channels (multiples of the norm groups and heads), one layer.
_TINY_LATENTSYNC_UNET = {"block_out_channels": [32, 64, 64, 64], "layers_per_block": 1}
# OpenAI whisper-tiny's dims (the checkpoint's text half is not read by the engine, so not written).
LATENTSYNC_WHISPER_DIMS = {"n_mels": 80, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6,
                           "n_audio_layer": 4, "n_vocab": 51865, "n_text_ctx": 448, "n_text_state": 384,
                           "n_text_head": 6, "n_text_layer": 4}

UNET_DIR = "musetalkV15"
VAE_DIR = "sd-vae"
WHISPER_DIR = "whisper"
BISENET_FILE = Path("face-parse-bisent") / "79999_iter.pth"
# ImageNet ResNet-18: the engine never reads it (the parser's checkpoint holds its
# backbone), but it is in the weights lock and upstream's BiSeNet starts from it.
RESNET18_FILE = Path("face-parse-bisent") / "resnet18-5c106cde.pth"


def default_dest(tiny: bool = False) -> Path:
    """Where the benchmarks cache their random models: ``~/.cache/musetalk-worker/bench-models[-tiny]``."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "musetalk-worker" / ("bench-models-tiny" if tiny else "bench-models")


def build_models(dest: Path, *, tiny: bool = False, with_dwpose: bool = False, latentsync: Sequence[str] = (),
                 seed: int = 0) -> Path:
    """Writes the random models into ``dest`` (standard layout) and returns it.

    Deterministic for a given ``seed``. Files already there are kept.
    ``latentsync``: the LatentSync versions to add (``latentsync-<version>/``).

    Raises:
        ValueError: ``dest`` holds a build of the other size or seed, or a LatentSync version is unknown.
    """
    from musetalk_worker.options import LATENTSYNC_VERSIONS

    unknown = sorted(set(latentsync) - set(LATENTSYNC_VERSIONS))
    if unknown:
        raise ValueError(f"unknown LatentSync version(s) {', '.join(unknown)}: use {', '.join(LATENTSYNC_VERSIONS)}")
    dest = Path(dest).expanduser().resolve()
    variant = {"variant": "tiny" if tiny else "real-architecture", "seed": seed, "random_weights": True}
    marker = dest / MARKER
    if marker.exists():
        found = json.loads(marker.read_text())
        if {k: found.get(k) for k in variant} != variant:
            raise ValueError(f"{dest} holds random models {found}, not {variant}; choose another --dest")
    dest.mkdir(parents=True, exist_ok=True)
    _write_unet(dest, {**UNET_CONFIG, **(_TINY_UNET if tiny else {})}, seed)
    _write_vae(dest, {**VAE_CONFIG, **(_TINY_VAE if tiny else {})}, seed)
    _write_whisper(dest, {**WHISPER_CONFIG, **(_TINY_WHISPER if tiny else {})}, seed)
    _write_bisenet(dest, seed)
    _write_resnet18(dest, seed)
    if with_dwpose:
        _write_s3fd(dest, seed)
        _write_dwpose(dest, seed)
    for version in latentsync:
        _write_latentsync(dest, version, tiny, seed)
    marker.write_text(json.dumps(variant, indent=1) + "\n")
    return dest


def random_state(shapes: Dict[str, torch.Size], seed: int) -> Dict[str, torch.Tensor]:
    """Random tensors for a state dict's ``shapes``, each seeded from ``seed`` and its own name.

    Matrices and kernels get N(0, 1/fan_in), which keeps activations near unit
    scale layer after layer; vectors named ``weight`` (the norms' scales) are 1
    and the rest (biases) N(0, 0.01).
    """
    generator = torch.Generator()
    state = {}
    for name, shape in shapes.items():
        # Seeding per tensor makes each value independent of the order of the others.
        generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        tensor = torch.empty(shape)
        if len(shape) >= 2:
            fan_in = tensor[0].numel()
            tensor.normal_(0.0, fan_in**-0.5, generator=generator)
        elif name.endswith("weight"):
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, 0.01, generator=generator)
        state[name] = tensor
    return state


def _write_unet(dest: Path, config: Dict[str, object], seed: int) -> None:
    from diffusers import UNet2DConditionModel

    folder = dest / UNET_DIR
    folder.mkdir(exist_ok=True)
    if not (folder / "musetalk.json").exists():
        _atomic_write(folder / "musetalk.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    if (folder / "unet.pth").exists():
        return
    # The meta device gives the shapes without initialising 850 M parameters.
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNet2DConditionModel.from_config(config).state_dict().items()}
    state = random_state(shapes, seed)
    logger.info("UNet: %.1f M parameters", sum(t.numel() for t in state.values()) / 1e6)
    _atomic_write(folder / "unet.pth", lambda p: torch.save(state, p))


def _write_vae(dest: Path, config: Dict[str, object], seed: int) -> None:
    from diffusers import AutoencoderKL

    if (dest / VAE_DIR / "config.json").exists():
        return
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config)
    _atomic_dir(dest / VAE_DIR, vae.save_pretrained)


def _write_whisper(dest: Path, config: Dict[str, object], seed: int) -> None:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    if (dest / WHISPER_DIR / "config.json").exists():
        return
    torch.manual_seed(seed)
    model = WhisperModel(WhisperConfig(**config))

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        WhisperFeatureExtractor(feature_size=config["num_mel_bins"]).save_pretrained(folder)

    _atomic_dir(dest / WHISPER_DIR, save)


def _write_bisenet(dest: Path, seed: int) -> None:
    from musetalk_worker.engines.musetalk.bisenet import BiSeNet, _OutputHead

    if (dest / BISENET_FILE).exists():
        return
    torch.manual_seed(seed)
    state = BiSeNet().state_dict()
    # The published checkpoint also holds the two training-only heads (on the
    # 1/16 and 1/32 context features) that the loader drops: keep the file's shape.
    for head in ("conv_out16", "conv_out32"):
        for key, value in _OutputHead(128, 64, 19).state_dict().items():
            state[f"{head}.{key}"] = value
    (dest / BISENET_FILE).parent.mkdir(exist_ok=True)
    _atomic_write(dest / BISENET_FILE, lambda p: torch.save(state, p))


def _write_resnet18(dest: Path, seed: int) -> None:
    from torchvision.models import resnet18

    if (dest / RESNET18_FILE).exists():
        return
    torch.manual_seed(seed)
    (dest / RESNET18_FILE).parent.mkdir(exist_ok=True)
    _atomic_write(dest / RESNET18_FILE, lambda p: torch.save(resnet18(weights=None).state_dict(), p))


def _write_s3fd(dest: Path, seed: int) -> None:
    from musetalk_worker.faces import S3FD_WEIGHTS
    from musetalk_worker.faces.s3fd import S3FD

    if (dest / S3FD_WEIGHTS).exists():
        return
    torch.manual_seed(seed)
    state = S3FD().state_dict()
    # Heads that ignore the image: background on every level but the coarsest,
    # where the first anchor is a face. The body still runs in full.
    for key, value in state.items():
        if "_mbox_" in key:
            value.zero_()
            if "_mbox_conf" in key and key.endswith(".bias"):
                value[:-1] = 10.0
    state["conv7_2_mbox_conf.bias"][:] = torch.tensor([0.0, 10.0])
    (dest / S3FD_WEIGHTS).parent.mkdir(exist_ok=True)
    _atomic_write(dest / S3FD_WEIGHTS, lambda p: torch.save(state, p))


def _write_dwpose(dest: Path, seed: int) -> None:
    from musetalk_worker.faces import DWPOSE_WEIGHTS
    from musetalk_worker.faces.dwpose import build_pose_model

    if (dest / DWPOSE_WEIGHTS).exists():
        return
    torch.manual_seed(seed)
    model = build_pose_model(None)
    # The real file's layout: weights plus the dataset metadata.
    checkpoint = {"state_dict": model.state_dict(), "meta": {"dataset_meta": model.dataset_meta}}
    (dest / DWPOSE_WEIGHTS).parent.mkdir(exist_ok=True)
    _atomic_write(dest / DWPOSE_WEIGHTS, lambda p: torch.save(checkpoint, p))


def _write_latentsync(dest: Path, version: str, tiny: bool, seed: int) -> None:
    """``latentsync-<version>/`` as the weights lock lays it out, from random weights."""
    from safetensors.torch import save_file

    from musetalk_worker.engines.latentsync.models import MASK, UNET_CHECKPOINT, UNET_CONFIGS, VAE_FOLDER
    from musetalk_worker.engines.latentsync.pipeline import RESOLUTIONS
    from musetalk_worker.engines.latentsync.unet import LatentSyncUNet
    from musetalk_worker.engines.latentsync.unet_config import UNetConfig
    from musetalk_worker.engines.latentsync.whisper import WhisperDims, WhisperEncoder

    folder = dest / f"latentsync-{version}"
    folder.mkdir(exist_ok=True)
    config = UNetConfig()
    if tiny:
        (folder / UNET_CONFIGS).mkdir(parents=True, exist_ok=True)
        # A yaml replaces the built-in architecture, so it also says the resolution the version runs at.
        yaml_text = json.dumps({"model": _TINY_LATENTSYNC_UNET, "data": {"resolution": RESOLUTIONS[version]}})
        (folder / UNET_CONFIGS / "stage2.yaml").write_text(yaml_text + "\n")  # JSON is YAML
        config = UNetConfig.from_yaml(folder / UNET_CONFIGS / "stage2.yaml")
    unet_file = (folder / UNET_CHECKPOINT).with_suffix(".safetensors")
    if not unet_file.exists():
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in LatentSyncUNet(config).state_dict().items()}
        state = random_state(shapes, seed)
        logger.info("LatentSync %s UNet3D: %.1f M parameters", version, sum(t.numel() for t in state.values()) / 1e6)
        # The image's conversion of the published float32 checkpoint is float16 (weights.lock.json).
        _atomic_write(unet_file, lambda p: save_file({k: v.half() for k, v in state.items()}, str(p)))
    whisper = folder / "whisper" / "tiny.pt"
    if not whisper.exists():
        dims = WhisperDims(**{k: LATENTSYNC_WHISPER_DIMS[k] for k in WhisperDims.__dataclass_fields__})
        with torch.device("meta"):
            shapes = {f"encoder.{k}": v.shape for k, v in WhisperEncoder(dims).state_dict().items()}
        checkpoint = {"dims": LATENTSYNC_WHISPER_DIMS, "model_state_dict": random_state(shapes, seed)}
        whisper.parent.mkdir(exist_ok=True)
        _atomic_write(whisper, lambda p: torch.save(checkpoint, p))
    if not (folder / VAE_FOLDER).exists():
        (folder / VAE_FOLDER).symlink_to(Path("..") / VAE_DIR)
    if not (folder / MASK).exists():
        _atomic_write(folder / MASK, _write_mouth_mask)


def _write_mouth_mask(path: Path) -> None:
    """A 256x256 mask like upstream's: white (keep the reference) but for a black lower-face region."""
    import cv2
    import numpy as np

    mask = np.full((256, 256, 3), 255, np.uint8)
    cv2.ellipse(mask, (128, 190), (80, 70), 0, 0, 360, (0, 0, 0), thickness=-1)
    path.write_bytes(cv2.imencode(".png", mask)[1].tobytes())


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)
    logger.info("wrote %s (%.1f MiB)", path, path.stat().st_size / 2**20)


def _atomic_dir(folder: Path, save: Callable[[Path], None]) -> None:
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    logger.info("wrote %s/", folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, help="models folder to fill (default ~/.cache/musetalk-worker/bench-models"
                        "[-tiny])")
    parser.add_argument("--tiny", action="store_true", help="shrunk UNet and VAE (for tests), not the real sizes")
    parser.add_argument("--with-dwpose", action="store_true", help="add S3FD + DWPose checkpoints (needs mmpose)")
    parser.add_argument("--latentsync", type=lambda text: [v for v in text.split(",") if v], default=[],
                        help="comma-separated LatentSync versions to add (1.5, 1.6)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        dest = build_models(args.dest or default_dest(args.tiny), tiny=args.tiny, with_dwpose=args.with_dwpose,
                            latentsync=args.latentsync, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
