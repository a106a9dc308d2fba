"""`facecast generate` (services/cli/generate.py): the MP4 it writes, and the errors users get."""

import math
import wave

import numpy as np
import pytest

from services.cli.main import main
from services.video import probe_video

from tests.model_core.helpers import speech


def write_wav(path, audio: np.ndarray, rate: int = 16000, channels: int = 1):
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(channels)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture
def inputs(tmp_path):
    from PIL import Image

    image = tmp_path / "face.png"
    Image.fromarray((np.random.default_rng(0).random((80, 100, 3)) * 255).astype(np.uint8)).save(image)
    audio = write_wav(tmp_path / "speech.wav", speech(1.3, seed=1, sample_rate_hz=22050), rate=22050)
    return image, audio, tmp_path


@pytest.mark.parametrize("fps", [25, 30])
def test_generate_writes_an_mp4_with_the_right_frames_fps_and_audio(inputs, capsys, fps):
    image, audio, tmp = inputs
    out = tmp / "out.mp4"
    code = main(["generate", "--image", str(image), "--audio", str(audio), "--out", str(out), "--preset", "tiny",
                 "--fps", str(fps), "--quiet"])
    assert code == 0
    info = probe_video(out)
    assert info.num_frames == math.ceil(1.3 * fps)
    assert info.fps == pytest.approx(fps)
    assert (info.width, info.height) == (64, 64)
    assert info.has_audio and info.audio_duration_s == pytest.approx(1.3, abs=0.05)
    printed = capsys.readouterr().out
    assert "TTFF" in printed and "per-chunk latency" in printed and "FPS" in printed
    assert "RANDOM" in printed, "random weights must be said plainly"


def run_bad(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def test_non_image_is_refused(inputs, capsys):
    image, audio, tmp = inputs
    code, err = run_bad(["generate", "--image", str(audio), "--audio", str(audio), "--out", str(tmp / "o.mp4"),
                         "--preset", "tiny"], capsys)
    assert code == 2 and "speech.wav" in err and "image" in err


def test_empty_audio_is_refused(inputs, capsys):
    image, _, tmp = inputs
    empty = write_wav(tmp / "empty.wav", np.zeros(0, np.float32))
    code, err = run_bad(["generate", "--image", str(image), "--audio", str(empty), "--out", str(tmp / "o.mp4"),
                         "--preset", "tiny"], capsys)
    assert code == 2 and "no audio samples" in err


def test_unreadable_audio_is_refused(inputs, capsys):
    image, _, tmp = inputs
    junk = tmp / "junk.wav"
    junk.write_text("this is not audio")
    code, err = run_bad(["generate", "--image", str(image), "--audio", str(junk), "--out", str(tmp / "o.mp4"),
                         "--preset", "tiny"], capsys)
    assert code == 2 and "junk.wav" in err


def test_missing_audio_file_is_refused(inputs, capsys):
    image, _, tmp = inputs
    code, err = run_bad(["generate", "--image", str(image), "--audio", str(tmp / "nope.wav"), "--out",
                         str(tmp / "o.mp4"), "--preset", "tiny"], capsys)
    assert code == 2 and "nope.wav" in err


def test_unknown_preset_names_the_allowed_ones(inputs, capsys):
    image, audio, tmp = inputs
    code, err = run_bad(["generate", "--image", str(image), "--audio", str(audio), "--out", str(tmp / "o.mp4"),
                         "--preset", "huge"], capsys)
    assert code == 2 and "preset='huge' is unknown; allowed: tiny, small, talk128, wan-1.3b, wan-14b" in err


@pytest.mark.parametrize("flag,value,needle", [("--steps", "9", "steps=9"), ("--chunk", "0", "chunk_latent_frames=0"),
                                              ("--width", "70", "width=70")])
def test_impossible_options_name_the_field(inputs, capsys, flag, value, needle):
    image, audio, tmp = inputs
    code, err = run_bad(["generate", "--image", str(image), "--audio", str(audio), "--out", str(tmp / "o.mp4"),
                         "--preset", "tiny", flag, value], capsys)
    assert code == 2 and needle in err


def test_output_must_be_mp4(inputs, capsys):
    image, audio, tmp = inputs
    code, err = run_bad(["generate", "--image", str(image), "--audio", str(audio), "--out", str(tmp / "o.avi"),
                         "--preset", "tiny"], capsys)
    assert code == 2 and ".mp4" in err


def test_bad_face_region_and_missing_encoder_path_are_refused(inputs, capsys):
    image, audio, tmp = inputs
    base = ["generate", "--image", str(image), "--audio", str(audio), "--out", str(tmp / "o.mp4"), "--preset", "tiny"]
    code, err = run_bad(base + ["--face-region", "0.5,0.5"], capsys)
    assert code == 2 and "--face-region" in err
    code, err = run_bad(base + ["--face-region", "0.8,0.1,0.2,0.9"], capsys)
    assert code == 2 and "region" in err and "x0 < x1" in err
    code, err = run_bad(base + ["--audio-encoder", "wav2vec2"], capsys)
    assert code == 2 and "model_path" in err
    code, err = run_bad(base + ["--audio-encoder", "wav2vec2", "--audio-encoder-path", str(tmp / "none")], capsys)
    assert code == 2 and "none" in err


def test_wav2vec2_encoder_from_a_local_directory_drives_generation(inputs, capsys):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    image, audio, tmp = inputs
    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2)
    Wav2Vec2Model(config).save_pretrained(tmp / "w2v")
    out = tmp / "w2v.mp4"
    assert main(["generate", "--image", str(image), "--audio", str(audio), "--out", str(out), "--preset", "tiny",
                 "--audio-encoder", "wav2vec2", "--audio-encoder-path", str(tmp / "w2v"), "--quiet",
                 "--face-region", "0.2,0.3,0.8,0.9"]) == 0
    assert probe_video(out).num_frames == math.ceil(1.3 * 25)


def test_generate_uses_the_checkpoint_found_for_the_preset(inputs, capsys, monkeypatch):
    from model_core.checkpoint import save_facecast_checkpoint
    from model_core.engine import AvatarEngine

    image, audio, tmp = inputs
    engine = AvatarEngine.from_preset("tiny", seed=3)
    (tmp / "ckpts").mkdir()
    save_facecast_checkpoint(engine.dit, tmp / "ckpts" / "tiny.safetensors", vae=engine.vae)
    monkeypatch.setenv("FACECAST_CHECKPOINTS", str(tmp / "ckpts"))
    assert main(["generate", "--image", str(image), "--audio", str(audio), "--out", str(tmp / "c.mp4"),
                 "--preset", "tiny", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ckpts/tiny.safetensors" in printed and "RANDOM" not in printed


def test_corrupt_checkpoint_is_refused(inputs, capsys):
    image, audio, tmp = inputs
    bad = tmp / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    code, err = run_bad(["generate", "--image", str(image), "--audio", str(audio), "--out", str(tmp / "o.mp4"),
                         "--preset", "tiny", "--checkpoint", str(bad)], capsys)
    assert code == 2 and "bad.safetensors" in err
