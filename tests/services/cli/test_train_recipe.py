"""`facecast train`'s defaults are the shipped checkpoints' recipe: the teacher's runs in turn, each from the last
one's weights, the student's guidance, the fast decoder's share of the student's own streams; held against what the
shipped checkpoints record of their training."""

import dataclasses
import json
from pathlib import Path

import pytest

from model_core.checkpoint import audio_backend_of, read_facecast_metadata
from model_core.shipped import (CHECKPOINTS, TALK128_FAST_DECODER, TALK128_STUDENT, TALK128_TEACHER, TALK128_VAE,
                                VAE_DECODER_TRAIN, shipped_path)
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
        assert not Path(request.export).resolve().is_relative_to(CHECKPOINTS), "a test would overwrite a shipped file"
        export = Path(request.export) / "config.json" if request.stage.startswith("vae") else Path(request.export)
        export.parent.mkdir(parents=True, exist_ok=True)
        export.write_bytes(b"weights")
        return {"step": request.steps}

    monkeypatch.setattr(driver, "train", fake_train)
    monkeypatch.setattr(train_cli, "_ensure_world", lambda *args: None)
    monkeypatch.setattr(train_cli, "_ensure_latents", lambda *args, **kwargs: None)
    return requests


def test_the_teacher_runs_its_phases_in_turn_each_from_the_last_ones_weights(runs, tmp_path, capsys):
    final = tmp_path / "teacher.safetensors"
    assert main(["train", "teacher", "--run-dir", str(tmp_path), "--export", str(final)]) == 0
    base, mouth, mouth2, listen = (tmp_path / f"teacher-{phase}" / "teacher.safetensors"
                                   for phase in ("base", "mouth", "mouth2", "listen"))
    assert [(Path(r.run_dir).name, r.steps, r.init, r.mouth_weight, r.learning_rate, r.export) for r in runs] == [
        ("teacher-base", 3000, None, None, None, str(base)),
        ("teacher-mouth", 2000, str(base), 16.0, 2e-4, str(mouth)),
        ("teacher-mouth2", 6000, str(mouth), 16.0, 2e-4, str(mouth2)),
        ("teacher-listen", 6000, str(mouth2), 16.0, 2e-4, str(listen)),
        ("teacher-hear", 6000, str(listen), 16.0, 2e-4, str(final)),
    ]
    assert [r.audio_injection_dim for r in runs] == [None, None, None, 32, 32]
    # phase hear trains on Whisper's features: the same latents, in their own cache beside the log-mel one's
    latents = str(train_cli.DEFAULT_LATENTS)
    assert [r.latents for r in runs] == [latents] * 4 + [f"{latents}-whisper-ct2"]
    # one phase again, resumed on its own: from the phase before it, unless --init says otherwise; flags override
    runs.clear()
    assert main(["train", "teacher", "--run-dir", str(tmp_path), "--phase", "mouth", "--steps", "50"]) == 0
    assert [(r.steps, r.init, r.export) for r in runs] == [(50, str(base), str(mouth))]
    runs.clear()
    assert main(["train", "teacher", "--run-dir", str(tmp_path), "--phase", "mouth2", "--init", str(base),
                 "--mouth-weight", "8", "--export", str(final)]) == 0
    assert [(r.init, r.mouth_weight, r.learning_rate, r.export) for r in runs] == [(str(base), 8.0, 2e-4, str(final))]


def _teacher(path: Path, backend: str, width: int) -> Path:
    """A tiny teacher checkpoint that records the audio front end it was trained on."""
    from model_core.checkpoint import AUDIO_FRONTEND_KEY, save_facecast_checkpoint
    from model_core.config import get_preset
    from model_core.models import random_dit

    model = random_dit(dataclasses.replace(get_preset("tiny").dit, audio_dim=width), 0)
    save_facecast_checkpoint(model, path, extra={
        "stage": "teacher", AUDIO_FRONTEND_KEY: {"backend": backend, "fps": 25.0, "feature_dim": width}})
    return path


