"""`facecast serve` (services/cli/serve.py) refusing what it can check before it starts anything: each refusal is one
line naming the flag, with status 2, and no Ray or redis-server is started.  Serving itself is held end to end by
test_serve_call.py."""

import socket

import pytest

from services.cli.main import main
from services.deploy.serve_config import config_path
from services.net import free_port


def refused(argv, capsys) -> str:
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("facecast serve: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_a_missing_config_is_named(capsys):
    err = refused(["--config", "nonexistent.yaml", "--port", str(free_port())], capsys)
    assert "nonexistent.yaml" in err


def test_a_config_needing_custom_resources_is_refused(capsys):
    err = refused(["--config", str(config_path("1+1")), "--port", str(free_port())], capsys)
    assert "score_slot (by ScoreWorkerGroup)" in err and "vae_slot (by VAEDecoder)" in err


def test_too_few_gpus_are_refused(capsys):
    err = refused(["--config", str(config_path("local")), "--num-gpus", "1", "--port", str(free_port())], capsys)
    assert "--num-gpus 1 is too few" in err and "ask for 2 GPUs" in err


@pytest.mark.parametrize("port", [0, 70000])
def test_an_impossible_port_is_refused(port, capsys):
    assert f"--port {port} is invalid: allowed 1 to 65535" in refused(["--preset", "tiny", "--port", str(port)], capsys)


def test_a_port_in_use_is_refused(capsys):
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert f"--port {port} is in use" in refused(["--preset", "tiny", "--port", str(port)], capsys)


def test_an_unknown_preset_is_refused(capsys):
    err = refused(["--preset", "huge", "--port", str(free_port())], capsys)
    assert "preset='huge' is unknown; allowed: tiny, small, talk128" in err


def test_missing_trained_weights_are_named_before_anything_starts(capsys, monkeypatch, tmp_path):
    """No --config serves the trained preset: without its shipped weights, one line says which file and how to make
    it (and no cluster starts to find out)."""
    from model_core import shipped

    monkeypatch.setattr(shipped, "CHECKPOINTS", tmp_path)
    err = refused(["--port", str(free_port())], capsys)
    assert f"{tmp_path}/talk128-student.safetensors" in err and "facecast train student" in err


def test_a_fast_decoder_the_preset_does_not_ship_is_refused_before_anything_starts(capsys):
    err = refused(["--preset", "tiny", "--decoder", "fast", "--port", str(free_port())], capsys)
    assert "decoder='fast' is invalid: allowed: full (preset 'tiny' ships no fast decoder)" in err


def test_a_key_on_the_command_line_is_refused_with_the_reason(capsys):
    err = refused(["--preset", "tiny", "--api-key", "a-key-anyone-can-see-in-ps", "--port", str(free_port())], capsys)
    assert "--api-key was removed" in err and "ps" in err and "$FACECAST_API_KEYS" in err and "--api-key-file" in err
    assert "a-key-anyone-can-see-in-ps" not in err


def test_a_bad_key_file_is_named_without_its_keys(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("FACECAST_API_KEYS", raising=False)
    missing = tmp_path / "nope"
    err = refused(["--preset", "tiny", "--api-key-file", str(missing), "--port", str(free_port())], capsys)
    assert f"--api-key-file: API key file '{missing}' cannot be read" in err
    short = tmp_path / "keys"
    short.write_text("ops=good-key-0123456789\nold=tiny\n")
    err = refused(["--preset", "tiny", "--api-key-file", str(short), "--port", str(free_port())], capsys)
    assert f"API key file '{short}' entry 2: the key is 4 characters long" in err
    assert "good-key" not in err and "tiny\n" not in err


def test_keys_new_and_hash_print_the_lines_a_server_accepts(capsys, monkeypatch):
    import io

    from services.api.keys import ApiKeyring, parse_api_keys

    assert main(["keys", "new", "--name", "agent"]) == 0
    out = capsys.readouterr().out
    entry = next(line.split()[-1] for line in out.splitlines() if line.startswith("for $FACECAST_API_KEYS"))
    key = parse_api_keys(entry, "out")["agent"]
    config_line = out.splitlines()[-1].split(":  ", 1)[1]
    name, digest = config_line.split(": ")
    assert ApiKeyring.from_hashes({name: digest.strip('"')}).match(key) == "agent"
    monkeypatch.setattr("sys.stdin", io.StringIO(key + "\n"))
    assert main(["keys", "hash", "--name", "agent"]) == 0
    assert capsys.readouterr().out.strip().endswith(config_line)
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["keys", "hash"]) == 2
    assert "at least 16 are required" in capsys.readouterr().err


def test_tls_and_host_flags_are_checked_before_anything_starts(capsys, tmp_path):
    from tests.tls import self_signed

    cert, key = self_signed(tmp_path)
    _, other_key = self_signed(tmp_path, "other")
    port = str(free_port())
    assert "--tls-key is missing: TLS needs both" in refused(["--preset", "tiny", "--tls-cert", str(cert),
                                                               "--port", port], capsys)
    err = refused(["--preset", "tiny", "--tls-cert", str(cert), "--tls-key", str(other_key), "--port", port], capsys)
    assert f"--tls-key {str(other_key)!r} is not the private key of --tls-cert {str(cert)!r}" in err
    err = refused(["--preset", "tiny", "--host", "example.com", "--port", port], capsys)
    assert "--host 'example.com' is not an IP address: 127.0.0.1 (this machine only, the default), 0.0.0.0" in err


@pytest.mark.parametrize("entry, named", [("ScoreWorkerGroup=0", "must be a positive integer"),
                                          ("ScoreWorkerGroup=two", "must be a positive integer"),
                                          ("LLMBridge=2", "allowed: SessionIngress, AudioEncoder"),
                                          ("Score=2", "unknown or unscalable deployment 'Score'")])
def test_bad_replica_counts_are_refused_naming_the_flag_and_the_allowed_values(entry, named, capsys):
    err = refused(["--preset", "tiny", "--replicas", entry, "--port", str(free_port())], capsys)
    assert f"--replicas {entry!r}" in err and named in err


def test_replicas_are_counted_in_the_gpus_and_checked_against_the_transport(capsys):
    err = refused(["--preset", "tiny", "--replicas", "ScoreWorkerGroup=3", "--num-gpus", "3",
                   "--port", str(free_port())], capsys)
    assert "--num-gpus 3 is too few" in err and "ask for 4 GPUs" in err
    err = refused(["--preset", "tiny", "--replicas", "VAEDecoder=2", "--latent-transport", "collective",
                   "--port", str(free_port())], capsys)
    assert "exactly 1 VAEDecoder replica" in err
