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


def test_settings_defaults_and_api_keys_from_config_env_and_file(monkeypatch, tmp_path):
    from services.api.keys import hash_api_key

    settings = AppSettings.from_args({"api_keys": {"ops": hash_api_key("ops-key-0123456789")}})
    keys = tmp_path / "keys"
    keys.write_text("# rotation: old and new\nold=old-key-0123456789\nnew new-key-0123456789\n")
    monkeypatch.setenv("FACECAST_API_KEYS", "env-key-0123456789, agent=agent-key-0123456789")
    monkeypatch.setenv("FACECAST_API_KEY_FILE", str(keys))
    ring = settings.effective_api_keys()
    assert ring.names == ("ops", "env-1", "agent", "old", "new")
    assert [ring.match(key) for key in ("ops-key-0123456789", "env-key-0123456789", "new-key-0123456789",
                                        "ops-key-012345678")] == ["ops", "env-1", "new", None]
    assert "key-0123456789" not in repr(ring) and "sha256" not in repr(ring)
    assert settings.stream_defaults().steps == settings.steps == 2


@pytest.mark.parametrize("api_keys, needle", [
    (["a-raw-key-in-a-list-0000"], "must be a mapping of key name to 'sha256:<64 hex digits>'"),
    ({"ops": "a-raw-key-in-the-config"}, "api_keys['ops'] must be 'sha256:<64 lowercase hex digits>'"),
    ({"bad name": "sha256:" + "0" * 64}, "key name 'bad name' is invalid"),
])
def test_api_keys_in_a_config_must_be_named_hashes(api_keys, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)) as caught:
        AppSettings.from_args({"api_keys": api_keys})
    assert "raw-key" not in str(caught.value)


def test_a_short_or_clashing_key_in_the_environment_is_refused_without_echoing_it(monkeypatch):
    monkeypatch.setenv("FACECAST_API_KEYS", "ops=short-key")
    with pytest.raises(ConfigError, match=r"\$FACECAST_API_KEYS entry 1: the key is 9 characters long; at least 16"):
        AppSettings().effective_api_keys()
    monkeypatch.setenv("FACECAST_API_KEYS", "ops=first-key-0123456789,ops=other-key-0123456789")
    with pytest.raises(ConfigError, match="entry 2: key name 'ops' is given twice") as caught:
        AppSettings().effective_api_keys()
    assert "0123456789" not in str(caught.value)


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
