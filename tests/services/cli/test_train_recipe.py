"""`facecast train`'s defaults are the shipped checkpoints' recipe: the teacher's runs in turn, each from the last
one's weights, the student's guidance, the fast decoder's share of the student's own streams; held against what the
shipped checkpoints record of their training."""

import dataclasses
import json
from pathlib import Path

import pytest

from model_core.checkpoint import read_facecast_metadata
from model_core.shipped import TALK128_FAST_DECODER, TALK128_STUDENT, TALK128_TEACHER, shipped_path
from model_core.training.dmd_stage import DistillConfig
from model_core.training.fastdecode_stage import FastDecoderTrainConfig
from model_core.training.teacher_stage import TeacherTrainConfig
from model_core.training.vae_stage import DecoderTrainConfig, VAETrainConfig
from services.cli import train as train_cli
from services.cli.main import main
from services.train import driver


@pytest.fixture
def runs(monkeypatch):
    """Every driver run the command asks for, in order (each leaves its export, as a finished run does)."""
    requests = []

    def fake_train(request):
        requests.append(request)
        Path(request.export).parent.mkdir(parents=True, exist_ok=True)
        Path(request.export).write_bytes(b"weights")
        return {"step": request.steps}

    monkeypatch.setattr(driver, "train", fake_train)
    monkeypatch.setattr(train_cli, "_ensure_world", lambda *args: None)
    monkeypatch.setattr(train_cli, "_ensure_latents", lambda *args, **kwargs: None)
    return requests


def test_the_teacher_runs_its_phases_in_turn_each_from_the_last_ones_weights(runs, tmp_path, capsys):
    final = tmp_path / "teacher.safetensors"
    assert main(["train", "teacher", "--run-dir", str(tmp_path), "--export", str(final)]) == 0
    base, mouth = (tmp_path / f"teacher-{phase}" / "teacher.safetensors" for phase in ("base", "mouth"))
    assert [(Path(r.run_dir).name, r.steps, r.init, r.mouth_weight, r.learning_rate, r.export) for r in runs] == [
        ("teacher-base", 3000, None, None, None, str(base)),
        ("teacher-mouth", 2000, str(base), 16.0, 2e-4, str(mouth)),
        ("teacher-mouth2", 6000, str(mouth), 16.0, 2e-4, str(final)),
    ]
    # one phase again, resumed on its own: from the phase before it, unless --init says otherwise; flags override
    runs.clear()
    assert main(["train", "teacher", "--run-dir", str(tmp_path), "--phase", "mouth", "--steps", "50"]) == 0
    assert [(r.steps, r.init, r.export) for r in runs] == [(50, str(base), str(mouth))]
    runs.clear()
    assert main(["train", "teacher", "--run-dir", str(tmp_path), "--phase", "mouth2", "--init", str(base),
                 "--mouth-weight", "8", "--export", str(final)]) == 0
    assert [(r.init, r.mouth_weight, r.learning_rate, r.export) for r in runs] == [(str(base), 8.0, 2e-4, str(final))]


def _comparable(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def test_the_default_recipes_are_the_shipped_checkpoints():
    """Change a default and this fails until the shipped checkpoint is retrained with it (or the default restored)."""
    recorded = read_facecast_metadata(shipped_path(TALK128_TEACHER))["train"]
    last_steps, last_recipe = list(train_cli.TEACHER_PHASES.values())[-1]
    expected = _comparable(TeacherTrainConfig(**last_recipe))
    assert {k: v for k, v in recorded.items() if k != "init"} == {k: v for k, v in expected.items() if k != "init"}
    student = read_facecast_metadata(shipped_path(TALK128_STUDENT))["train"]
    assert student == _comparable(DistillConfig())
    assert train_cli.PAIRS["guidance"] == student["real_guidance"] == 3.5
    # the VAE records no training config; its recipe is `--opening-weight 0.1 --interior-weight 30` (MODEL_CARD)
    assert (VAETrainConfig().opening_weight, VAETrainConfig().interior_weight) == (0.1, 30.0)
    assert DecoderTrainConfig().interior_weight == 30.0
    fast = json.loads((shipped_path(TALK128_FAST_DECODER) / "fast-decoder.json").read_text())["train"]
    assert fast == _comparable(FastDecoderTrainConfig())
    assert fast["steps"] == train_cli.DEFAULTS["fast-decoder"]["steps"]
