"""Stage 2 on `tiny`: the teacher's ODE pairs (kept at the student's levels, resumable) and the causal student's
regression onto them, whose export streams in the engine."""

import numpy as np
import pytest
import torch

from model_core.audio import AudioConfig, AudioFrontend
from model_core.config import get_preset
from model_core.training.latents import encode_clip
from model_core.training.loop import read_log, run_stage
from model_core.training.student_stage import (StudentInitConfig, StudentInitStage, make_ode_pairs, read_pairs,
                                               student_levels, teacher_levels)
from model_core.training.teacher_stage import (TeacherStage, TeacherTrainConfig, Window, predict_velocity,
                                               window_batch)
from model_core.vae import StreamingVAE
from model_core.world.speech import espeak_available
from model_core.world.split import WorldSplit
from model_core.world.store import WorldSource

pytestmark = pytest.mark.skipif(not espeak_available(), reason="libespeak-ng missing: run `make espeak-ng`")
TINY = get_preset("tiny")


class Listed(list):
    pass


@pytest.fixture(scope="module")
def latents():
    source = WorldSource(WorldSplit(0), "train", 2, 64)
    vae = StreamingVAE.from_config(TINY.vae, seed=0)
    frontend = AudioFrontend(AudioConfig())
    return Listed(encode_clip(source[i], vae, frontend, TINY.dit) for i in range(2))


@pytest.fixture(scope="module")
def teacher_path(latents, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    stage = TeacherStage(TINY.dit, latents, TeacherTrainConfig(batch_size=4, learning_rate=2e-3, warmup_steps=5))
    for block in stage.dit.blocks:  # audio that matters, so guidance changes something
        torch.nn.init.normal_(block.attn2.audio_v_proj.weight, std=0.2)
    run_stage(stage, folder, 10, progress=False, export_to=folder / "teacher.safetensors")
    return folder / "teacher.safetensors"


def test_teacher_grid_passes_through_the_student_levels():
    student = student_levels(2, 5.0)
    grid = teacher_levels(student, 12, 3.0)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and all(a > b for a, b in zip(grid, grid[1:]))
    assert all(any(abs(g - s) < 1e-9 for g in grid) for s in student)


def test_ode_pairs_are_the_teacher_trajectory_and_resume(latents, teacher_path, tmp_path):
    from model_core.checkpoint import load_facecast_checkpoint

    out = tmp_path / "pairs.pt"
    make_ode_pairs(load_facecast_checkpoint(teacher_path)[0].float(), latents, out, count=2, frames=9, steps=2,
                   shift=5.0, teacher_steps=3, guidance=2.0, batch_size=2, progress=False)
    first = read_pairs(out)
    make_ode_pairs(load_facecast_checkpoint(teacher_path)[0].float(), latents, out, count=4, frames=9, steps=2,
                   shift=5.0, teacher_steps=3, guidance=2.0, batch_size=2, progress=False)
    pairs = read_pairs(out)
    assert pairs["states"].shape == (4, 3, 16, 9, 8, 8)
    torch.testing.assert_close(pairs["states"][:2], first["states"])  # resumed, not redone
    # independently: Euler with CFG over the grid, by hand, from the stored noise; keep the state at sigma_1
    teacher = load_facecast_checkpoint(teacher_path)[0].float().eval()
    window = Window(**pairs["windows"][3])
    batch = window_batch(latents, [window], 9, teacher.config)
    silent = dict(batch, regions=torch.zeros_like(batch["regions"]))
    x = pairs["states"][3:4, 0].float()
    middle = None
    levels = teacher_levels(student_levels(2, 5.0), 3, 3.0)
    with torch.no_grad():
        for a, b in zip(levels, levels[1:]):
            t = torch.tensor([a])
            c, u = (predict_velocity(teacher, x, t, d, layout="full") for d in (batch, silent))
            x = x + (b - a) * (u + 2.0 * (c - u))
            if abs(b - student_levels(2, 5.0)[1]) < 1e-9:
                middle = x
    torch.testing.assert_close(pairs["states"][3, 1].float(), middle[0], atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(pairs["states"][3, 2].float(), x[0], atol=5e-3, rtol=5e-3)


def test_student_regression_lowers_its_loss_and_its_export_streams(latents, teacher_path, tmp_path):
    from model_core.checkpoint import load_facecast_checkpoint
    from model_core.engine import AvatarEngine

    pairs_path = make_ode_pairs(load_facecast_checkpoint(teacher_path)[0].float(), latents, tmp_path / "pairs.pt",
                                count=4, frames=9, steps=2, shift=5.0, teacher_steps=3, batch_size=4, progress=False)
    stage = StudentInitStage(teacher_path, latents, read_pairs(pairs_path),
                             StudentInitConfig(batch_size=4, learning_rate=2e-3, warmup_steps=5))
    run_stage(stage, tmp_path / "run", 40, log_every=10, progress=False, export_to=tmp_path / "student.safetensors")
    losses = [row["loss"] for row in read_log(tmp_path / "run")]
    assert losses[-1] < 0.7 * losses[0], losses
    engine = AvatarEngine.from_preset("tiny", checkpoint=str(tmp_path / "student.safetensors"))
    session = engine.open_session(torch.zeros(3, 64, 64))
    chunks = engine.push_audio(session, np.zeros(16000, np.float32), 16000) + engine.end_input(session)
    assert sum(c.num_frames for c in chunks) == 25 and all(torch.isfinite(c.frames).all() for c in chunks)
