"""LatentSync's UNet3D: upstream's architecture and keys, strict loading, parity with every fixture, DeepCache.

Parity bounds are the fixture README's (noise_pred ≤ 1e-4 × max abs, 1e-3 at the last step) wherever float32
can reproduce a fixture value; see ``ROUNDING_SHARE`` for the inputs where it cannot.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import yaml
from safetensors.torch import save_file

import latentsync_fixtures
from musetalk_worker.engines.latentsync.unet import DeepCache, LatentSyncUNet, load_unet
from musetalk_worker.engines.latentsync.unet_config import UNetConfig
from musetalk_worker.errors import ErrorCode, LipSyncError

CPU = torch.device("cpu")
CHUNK = 16
# A 3.1 M-element UNet of the real block structure for the tests that need no fixture.
SMALL = UNetConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=16)

# The fixtures' tiny UNet at resolution 64 (8×8 latents) narrows to 1×1 maps, where the per-frame group norms of
# the transformers and motion modules normalise 2 values per group: there a float32 rounding of the input moves
# the output by up to 1e-2 × max abs (measured), and upstream's own code run here misses such fixture values by
# up to 2e-3. A fixture value is held to the README bound when our float32 and float64 results agree within a
# tenth of it; otherwise it is not float32-reproducible and only gross errors are caught.
ROUNDING_SHARE = 0.1
ILL_CONDITIONED_BOUND = 3e-2


def _meta_state(config: UNetConfig) -> Dict[str, torch.Tensor]:
    with torch.device("meta"):
        return LatentSyncUNet(config).state_dict()


def _config_path(folder: Path) -> Path:
    (path,) = (folder / "models" / "configs" / "unet").glob("*.yaml")
    return path


# --- architecture -------------------------------------------------------------------------------------------


def test_stage2_architecture_has_upstreams_keys_and_sizes():
    state = _meta_state(UNetConfig())
    assert len(state) == 1246
    assert sum(t.numel() for t in state.values()) == 1_267_944_644
    shapes = {
        "conv_in.weight": (320, 13, 3, 3),
        "time_embedding.linear_1.weight": (1280, 320),
        "time_embedding.linear_2.weight": (1280, 1280),
        "down_blocks.0.resnets.0.time_emb_proj.weight": (320, 1280),
        "down_blocks.0.attentions.0.proj_in.weight": (320, 320, 1, 1),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 384),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.bias": (320,),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "down_blocks.1.resnets.0.conv_shortcut.weight": (640, 320, 1, 1),
        "down_blocks.2.downsamplers.0.conv.weight": (1280, 1280, 3, 3),
        "down_blocks.3.motion_modules.1.temporal_transformer.proj_in.weight": (1280, 1280),
        "down_blocks.3.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe":
            (1, 24, 1280),
        "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe":
            (1, 24, 320),
        "mid_block.resnets.1.conv2.weight": (1280, 1280, 3, 3),
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight": (1280, 384),
        "up_blocks.0.resnets.0.conv1.weight": (1280, 2560, 3, 3),
        "up_blocks.0.upsamplers.0.conv.weight": (1280, 1280, 3, 3),
        "up_blocks.1.resnets.2.conv1.weight": (1280, 1920, 3, 3),
        "up_blocks.3.resnets.0.conv1.weight": (320, 960, 3, 3),
        "up_blocks.3.resnets.2.conv1.weight": (320, 640, 3, 3),
        "up_blocks.3.motion_modules.2.temporal_transformer.transformer_blocks.0.ff_norm.weight": (320,),
        "conv_norm_out.weight": (320,),
        "conv_out.weight": (4, 320, 3, 3),
    }
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert sum(k.endswith(".pos_encoder.pe") for k in state) == 40
    assert not any(k.startswith("mid_block.motion_modules") or k.startswith("up_blocks.3.upsamplers") for k in state)
    assert not any(k.endswith(("to_q.bias", "to_k.bias", "to_v.bias")) for k in state)
    assert [k for k in state if k.startswith("up_blocks.3.resnets.")].count("up_blocks.3.resnets.2.conv2.weight") == 1


@pytest.mark.parametrize("latent", [32, 64], ids=["v1.5-256", "v1.6-512"])
def test_stage2_runs_a_chunk_on_the_meta_device(latent):
    with torch.device("meta"), torch.no_grad():
        cache = DeepCache(LatentSyncUNet().eval())
        sample, audio = torch.empty(2, 13, CHUNK, latent, latent), torch.empty(2 * CHUNK, 50, 384)
        assert cache(0, sample, 951, audio).shape == (2, 4, CHUNK, latent, latent)
        assert cache(1, sample, 901, audio).shape == (2, 4, CHUNK, latent, latent)
        with pytest.raises(ValueError, match="exceed the motion modules' position encoding"):
            cache.unet(torch.empty(1, 13, 25, latent, latent), 951, torch.empty(25, 50, 384))


def test_without_motion_modules_the_size_is_that_of_1_0():
    state = _meta_state(UNetConfig(use_motion_module=False))
    assert sum(t.numel() for t in state.values()) == 849_962_244
    assert not any("motion_modules" in k for k in state)


@pytest.mark.parametrize("folder", latentsync_fixtures.fixture_dirs(), ids=lambda p: p.name)
@pytest.mark.parametrize("resolution", [256, 512], ids=["v1.5", "v1.6"])
def test_upstream_stage2_yaml_builds_the_stage2_architecture(folder, resolution, tmp_path):
    # The fixture's yaml is upstream's stage2.yaml with three sizes shrunk; put the real ones back, and write
    # norm_eps as upstream does (`1e-5`, which PyYAML reads as a string).
    settings = yaml.safe_load(_config_path(folder).read_text())
    settings["data"]["resolution"] = resolution
    settings["model"].update(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                             cross_attention_dim=384, norm_eps="1e-5")
    path = tmp_path / "stage2.yaml"
    path.write_text(yaml.safe_dump(settings))
    config = UNetConfig.from_yaml(path)
    assert config == UNetConfig()
    expected = {k: v.shape for k, v in _meta_state(UNetConfig()).items()}
    assert {k: v.shape for k, v in _meta_state(config).items()} == expected


@pytest.mark.parametrize("key, value, named", [
    ("resnet_time_scale_shift", "scale_shift", "model.resnet_time_scale_shift"),
    ("use_inflated_groupnorm", True, "model.use_inflated_groupnorm"),
    ("transformer_layers_per_block", 2, "model.transformer_layers_per_block"),
    ("layers_per_block", "two", "model.layers_per_block"),
    ("motion_module_kwargs", {"attention_block_types": ["Temporal_Cross"]}, "Temporal_Cross"),
    ("block_out_channels", [320, 640, 1280], "same length"),
])
def test_config_reader_names_what_it_cannot_run(key, value, named, tmp_path):
    path = tmp_path / "unet.yaml"
    path.write_text(yaml.safe_dump({"model": {"in_channels": 13, key: value}}))
    with pytest.raises(LipSyncError) as caught:
        UNetConfig.from_yaml(path)
    assert caught.value.code is ErrorCode.MODELS_MISSING and caught.value.stage == "load"
    assert named in caught.value.message and str(path) in caught.value.message


def test_config_reader_needs_a_model_section(tmp_path):
    path = tmp_path / "unet.yaml"
    path.write_text("data:\n  resolution: 256\n")
    with pytest.raises(LipSyncError, match="no 'model:' section"):
        UNetConfig.from_yaml(path)


# --- loading ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", latentsync_fixtures.fixture_dirs(), ids=lambda p: p.name)
def test_fixture_unet_loads_strictly(folder):
    fixture = latentsync_fixtures.load(folder)
    checkpoint = fixture.models / "latentsync_unet.pt"
    unet = load_unet(checkpoint, UNetConfig.from_yaml(_config_path(folder)), CPU, torch.float32)
    state = unet.state_dict()
    assert len(state) == fixture.settings["models"]["unet_tensors"]
    assert sum(t.numel() for t in state.values()) == fixture.settings["models"]["unet_elements"]
    expected = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())


@pytest.fixture
def small_checkpoint(tmp_path) -> Tuple[Path, Dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state = LatentSyncUNet(SMALL).state_dict()
    path = tmp_path / "latentsync_unet.pt"
    torch.save({"state_dict": state, "global_step": 0}, path)
    return path, state


def _edit(state: Dict[str, torch.Tensor], how: str) -> Tuple[Dict[str, torch.Tensor], str]:
    state = dict(state)
    key = "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight"
    if how == "missing":
        del state[key]
    elif how == "unexpected":
        key = "up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.bias"
        state[key] = torch.zeros(64)
    else:
        state[key] = torch.zeros(64, 384)
    return state, key


@pytest.mark.parametrize("how", ["missing", "unexpected", "misshaped"])
def test_a_checkpoint_that_does_not_match_is_refused_naming_the_key(how, small_checkpoint, tmp_path):
    _, state = small_checkpoint
    edited, key = _edit(state, how)
    path = tmp_path / "edited.pt"
    torch.save({"state_dict": edited, "global_step": 0}, path)
    with pytest.raises(LipSyncError) as caught:
        load_unet(path, SMALL, CPU, torch.float32)
    error = caught.value
    assert error.code is ErrorCode.MODELS_MISSING and error.stage == "load"
    assert str(path) in error.message and key in error.message and "LatentSync 1.5/1.6" in error.message
    assert ("(64, 384)" in error.message) == (how == "misshaped")


def test_safetensors_beside_the_checkpoint_is_preferred(small_checkpoint):
    path, state = small_checkpoint
    half = {k: v.half() + 1 for k, v in state.items()}
    save_file(half, str(path.with_suffix(".safetensors")))
    unet = load_unet(path, SMALL, CPU, torch.float32)
    assert unet.dtype == torch.float32
    assert torch.equal(unet.conv_in.weight, half["conv_in.weight"].float())


def test_a_missing_or_unreadable_checkpoint_is_models_missing(tmp_path):
    with pytest.raises(LipSyncError, match="is missing") as caught:
        load_unet(tmp_path / "latentsync_unet.pt", SMALL, CPU, torch.float32)
    assert caught.value.code is ErrorCode.MODELS_MISSING
    (tmp_path / "latentsync_unet.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LipSyncError, match="cannot be read") as caught:
        load_unet(tmp_path / "latentsync_unet.pt", SMALL, CPU, torch.float32)
    assert caught.value.code is ErrorCode.MODELS_MISSING


# --- DeepCache ----------------------------------------------------------------------------------------------


def _small_inputs(batch: int = 2, frames: int = 5, size: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, SMALL.in_channels, frames, size, size, generator=generator)
    audio = torch.randn(batch * frames, 50, SMALL.cross_attention_dim, generator=generator)
    return sample, audio


def test_deepcache_runs_the_whole_unet_every_third_step():
    torch.manual_seed(0)
    cache = DeepCache(LatentSyncUNet(SMALL).eval())
    assert [i for i in range(20) if cache.is_full_step(i)] == [0, 3, 6, 9, 12, 15, 18]


def test_a_cached_step_reruns_only_the_last_layer_and_is_exact():
    torch.manual_seed(0)
    unet = LatentSyncUNet(SMALL).eval()
    final = unet.up_blocks[-1]
    last = len(final.resnets) - 1
    watched = {name: unet.get_submodule(name) for name in
               ["conv_in", "time_embedding", "mid_block", "conv_norm_out", "conv_out"]
               + [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
               + [f"up_blocks.{i}" for i in range(len(unet.up_blocks) - 1)]
               + [f"up_blocks.{len(unet.up_blocks) - 1}.{kind}.{i}"
                  for kind in ("resnets", "attentions", "motion_modules") for i in range(last + 1)]}
    calls: List[str] = []
    for name, module in watched.items():
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
    sample, audio = _small_inputs()
    cache = DeepCache(unet)
    with torch.no_grad():
        full = cache(0, sample, 801, audio)
        assert set(calls) == set(watched)
        calls.clear()
        again = cache(1, sample, 801, audio)
        top = f"up_blocks.{len(unet.up_blocks) - 1}"
        assert sorted(calls) == sorted(["conv_in", "time_embedding", f"{top}.resnets.{last}",
                                        f"{top}.attentions.{last}", f"{top}.motion_modules.{last}",
                                        "conv_norm_out", "conv_out"])
        assert torch.equal(again, full)
        moved = cache(2, sample + 0.1, 751, audio)
        assert not torch.allclose(moved, unet(sample + 0.1, 751, audio), atol=1e-4)


def test_a_cached_step_without_its_full_step_is_refused():
    torch.manual_seed(0)
    cache = DeepCache(LatentSyncUNet(SMALL).eval())
    sample, audio = _small_inputs()
    with torch.no_grad(), pytest.raises(RuntimeError, match="full step 0"):
        cache(1, sample, 901, audio)
    with torch.no_grad():
        cache(0, sample, 951, audio)
        with pytest.raises(RuntimeError, match="full step 3"):
            cache(4, sample, 751, audio)


# --- parity -------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _fixture_unet(folder: Path, dtype: torch.dtype) -> LatentSyncUNet:
    return load_unet(folder / "models" / "latentsync_unet.pt", UNetConfig.from_yaml(_config_path(folder)), CPU, dtype)


class _Chunk:
    """The UNet inputs of one 16-frame chunk of a case, from the fixture's arrays."""

    def __init__(self, fixture: latentsync_fixtures.LatentSyncFixture, case: str, start: int):
        self.fixture, self.case = fixture, case
        frames = fixture.array(case, "mask_latents").shape[0]
        self.frames = slice(start, min(start + CHUNK, frames))
        self.cfg = fixture.cases[case]["guidance"] > 1
        batch = 2 if self.cfg else 1

        def video(name: str) -> torch.Tensor:  # (N, c, l, l) → (batch, c, f, l, l)
            return torch.from_numpy(fixture.array(case, name)[self.frames]).permute(1, 0, 2, 3)[None].repeat(
                batch, 1, 1, 1, 1)

        self.conditions = torch.cat([video("mask_latents"), video("masked_image_latents"), video("ref_latents")], 1)
        if start == 0:
            self.audio = torch.from_numpy(fixture.array(case, "audio_embeds_first_chunk"))
        else:
            audio = torch.from_numpy(fixture.array(case, "whisper_chunks")[self.frames])
            self.audio = torch.cat([torch.zeros_like(audio), audio]) if self.cfg else audio
        self.timesteps = fixture.array(case, "timesteps")

    def sample(self, step: int) -> torch.Tensor:
        """The UNet input at step index ``step``: the latents before it, with the conditions, per batch row."""
        if step == 0:
            x = torch.from_numpy(self.fixture.array(self.case, "initial_noise"))
            x = x.repeat(1, 1, self.frames.stop - self.frames.start, 1, 1)
        else:
            x = torch.from_numpy(self.fixture.array(self.case, "latents_step")[step - 1][:, self.frames])[None]
        return torch.cat([x.repeat(self.conditions.shape[0], 1, 1, 1, 1), self.conditions], 1)

    def run(self, unet: LatentSyncUNet, step: int, deepcache: bool) -> torch.Tensor:
        """The noise prediction at ``step``; with DeepCache, after the full step it reuses (if not itself)."""
        def args(i: int) -> Tuple[torch.Tensor, int, torch.Tensor]:
            return self.sample(i).to(unet.dtype), int(self.timesteps[i]), self.audio.to(unet.dtype)

        with torch.no_grad():
            if not deepcache:
                return unet(*args(step))
            cache = DeepCache(unet)
            if not cache.is_full_step(step):
                full = step - step % cache.interval
                cache(full, *args(full))
            return cache(step, *args(step))


