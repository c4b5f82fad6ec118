"""LatentSync's audio features: upstream's arrays in every parity fixture case, strict loading of the whisper
checkpoint, and on-demand encoding of long audio with at most two segments held."""

from __future__ import annotations

import functools
import wave
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch

import latentsync_fixtures
from musetalk_worker.decode import load_audio, probe
from musetalk_worker.engines.latentsync.audio import (
    WHISPER_CHECKPOINT, AudioFeatures, LatentSyncAudio, audio_frame_count, guidance_audio_embeds,
    log_mel_spectrogram, upstream_audio_out,
)
from musetalk_worker.errors import ErrorCode, LipSyncError

CASES = latentsync_fixtures.fixture_cases()
CPU = torch.device("cpu")


def _relative_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    assert tuple(actual.shape) == expected.shape
    return float(np.abs(actual.numpy() - expected).max() / np.abs(expected).max())


@functools.lru_cache(maxsize=None)
def _audio(folder: Path) -> LatentSyncAudio:
    return LatentSyncAudio.load(folder / "models", CPU, torch.float32)


def _wav(folder: Path, case: str) -> Path:
    return folder / f"{latentsync_fixtures.load(folder).cases[case]['audio']}.wav"


@functools.lru_cache(maxsize=None)
def _case(folder: Path, case: str) -> Tuple[np.ndarray, AudioFeatures]:
    samples = load_audio(probe(_wav(folder, case)))
    return samples, _audio(folder).features(samples)


@pytest.mark.parametrize("folder, case", CASES)
def test_decode_is_upstreams_s16_read(folder: Path, case: str):
    # Upstream reads s16 and divides by 32768; the fixtures' wavs are 16 kHz mono s16, so this must be exact.
    with wave.open(str(_wav(folder, case))) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        raw = np.frombuffer(wav.readframes(wav.getnframes()), np.int16).astype(np.float32) / 32768.0
    np.testing.assert_array_equal(_case(folder, case)[0], raw)


@pytest.mark.parametrize("folder, case", CASES)
def test_mel(folder: Path, case: str):
    expected = latentsync_fixtures.load(folder).array(case, "mel")
    mel = _case(folder, case)[1].mel
    assert tuple(mel.shape) == expected.shape
    assert float(np.abs(mel.numpy() - expected).max()) <= 1e-5


@pytest.mark.parametrize("folder, case", CASES)
def test_segment_bounds(folder: Path, case: str):
    expected = latentsync_fixtures.load(folder).array(case, "whisper_segment_bounds")
    assert _case(folder, case)[1].segment_bounds == [tuple(bounds) for bounds in expected.tolist()]


@pytest.mark.parametrize("folder, case", CASES)
def test_whisper_feature(folder: Path, case: str):
    features = _case(folder, case)[1]
    feature = torch.cat([features.segment(index) for index in range(len(features.segment_bounds))])
    assert _relative_error(feature, latentsync_fixtures.load(folder).array(case, "whisper_feature")) <= 1e-4


@pytest.mark.parametrize("folder, case", CASES)
def test_whisper_chunks(folder: Path, case: str):
    fixture = latentsync_fixtures.load(folder)
    samples, features = _case(folder, case)
    assert len(features) == fixture.cases[case]["num_output_frames"]
    # Upstream's count is always 2 frames past the whole frames of audio.
    assert len(features) == audio_frame_count(len(samples)) + 2
    assert _relative_error(features.chunk(0, len(features)), fixture.array(case, "whisper_chunks")) <= 1e-4


@pytest.mark.parametrize("folder, case", CASES)
def test_audio_embeds_first_chunk(folder: Path, case: str):
    fixture = latentsync_fixtures.load(folder)
    features = _case(folder, case)[1]
    first = features.chunk(0, min(fixture.settings["chunk_size"], len(features)))
    embeds = guidance_audio_embeds(first, fixture.cases[case]["guidance"])
    assert _relative_error(embeds, fixture.array(case, "audio_embeds_first_chunk")) <= 1e-4


@pytest.mark.parametrize("folder, case", CASES)
def test_float16_compute(folder: Path, case: str):
    # The CUDA path's dtype, run on the CPU: a loose bound, since upstream's float16 arrays come from a GPU only.
    audio = LatentSyncAudio.load(folder / "models", CPU, torch.float16)
    features = audio.features(_case(folder, case)[0])
    chunks = features.chunk(0, len(features))
    assert chunks.dtype == torch.float16
    assert _relative_error(chunks.float(), latentsync_fixtures.load(folder).array(case, "whisper_chunks")) <= 1e-2


@pytest.mark.parametrize("folder, case", CASES)
def test_audio_out(folder: Path, case: str):
    samples, features = _case(folder, case)
    expected = latentsync_fixtures.load(folder).array(case, "audio_out")
    np.testing.assert_array_equal(upstream_audio_out(samples, len(features)), expected)


def test_audio_out_cuts_as_upstreams_float_arithmetic():
    samples = np.arange(200_000, dtype=np.float32)
    # int(201 / 25 * 16000) is 128639 in floating point, one sample short of 201 frames of 640 samples.
    assert len(upstream_audio_out(samples, 201)) == 128_639
    assert len(upstream_audio_out(samples, 200)) == 128_000
    # Upstream's video is longer than its audio, so it writes all of it.
    assert len(upstream_audio_out(samples, audio_frame_count(len(samples)) + 2)) == len(samples)


