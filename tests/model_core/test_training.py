"""The training loop and the VAE stage: a few steps on tiny data lower the loss, a resumed run equals an unbroken
one, and the export loads as a streaming VAE whose chunked decode equals its whole decode."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model_core.config import get_preset
from model_core.training.loop import read_log, run_stage
from model_core.training.latents import vae_digest
from model_core.training.vae_stage import (DecoderStage, DecoderTrainConfig, VAEStage, VAETrainConfig,
                                           latent_statistics, reconstruction_report)
from model_core.vae import StreamingVAE
from model_core.world.speech import espeak_available
from model_core.world.split import WorldSplit
from model_core.world.store import WorldSource

pytestmark = pytest.mark.skipif(not espeak_available(), reason="libespeak-ng missing: run `make espeak-ng`")


@pytest.fixture(scope="module")
def source():
    class Cached:  # one rendered clip, served from memory
        def __init__(self):
            self.clip = WorldSource(WorldSplit(0), "train", 1, 64)[0]

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return self.clip
    return Cached()


def stage(source, **overrides):
    overrides = {"window_frames": 5, **overrides}  # the default 17-frame windows cost 3x as much per test step
    return VAEStage(get_preset("talk128").vae, source, VAETrainConfig(batch_size=1, learning_rate=2e-3, **overrides))


def test_vae_stage_loss_decreases(source, tmp_path):
    run_stage(stage(source), tmp_path, 24, log_every=4, checkpoint_every=100, progress=False)
    losses = [row["loss"] for row in read_log(tmp_path)]
    assert len(losses) == 6
    assert losses[-1] < 0.7 * losses[0]


def test_resumed_run_equals_unbroken_run(source, tmp_path):
    whole = stage(source)
    run_stage(whole, tmp_path / "whole", 6, checkpoint_every=3, progress=False)
    first = stage(source)
    run_stage(first, tmp_path / "broken", 3, checkpoint_every=3, progress=False)
    torch.manual_seed(12345)  # a new process: the global RNG is wherever it is, not where step 3 left it
    resumed = stage(source)  # built afresh, it finds the checkpoint
    run_stage(resumed, tmp_path / "broken", 6, checkpoint_every=3, progress=False)
    for key, value in whole.vae.state_dict().items():
        torch.testing.assert_close(resumed.vae.state_dict()[key], value, rtol=0, atol=0)
    assert whole.optimizer().state_dict()["state"][0]["step"] == resumed.optimizer().state_dict()["state"][0]["step"]


def test_export_is_a_streaming_vae(source, tmp_path):
    trained = stage(source)
    run_stage(trained, tmp_path / "run", 2, progress=False, export_to=tmp_path / "export")
    vae = StreamingVAE.from_pretrained(tmp_path / "export")
    assert vae.spatial_compression == 8 and vae.temporal_compression == 4
    assert len(vae.vae.config.latents_mean) == 16 and min(vae.vae.config.latents_std) > 0
    # the config carries the statistics measured on the data (not diffusers' Wan defaults)
    mean, std = latent_statistics(trained.vae, source)
    assert vae.vae.config.latents_mean == pytest.approx(mean) and vae.vae.config.latents_std == pytest.approx(std)
    latents = torch.randn(1, 16, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    cache, pieces = vae.new_decode_cache(), []
    for start in (0, 1, 3):
        end = {0: 1, 1: 3, 3: 4}[start]
        frames, cache = vae.decode_chunk(latents[:, :, start:end], cache)
        pieces.append(frames)
    torch.testing.assert_close(torch.cat(pieces, 2), vae.decode(latents).clamp(-1, 1), atol=2e-3, rtol=2e-3)
    report = reconstruction_report(vae, source, clips=1, length=9)
    assert set(report) >= {"psnr", "ssim", "mouth_psnr", "per_style", "decode_ms_per_frame", "psnr_by_block"}
    assert len(report["psnr_by_block"]) == 1
    assert report["psnr_by_block"][0] == pytest.approx(report["psnr"], abs=1e-3)


def test_a_run_directory_of_another_stage_is_refused(source, tmp_path):
    run_stage(stage(source), tmp_path, 1, progress=False)
    other = stage(source)
    other.name = "probe"
    with pytest.raises(ValueError, match="holds a 'vae' run"):
        run_stage(other, tmp_path, 2, progress=False)
    shutil.rmtree(tmp_path)


def test_probe_stage_runs_and_its_loss_decreases(tmp_path):
    """A smoke run (the probe's quality is held by tests/model_core/test_eval.py with the shipped probe)."""
    from model_core.training.probe_stage import ProbeStage, ProbeTrainConfig, load_probe

    clips = [WorldSource(WorldSplit(0), "train", 2, 128)[i] for i in range(2)]

    class Two:
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return clips[index]

    probe = ProbeStage(Two(), ProbeTrainConfig(batch_size=32, learning_rate=2e-3))
    run_stage(probe, tmp_path, 30, log_every=10, progress=False, export_to=tmp_path / "probe.safetensors")
    rows = read_log(tmp_path)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], [round(r["loss"], 3) for r in rows]
    loaded = load_probe(tmp_path / "probe.safetensors")
    crops = torch.zeros(2, 3, 64, 64)
    torch.testing.assert_close(loaded(crops)[0], probe.probe.cpu()(crops)[0], atol=2e-2, rtol=0)