def _compare(ours: torch.Tensor, ours64: torch.Tensor, expected: torch.Tensor, bound: float
             ) -> Tuple[str, bool, bool]:
    """``(verdict, within its bound, held to the README bound)`` for one noise prediction."""
    scale = expected.abs().max().item()
    error = (ours - expected).abs().max().item() / scale
    rounding = (ours.double() - ours64).abs().max().item() / scale
    strict = rounding <= ROUNDING_SHARE * bound
    limit = bound if strict else max(bound, ILL_CONDITIONED_BOUND)
    kind = "README bound" if strict else "ill-conditioned in float32, gross-error bound"
    return f"error {error:.1e} × max abs (float32 rounding {rounding:.1e}; {kind} {limit:.0e})", error <= limit, strict


@pytest.mark.parametrize("folder, case", latentsync_fixtures.fixture_cases())
def test_noise_prediction_matches_upstream(folder, case):
    fixture = latentsync_fixtures.load(folder)
    deepcache = bool(fixture.cases[case]["deepcache"])
    expected_all = fixture.array(case, "noise_pred")
    steps = [int(i) for i in fixture.array(case, "noise_pred_step_index")]
    last = len(fixture.array(case, "timesteps")) - 1
    frames = fixture.array(case, "mask_latents").shape[0]
    unet, unet64 = _fixture_unet(folder, torch.float32), _fixture_unet(folder, torch.float64)
    report, failed, strict = [], [], 0
    for start in range(0, frames, CHUNK):
        chunk = _Chunk(fixture, case, start)
        for row, step in enumerate(steps):
            expected = torch.from_numpy(expected_all[row][:, :, chunk.frames])
            verdict, ok, held = _compare(chunk.run(unet, step, deepcache), chunk.run(unet64, step, deepcache),
                                         expected, 1e-3 if step == last else 1e-4)
            line = f"frames {chunk.frames.start}-{chunk.frames.stop - 1} step {step}: {verdict}"
            report.append(line)
            strict += held
            if not ok:
                failed.append(line)
    assert not failed, "\n".join(["noise_pred differs from upstream:"] + report)
    # Not every value may be ill-conditioned, or the test would only catch gross errors.
    assert strict, "\n".join(["no noise_pred value of this case is float32-reproducible:"] + report)
