"""``train fit``: a LoRA (or, with ``full``, the whole UNet) fitted on a prepared cache.

The loss is upstream's first stage: L1 between the VAE-decoded UNet output and
the real 256x256 face, the reference latent taken from another time of the
same clip. The VAE and Whisper stay frozen; gradients pass through the
decoder. On a GPU the forward runs under bf16 autocast with gradient
checkpointing in the UNet and the decoder. Under ``torchrun`` (or
``accelerate launch``, which sets the same variables) every process draws its
own batches and the gradients are averaged (DDP; NCCL on GPUs, gloo on the CPU);
only rank 0 prints and writes.

Evaluation is on a fixed set of held-out frames: L1 of the whole face and of
its lower (mouth) half, in 0..1 units, and the mouth's PSNR.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..device import resolve_device
from ..engines.musetalk.generate import positional_encoding
from ..engines.musetalk.models import UNET_CONFIG, UNET_FILES, load_unet, load_vae
from .adapter import TARGET_MODULES, add_lora, lora_tensors, save_adapter, sha256_file
from .data import Batch, FrameCache

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
EVAL_FRAMES = 64


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """What to fit and how. ``lr`` None: 1e-4 for a LoRA, 1e-5 for the full UNet; ``alpha`` None: the rank;
    ``eval_every`` None: a fifth of the steps; ``checkpoint_every`` None: at every evaluation."""

    steps: int
    rank: int = 16
    alpha: Optional[float] = None
    lr: Optional[float] = None
    batch: int = 4
    full: bool = False
    holdout: float = 0.2
    eval_every: Optional[int] = None
    checkpoint_every: Optional[int] = None
    seed: int = 0
    version: str = "v15"

    def __post_init__(self) -> None:
        for name in ("steps", "rank", "batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be between 0 and 1, got {self.holdout}")
        if self.version not in UNET_FILES:
            raise ValueError(f"version must be one of {', '.join(UNET_FILES)}, got {self.version!r}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-5 if self.full else 1e-4)

    @property
    def evaluation_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 5)


def fit(data: Path, models_dir: Path, out: Path, options: FitOptions, device: str = "auto",
        emit: Callable[[dict], None] = lambda line: print(json.dumps(line), flush=True)) -> dict:
    """Fits, writes the adapter into ``out`` and returns the summary (also given to ``emit``, rank 0 only).

    A ``checkpoint.pt`` in ``out`` from an interrupted run with the same options is resumed.
    """
    rank, world = _init_distributed()
    chosen = resolve_device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if world > 1 and device != "cpu"
                            and torch.cuda.is_available() else device)
    out = Path(out)
    cache = FrameCache(data, options.holdout)
    unet = load_unet(models_dir, options.version, chosen, torch.float32)
    vae = load_vae(models_dir, chosen, torch.float32)
    alpha = options.alpha if options.alpha is not None else float(options.rank)
    if options.full:
        unet.requires_grad_(True)
        trainable = list(unet.parameters())
    else:
        trainable = add_lora(unet, options.rank, alpha)
    if chosen.type == "cuda":
        unet.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    unet.train()
    model = torch.nn.parallel.DistributedDataParallel(unet) if world > 1 else unet
    optimizer = torch.optim.AdamW(trainable, lr=options.learning_rate, weight_decay=0.0)
    step_fn = _Forward(vae, chosen)

    state = _resume(out, options, unet, optimizer, trainable, chosen)
    held_out = cache.fixed(cache.held_out, EVAL_FRAMES, options.seed)
    if state is None:
        state = {"step": 0, "losses": [], "evals": [{"step": 0, **step_fn.evaluate(unet, held_out)}]}
        if rank == 0:
            emit({"step": 0, "eval": state["evals"][0]})
    for step in range(state["step"], options.steps):
        generator = torch.Generator().manual_seed(options.seed * 1_000_003 + step * 131 + rank)
        loss = step_fn.loss(model, cache.sample(cache.train, options.batch, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.detach()
        if world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.AVG)
        state["losses"].append(float(value))
        state["step"] = step + 1
        done = state["step"]
        if done % options.evaluation_interval == 0 or done == options.steps:
            result = {"step": done, **step_fn.evaluate(unet, held_out)}
            state["evals"].append(result)
            if rank == 0:
                emit({"step": done, "loss": state["losses"][-1], "eval": result})
        if rank == 0 and (done % (options.checkpoint_every or options.evaluation_interval) == 0) \
                and done < options.steps:
            _save_checkpoint(out, options, unet, optimizer, trainable, state)

    summary = _summary(options, state, out)
    if rank == 0:
        _write_output(out, models_dir, options, alpha, unet, state)
        (out / CHECKPOINT).unlink(missing_ok=True)
        emit(summary)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


class _Forward:
    """The training forward (UNet at t=0, VAE decode, L1) and the held-out evaluation."""

    def __init__(self, vae: torch.nn.Module, device: torch.device):
        self.vae = vae
        self.device = device
        self.positions = positional_encoding(50, 384).to(device)
        self.timestep = torch.zeros(1, dtype=torch.long, device=device)

    def faces(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Generated faces [B, 3, 256, 256] in [-1, 1] (float32)."""
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        with autocast:
            prompts = batch.prompts.to(self.device) + self.positions
            pred = model(batch.latents.to(self.device), self.timestep, encoder_hidden_states=prompts).sample
            return self.vae.decode(pred / self.vae.config.scaling_factor).sample.float()

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return F.l1_loss(self.faces(model, batch), batch.targets.to(self.device))

    @torch.no_grad()
    def evaluate(self, unet: torch.nn.Module, batches: List[Batch]) -> Dict[str, float]:
        was_training = unet.training
        unet.eval()
        face = mouth = squared = 0.0
        count = 0
        for batch in batches:
            made = (self.faces(unet, batch).clamp(-1, 1) + 1) / 2
            real = (batch.targets.to(self.device) + 1) / 2
            diff = made - real
            half = diff[:, :, diff.shape[2] // 2:]
            face += float(diff.abs().mean(dim=(1, 2, 3)).sum())
            mouth += float(half.abs().mean(dim=(1, 2, 3)).sum())
            squared += float(half.square().mean(dim=(1, 2, 3)).sum())
            count += len(diff)
        unet.train(was_training)
        mse = squared / count
        return {"l1": face / count, "mouth_l1": mouth / count,
                "mouth_psnr": 10 * math.log10(1 / mse) if mse > 0 else math.inf, "frames": count}


def _init_distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _trainable_state(unet, trainable_full: bool) -> Dict[str, torch.Tensor]:
    if trainable_full:
        return {k: v.detach().float().cpu().contiguous() for k, v in unet.state_dict().items()}
    return lora_tensors(unet)


def _options_key(options: FitOptions) -> dict:
    # Options that change what the checkpoint's tensors mean; steps and intervals may change on resume.
    return {k: getattr(options, k) for k in ("rank", "alpha", "full", "holdout", "seed", "version", "batch", "lr")}


def _save_checkpoint(out, options, unet, optimizer, trainable, state) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"options": _options_key(options), "params": [p.detach().cpu() for p in trainable],
               "optimizer": optimizer.state_dict(), "state": state}
    torch.save(payload, out / f"{CHECKPOINT}.tmp")
    os.replace(out / f"{CHECKPOINT}.tmp", out / CHECKPOINT)