def _data_parallel_worker(rank: int, world_size: int, port: int, stage_name: str, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from model_core.training.probe_stage import ProbeStage, ProbeTrainConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    clip = WorldSource(WorldSplit(0), "train", 1, 64 if stage_name == "vae" else 128)[0]

    class One:
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return clip

    if stage_name == "vae":
        trained = VAEStage(get_preset("talk128").vae, One(), VAETrainConfig(batch_size=1, learning_rate=2e-3),
                           wrap=DistributedDataParallel)
    else:
        trained = ProbeStage(One(), ProbeTrainConfig(batch_size=8, learning_rate=2e-3), wrap=DistributedDataParallel)
    first_batch = trained.batch(0, rank)
    run_stage(trained, Path(out) / "run", 2, rank=rank, progress=False)
    weights = torch.cat([p.detach().flatten() for m in trained.modules().values() for p in m.parameters()])
    torch.save({"weights": weights, "batch": next(iter(first_batch.values()))}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("stage_name", ["vae", "probe"])
def test_data_parallel_workers_see_different_data_and_keep_equal_weights(stage_name, tmp_path):
    """What `--workers N` relies on: each rank draws its own batches, and the stage trains through the module it was
    given to wrap (DDP), so gradients are averaged and the replicas stay identical."""
    import torch.multiprocessing as mp

    from services.net import free_port

    mp.spawn(_data_parallel_worker, args=(2, free_port(), stage_name, str(tmp_path)), nprocs=2)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(zero["batch"], one["batch"])
    torch.testing.assert_close(zero["weights"], one["weights"], rtol=0, atol=0)


@pytest.mark.parametrize("residual", [False, True], ids=["wan2.1", "wan2.2-residual"])
def test_stream_encode_and_decode_equal_diffusers_whole_clip_paths(residual):
    """Phase 4 trains through `stream_encode` / `stream_decode` with carried caches: held against diffusers' own
    whole-clip encode and decode, so the stream is what the VAE computes for the clip at once (for Wan2.2's
    patchified residual layout too: the patch is folded in before the encoder and unfolded after the decoder)."""
    from model_core.training.vae_stage import new_stream_caches, new_vae, stream_decode, stream_encode

    from .helpers import WAN22_VAE

    shape = WAN22_VAE if residual else get_preset("tiny").vae
    vae = new_vae(shape, seed=0).eval()
    video = torch.rand(1, 3, 17, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    encoder_cache, decoder_cache = new_stream_caches(vae)
    with torch.no_grad():
        pieces = [stream_encode(vae, video[:, :, a:b], encoder_cache) for a, b in ((0, 9), (9, 17))]
        moments = vae.quant_conv(torch.cat(pieces, 2))
        torch.testing.assert_close(moments, vae._encode(video), atol=1e-5, rtol=1e-4)
        z = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(1))
        streamed = torch.cat([stream_decode(vae, vae.post_quant_conv(z[:, :, a:b]), decoder_cache)
                              for a, b in ((0, 3), (3, 5))], 2)
        torch.testing.assert_close(streamed, vae.decode(z).sample, atol=1e-5, rtol=1e-4)


def test_stream_phase_trains_and_resumes_mid_stream(source, tmp_path):
    config = dict(stream_from_step=0, stream_steps=3, stream_batch=1)
    run_stage(stage(source, **config), tmp_path / "whole", 4, log_every=1, checkpoint_every=100, progress=False)
    rows = read_log(tmp_path / "whole")
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    broken = stage(source, **config)
    run_stage(broken, tmp_path / "broken", 2, checkpoint_every=2, progress=False)
    resumed = stage(source, **config)  # resumes at step 2, mid-stream: its caches are rebuilt by replay
    run_stage(resumed, tmp_path / "broken", 4, log_every=1, checkpoint_every=100, progress=False)
    assert [r["step"] for r in read_log(tmp_path / "broken")][-2:] == [3, 4]


def test_phases_train_on_their_windows_with_their_rates(source):
    """5-frame windows, then 13, then 33 (the caches' steady state), then streams: each phase's frames, learning
    rate and gradient clipping as configured."""
    trained = stage(source, long_window_from_step=1, steady_window_from_step=2, stream_from_step=3,
                    steady_learning_rate=3e-4, stream_learning_rate=1e-4, grad_clip=0.5, stream_batch=1)
    seen = []
    for step in range(4):
        batch = trained.batch(step, 0)
        trained.loss(batch)
        seen.append((batch["video"].shape[2], trained.optimizer().param_groups[0]["lr"], trained.grad_clip))
    assert seen == [(5, 2e-3, None), (13, 2e-3, None), (33, 3e-4, 0.5), (9, 1e-4, 0.5)]
    with pytest.raises(ValueError, match="steady_window_frames=32 is invalid"):
        VAETrainConfig(steady_window_frames=32)


def test_the_decoder_phase_trains_the_decoder_alone_and_keeps_the_latent_space(source, tmp_path):
    first = stage(source)
    run_stage(first, tmp_path / "full", 4, progress=False, export_to=tmp_path / "full-vae")
    before = StreamingVAE.from_pretrained(tmp_path / "full-vae")
    tune = DecoderStage(tmp_path / "full-vae", source, DecoderTrainConfig(steps=16, window_frames=5, batch_size=1,
                                                                          warmup_steps=1, learning_rate=2e-3))
    run_stage(tune, tmp_path / "decoder", 16, log_every=4, progress=False, export_to=tmp_path / "tuned")
    losses = [row["loss"] for row in read_log(tmp_path / "decoder")]
    assert losses[-1] < 0.9 * losses[0]
    after = StreamingVAE.from_pretrained(tmp_path / "tuned")
    assert vae_digest(after) == vae_digest(before)  # the same latent space: caches and DiTs trained in it stay valid
    for name, value in before.vae.state_dict().items():
        same = torch.equal(after.vae.state_dict()[name], value)
        assert same == name.startswith(("encoder.", "quant_conv.")), name
    assert after.vae.config.latents_mean == before.vae.config.latents_mean
    assert "_name_or_path" not in (tmp_path / "tuned" / "config.json").read_text()  # no local path is shipped


def decoder_stages(source, tmp_path, batch_size: int, **variant) -> tuple[DecoderStage, DecoderStage]:
    """Decoder phases on a 2-step VAE: one with the plain recipe, one with `variant` changed."""
    run_stage(stage(source), tmp_path / "full", 2, progress=False, export_to=tmp_path / "full-vae")
    config = DecoderTrainConfig(steps=4, window_frames=5, batch_size=batch_size, warmup_steps=1)
    return (DecoderStage(tmp_path / "full-vae", source, config),
            DecoderStage(tmp_path / "full-vae", source, dataclasses.replace(config, **variant)))


def test_the_decoders_motion_term_is_the_frame_to_frame_changes_l1(source, tmp_path):
    """motion_weight: the loss adds weight x mean |decoded change - true change| over consecutive frames (a decoder
    that flickers where the clip is still pays for it); 0 leaves the loss the mouth-weighted L1 alone."""
    plain, moving = decoder_stages(source, tmp_path, batch_size=1, motion_weight=2.0)
    batch = plain.batch(0, 0)
    loss, metrics = plain.loss(batch)
    assert float(loss) == pytest.approx(metrics["l1"]) and "motion" not in metrics
    loss, metrics = moving.loss(batch)
    with torch.no_grad():
        decoded = moving.objective(batch["video"])
    expected = (torch.diff(decoded, dim=2) - torch.diff(batch["video"], dim=2)).abs().mean()
    assert metrics["motion"] == pytest.approx(float(expected), rel=1e-4)
    assert float(loss) == pytest.approx(metrics["l1"] + 2.0 * float(expected), rel=1e-4)
    with pytest.raises(ValueError, match="motion_weight=-1 is invalid"):
        DecoderTrainConfig(motion_weight=-1)


def test_the_decoders_latent_noise_is_each_samples_level_times_the_channel_std(source, tmp_path):
    """latent_noise: the decoder sees the encoder's latents plus, per sample, a level in [0, latent_noise] times each
    channel's `latents_std` of standard Gaussian noise; deterministic per (seed, step, rank); 0 decodes them as they
    are."""
    plain, noisy = decoder_stages(source, tmp_path, batch_size=2, latent_noise=0.5)
    batch = noisy.batch(3, 0)
    assert "noise_levels" not in plain.batch(3, 0)
    levels = batch["noise_levels"]
    assert levels.shape == (2,) and bool((levels >= 0).all() and (levels <= 0.5).all()) and levels[0] != levels[1]
    assert torch.equal(noisy.batch(3, 0)["noise_levels"], levels) and noisy.batch(3, 0)["noise_seed"] == \
        batch["noise_seed"]
    vae = noisy.vae
    with torch.no_grad():
        clean = vae.encode(batch["video"]).latent_dist.mean
        std = torch.tensor(vae.config.latents_std)[None, :, None, None, None]
        draw = torch.randn(clean.shape, generator=torch.Generator().manual_seed(batch["noise_seed"]))
        expected = vae.decode(clean + draw * std * levels[:, None, None, None, None]).sample
        got = noisy.objective(batch["video"], levels, batch["noise_seed"])
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(noisy.objective(batch["video"]), vae.decode(clean).sample)
        assert (got - vae.decode(clean).sample).abs().mean() > 1e-4
    with pytest.raises(ValueError, match="latent_noise=-1 is invalid"):
        DecoderTrainConfig(latent_noise=-1)


def test_the_decoder_rate_warms_up_holds_and_falls_to_zero():
    config = DecoderTrainConfig(steps=100, learning_rate=1.0, warmup_steps=10, decay_from=0.5)
    assert config.rate(0) == pytest.approx(0.1) and config.rate(9) == pytest.approx(1.0)
    assert config.rate(49) == pytest.approx(1.0) and config.rate(75) == pytest.approx(0.5)
    assert config.rate(100) == 0.0
    with pytest.raises(ValueError, match="window_frames=6 is invalid"):
        DecoderTrainConfig(window_frames=6)


def test_frames_and_the_mouth_are_grouped_as_the_latent_frames_code_them():
    """Latent frame 0 codes video frame 0 alone; latent frame k codes frames 4k-3 .. 4k (written out by hand)."""
    from model_core.training.data import frame_openings, latent_mouth

    assert frame_openings(torch.arange(9.0)[None]).tolist() == [[[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]]]
    mask = torch.zeros(1, 1, 9, 16, 16)
    mask[0, 0, 0, :8, :8] = 1             # frame 0: the top-left cell
    mask[0, 0, 1:3, 8:, 8:] = 1           # frames 1-2 of latent frame 1 (half its frames): the bottom-right cell
    mouth = latent_mouth(mask, 8)
    assert mouth.shape == (1, 3, 2, 2)
    assert mouth[0, 0].tolist() == [[1, 0], [0, 0]] and mouth[0, 1].tolist() == [[0, 0], [0, 0.5]]
    assert mouth[0, 2].abs().sum() == 0



def test_the_batch_mouth_cells_are_the_latent_caches(source):
    """The VAE stage's latent mouth (pooled from a window's pixel mask) is the latent cache's (`latent_mouth_weight`,
    from the face boxes): one grouping rule, two inputs."""
    from model_core.training.data import frame_window, latent_mouth
    from model_core.training.latents import latent_mouth_weight

    clip = source[0]
    _, mask = frame_window(clip, 8, 17)
    cache = latent_mouth_weight(clip.truth.face_box[8:25], 64, 5, 4, (8, 8))
    torch.testing.assert_close(latent_mouth(mask[None], 8)[0], cache)


def test_the_opening_term_reaches_the_encoder_and_head_only_and_skips_unknown_windows(source):
    from model_core.training.data import latent_mouth
    from model_core.training.vae_stage import OPENING_VARIANCE, opening_error

    # the error by hand: readings 0 against openings 0.1 everywhere; a window without a known opening adds nothing
    known = torch.full((1, 9), 0.1)
    unknown = torch.full((1, 9), float("nan"))
    readings = torch.zeros(2, 3, 4, requires_grad=True)
    assert float(opening_error(readings, torch.cat([known, unknown]))) == pytest.approx(0.01 / OPENING_VARIANCE)
    nothing = opening_error(readings, torch.cat([unknown, unknown]))
    assert float(nothing) == 0.0 and not torch.autograd.grad(nothing, readings)[0].any()

    trained = stage(source, opening_weight=1.0)
    assert stage(source, opening_weight=0.0).head is None and "opening_head" in trained.modules()
    torch.nn.init.normal_(trained.head.linear.weight, std=0.1)  # a fresh head is zero: it passes no signal back yet
    batch = trained.batch(0, 0)
    assert batch["opening"].shape == (1, 5) and not torch.isnan(batch["opening"]).any()  # one character: known
    _, _, readings = trained.objective(batch["video"], mouth=latent_mouth(batch["mask"], 8))
    error = opening_error(readings, batch["opening"])
    encoder = list(trained.vae.encoder.parameters()) + list(trained.vae.quant_conv.parameters())
    decoder = list(trained.vae.decoder.parameters()) + list(trained.vae.post_quant_conv.parameters())
    grads = torch.autograd.grad(error, encoder + decoder + list(trained.head.parameters()), allow_unused=True)
    encoder_grads, rest = grads[:len(encoder)], grads[len(encoder):]
    decoder_grads, head_grads = rest[:len(decoder)], rest[len(decoder):]
    assert any(g is not None and g.abs().sum() > 0 for g in encoder_grads)
    assert all(g is None or not g.any() for g in decoder_grads)      # the decoder learns from the pixels alone
    assert all(g is not None and g.abs().sum() > 0 for g in head_grads)
    loss, values = trained.loss(batch)
    assert values["opening"] == pytest.approx(float(error), rel=1e-4)


def test_the_opening_term_trains_a_head_that_reads_the_mouth(source):
    """On one window, steps of the stage's loss drive the opening head's error down (the windows of a run differ
    too much in speech for a few steps' logged error to say it)."""
    trained = stage(source, opening_weight=1.0)
    batch = next(b for b in map(lambda step: trained.batch(step, 0), range(64)) if b["opening"].std() > 0.1)
    optimizer = trained.optimizer()
    errors = []
    for _ in range(30):
        loss, values = trained.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        errors.append(values["opening"])
    assert errors[-1] < 0.2 * errors[0], errors


def test_the_interior_weight_lands_where_the_world_paints_the_mouth_open():
    """Pixels of the world's mouth-interior colour inside the mouth mask, in any frame, grown 2 px, get the extra
    weight; the same colour outside the mouth mask does not; without it the loss is the mouth-weighted L1."""
    from model_core.training.data import interior_mask
    from model_core.training.vae_stage import mouth_weighted_l1
    from model_core.world.render import MOUTH_INSIDE

    video = torch.zeros(1, 3, 5, 32, 32)
    inside = torch.tensor(MOUTH_INSIDE, dtype=torch.float32).div(127.5).sub(1.0)
    video[0, :, 3, 20, 16] = inside            # one frame shows the open mouth at (20, 16)
    video[0, :, 1, 2, 2] = inside              # the same colour far from the mouth (a background detail)
    mask = torch.zeros(1, 1, 5, 32, 32)
    mask[..., 14:26, 8:24] = 1
    interior = interior_mask(video, mask)
    assert interior.shape == (1, 1, 1, 32, 32)
    expected = torch.zeros(32, 32)
    expected[18:23, 14:19] = 1                 # (20, 16) grown by 2 px, in every frame of the window
    assert torch.equal(interior[0, 0, 0], expected)
    decoded = video + 0.5
    plain = mouth_weighted_l1(decoded, video, mask, 4.0)
    assert float(plain) == pytest.approx(0.5)  # a uniform error is that error, whatever the weights
    error = torch.zeros_like(video)
    error[0, :, :, 20, 16] = 1.0               # an error only at the interior pixel: weighted 1 + 4 + 30 there
    weight = 1.0 + 4.0 * mask + 30.0 * interior
    total = float(weight.expand_as(mask).sum() * 3)
    assert float(mouth_weighted_l1(video + error, video, mask, 4.0, 30.0)) == pytest.approx(35.0 * 3 * 5 / total)
