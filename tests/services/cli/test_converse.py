"""`facecast converse` (services/cli/converse.py): a spoken question in, the avatar's spoken answer out, with the real
offline cascade and the trained talk128 model; its errors."""

import math

import numpy as np
import pytest

from services.cli.main import main
from services.llm.offline import missing_packages
from services.video import probe_video

from .test_generate import write_wav

pytestmark = pytest.mark.skipif(bool(missing_packages()), reason=f"the cascade needs {missing_packages()}")


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    from services.llm.offline import CascadeModels, OfflineConfig

    speech = CascadeModels.shared(OfflineConfig.from_settings()).speak("What is the capital of France?", noise=False)
    return write_wav(tmp_path_factory.mktemp("q") / "question.wav", speech / 32768.0, rate=24000)


def test_a_spoken_question_becomes_the_avatars_spoken_answer(question, tmp_path, capsys):
    out = tmp_path / "reply.mp4"
    code = main(["converse", "--image", "assets/reference.png", "--audio", str(question), "--out", str(out),
                 "--decoder", "fast", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "heard: 'What is the capital of France?'" in printed
    said = printed.split("says:", 1)[1].splitlines()[0]
    assert "paris" in said.lower(), said
    info = probe_video(out)
    assert info.has_audio and info.audio_duration_s > 1.0, "the reply's voice is in the MP4"
    assert info.num_frames == math.ceil(info.audio_duration_s * info.fps - 1e-6) or \
        abs(info.num_frames - info.audio_duration_s * info.fps) <= 1
    assert "speech recognition" in printed and "first speech after" in printed


def test_silence_is_refused_naming_the_input(tmp_path, capsys):
    silent = write_wav(tmp_path / "silence.wav", np.zeros(16000 * 2))
    code = main(["converse", "--image", "assets/reference.png", "--audio", str(silent), "--out",
                 str(tmp_path / "o.mp4"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "no speech was heard" in err and "silence.wav" in err


def test_a_missing_question_file_is_one_clear_error(tmp_path, capsys):
    code = main(["converse", "--image", "assets/reference.png", "--audio", str(tmp_path / "nope.wav"), "--out",
                 str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and "nope.wav" in err and "Traceback" not in err
