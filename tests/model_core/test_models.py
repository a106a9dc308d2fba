"""Model construction: seeded random weights, and the one parser of device and dtype names."""

import pytest
import torch

from model_core.config import ConfigError
from model_core.models import random_dit, resolve_device, torch_dtype

from .helpers import tiny_config

ALLOWED_DEVICES = "allowed: auto, cpu, cuda, cuda:N"


def test_random_weights_are_a_function_of_the_seed_and_audio_acts_from_the_start():
    a, again, other = random_dit(tiny_config(), 1), random_dit(tiny_config(), 1), random_dit(tiny_config(), 2)
    for (name, weight), same, different in zip(a.state_dict().items(), again.state_dict().values(),
                                               other.state_dict().values()):
        assert torch.equal(weight, same), name
    assert not torch.equal(a.blocks[0].attn1.to_q.weight, other.blocks[0].attn1.to_q.weight)
    for block in a.blocks:  # zero-initialised in a fresh model; random here, so audio changes the output
        assert block.attn2.audio_v_proj.weight.abs().amax() > 0


def test_dtype_names():
    assert torch_dtype("float32") is torch.float32
    assert torch_dtype("bfloat16") is torch.bfloat16
    assert torch_dtype("float16") is torch.float16
    with pytest.raises(ConfigError, match=r"^--dtype='float64' is invalid: allowed: float32, bfloat16, float16$"):
        torch_dtype("float64", field="--dtype")
    with pytest.raises(ConfigError, match=r"^dtype='fp32' is invalid"):
        torch_dtype("fp32")


def test_device_names_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "CPU", "cpu:0", "cuda:", "cuda:x", "cuda:-1", ""):
        with pytest.raises(ConfigError) as error:
            resolve_device(bad, field="--device")
        assert str(error.value) == f"--device={bad!r} is invalid: {ALLOWED_DEVICES}"
    for asked in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=rf"^device='{asked}' asks for CUDA, but this machine has no CUDA"):
            resolve_device(asked)


def test_device_names_with_two_cuda_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"^device='cuda:2' is invalid: this machine has 2 CUDA device\(s\), "
                                          r"cuda:0 to cuda:1$"):
        resolve_device("cuda:2")


def test_a_preset_streams_its_shipped_weights_and_names_them_when_missing(tmp_path, monkeypatch):
    """A preset with `weights` loads that file from checkpoints/ when no checkpoint is given (the trained default of
    generate/serve/demo); missing, the score model refuses in one message naming the file and the command that makes
    it, while the VAE alone (what the training stages ask for before the score model exists) still builds."""
    import dataclasses

    from model_core import shipped
    from model_core.audio import AudioConfig
    from model_core.checkpoint import CheckpointError, save_facecast_checkpoint
    from model_core.config import get_preset
    from model_core.models import build_dit, build_vae

    monkeypatch.setattr(shipped, "CHECKPOINTS", tmp_path)
    preset = dataclasses.replace(get_preset("tiny"), weights="tiny-trained.safetensors")
    audio = AudioConfig()
    with pytest.raises(CheckpointError, match="tiny-trained.safetensors.*missing.*facecast train student"):
        build_dit(preset, checkpoint=None, device="cpu", dtype=torch.float32, seed=0, audio_config=audio)
    assert build_vae(preset, checkpoint=None, device="cpu", seed=0) is not None
    trained, _ = build_dit(get_preset("tiny"), checkpoint=None, device="cpu", dtype=torch.float32, seed=7,
                           audio_config=audio)
    save_facecast_checkpoint(trained, tmp_path / "tiny-trained.safetensors")
    loaded, note = build_dit(preset, checkpoint=None, device="cpu", dtype=torch.float32, seed=0, audio_config=audio)
    assert note == f"weights: {tmp_path / 'tiny-trained.safetensors'}"
    for (name, weight), expected in zip(loaded.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(weight, expected), name
    random, note = build_dit(get_preset("tiny"), checkpoint=None, device="cpu", dtype=torch.float32, seed=0,
                             audio_config=audio)
    assert "RANDOM" in note


def test_a_checkpoint_is_fed_the_audio_front_end_it_was_trained_on(tmp_path):
    """The engine, the cluster's settings and `generate` feed a checkpoint the features it learned from (recorded at
    export), not the preset's default; a checkpoint without the record was trained on log-mel."""
    import dataclasses

    pytest.importorskip("ctranslate2")
    from model_core.checkpoint import AUDIO_FRONTEND_KEY, save_facecast_checkpoint
    from model_core.config import get_preset
    from model_core.engine import AvatarEngine
    from model_core.models import audio_config_for
    from services.serving.settings import AppSettings

    tiny = get_preset("tiny")
    hears = random_dit(dataclasses.replace(tiny.dit, audio_dim=512), 0)
    save_facecast_checkpoint(hears, tmp_path / "whisper.safetensors", extra={
        "stage": "distill", AUDIO_FRONTEND_KEY: {"backend": "whisper-ct2", "fps": 25.0, "feature_dim": 512}})
    save_facecast_checkpoint(random_dit(tiny.dit, 0), tmp_path / "older.safetensors", extra={"stage": "distill"})
    assert audio_config_for(tiny, str(tmp_path / "whisper.safetensors")).backend == "whisper-ct2"
    assert audio_config_for(tiny, str(tmp_path / "older.safetensors")).backend == "logmel"
    assert audio_config_for(tiny, None).backend == tiny.audio_backend
    engine = AvatarEngine.from_preset("tiny", checkpoint=str(tmp_path / "whisper.safetensors"))
    assert engine.audio_config.backend == "whisper-ct2" and engine.frontend(25.0).feature_dim == 512
    settings = AppSettings(preset="tiny", checkpoint=str(tmp_path / "whisper.safetensors"))
    assert settings.audio_config().backend == "whisper-ct2"
