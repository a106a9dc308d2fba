"""Stage 3: the DMD gradient on a 1-D toy whose scores are known in closed form (sign and stop-gradients), the
generator's rollout equal to the product's streaming path, and a `tiny` distillation run that trains and streams."""

import numpy as np
import pytest
import torch

from model_core.audio import AudioConfig, AudioFrontend
from model_core.config import get_preset
from model_core.stages import NoisyChunk, ScoreStage
from model_core.training.dmd_stage import DistillConfig, DistillStage, dmd_loss, rollout
from model_core.training.latents import encode_clip
from model_core.training.loop import read_log, run_stage
from model_core.training.student_stage import StudentInitConfig, StudentInitStage, make_ode_pairs, read_pairs
from model_core.training.teacher_stage import TeacherStage, TeacherTrainConfig, sample_batch, text_states
from model_core.vae import StreamingVAE
from model_core.world.speech import espeak_available
from model_core.world.split import WorldSplit
from model_core.world.store import WorldSource

TINY = get_preset("tiny")


def posterior_mean(x_t, sigma, mean):
    """E[x0 | x_t] for x0 ~ N(mean, 1) and x_t = (1 - sigma) x0 + sigma eps: the optimal x0-denoiser."""
    a = 1.0 - sigma
    return mean + a / (a * a + sigma * sigma) * (x_t - a * mean)


def test_dmd_gradient_on_a_1d_toy_has_the_right_sign_and_stops_at_the_scores():
    """Generator x0 = theta + z; real data N(2, 1); the fake score is the generator's own distribution N(theta, 1).
    The scores are passed in *with* their autograd graphs: the loss must not differentiate through them."""
    torch.manual_seed(0)
    real_mean, sigma = 2.0, 0.6
    theta = torch.tensor(-1.0, requires_grad=True)
    z, eps = torch.randn(512), torch.randn(512)
    x0 = theta + z
    x_t = (1 - sigma) * x0 + sigma * eps
    real = posterior_mean(x_t, sigma, torch.tensor(real_mean))
    fake = posterior_mean(x_t, sigma, theta)
    dmd_loss(x0[:, None], real[:, None], fake[:, None]).backward()
    # by hand: fake - real = (theta - m) sigma^2 / ((1-sigma)^2 + sigma^2) for every sample, each normalised by
    # |x0 - real|, and d x0 / d theta = 1; the loss's gradient is their batch mean
    a = 1 - sigma
    gap = (theta.detach() - real_mean) * sigma ** 2 / (a * a + sigma ** 2)
    expected = (gap / (x0.detach() - real.detach()).abs()).mean()
    assert theta.grad < 0  # descending moves theta towards the real mean
    torch.testing.assert_close(theta.grad, expected, rtol=1e-5, atol=1e-7)
    # and plain SGD on it converges to the real distribution
    theta = torch.tensor(-1.0, requires_grad=True)
    optimiser = torch.optim.SGD([theta], lr=0.2)
    for _ in range(300):
        z, eps = torch.randn(256), torch.randn(256)
        x0 = theta + z
        x_t = (1 - sigma) * x0 + sigma * eps
        loss = dmd_loss(x0[:, None], posterior_mean(x_t, sigma, torch.tensor(real_mean))[:, None],
                        posterior_mean(x_t, sigma, theta)[:, None])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert abs(float(theta.detach()) - real_mean) < 0.15


needs_espeak = pytest.mark.skipif(not espeak_available(), reason="libespeak-ng missing: run `make espeak-ng`")


class Listed(list):
    pass


@pytest.fixture(scope="module")
def latents():
    source = WorldSource(WorldSplit(0), "train", 2, 64)
    vae = StreamingVAE.from_config(TINY.vae, seed=0)
    return Listed(encode_clip(source[i], vae, AudioFrontend(AudioConfig()), TINY.dit) for i in range(2))


