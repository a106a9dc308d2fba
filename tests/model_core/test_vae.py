"""Streaming VAE decode with an external per-session cache equals whole-clip decode."""

import pytest
import torch

from model_core.config import VAEConfig
from model_core.vae import StreamingVAE

from .helpers import WAN22_VAE

SHAPES = {
    "wan2.1": VAEConfig(base_dim=8, num_res_blocks=1),
    "wan2.2-residual": WAN22_VAE,
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def vae(request):
    return StreamingVAE.from_config(SHAPES[request.param], seed=0)


@pytest.mark.parametrize("splits", [(3, 3, 3), (1, 4, 2, 2), (9,)])
def test_streaming_decode_equals_whole_decode(vae, splits):
    latents = torch.randn(1, 16, sum(splits), 4, 6, generator=torch.Generator().manual_seed(len(splits)))
    whole = vae.decode(latents)
    cache, pieces, start = vae.new_decode_cache(), [], 0
    for size in splits:
        frames, cache = vae.decode_chunk(latents[:, :, start:start + size], cache)
        assert frames.shape[2] == vae.frames_for_latents(start, size)
        pieces.append(frames)
        start += size
    streamed = torch.cat(pieces, dim=2)
    assert streamed.shape == whole.shape == (1, 3, 1 + 4 * (sum(splits) - 1), 32, 48)
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-5)


def test_one_decoder_interleaves_sessions(vae):
    generator = torch.Generator().manual_seed(7)
    a, b = torch.randn(1, 16, 6, 4, 4, generator=generator), torch.randn(1, 16, 6, 4, 4, generator=generator)
    cache_a, cache_b, out_a, out_b = vae.new_decode_cache(), vae.new_decode_cache(), [], []
    for start in (0, 3):
        frames, cache_a = vae.decode_chunk(a[:, :, start:start + 3], cache_a)
        out_a.append(frames)
        frames, cache_b = vae.decode_chunk(b[:, :, start:start + 3], cache_b)
        out_b.append(frames)
    torch.testing.assert_close(torch.cat(out_a, 2), vae.decode(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(out_b, 2), vae.decode(b), atol=1e-5, rtol=1e-5)


def test_encode_image_then_decode_shapes_and_normalisation(vae):
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    latent = vae.encode_image(image)
    assert latent.shape == (2, 16, 1, 4, 4) and vae.spatial_compression == 8 and vae.temporal_compression == 4
    torch.testing.assert_close(vae.normalize(vae.denormalize(latent)), latent, atol=1e-5, rtol=1e-5)
    frames, _ = vae.decode_chunk(latent, vae.new_decode_cache())
    assert frames.shape == (2, 3, 1, 32, 32)


def test_vae_round_trips_through_save_and_state(vae, tmp_path):
    vae.save_pretrained(tmp_path)
    loaded = StreamingVAE.from_pretrained(tmp_path)
    rebuilt = StreamingVAE.from_state(vae.config_dict(), vae.vae.state_dict())
    latents = torch.randn(1, 16, 2, 4, 4)
    for other in (loaded, rebuilt):
        torch.testing.assert_close(other.decode(latents), vae.decode(latents), atol=0, rtol=0)


def test_missing_vae_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        StreamingVAE.from_pretrained(tmp_path / "nope")


def test_batched_decode_of_several_sessions_equals_each_alone(vae):
    generator = torch.Generator().manual_seed(11)
    streams = [torch.randn(1, 16, 9, 4, 4, generator=generator) for _ in range(3)]
    alone = [vae.decode(z) for z in streams]
    caches = [vae.new_decode_cache() for _ in streams]
    pieces = [[] for _ in streams]
    for start in (0, 3, 6):
        assert vae.batchable(caches) == (start > 0), "first chunks cannot be stacked, later ones can"
        outputs = vae.decode_chunk_batch([z[:, :, start:start + 3] for z in streams], caches)
        for row, (frames, cache) in enumerate(outputs):
            pieces[row].append(frames)
            caches[row] = cache
    for got, want in zip(pieces, alone):
        torch.testing.assert_close(torch.cat(got, 2), want, atol=1e-5, rtol=1e-5)


def test_vae_shape_errors_name_the_field():
    from model_core.config import ConfigError

    with pytest.raises(ConfigError, match=r"^patch_size=3 is invalid: allowed: 1, 2, 4$"):
        VAEConfig(patch_size=3)
    with pytest.raises(ConfigError, match=r"^dim_mult=\(1, 2, 4\) is invalid: with is_residual the last two"):
        VAEConfig(dim_mult=(1, 2, 4), temperal_downsample=(True, True), is_residual=True)
    assert VAEConfig(dim_mult=(1, 2, 2), temperal_downsample=(True, True), patch_size=2).spatial_compression == 8


def test_the_talk128_shape_builds_the_shipped_vae():
    """The preset's VAEConfig (through `diffusers_kwargs`) is the architecture of checkpoints/talk128-vae: its weights
    load strictly into a VAE built from the config (a lost layout option, e.g. the residual blocks, would not)."""
    from diffusers import AutoencoderKLWan

    from model_core.config import get_preset
    from model_core.shipped import TALK128_VAE, shipped_path

    shipped = StreamingVAE.from_pretrained(shipped_path(TALK128_VAE))
    built = AutoencoderKLWan(**get_preset("talk128").vae.diffusers_kwargs())
    built.load_state_dict(shipped.vae.state_dict(), strict=True)
    assert shipped.spatial_compression == get_preset("talk128").vae.spatial_compression == 8


def test_the_cpu_decoder_runs_its_3d_convolutions_through_onednn_with_the_same_frames():
    """PyTorch sends batch-1 3x3x3 conv3d on the CPU to its slow reference kernel; the VAE routes them through
    oneDNN (3-5x faster): same frames to float rounding, and the slow kernel never runs. Training (autograd on)
    keeps PyTorch's path."""
    from torch.profiler import ProfilerActivity, profile

    from model_core.vae import set_conv3d_path

    vae = StreamingVAE.from_config(WAN22_VAE, seed=3)
    latents = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(1))

    def decode():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            frames, _ = vae.decode_chunk(latents, vae.new_decode_cache())
        return frames, {event.key for event in prof.key_averages()}

    set_conv3d_path(vae.vae, "native")
    native, native_ops = decode()
    set_conv3d_path(vae.vae, "onednn")
    fast, fast_ops = decode()
    assert "aten::slow_conv3d_forward" in native_ops
    assert "aten::slow_conv3d_forward" not in fast_ops and "aten::mkldnn_convolution" in fast_ops
    torch.testing.assert_close(fast, native, atol=1e-5, rtol=1e-4)
    with torch.enable_grad():
        conv = next(m for m in vae.vae.modules() if isinstance(m, torch.nn.Conv3d))
        x = torch.randn(1, conv.in_channels, 3, 4, 4, requires_grad=True)
        conv(x).sum().backward()
        assert x.grad is not None
    with pytest.raises(ValueError, match="allowed: onednn, native"):
        set_conv3d_path(vae.vae, "fast")