def _resume(out, options, unet, optimizer, trainable, device) -> Optional[dict]:
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload["options"] != _options_key(options):
        logger.warning("%s was made with other options (%s): starting afresh", path, payload["options"])
        return None
    with torch.no_grad():
        for param, saved in zip(trainable, payload["params"]):
            param.copy_(saved.to(device))
    optimizer.load_state_dict(payload["optimizer"])
    logger.info("resumed from %s at step %d", path, payload["state"]["step"])
    return payload["state"]


def _summary(options: FitOptions, state: dict, out: Path) -> dict:
    losses = state["losses"]
    tenth = max(1, len(losses) // 10)
    return {"steps": state["step"], "loss_start": sum(losses[:tenth]) / tenth, "loss_end": sum(losses[-tenth:]) / tenth,
            "adapter": str(out), "eval": {"before": state["evals"][0], "after": state["evals"][-1]}}


def _write_output(out: Path, models_dir: Path, options: FitOptions, alpha: float, unet, state: dict) -> None:
    folder, candidates = UNET_FILES[options.version]
    files = [f"{folder}/{UNET_CONFIG}"] + [f"{folder}/{c}" for c in candidates if (Path(models_dir) / folder / c).exists()][:1]
    meta = {
        "base": {"version": options.version, "files": {f: sha256_file(Path(models_dir) / f) for f in files}},
        "rank": options.rank, "alpha": alpha, "target_modules": list(TARGET_MODULES),
        "steps": state["step"], "options": dataclasses.asdict(options),
        "eval": {"before": state["evals"][0], "after": state["evals"][-1]},
    }
    if options.full:
        meta = {k: v for k, v in meta.items() if k not in ("rank", "alpha", "target_modules")}
    save_adapter(out, _trainable_state(unet, options.full), meta, full=options.full)