def _fixture_checkpoint() -> Path:
    folders = latentsync_fixtures.fixture_dirs()
    if not folders:
        pytest.skip("no LatentSync parity fixture")
    return folders[0] / "models" / WHISPER_CHECKPOINT


def _drop_key(state: dict) -> str:
    key = "encoder.blocks.0.attn.key.weight"
    del state[key]
    return key


def _reshape_key(state: dict) -> str:
    key = "encoder.conv1.bias"
    state[key] = state[key][:-1]
    return key


def _extra_block(state: dict) -> str:
    key = "encoder.blocks.99.mlp_ln.bias"
    state[key] = state["encoder.blocks.0.mlp_ln.bias"]
    return key


@pytest.mark.parametrize("damage", [_drop_key, _reshape_key, _extra_block], ids=["missing", "shape", "unexpected"])
def test_strict_load_names_the_tensor_and_the_file(tmp_path: Path, damage):
    checkpoint = torch.load(_fixture_checkpoint(), map_location="cpu", weights_only=True)
    key = damage(checkpoint["model_state_dict"])
    path = tmp_path / WHISPER_CHECKPOINT
    path.parent.mkdir()
    torch.save(checkpoint, path)
    with pytest.raises(LipSyncError) as raised:
        LatentSyncAudio.load(tmp_path, CPU)
    assert raised.value.code is ErrorCode.MODELS_MISSING
    assert key in raised.value.message and str(path) in raised.value.message


def test_missing_checkpoint_names_the_file(tmp_path: Path):
    with pytest.raises(LipSyncError) as raised:
        LatentSyncAudio.load(tmp_path, CPU)
    assert raised.value.code is ErrorCode.MODELS_MISSING
    assert WHISPER_CHECKPOINT in raised.value.message


def test_audio_shorter_than_a_step_is_refused():
    audio = LatentSyncAudio.load(_fixture_checkpoint().parents[1], CPU)
    with pytest.raises(LipSyncError) as raised:
        audio.features(np.zeros(319, np.float32))
    assert raised.value.code is ErrorCode.INVALID_INPUT


def _speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Tones with a syllable-rate envelope, loudness that changes over time, and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    voice = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in (140, 280, 700, 1200, 2500))
    envelope = (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) * (0.2 + 0.8 * np.abs(np.sin(2 * np.pi * t / 23)))
    return (0.05 * envelope * voice + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def _whisper_mel(samples: np.ndarray) -> np.ndarray:
    """openai-whisper's formula over the whole audio at once (one STFT, last frame dropped)."""
    import librosa
    audio = torch.from_numpy(samples)
    spectrum = torch.stft(audio, 400, 160, window=torch.hann_window(400), return_complex=True)[:, :-1]
    filters = torch.from_numpy(librosa.filters.mel(sr=16000, n_fft=400, n_mels=80))
    log_mel = (filters @ spectrum.abs() ** 2).clamp(min=1e-10).log10()
    return ((torch.maximum(log_mel, log_mel.max() - 8.0) + 4.0) / 4.0).numpy()


def test_long_audio_is_encoded_on_demand_two_segments_at_most():
    audio = LatentSyncAudio.load(_fixture_checkpoint().parents[1], CPU)
    samples = _speech_like(70.0)
    mel = log_mel_spectrogram(samples)
    assert float(np.abs(mel.numpy() - _whisper_mel(samples)).max()) <= 1e-5

    features = audio.features(samples)
    assert features.segment_bounds == [(0, 3000), (3000, 6000), (6000, 7000)]
    steps = features.num_steps
    assert steps == 3500 and len(features) == audio_frame_count(len(samples)) + 2 == 1752

    # Reference: every segment encoded, concatenated, then upstream's clamped windows taken from the whole array.
    whole = torch.cat([audio.encode_segment(features.mel[:, start:end]) for start, end in features.segment_bounds])
    windows = [[min(max(2 * i - 4 + j, 0), steps - 1) for j in range(10)] for i in range(len(features))]
    expected = whole[torch.tensor(windows)].flatten(1, 2)

    held_at_encode: List[int] = []
    hook = audio.encoder.register_forward_hook(lambda *_: held_at_encode.append(len(features.cached_segments)))
    try:
        chunks = []
        for start in range(0, len(features), 16):
            chunks.append(features.chunk(start, min(start + 16, len(features))))
            assert len(features.cached_segments) <= 2
        # In order, each segment is encoded once, including across the chunks that straddle a boundary.
        assert len(held_at_encode) == 3
        assert torch.equal(torch.cat(chunks), expected)

        rng = np.random.default_rng(1)
        ranges = [(740, 760), (1490, 1510), (0, 5), (1745, 1752), (10, 1700)]
        ranges += [tuple(sorted(rng.integers(0, len(features) + 1, 2).tolist())) for _ in range(5)]
        for start, stop in ranges:
            assert torch.equal(features.chunk(start, stop), expected[start:stop]), (start, stop)
            assert len(features.cached_segments) <= 2
        assert torch.equal(features.chunk(0, len(features)), expected)
    finally:
        hook.remove()
    # Room is made before a segment is encoded, so at most one other is held while it is.
    assert max(held_at_encode) <= 1