@pytest.fixture(scope="module")
def checkpoints(latents, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stages")
    teacher = TeacherStage(TINY.dit, latents, TeacherTrainConfig(batch_size=4, learning_rate=2e-3, warmup_steps=5))
    for block in teacher.dit.blocks:
        torch.nn.init.normal_(block.attn2.audio_v_proj.weight, std=0.2)
    run_stage(teacher, folder / "t", 8, progress=False, export_to=folder / "teacher.safetensors")
    from model_core.checkpoint import load_facecast_checkpoint
    pairs = make_ode_pairs(load_facecast_checkpoint(folder / "teacher.safetensors")[0].float(), latents,
                           folder / "pairs.pt", count=4, frames=9, steps=2, shift=5.0, teacher_steps=3, batch_size=4,
                           progress=False)
    student = StudentInitStage(folder / "teacher.safetensors", latents, read_pairs(pairs),
                               StudentInitConfig(batch_size=2, learning_rate=1e-3, warmup_steps=2))
    run_stage(student, folder / "s", 4, progress=False, export_to=folder / "student.safetensors")
    return folder


@needs_espeak
def test_rollout_streams_as_the_score_stage_does(latents, checkpoints):
    """The generator's training rollout (no corruption, no teacher forcing) is a session's stream: held against the
    product's ScoreStage, chunk by chunk, adaptive sink included."""
    from model_core.checkpoint import load_facecast_checkpoint

    dit = load_facecast_checkpoint(checkpoints / "student.safetensors")[0].float().eval()
    batch = sample_batch(latents, np.random.default_rng(3), 9, dit.config, batch_size=1, audio_dropout=0.0,
                         listening_dropout=0.0)
    noise = torch.randn(1, 16, 9, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = rollout(dit, batch, noise, steps=2, shift=5.0, chunk=3, sink_rope_offset=3, exit_step=1)
    stage = ScoreStage(dit)
    session = stage.open("s", TINY.stream.replace(steps=2, shift=5.0), batch["reference"],
                         text_states(dit.config, 1, "cpu"), batch["regions"][:, :1])
    outputs = []
    for c in range(3):
        frames = slice(3 * c, 3 * c + 3)
        audio = dit.project_audio(batch["features"][:, :1, frames], batch["speaking"][:, :1, frames],
                                  batch["regions"][:, :1])
        chunk = stage.run_steps(session, NoisyChunk("s", c, noise[:, :, frames].clone(), audio, None))
        if c == 0:
            stage.set_sink(session, chunk.latents[:, :, :1])
        outputs.append(chunk.latents)
    torch.testing.assert_close(ours.final, torch.cat(outputs, 2), atol=1e-4, rtol=1e-4)
    # the sample at the last step is the clean estimate that step lands on
    torch.testing.assert_close(ours.samples, ours.final, atol=1e-4, rtol=1e-4)


@needs_espeak
def test_distillation_trains_both_scores_and_its_export_streams(latents, checkpoints, tmp_path):
    from model_core.engine import AvatarEngine

    stage = DistillStage(checkpoints / "teacher.safetensors", checkpoints / "student.safetensors", latents,
                         read_pairs(checkpoints / "pairs.pt"),
                         DistillConfig(batch_size=2, fake_updates=2, self_forcing_ramp=4, generator_lr=1e-3))
    generator_before = [p.detach().clone() for p in stage.generator.parameters()]
    fake_before = [p.detach().clone() for p in stage.fake.parameters()]
    run_stage(stage, tmp_path / "run", 6, log_every=2, checkpoint_every=3, progress=False,
              export_to=tmp_path / "student.safetensors")
    rows = read_log(tmp_path / "run")
    assert all(np.isfinite(r["fake_loss"]) and np.isfinite(r["dmd"]) for r in rows)
    assert any(not torch.equal(a, b) for a, b in zip(generator_before, stage.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(fake_before, stage.fake.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(stage.real.parameters(),
                                                 DistillStage(checkpoints / "teacher.safetensors",
                                                              checkpoints / "student.safetensors", latents,
                                                              None).real.parameters()))
    engine = AvatarEngine.from_preset("tiny", checkpoint=str(tmp_path / "student.safetensors"))
    session = engine.open_session(torch.zeros(3, 64, 64))
    chunks = engine.push_audio(session, np.zeros(8000, np.float32), 16000) + engine.end_input(session)
    assert all(torch.isfinite(c.frames).all() for c in chunks)
