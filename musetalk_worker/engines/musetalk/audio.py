"""Audio prompts: Whisper encoder features cut into one window per video frame.

The speech is encoded in 30 s windows (Whisper's input size). Each output frame
gets the 10 encoder steps (20 ms each) around its time, from 5 hidden states
(embeddings, three layer outputs and the final normed output), flattened to a
[50, 384] prompt. Windows are encoded on demand and only the two most recent
are kept, so memory does not grow with the length of the audio.

Frame timing uses the exact frame rate (upstream truncates it to an integer,
which drifts lip sync on 29.97 fps video).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from fractions import Fraction

import numpy as np
import torch
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

SAMPLE_RATE = 16000
STEPS_PER_SECOND = 50
WINDOW_SECONDS = 30
WINDOW_STEPS = WINDOW_SECONDS * STEPS_PER_SECOND
_SAMPLES_PER_STEP = SAMPLE_RATE // STEPS_PER_SECOND
# Steps per frame window, and the zero padding (in units of steps per frame) on each side.
_CONTEXT_STEPS = 10
_PAD_LEFT, _PAD_RIGHT = 2, 2


def num_frames(num_samples: int, fps: Fraction) -> int:
    """Number of video frames that cover ``num_samples`` of 16 kHz audio."""
    return math.floor(Fraction(num_samples, SAMPLE_RATE) * Fraction(fps))


class AudioEncoder:
    """Whisper's feature extractor and encoder, loaded once."""

    def __init__(self, extractor: WhisperFeatureExtractor, encoder: WhisperEncoder):
        self.extractor = extractor
        self.encoder = encoder

    @torch.inference_mode()
    def encode_window(self, samples: np.ndarray) -> torch.Tensor:
        """Hidden states [1500, 5, 384] of up to 30 s of 16 kHz audio."""
        param = next(self.encoder.parameters())
        features = self.extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        out = self.encoder(features.to(device=param.device, dtype=param.dtype), output_hidden_states=True)
        return torch.stack(out.hidden_states, dim=2)[0]

    def prompts(self, samples: np.ndarray, fps: Fraction) -> "AudioPrompts":
        """Per-frame prompts for one clip of 16 kHz mono audio at ``fps``."""
        return AudioPrompts(self, samples, Fraction(fps))


class AudioPrompts:
    """The audio prompts of one clip; frames are fetched in slices, in any order."""

    def __init__(self, encoder: AudioEncoder, samples: np.ndarray, fps: Fraction):
        self._encoder = encoder
        self._samples = samples
        self.fps = fps
        self.num_frames = num_frames(len(samples), fps)
        self._num_steps = len(samples) // _SAMPLES_PER_STEP
        self._steps_per_frame = Fraction(STEPS_PER_SECOND) / fps
        self._pad = math.ceil(self._steps_per_frame)
        self._windows: "OrderedDict[int, torch.Tensor]" = OrderedDict()
        self._zero: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, frames: slice) -> torch.Tensor:
        """Prompts [n, 50, 384] for a slice of frame indices (before positional encoding)."""
        return torch.stack([self._frame(i) for i in range(*frames.indices(self.num_frames))])

    def _frame(self, index: int) -> torch.Tensor:
        # In upstream's padded step sequence the window starts at floor(i * 50 / fps);
        # the padding puts step 0 of the audio at position 2 * pad.
        start = math.floor(index * self._steps_per_frame) - _PAD_LEFT * self._pad
        steps = [self._step(s) for s in range(start, start + _CONTEXT_STEPS)]
        return torch.stack(steps).flatten(0, 1)

    def _step(self, step: int) -> torch.Tensor:
        if not 0 <= step < self._num_steps:
            return self._zeros()
        window = self._window(step // WINDOW_STEPS)
        return window[step % WINDOW_STEPS]

    def _zeros(self) -> torch.Tensor:
        if self._zero is None:
            config = self._encoder.encoder.config
            param = next(self._encoder.encoder.parameters())
            self._zero = torch.zeros(config.encoder_layers + 1, config.d_model, device=param.device, dtype=param.dtype)
        return self._zero

    def _window(self, index: int) -> torch.Tensor:
        if index not in self._windows:
            start = index * WINDOW_STEPS * _SAMPLES_PER_STEP
            self._windows[index] = self._encoder.encode_window(
                self._samples[start : start + WINDOW_STEPS * _SAMPLES_PER_STEP]
            )
            while len(self._windows) > 2:
                self._windows.popitem(last=False)
        self._windows.move_to_end(index)
        return self._windows[index]
