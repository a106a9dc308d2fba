"""AppSettings: the cluster's one config object names every bad field."""

import re

import pytest

from model_core.config import ConfigError
from services.serving.settings import AppSettings


@pytest.mark.parametrize("args,needle", [
    ({"layout": "2+2"}, "layout='2+2'"), ({"preset": "huge"}, "preset='huge'"), ({"steps": 7}, "steps=7"),
    ({"score_mode": "parallel"}, "score_mode"), ({"vae_placement": "gpu9"}, "vae_placement"),
    ({"max_batch_size": 0}, "max_batch_size"), ({"stepz": 2}, "unknown application args ['stepz']"),
    ({"audio_backend": "nope"}, "backend='nope'"), ({"audio_backend": "whisper"}, "model_path=None"),
    ({"session_ttl_s": 0}, "session_ttl_s"), ({"session_sweep_s": -1}, "session_sweep_s"),
    ({"latent_transport": "rdma"}, "latent_transport='rdma' is invalid: allowed: object_store, collective"),
    ({"latent_transport": "collective", "vae_placement": "colocated"}, "allowed: object_store"),
])
def test_settings_name_the_bad_field(args, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        AppSettings.from_args(args)


def test_settings_defaults_and_api_keys_from_env(monkeypatch):
    settings = AppSettings.from_args({"api_keys": ["a"]})
    monkeypatch.setenv("FACECAST_API_KEYS", "b, c")
    assert settings.effective_api_keys() == {"a", "b", "c"}
    assert settings.stream_defaults().steps == settings.steps == 2


def test_the_default_decoder_must_be_one_the_preset_ships():
    with pytest.raises(ConfigError, match="decoder='fast' is invalid: allowed: full \\(preset 'tiny' ships no fast "
                                          "decoder\\)"):
        AppSettings(preset="tiny", decoder="fast")
    assert AppSettings(preset="tiny").stream_defaults().decoder == "full"


def test_a_collective_latent_transport_without_its_backend_fails_the_deploy_naming_the_fix(monkeypatch):
    """NCCL on GPUs needs cupy: a score group asked for the link where the backend is missing refuses to start with
    the setting and the fix named, not at the first session."""
    from ray.util import collective

    from services.serving.latent_link import LinkError, check_available

    monkeypatch.setattr(collective, "nccl_available", lambda: False)
    with pytest.raises(LinkError, match=re.escape("pip install 'facecast[gpu]'")):
        check_available("nccl")
    check_available("gloo")   # on CPU the same path runs on gloo, which is here
