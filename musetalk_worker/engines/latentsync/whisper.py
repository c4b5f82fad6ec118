"""OpenAI Whisper's audio encoder as LatentSync reads it: the hidden state after the input embedding and after
each residual block.

The module is built from an OpenAI checkpoint (``{"dims", "model_state_dict"}``, e.g. ``tiny.pt``) and keeps its
key names, so the checkpoint loads strictly. The text decoder and ``ln_post`` are not built: LatentSync conditions
on the states before ``ln_post``.

Parameters are held in the compute dtype; layer norms and softmax run in float32 whatever it is, as whisper does
when it runs in float16 on CUDA.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ErrorCode, LipSyncError

_PREFIX = "encoder."
# In the checkpoint but not built: LatentSync's states end before it.
_UNUSED_PREFIX = "encoder.ln_post."


@dataclasses.dataclass(frozen=True)
class WhisperDims:
    """The encoder's part of a checkpoint's ``dims``."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int


class LayerNorm(nn.LayerNorm):
    """Layer norm in float32, returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention with whisper's projections (no bias on ``key``)."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, width = x.shape
        q, k, v = (proj(x).view(batch, steps, self.n_head, -1).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, steps, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm self-attention and a 4x GELU MLP, each with a residual."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = SelfAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder without ``ln_post``, returning every hidden state."""

    def __init__(self, dims: WhisperDims):
        super().__init__()
        self.dims = dims
        self.conv1 = nn.Conv1d(dims.n_mels, dims.n_audio_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dims.n_audio_state, dims.n_audio_state, kernel_size=3, stride=2, padding=1)
        # Whisper's sinusoids; the checkpoint holds them (in float16), and upstream uses the checkpoint's copy.
        self.register_buffer("positional_embedding", torch.empty(dims.n_audio_ctx, dims.n_audio_state))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(dims.n_audio_state, dims.n_audio_head)
                                    for _ in range(dims.n_audio_layer))

    @property
    def num_states(self) -> int:
        """How many states :meth:`forward` returns per step: the embedding and one per block."""
        return len(self.blocks) + 1

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """States ``(batch, num_states, n_audio_ctx, n_audio_state)`` of log-mel input
        ``(batch, n_mels, 2 * n_audio_ctx)``: ``[conv2 + GELU + positions, block 1, ..., block n]``."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        # Added in float32 and rounded once, as upstream adds its float32 buffer to a float16 input.
        x = (x.float() + self.positional_embedding.float()).to(x.dtype)
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return torch.stack(states, dim=1)


def load_whisper_encoder(path: Path, device: torch.device, dtype: torch.dtype) -> WhisperEncoder:
    """The encoder of the OpenAI whisper checkpoint at ``path``, in eval mode on ``device`` in ``dtype``.

    Every encoder tensor must be present with its shape, and no other encoder tensor may be there.

    Raises:
        LipSyncError(models_missing): the file is not such a checkpoint, or a tensor is missing, unexpected or of
            the wrong shape (the message names the tensor and the file).
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise _bad_checkpoint(path, f"it is not a readable torch file ({e})") from e
    if not isinstance(checkpoint, Mapping) or "dims" not in checkpoint or "model_state_dict" not in checkpoint:
        raise _bad_checkpoint(path, "it has no 'dims' and 'model_state_dict' (not an OpenAI whisper checkpoint)")
    dims = _dims(path, checkpoint["dims"])
    state = {key[len(_PREFIX):]: value for key, value in checkpoint["model_state_dict"].items()
             if key.startswith(_PREFIX) and not key.startswith(_UNUSED_PREFIX)}
    # Built on the meta device: every tensor comes from the checkpoint.
    with torch.device("meta"):
        encoder = WhisperEncoder(dims)
    expected = encoder.state_dict()
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise _bad_checkpoint(path, f"tensor '{_PREFIX}{missing[0]}' is missing ({len(missing)} missing)")
    unexpected = sorted(state.keys() - expected.keys())
    if unexpected:
        raise _bad_checkpoint(path, f"tensor '{_PREFIX}{unexpected[0]}' is not part of a whisper encoder "
                                    f"with {dims.n_audio_layer} blocks")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise _bad_checkpoint(path, f"tensor '{_PREFIX}{key}' has shape {tuple(state[key].shape)}, "
                                        f"expected {tuple(tensor.shape)} from its dims")
    encoder.load_state_dict(state, strict=True, assign=True)
    return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _dims(path: Path, dims: Any) -> WhisperDims:
    names = [field.name for field in dataclasses.fields(WhisperDims)]
    absent = [name for name in names if not isinstance(dims, Mapping) or name not in dims]
    if absent:
        raise _bad_checkpoint(path, f"its dims lack '{absent[0]}'")
    return WhisperDims(**{name: int(dims[name]) for name in names})


def _bad_checkpoint(path: Path, why: str) -> LipSyncError:
    return LipSyncError(ErrorCode.MODELS_MISSING,
                        f"whisper checkpoint '{path}' cannot be loaded: {why}. Fetch the weights again.",
                        stage="load")
