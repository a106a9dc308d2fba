"""`facecast call` (services/cli/call.py) without a server: what it refuses before connecting (status 2) and the hint
it gives when nothing listens (status 1).  Calling a real `facecast serve` is held by test_serve_call.py."""

import numpy as np
import pytest

from services.cli.main import main
from services.net import free_port


@pytest.fixture
def inputs(tmp_path):
    import wave

    from PIL import Image

    image = tmp_path / "face.png"
    Image.fromarray((np.random.default_rng(5).random((32, 32, 3)) * 255).astype(np.uint8)).save(image)
    audio = tmp_path / "speech.wav"
    with wave.open(str(audio), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(16000)
        handle.writeframes(np.zeros(1600, "<i2").tobytes())
    return image, audio, tmp_path


def test_call_where_nothing_listens_exits_1_with_a_hint(inputs, capsys):
    image, audio, tmp = inputs
    target = f"127.0.0.1:{free_port()}"
    code = main(["call", "--target", target, "--image", str(image), "--audio", str(audio),
                 "--out", str(tmp / "none.mp4"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert "UNAVAILABLE" in err and f"is `facecast serve` running at {target}?" in err


@pytest.mark.parametrize("flag,value,needle", [
    ("--image", "{tmp}/missing.png", "missing.png': file not found"),
    ("--out", "{tmp}/out.avi", "must end in .mp4"),
    ("--out", "{tmp}/no/such/dir/out.mp4", "does not exist"),
])
def test_bad_arguments_exit_2_before_connecting(inputs, capsys, flag, value, needle):
    image, audio, tmp = inputs
    flags = {"--image": str(image), "--audio": str(audio), "--out": str(tmp / "out.mp4"), flag: value.format(tmp=tmp)}
    argv = ["call", "--target", f"127.0.0.1:{free_port()}", "--quiet"]
    for name, text in flags.items():
        argv += [name, text]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("facecast call: error: ") and needle in err


def test_the_client_reads_its_key_from_a_key_file_or_the_environment_never_argv(tmp_path, monkeypatch):
    """`--api-key-file` reads the server's key-file format (its first key); `$FACECAST_API_KEY` otherwise; a key on
    the command line and a short key are refused without being echoed."""
    import argparse

    from services.cli.common import UserError, client_api_key

    keys = tmp_path / "keys"
    keys.write_text("# mine\nops=client-key-0123456789\nold=older-key-0123456789\n")
    assert client_api_key(argparse.Namespace(api_key=None, api_key_file=str(keys))) == "client-key-0123456789"
    keys.write_text("bare-key-0123456789abc\n")
    assert client_api_key(argparse.Namespace(api_key=None, api_key_file=str(keys))) == "bare-key-0123456789abc"
    monkeypatch.setenv("FACECAST_API_KEY", "env-key-0123456789")
    assert client_api_key(argparse.Namespace(api_key=None, api_key_file=None)) == "env-key-0123456789"
    with pytest.raises(UserError, match="--api-key was removed") as caught:
        client_api_key(argparse.Namespace(api_key="in-ps-0123456789", api_key_file=None))
    assert "in-ps" not in str(caught.value)
    keys.write_text("ops=tiny\n")
    with pytest.raises(UserError, match="entry 1: the key is 4 characters long") as caught:
        client_api_key(argparse.Namespace(api_key=None, api_key_file=str(keys)))
    assert "tiny" not in str(caught.value)
    keys.write_text("# nothing\n")
    with pytest.raises(UserError, match="holds no key"):
        client_api_key(argparse.Namespace(api_key=None, api_key_file=str(keys)))
