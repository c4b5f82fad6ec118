"""LatentSync's audio conditioning: whisper encoder states, one window of 10 steps x 5 states per 25 fps frame.

As upstream (``latentsync/whisper``): the log-mel is computed once over the whole audio (its clamp uses the global
maximum), cut into 30 s segments zero-padded in log-mel space, and each segment is encoded; the states before
``ln_post`` are kept at 50 steps per second. Frame ``i`` gets steps ``2i-4 ... 2i+5`` clamped to the audio (edge
steps repeat; no zero padding, no positional encoding), flattened time-major to ``(50, width)``.

Memory: the whole log-mel is kept (80 floats per 10 ms: 9.6 MB for 5 minutes), because the clamp needs its
maximum; it is computed one segment at a time so the spectrum is never held whole. Encoder states are computed
per segment when a chunk of frames needs them and at most two segments are held (11.5 MB each for whisper-tiny in
float32), whatever the length of the audio.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from pathlib import Path
from typing import List, Tuple

import librosa
import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ErrorCode, LipSyncError
from ...model_files import require
from .whisper import WhisperEncoder, load_whisper_encoder

SAMPLE_RATE = 16000
FPS = 25
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
# Whisper's input: 30 s of log-mel frames; the encoder halves the rate to 50 steps per second.
SEGMENT_FRAMES = 3000
SEGMENT_STEPS = SEGMENT_FRAMES // 2
# A frame's window around its centre step 2i (upstream's audio_feat_length [2, 2] at 2 steps per frame).
WINDOW_BEFORE = 4
WINDOW_STEPS = 10
WHISPER_CHECKPOINT = "whisper/tiny.pt"


@functools.lru_cache(maxsize=None)
def _mel_filters() -> torch.Tensor:
    # Whisper's mel_filters.npz holds exactly this filterbank (bit-identical with librosa 0.11).
    return torch.from_numpy(librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS))


def log_mel_spectrogram(samples: np.ndarray) -> torch.Tensor:
    """openai-whisper's log-mel ``(80, len(samples) // 160)`` (float32, CPU) of 16 kHz mono audio.

    Hann-windowed STFT (n_fft 400, hop 160, centred with reflect padding, last frame dropped), power, 80 mel
    bands, ``log10(max(x, 1e-10))`` clamped from below at the global maximum minus 8, then ``(x + 4) / 4``.
    """
    frames = len(samples) // HOP_LENGTH
    # numpy's "reflect" is torch.stft's (the edge sample is not repeated).
    padded = torch.from_numpy(np.pad(np.asarray(samples, dtype=np.float32), N_FFT // 2, mode="reflect"))
    window = torch.hann_window(N_FFT)
    mel = torch.empty(N_MELS, frames)
    for start in range(0, frames, SEGMENT_FRAMES):
        stop = min(start + SEGMENT_FRAMES, frames)
        # Frame j of the centred STFT covers padded[160 j : 160 j + 400]; the frame after the last is never used.
        piece = padded[start * HOP_LENGTH:(stop - 1) * HOP_LENGTH + N_FFT]
        spectrum = torch.stft(piece, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
        mel[:, start:stop] = _mel_filters() @ spectrum.abs().pow(2)
    log_mel = mel.clamp_(min=1e-10).log10_()
    return (torch.maximum(log_mel, log_mel.max() - 8.0) + 4.0) / 4.0


def upstream_frame_count(num_steps: int) -> int:
    """Frames upstream makes for ``num_steps`` whisper steps: ``num_steps // 2 + 2`` (2 frames past the audio)."""
    return num_steps // 2 + 2


def audio_frame_count(num_samples: int) -> int:
    """Whole 25 fps frames within ``num_samples`` of 16 kHz audio: ``floor(seconds * 25)``."""
    return num_samples * FPS // SAMPLE_RATE


def window_steps(start: int, stop: int, num_steps: int) -> torch.Tensor:
    """Step indices ``(stop - start, 10)`` of the windows of frames ``start .. stop - 1``, clamped to the audio."""
    first = 2 * torch.arange(start, stop) - WINDOW_BEFORE
    return (first[:, None] + torch.arange(WINDOW_STEPS)).clamp_(0, num_steps - 1)


def upstream_audio_out(samples: np.ndarray, num_frames: int) -> np.ndarray:
    """The samples upstream writes beside its ``num_frames``-frame video: the decoded audio cut at
    ``int(num_frames / 25 * 16000)`` in floating point, as upstream (one sample short for some counts, e.g. 201).
    With upstream's own frame count, 2 frames past the audio, that is all of it."""
    return samples[:int(num_frames / FPS * SAMPLE_RATE)]


