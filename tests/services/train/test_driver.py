"""The training driver's request (services/train/driver.py): what each stage accepts, and that a request's
recipe overrides reach the stage it builds."""

import pytest

from services.train.driver import TrainRequest, build_stage


def test_overrides_are_refused_on_stages_they_do_not_belong_to():
    with pytest.raises(ValueError, match="history_corrupt applies to the distill stage, not 'teacher'"):
        TrainRequest(stage="teacher", data="world:train", run_dir="x", steps=1, latents="l", history_corrupt=0.0)
    with pytest.raises(ValueError, match="opening_weight applies to the vae stage"):
        TrainRequest(stage="probe", data="world:train", run_dir="x", steps=1, opening_weight=0.1)
    with pytest.raises(ValueError, match="interior_weight applies to the vae stages"):
        TrainRequest(stage="probe", data="world:train", run_dir="x", steps=1, interior_weight=30.0)
    with pytest.raises(ValueError, match="init applies to the teacher stage, not 'distill'"):
        TrainRequest(stage="distill", data="world:train", run_dir="x", steps=1, latents="l", teacher="t",
                     student="s", pairs="p", init="t")
    with pytest.raises(ValueError, match="mouth_weight applies to the teacher stage, not 'vae'"):
        TrainRequest(stage="vae", data="world:train", run_dir="x", steps=1, mouth_weight=8.0)
    with pytest.raises(ValueError, match="guidance applies to the distill stage, not 'teacher'"):
        TrainRequest(stage="teacher", data="world:train", run_dir="x", steps=1, latents="l", guidance=4.0)


class NoLatents:
    """A latent cache stand-in: building a stage only opens it and checks its VAE."""

    def __init__(self, path):
        pass

    def check_vae(self, vae):
        pass


def test_the_history_corrupt_override_reaches_the_distillation(monkeypatch):
    """`--history-corrupt 0` is the ablation the eval table needs: the DistillConfig built must carry it."""
    from model_core.training import dmd_stage, latents, student_stage

    built = {}

    monkeypatch.setattr(latents, "LatentSource", NoLatents)
    monkeypatch.setattr(student_stage, "read_pairs", lambda path: {})
    monkeypatch.setattr(dmd_stage, "DistillStage", lambda *args, **kwargs: built.setdefault("config", args[4]))
    request = TrainRequest(stage="distill", data="world:train", run_dir="x", steps=1, latents="l", teacher="t",
                           student="s", pairs="p", history_corrupt=0.0, guidance=4.5)
    config = build_stage(request)
    assert (config.history_corrupt, config.real_guidance) == (0.0, 4.5)
    default = TrainRequest(stage="distill", data="world:train", run_dir="x", steps=1, latents="l", teacher="t",
                           student="s", pairs="p")
    built.clear()
    assert build_stage(default).history_corrupt == dmd_stage.DistillConfig().history_corrupt == 0.1
    built.clear()
    assert build_stage(default).real_guidance == dmd_stage.DistillConfig().real_guidance == 3.5


def test_the_teacher_overrides_reach_its_config(monkeypatch):
    """`--init`, `--mouth-weight` and a phase's `decay_from` must reach the TeacherTrainConfig the stage is built with,
    with the run's length (where a falling rate reaches 0)."""
    from model_core.training import latents, teacher_stage

    monkeypatch.setattr(latents, "LatentSource", NoLatents)
    monkeypatch.setattr(latents, "dit_config_for_latents", lambda preset, source: preset.dit)
    monkeypatch.setattr(teacher_stage, "TeacherStage", lambda config, source, train, **kwargs: train)
    request = TrainRequest(stage="teacher", data="world:train", run_dir="x", steps=40, latents="l", init="t.st",
                           mouth_weight=12.0, decay_from=0.5)
    built = build_stage(request)
    assert (built.init, built.mouth_weight, built.decay_from, built.steps) == ("t.st", 12.0, 0.5, 40)
    default = build_stage(TrainRequest(stage="teacher", data="world:train", run_dir="x", steps=1, latents="l"))
    assert (default.init, default.mouth_weight) == (None, teacher_stage.TeacherTrainConfig().mouth_weight)
    assert default.decay_from == teacher_stage.TeacherTrainConfig().decay_from == 1.0   # the rate holds
    with pytest.raises(ValueError, match="decay_from applies to the teacher stage, not 'vae'"):
        TrainRequest(stage="vae", data="world:train", run_dir="x", steps=1, decay_from=0.5)


