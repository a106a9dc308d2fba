"""CausalAvatarDiT against diffusers' WanTransformer3DModel, and Wan checkpoint loading."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file

from model_core.checkpoint import CheckpointError, dit_config_from_diffusers, load_wan_transformer
from model_core.dit import CausalAvatarDiT

DIFFUSERS_KW = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
                    out_channels=16, text_dim=16, freq_dim=256, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=32, added_kv_proj_dim=32)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = WanTransformer3DModel(**DIFFUSERS_KW).eval()
    with torch.no_grad():  # make every parameter non-trivial (diffusers zero-inits nothing here, but be sure)
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    path = tmp_path_factory.mktemp("wan")
    model.save_pretrained(path)
    return path, model


def ours_from(path):
    config = dit_config_from_diffusers(json.loads((path / "config.json").read_text()), audio_dim=320, text_len=512)
    model = CausalAvatarDiT(config).eval()
    report = load_wan_transformer(model, path)
    return model, report


def test_every_base_key_loads_and_only_audio_and_reference_layers_are_new(wan_dir):
    path, reference = wan_dir
    model, report = ours_from(path)
    assert report.loaded == len(reference.state_dict())
    assert report.new_layers, "audio layers must be reported as new"
    assert all(("audio" in key) or key.startswith("reference_embedder") for key in report.new_layers)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("frames", [1, 5])
def test_full_bidirectional_forward_equals_diffusers(wan_dir, frames):
    path, reference = wan_dir
    model, _ = ours_from(path)
    generator = torch.Generator().manual_seed(frames)
    latents = torch.randn(2, 16, frames, 8, 12, generator=generator)
    timestep = torch.tensor([730.0, 120.0])
    text = torch.randn(2, 512, 16, generator=generator)
    image = torch.randn(2, 7, 32, generator=generator)
    with torch.no_grad():
        expected = reference(latents, timestep, text, image, return_dict=False)[0]
        cond = model.prepare_conditions(text, image, timestep[:1])
        actual = model.forward_full(latents, timestep[:, None].expand(2, frames), cond, layout="full")
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_fresh_audio_layers_leave_the_base_model_unchanged(wan_dir):
    """audio_v_proj starts at zero: with audio tokens present, a freshly loaded model still equals diffusers."""
    path, reference = wan_dir
    model, _ = ours_from(path)
    latents, timestep = torch.randn(1, 16, 3, 8, 8), torch.tensor([500.0])
    text, image = torch.randn(1, 512, 16), torch.randn(1, 4, 32)
    with torch.no_grad():
        expected = reference(latents, timestep, text, image, return_dict=False)[0]
        cond = model.prepare_conditions(text, image, timestep)
        audio = model.project_audio(torch.randn(1, 1, 3, 20, 320), torch.ones(1, 1, 3, 20, dtype=torch.bool),
                                    torch.ones(1, 1, 16))
        actual = model.forward_full(latents, timestep[:, None].expand(1, 3), cond, audio=audio, layout="full")
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_missing_base_key_is_an_error_naming_it(wan_dir, tmp_path):
    path, _ = wan_dir
    state = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    del state["blocks.1.ffn.net.2.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    config = dit_config_from_diffusers(json.loads((path / "config.json").read_text()), audio_dim=320)
    with pytest.raises(CheckpointError, match="blocks.1.ffn.net.2.weight"):
        load_wan_transformer(CausalAvatarDiT(config), tmp_path / "broken.safetensors")


def test_unexpected_and_misshapen_keys_are_errors(wan_dir, tmp_path):
    path, _ = wan_dir
    state = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    state["blocks.0.attn1.mystery.weight"] = torch.zeros(2)
    state["proj_out.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "odd.safetensors"))
    config = dit_config_from_diffusers(json.loads((path / "config.json").read_text()), audio_dim=320)
    with pytest.raises(CheckpointError, match="mystery") as caught:
        load_wan_transformer(CausalAvatarDiT(config), tmp_path / "odd.safetensors")
    assert "proj_out.bias" in str(caught.value)


def test_text_to_video_checkpoint_is_refused_with_a_reason():
    config = {key: value for key, value in DIFFUSERS_KW.items()}
    config.update(image_dim=None, num_attention_heads=2, num_layers=2)
    with pytest.raises(CheckpointError, match="image_dim"):
        dit_config_from_diffusers(config, audio_dim=320)


def test_i2v_layout_with_36_input_channels_loads_and_runs(tmp_path):
    torch.manual_seed(1)
    reference = WanTransformer3DModel(**{**DIFFUSERS_KW, "in_channels": 36}).eval()
    reference.save_pretrained(tmp_path)
    model, _ = ours_from(tmp_path)
    assert model.config.in_channels == 36
    latents, condition = torch.randn(1, 16, 2, 8, 8), torch.randn(1, 20, 2, 8, 8)
    text, image, timestep = torch.randn(1, 512, 16), torch.randn(1, 3, 32), torch.tensor([300.0])
    with torch.no_grad():
        expected = reference(torch.cat([latents, condition], 1), timestep, text, image, return_dict=False)[0]
        cond = model.prepare_conditions(text, image, timestep)
        actual = model.forward_full(latents, timestep[:, None].expand(1, 2), cond, layout="full",
                                    latent_condition=condition)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_audio_injection_adds_each_speakers_window_filter_inside_its_region_only():
    """AudioInjection against a written-out expectation: character k's vector for frame f is a linear filter over
    its window's reduced tokens, added to the tokens of k's region only; zeroed regions add nothing."""
    from model_core.cache import ChunkAudio
    from model_core.dit import AudioInjection

    from .helpers import tiny_config

    config = tiny_config(audio_injection_dim=4)
    torch.manual_seed(0)
    injection = AudioInjection(config)
    assert float(injection.out.weight.detach().abs().sum()) == 0.0, "starts at zero: a fresh model is unchanged"
    torch.nn.init.normal_(injection.out.weight)
    batch, characters, frames, per_frame, dim = 2, 2, 3, 4, config.dim
    window = config.audio_tokens_per_frame
    tokens = torch.randn(batch, characters, frames, window, dim)
    regions = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], [[1.0, 0.0, 0.0, 0.0], [0.0] * 4]])
    hidden = torch.randn(batch, (1 + frames) * per_frame, dim)   # one leading frame (a sink) hears nothing
    out = injection(hidden, ChunkAudio(tokens=tokens, regions=regions), 1, 1 + frames)

    expected = hidden.clone()
    for b in range(batch):
        for k in range(characters):
            for f in range(frames):
                reduced = tokens[b, k, f] @ injection.reduce.weight.T + injection.reduce.bias   # [T, r]
                vector = injection.out.weight @ reduced.reshape(-1) + injection.out.bias
                for s in range(per_frame):
                    if regions[b, k, s]:
                        expected[b, (1 + f) * per_frame + s] += vector
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    silent = injection(hidden, ChunkAudio(tokens=tokens, regions=torch.zeros_like(regions)), 1, 1 + frames)
    torch.testing.assert_close(silent, hidden, atol=0, rtol=0)