def guidance_audio_embeds(audio_embeds: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The UNet's ``encoder_hidden_states`` for a chunk: ``[zeros; audio]`` with classifier-free guidance
    (``guidance_scale > 1``), else the audio embeddings alone."""
    if guidance_scale > 1.0:
        return torch.cat([torch.zeros_like(audio_embeds), audio_embeds])
    return audio_embeds


class LatentSyncAudio:
    """The whisper encoder LatentSync conditions on, loaded once; :meth:`features` serves one audio clip."""

    def __init__(self, encoder: WhisperEncoder):
        self.encoder = encoder

    @classmethod
    def load(cls, models_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> "LatentSyncAudio":
        """Whisper from ``<models_dir>/whisper/tiny.pt`` on ``device``, computing in ``dtype`` (upstream: float16
        on CUDA, float32 on the CPU).

        Raises:
            LipSyncError(models_missing): the file is absent or is not a complete whisper checkpoint.
        """
        return cls(load_whisper_encoder(require(models_dir, WHISPER_CHECKPOINT), device, dtype))

    @torch.inference_mode()
    def encode_segment(self, mel: torch.Tensor) -> torch.Tensor:
        """States ``(frames // 2, 5, width)`` of up to 30 s of log-mel ``(80, frames)``, zero-padded to 30 s."""
        param = next(self.encoder.parameters())
        frames = mel.shape[1]
        padded = F.pad(mel, (0, SEGMENT_FRAMES - frames)).to(device=param.device, dtype=param.dtype)
        return self.encoder(padded[None])[0, :, :frames // 2].transpose(0, 1)

    def features(self, samples: np.ndarray) -> "AudioFeatures":
        """The per-frame features of 16 kHz mono ``samples``, encoded as chunks ask for them.

        Raises:
            LipSyncError(invalid_input): the audio is shorter than one whisper step (20 ms).
        """
        if len(samples) < 2 * HOP_LENGTH:
            raise LipSyncError(ErrorCode.INVALID_INPUT,
                               f"the audio is {len(samples) * 1000 // SAMPLE_RATE} ms long; send at least 20 ms.",
                               stage="audio")
        return AudioFeatures(self, log_mel_spectrogram(samples))


class AudioFeatures:
    """The windows of one clip; ``len()`` is upstream's frame count and :meth:`chunk` gives any range of frames.

    Holds the clip's log-mel and at most two segments of encoder states (the last used), so a chunk that crosses
    a segment boundary, and the chunks after it, encode each segment once when frames are read in order.
    """

    _MAX_SEGMENTS = 2

    def __init__(self, audio: LatentSyncAudio, mel: torch.Tensor):
        self._audio = audio
        self.mel = mel
        self.num_steps = mel.shape[1] // 2
        self._segments: "OrderedDict[int, torch.Tensor]" = OrderedDict()

    def __len__(self) -> int:
        return upstream_frame_count(self.num_steps)

    @property
    def segment_bounds(self) -> List[Tuple[int, int]]:
        """``[start, end)`` in mel frames of each 30 s segment."""
        frames = self.mel.shape[1]
        return [(start, min(start + SEGMENT_FRAMES, frames)) for start in range(0, frames, SEGMENT_FRAMES)]

    @property
    def cached_segments(self) -> Tuple[int, ...]:
        """The segments whose states are held now, least recently used first."""
        return tuple(self._segments)

    def segment(self, index: int) -> torch.Tensor:
        """Encoder states ``(steps, 5, width)`` of segment ``index``: steps ``1500 index ...`` of the clip."""
        if index not in self._segments:
            # Make room first, so no more than two segments are ever held.
            while len(self._segments) >= self._MAX_SEGMENTS:
                self._segments.popitem(last=False)
            start, end = self.segment_bounds[index]
            self._segments[index] = self._audio.encode_segment(self.mel[:, start:end])
        self._segments.move_to_end(index)
        return self._segments[index]

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        """Windows ``(stop - start, 50, width)`` of frames ``start .. stop - 1`` (0 <= start <= stop <= len)."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"frames {start}..{stop} are outside 0..{len(self)}")
        encoder = self._audio.encoder
        param = next(encoder.parameters())
        steps = window_steps(start, stop, self.num_steps)
        owner = steps // SEGMENT_STEPS
        out = param.new_empty(*steps.shape, encoder.num_states, encoder.dims.n_audio_state)
        # One segment at a time, so a long range still holds no more than two.
        for index in torch.unique(owner).tolist():
            picked = owner == index
            out[picked.to(out.device)] = self.segment(index)[(steps[picked] - index * SEGMENT_STEPS).to(out.device)]
        return out.flatten(1, 2)