def test_the_voice_augmentation_and_the_grown_shape_reach_their_stages(monkeypatch):
    """A phase's `voice_augment` reaches the teacher's, the student initialisation's and the distillation's config;
    its `audio_injection_dim` the teacher's shape (and nothing else's)."""
    from model_core.config import get_preset
    from model_core.training import dmd_stage, latents, student_stage, teacher_stage

    monkeypatch.setattr(latents, "LatentSource", NoLatents)
    monkeypatch.setattr(latents, "dit_config_for_latents", lambda preset, source: preset.dit)
    monkeypatch.setattr(teacher_stage, "TeacherStage", lambda config, source, train, **kwargs: (config, train))
    monkeypatch.setattr(student_stage, "read_pairs", lambda path: {})
    monkeypatch.setattr(student_stage, "StudentInitStage", lambda teacher, source, pairs, train, **kwargs: train)
    monkeypatch.setattr(dmd_stage, "DistillStage", lambda *args, **kwargs: args[4])
    shape, train = build_stage(TrainRequest(stage="teacher", data="world:train", run_dir="x", steps=1, latents="l",
                                            voice_augment=1.0, audio_injection_dim=32))
    assert (shape.audio_injection_dim, shape.num_layers, train.voice_augment) == (32, 4, 1.0)
    shape, train = build_stage(TrainRequest(stage="teacher", data="world:train", run_dir="x", steps=1, latents="l"))
    assert shape == get_preset("talk128").dit and train.voice_augment == 0.0
    for stage in ("student-init", "distill"):
        request = TrainRequest(stage=stage, data="world:train", run_dir="x", steps=1, latents="l", teacher="t",
                               student="s", pairs="p", voice_augment=0.5)
        assert build_stage(request).voice_augment == 0.5
    with pytest.raises(ValueError, match="voice_augment applies to the teacher and student-init and distill stage"):
        TrainRequest(stage="vae", data="world:train", run_dir="x", steps=1, voice_augment=1.0)
    with pytest.raises(ValueError, match="audio_injection_dim applies to the teacher stage, not 'distill'"):
        TrainRequest(stage="distill", data="world:train", run_dir="x", steps=1, latents="l", teacher="t",
                     student="s", pairs="p", audio_injection_dim=32)


def test_the_decoder_phase_overrides_reach_its_config(monkeypatch):
    """`--motion-weight`, `--interior-weight` and `--learning-rate` must reach the DecoderTrainConfig (phase motion's
    recipe is motion weight 1 at 3e-4)."""
    from model_core.training import vae_stage
    from model_core.world import store

    monkeypatch.setattr(store, "open_source", lambda *args, **kwargs: None)
    monkeypatch.setattr(vae_stage, "DecoderStage", lambda vae, source, train, **kwargs: train)
    request = TrainRequest(stage="vae-decoder", data="world:train", run_dir="x", steps=7, vae="v", motion_weight=1.5,
                           interior_weight=10.0, learning_rate=3e-4)
    config = build_stage(request)
    assert (config.steps, config.motion_weight, config.interior_weight, config.learning_rate) == (7, 1.5, 10.0, 3e-4)
    default = build_stage(TrainRequest(stage="vae-decoder", data="world:train", run_dir="x", steps=7, vae="v"))
    assert default.motion_weight == vae_stage.DecoderTrainConfig().motion_weight == 0.0
    with pytest.raises(ValueError, match="motion_weight applies to the vae-decoder stage, not 'vae'"):
        TrainRequest(stage="vae", data="world:train", run_dir="x", steps=1, motion_weight=1.0)