def test_voice_augment_reaches_every_run_it_names(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_cli, "_ensure_pairs", lambda *args: None)
    logmel = _teacher(tmp_path / "logmel.safetensors", "logmel", 320)
    assert main(["train", "student", "--run-dir", str(tmp_path), "--voice-augment", "0.5", "--teacher", str(logmel),
                 "--export", str(tmp_path / "student.safetensors")]) == 0
    assert [(r.stage, r.voice_augment) for r in runs] == [("student-init", 0.5), ("distill", 0.5)]
    runs.clear()
    assert main(["train", "teacher", "--run-dir", str(tmp_path), "--phase", "base", "--voice-augment", "2"]) == 0
    assert [(r.stage, r.voice_augment) for r in runs] == [("teacher", 2.0)]
    runs.clear()   # a speech encoder's features are not log-mel bins to shift: refused, nothing runs
    (tmp_path / "listen.safetensors").write_bytes(b"weights")
    assert main(["train", "teacher", "--run-dir", str(tmp_path), "--phase", "hear", "--init",
                 str(tmp_path / "listen.safetensors"), "--voice-augment", "1"]) == 2
    assert "--voice-augment reshapes log-mel features" in capsys.readouterr().err and runs == []


def _comparable(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


ADDED_SINCE = {"voice_augment": 0.0}
"""Recipe fields added after a shipped checkpoint was trained, with the value that is what it was trained with (off):
a checkpoint whose record lacks one was trained so."""


TEACHER_ADDED_SINCE = {"decay_from": 1.0}
"""The same for the teacher's recipe alone (its run's length, `steps`, is the phase's in the table)."""


def _recorded(train: dict, added: dict = ADDED_SINCE) -> dict:
    return {**{k: v for k, v in added.items() if k not in train}, **train}


def test_the_default_recipes_are_the_shipped_checkpoints():
    """Change a default and this fails until the shipped checkpoint is retrained with it (or the default restored)."""
    last_steps, last_recipe = list(train_cli.TEACHER_PHASES.values())[-1]
    recorded = {"steps": last_steps, **_recorded(read_facecast_metadata(shipped_path(TALK128_TEACHER))["train"],
                                                 {**ADDED_SINCE, **TEACHER_ADDED_SINCE})}
    shape = {k: v for k, v in last_recipe.items() if k in train_cli.TEACHER_SHAPE}
    expected = _comparable(TeacherTrainConfig(steps=last_steps,
                                              **{k: v for k, v in last_recipe.items() if k not in shape}))
    metadata = read_facecast_metadata(shipped_path(TALK128_TEACHER))
    assert {k: metadata["dit_config"][k] for k in shape if k != "audio_backend"} == \
        {k: v for k, v in shape.items() if k != "audio_backend"}
    assert audio_backend_of(metadata) == shape.get("audio_backend", "logmel")
    assert audio_backend_of(read_facecast_metadata(shipped_path(TALK128_STUDENT))) == audio_backend_of(metadata)
    assert {k: v for k, v in recorded.items() if k != "init"} == {k: v for k, v in expected.items() if k != "init"}
    student = _recorded(read_facecast_metadata(shipped_path(TALK128_STUDENT))["train"])
    assert student == _comparable(DistillConfig())
    assert train_cli.PAIRS["guidance"] == student["real_guidance"] == 3.5
    # the VAE records its last decoder phase's run; its first phase's is `--opening-weight 0.1 --interior-weight 30`
    assert (VAETrainConfig().opening_weight, VAETrainConfig().interior_weight) == (0.1, 30.0)
    decoder = json.loads((shipped_path(TALK128_VAE) / VAE_DECODER_TRAIN).read_text())["train"]
    last = train_cli.VAE_PHASES["noise"]
    assert decoder == _comparable(DecoderTrainConfig(steps=last.steps, **last.recipe))
    fast = json.loads((shipped_path(TALK128_FAST_DECODER) / "fast-decoder.json").read_text())["train"]
    assert fast == _comparable(FastDecoderTrainConfig())
    assert fast["steps"] == train_cli.DEFAULTS["fast-decoder"]["steps"]


def test_the_vae_runs_its_four_phases_in_turn_each_decoder_phase_from_the_last_ones_export(runs, tmp_path):
    final = tmp_path / "shipped-vae"
    assert main(["train", "vae", "--run-dir", str(tmp_path), "--export", str(final)]) == 0
    full, decoder = tmp_path / "vae" / "vae-full", tmp_path / "vae-decoder" / "vae-decoder"
    motion = tmp_path / "vae-motion" / "vae-motion"
    assert [(Path(r.run_dir).name, r.stage, r.steps, r.vae, r.motion_weight, r.latent_noise, r.learning_rate,
             r.export) for r in runs] == [
        ("vae", "vae", 2000, None, None, None, None, str(full)),
        ("vae-decoder", "vae-decoder", 1800, str(full), None, None, None, str(decoder)),
        ("vae-motion", "vae-decoder", 1200, str(decoder), 1.0, None, 3e-4, str(motion)),
        ("vae-noise", "vae-decoder", 1200, str(motion), 1.0, 0.5, 3e-4, str(final)),
    ]


def test_a_vae_decoder_phase_alone_starts_from_the_phase_before_or_from_vae(runs, tmp_path, capsys):
    decoder = tmp_path / "vae-decoder" / "vae-decoder"
    assert main(["train", "vae", "--run-dir", str(tmp_path), "--phase", "motion"]) == 2
    assert f"--vae: {decoder} is not a VAE directory; run `facecast train vae --phase decoder` first" in \
        capsys.readouterr().err
    decoder.mkdir(parents=True)
    (decoder / "config.json").write_text("{}")
    assert main(["train", "vae", "--run-dir", str(tmp_path), "--phase", "motion", "--steps", "5",
                 "--motion-weight", "2", "--learning-rate", "1e-4", "--latent-noise", "0.25"]) == 0
    assert [(r.vae, r.steps, r.motion_weight, r.latent_noise, r.learning_rate, r.export) for r in runs] == [
        (str(decoder), 5, 2.0, 0.25, 1e-4, str(tmp_path / "vae-motion" / "vae-motion"))]
    runs.clear()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert main(["train", "vae", "--run-dir", str(tmp_path), "--phase", "decoder", "--vae", str(other)]) == 0
    assert [(r.vae, r.motion_weight, r.export) for r in runs] == [(str(other), None, str(decoder))]


@pytest.mark.parametrize("argv, message", [
    (["--phase", "decoder", "--export", "x"], "--export applies to phase noise, not decoder: phase decoder leaves "
                                              "its weights in"),
    (["--phase", "motion", "--export", "x"], "--export applies to phase noise, not motion"),
    (["--phase", "full", "--motion-weight", "1"], "--motion-weight applies to the decoder phases"),
    (["--phase", "full", "--latent-noise", "1"], "--latent-noise applies to the decoder phases of `facecast train vae` "
                                                 "(--phase decoder or motion or noise), not to phase full"),
    (["--phase", "noise", "--latent-noise", "-1"], "--latent-noise -1 is invalid: at least 0 (0: off)"),
    (["--vae", "x"], "--vae applies to the decoder phases of `facecast train vae`"),
    (["--phase", "motion", "--motion-weight", "-1"], "--motion-weight -1 is invalid: at least 0 (0: off)"),
    (["--phase", "loud"],
     "--phase='loud' is not a phase of `facecast train vae`; allowed: full, decoder, motion, noise"),
])
def test_train_vae_refuses_what_does_not_apply_in_one_line(runs, tmp_path, capsys, argv, message):
    assert main(["train", "vae", "--run-dir", str(tmp_path)] + argv) == 2
    assert message in capsys.readouterr().err
    assert runs == []


def test_the_student_trains_on_the_features_its_teacher_heard(runs, tmp_path, monkeypatch):
    """A teacher of phase hear (Whisper's features) gets students trained on the Whisper latent cache; a log-mel
    teacher on the log-mel one."""
    monkeypatch.setattr(train_cli, "_ensure_pairs", lambda *args: None)
    teachers = {backend: _teacher(tmp_path / f"{backend}.safetensors", backend, width)
                for backend, width in (("whisper-ct2", 512), ("logmel", 320))}
    for backend, cache in (("whisper-ct2", f"{train_cli.DEFAULT_LATENTS}-whisper-ct2"),
                           ("logmel", str(train_cli.DEFAULT_LATENTS))):
        runs.clear()
        assert main(["train", "student", "--teacher", str(teachers[backend]), "--run-dir", str(tmp_path / backend),
                     "--export", str(tmp_path / backend / "student.safetensors")]) == 0
        assert [(r.stage, r.latents) for r in runs] == [("student-init", cache), ("distill", cache)]
