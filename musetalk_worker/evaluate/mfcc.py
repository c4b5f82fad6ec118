"""The MFCCs SyncNet was trained on: 13 coefficients at 100 Hz from 16 kHz speech.

The settings are those of ``python_speech_features.mfcc``'s defaults, which the
SyncNet evaluation calls on 16-bit PCM samples: pre-emphasis 0.97, 25 ms
rectangular frames every 10 ms (the last one zero-padded), a 512-point power
spectrum, 26 triangular mel filters over 0..8 kHz, log, orthonormal DCT-II,
a sinusoidal lifter of 22, and the first coefficient replaced by the log frame
energy. SyncNet's weights depend on this exact scale, so the samples are taken
back to the int16 range first.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.fft import dct

SAMPLE_RATE = 16000
STEPS_PER_SECOND = 100
_FRAME = 400  # 25 ms
_STEP = SAMPLE_RATE // STEPS_PER_SECOND  # 10 ms
_NFFT = 512
_FILTERS = 26
_COEFFICIENTS = 13
_PRE_EMPHASIS = 0.97
_LIFTER = 22


def mfcc(samples: np.ndarray) -> np.ndarray:
    """MFCCs [13, steps] (float64) of 16 kHz mono float samples in [-1, 1]; one step is 10 ms."""
    pcm = np.clip(np.round(np.asarray(samples, np.float64) * 32768.0), -32768, 32767)
    emphasised = np.append(pcm[:1], pcm[1:] - _PRE_EMPHASIS * pcm[:-1])
    count = 1 if len(emphasised) <= _FRAME else 1 + math.ceil((len(emphasised) - _FRAME) / _STEP)
    padded = np.zeros((count - 1) * _STEP + _FRAME)
    padded[: len(emphasised)] = emphasised
    frames = np.lib.stride_tricks.sliding_window_view(padded, _FRAME)[::_STEP][:count]
    power = np.abs(np.fft.rfft(frames, _NFFT)) ** 2 / _NFFT
    tiny = np.finfo(float).eps
    energy = power.sum(axis=1)
    energy[energy == 0] = tiny
    bands = power @ _mel_filters().T
    bands[bands == 0] = tiny
    cepstra = dct(np.log(bands), type=2, axis=1, norm="ortho")[:, :_COEFFICIENTS]
    cepstra *= 1 + (_LIFTER / 2) * np.sin(np.pi * np.arange(_COEFFICIENTS) / _LIFTER)
    cepstra[:, 0] = np.log(energy)
    return cepstra.T


def _mel_filters() -> np.ndarray:
    """Triangular filters [26, 257] on FFT bins, edges rounded down to whole bins as the original does."""
    to_mel = lambda hz: 2595 * np.log10(1 + hz / 700.0)  # noqa: E731
    to_hz = lambda mel: 700 * (10 ** (mel / 2595.0) - 1)  # noqa: E731
    edges = np.floor((_NFFT + 1) * to_hz(np.linspace(to_mel(0), to_mel(SAMPLE_RATE / 2), _FILTERS + 2)) / SAMPLE_RATE)
    filters = np.zeros((_FILTERS, _NFFT // 2 + 1))
    bins = np.arange(_NFFT // 2 + 1)
    for j in range(_FILTERS):
        low, mid, high = edges[j : j + 3]
        rising = (bins >= low) & (bins < mid)
        falling = (bins >= mid) & (bins < high)
        filters[j, rising] = (bins[rising] - low) / (mid - low)
        filters[j, falling] = (high - bins[falling]) / (high - mid)
    return filters
