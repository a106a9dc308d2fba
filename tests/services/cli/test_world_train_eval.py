"""`facecast world`, `facecast train` and `facecast eval` from the command line: the world cache, a real Ray Train run
that resumes, and user errors as one line with status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model_core.training.latents import CACHE_VERSION
from model_core.training.loop import read_log
from model_core.world.speech import espeak_available
from services.cli.main import main

REPO = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(not espeak_available(), reason="libespeak-ng missing: run `make espeak-ng`")


def facecast(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_world_generate_resumes_and_info_reports_the_split(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["world", "generate", "--part", "eval", "--count", "2", "--size", "64", "--shard-size", "1",
                 "--out", str(out), "--quiet"]) == 0
    assert "2 new shards" in capsys.readouterr().out
    (out / "shard-00001.npz").unlink()
    assert main(["world", "generate", "--part", "eval", "--count", "2", "--size", "64", "--shard-size", "1",
                 "--out", str(out), "--quiet"]) == 0
    assert "1 new shards" in capsys.readouterr().out
    assert main(["world", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["part"] == "eval" and info["split"]["held_out_identities"] == 120
    assert info["split"]["held_out_voice"] == "en-gb-scotland+m7"


@pytest.mark.parametrize("args, message", [
    (["eval", "--video", "sideways"], "--video: video='sideways' is invalid"),
    (["train", "probe", "--steps", "0", "--data", "world:train"], "steps=0 is invalid"),
    (["train", "vae", "--workers", "0", "--data", "world:train"], "workers=0 is invalid"),
    (["world", "generate", "--count", "0", "--quiet", "--out", "/tmp/facecast-never"], "clip count=0 is invalid"),
    (["world", "info", "/nonexistent/place"], "is not a world dataset"),
    (["train", "all", "--steps", "3"], "--steps: not for `facecast train all`"),
    (["train", "all", "--profile", "huge"], "--profile='huge' is unknown; allowed: tiny, cpu, gpu"),
    (["train", "vae", "--profile", "tiny", "--data", "world:train"], "--profile applies to `facecast train all`"),
    (["train", "teacher", "--vae", "/nonexistent/vae", "--data", "world:train", "--latents", "/tmp/facecast-none"],
     "--vae: VAE directory '/nonexistent/vae' has no config.json"),
    (["train", "vae", "--phase", "init", "--data", "world:train"],
     "--phase='init' is not a phase of `facecast train vae`; allowed: full, decoder"),
    (["train", "vae", "--steps", "5", "--data", "world:train"], "--steps applies to one phase: add --phase full or"),
    (["train", "vae", "--phase", "decoder", "--vae", "/nonexistent/vae", "--data", "world:train"],
     "--vae: /nonexistent/vae is not a VAE directory"),
    (["train", "probe", "--phase", "full", "--data", "world:train"], "--phase applies to `facecast train student`"),
    (["train", "teacher", "--opening-weight", "0.1"], "--opening-weight applies to `facecast train vae` (its phase"),
    (["train", "vae", "--opening-weight", "-1", "--data", "world:train"], "--opening-weight -1 is invalid: at least 0"),
    (["train", "student", "--history-corrupt", "0"], "--history-corrupt applies to `facecast train student --phase"),
    (["train", "student", "--phase", "distill", "--history-corrupt", "2"], "--history-corrupt 2 is invalid: allowed"),
    (["train", "student", "--init", "x.safetensors"], "--init applies to `facecast train teacher`, not student"),
    (["train", "teacher", "--init", "/nonexistent/t.safetensors"], "--init: /nonexistent/t.safetensors does not"),
    (["train", "teacher", "--mouth-weight", "-2"], "--mouth-weight -2 is invalid: at least 0"),
    (["train", "teacher", "--steps", "10"], "--steps applies to one phase: add --phase base or --phase mouth"),
    (["train", "teacher", "--phase", "decoder"],
     "--phase='decoder' is not a phase of `facecast train teacher`; allowed: base, mouth, mouth2, listen"),
    (["train", "teacher", "--phase", "mouth2", "--run-dir", "/nonexistent/runs"],
     "--phase mouth2 starts from phase mouth's teacher, /nonexistent/runs/teacher-mouth/teacher.safetensors, which "
     "does not exist: run `facecast train teacher --phase mouth` first, or pass --init"),
    (["train", "teacher", "--guidance", "4"], "--guidance applies to `facecast train student`, not teacher"),
    (["train", "student", "--guidance", "40"], "--guidance 40 is invalid: allowed 1 to 20"),
    (["train", "vae", "--voice-augment", "1"],
     "--voice-augment applies to `facecast train teacher` and `facecast train student`, not vae"),
    (["train", "student", "--voice-augment", "-1"], "--voice-augment -1 is invalid: allowed 0 to 4 (0: off)"),
    (["train", "all", "--voice-augment", "1"], "--voice-augment: not for `facecast train all`"),
    (["train", "all", "--guidance", "4"], "--guidance: not for `facecast train all`"),
    (["train", "probe", "--interior-weight", "30"], "--interior-weight applies to `facecast train vae`, not probe"),
    (["train", "fast-decoder", "--vae", "/nonexistent/vae", "--export", "/tmp/facecast-fast"],
     "--vae: a fast decoder for another VAE needs --student, a streaming student trained in that VAE's latent space"),
    (["train", "fast-decoder", "--student", "/nonexistent/s.safetensors"],
     "--student: /nonexistent/s.safetensors does not exist (the streaming student whose latents the fast decoder"),
    (["eval", "--ablate", "sink", "--video", "truth"],
     "--ablate sink switches off a mechanism of the streaming engine"),
    (["eval", "--ablate", "corrupt"], "argument --ablate: invalid choice: 'corrupt'"),
    (["eval", "--horizon", "60", "--video", "truth"], "--horizon streams long sessions of the engine"),
    (["eval", "--horizon", "60", "--streams", "0"], "--streams 0 is invalid: at least 1 session"),
    (["eval", "--streams", "2"], "--streams sets the sessions of a long run: it needs --horizon SECONDS"),
    (["eval", "--horizon", "15", "--window", "10"], "--horizon 15 is invalid: at least two --window spans (20 s"),
    (["eval", "--horizon", "60", "--at", "55"], "--at 55 is invalid: allowed 10 to 40 s"),
    (["eval", "--at", "1000"], "--at scores a window of a long run: it needs --horizon SECONDS"),
    (["eval", "--listen", "--video", "vae"], "--listen sets the streaming engine's character listening"),
    (["eval", "--listen", "--horizon", "60"], "it needs --video model and no --horizon"),
    (["train", "vae", "--phase", "full", "--motion-weight", "1"], "--motion-weight applies to the decoder phases"),
    (["world", "generate", "--eval-voice", "en-us+m1"], "--eval-voice applies to --part eval"),
    (["world", "generate", "--part", "eval", "--eval-voice", "en-us+m1"], "--eval-voice needs its own --out"),
    (["world", "generate", "--part", "eval", "--eval-voice", "en-us+m9", "--out", "unused"],
     "held-out voice 'en-us+m9' is unknown; allowed: en-us+m1"),
])
def test_user_errors_are_one_line_with_status_2(args, message, capsys):
    """In process (`main`, as the console script runs it): each refusal is found before anything heavy starts."""
    try:
        code = main(list(args))
    except SystemExit as exit_:        # argparse's own refusals
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and message in err


@pytest.mark.parametrize("version, message", [
    (CACHE_VERSION, "was encoded with another VAE (digest 0123456789abcdef"),
    (1, "is a version-1 latent cache; this facecast reads version 2 (it adds the mouth openings): rebuild it"),
])
def test_a_stale_latent_cache_is_refused_in_one_line_before_ray_starts(tmp_path, version, message):
    cache = tmp_path / "latents"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({"count": 1, "shard_clips": 1, "vae_digest": "0123456789abcdef",
                                                     "version": version}))
    (cache / "shard-00000.pt").write_bytes(b"")
    result = facecast("train", "teacher", "--data", "world:train", "--latents", str(cache), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.stderr


def test_a_latent_cache_of_another_front_end_is_refused_in_one_line(tmp_path, capsys):
    """Phase hear reads `<latents>-whisper-ct2`; one holding log-mel features (of the right VAE) is refused by name."""
    from model_core.shipped import TALK128_VAE, shipped_path
    from model_core.training.latents import vae_digest
    from model_core.vae import StreamingVAE

    cache = tmp_path / "latents-whisper-ct2"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps({
        "count": 1, "shard_clips": 1, "version": CACHE_VERSION,
        "vae_digest": vae_digest(StreamingVAE.from_pretrained(shipped_path(TALK128_VAE))),
        "frontend": {"backend": "logmel", "fps": 25.0, "feature_dim": 320}}))
    (cache / "shard-00000.pt").write_bytes(b"")
    (tmp_path / "listen.safetensors").write_bytes(b"weights")
    assert main(["train", "teacher", "--phase", "hear", "--init", str(tmp_path / "listen.safetensors"), "--data",
                 "world:train", "--latents", str(tmp_path / "latents"), "--run-dir", str(tmp_path / "runs")]) == 2
    assert "holds the 'logmel' audio front end's features, not 'whisper-ct2''s" in capsys.readouterr().err


def test_eval_refuses_a_training_set(tmp_path):
    assert main(["world", "generate", "--part", "train", "--count", "1", "--size", "128", "--out",
                 str(tmp_path), "--quiet"]) == 0
    result = facecast("eval", "--data", str(tmp_path), "--video", "truth", timeout=120)
    assert result.returncode == 2 and "is a training set" in result.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_train_vae_runs_on_ray_train_and_resumes(tmp_path):
    args = ["train", "vae", "--data", "world:train", "--world-count", "1", "--batch-size", "1",
            "--run-dir", str(tmp_path / "run"), "--log-every", "1", "--checkpoint-every", "1"]
    run = tmp_path / "run" / "vae"
    first = facecast(*args, "--phase", "full", "--steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads(first.stdout[first.stdout.index("{"):])
    assert summary["step"] == 2 and summary["stage"] == "vae"
    assert (run / "state.pt").is_file() and (run / "vae-full" / "config.json").is_file()
    second = facecast(*args, "--phase", "full", "--steps", "3")  # the same command, one more step: resumes at 2
    assert second.returncode == 0, second.stderr[-3000:]
    assert [row["step"] for row in read_log(run)] == [1, 2, 3]
    # Ray Train's copies stay bounded: two checkpoints of the state, never the run directory copied into itself
    state_bytes = (run / "state.pt").stat().st_size
    ray_bytes = sum(p.stat().st_size for p in (run / "ray").rglob("*") if p.is_file())
    assert ray_bytes < 2.5 * state_bytes
    # a decoder phase (here the last, noise, from --vae) trains the decoder alone and writes --export with its
    # recipe beside it, in the same latent space
    third = facecast(*args, "--phase", "noise", "--steps", "2", "--vae", str(run / "vae-full"),
                     "--export", str(tmp_path / "export"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads(third.stdout[third.stdout.index("{"):])["stage"] == "vae-decoder"
    assert (tmp_path / "run" / "vae-noise" / "state.pt").is_file()
    recipe = json.loads((tmp_path / "export" / "decoder-train.json").read_text())["train"]
    assert (recipe["steps"], recipe["motion_weight"], recipe["latent_noise"], recipe["learning_rate"]) == \
        (2, 1.0, 0.5, 3e-4)
    from model_core.training.latents import vae_digest
    from model_core.vae import StreamingVAE

    full, tuned = (StreamingVAE.from_pretrained(path) for path in (run / "vae-full", tmp_path / "export"))
    assert vae_digest(tuned) == vae_digest(full)


def test_world_shards_are_the_same_bytes_from_any_number_of_workers(tmp_path):
    import numpy as np

    for workers in (1, 2):
        assert main(["world", "generate", "--part", "eval", "--count", "3", "--size", "64", "--shard-size", "1",
                     "--out", str(tmp_path / str(workers)), "--workers", str(workers), "--quiet"]) == 0
    for shard in ("shard-00000.npz", "shard-00001.npz", "shard-00002.npz"):
        one, two = np.load(tmp_path / "1" / shard), np.load(tmp_path / "2" / shard)
        assert sorted(one.files) == sorted(two.files)
        for key in one.files:
            np.testing.assert_array_equal(one[key], two[key], err_msg=f"{shard}:{key}")


def test_the_held_out_clips_in_another_voice_say_the_same_things(tmp_path):
    """`--eval-voice` changes the voice and nothing else the clip spec draws: identities, sentences, rate and pitch."""
    from model_core.world.store import ShardSource

    for name, extra in (("held-out", []), ("rp", ["--eval-voice", "en-gb-x-rp+m4"])):
        assert main(["world", "generate", "--part", "eval", "--count", "2", "--out", str(tmp_path / name),
                     "--quiet", "--workers", "1"] + extra) == 0
    for a, b in zip(*(ShardSource(tmp_path / name) for name in ("held-out", "rp"))):
        assert a.meta["identities"] == b.meta["identities"]
        assert [(t["sentence"], t["rate"], t["pitch"]) for t in a.meta["turns"]] == \
            [(t["sentence"], t["rate"], t["pitch"]) for t in b.meta["turns"]]
        assert {t["voice"] for t in a.meta["turns"]} == {"en-gb-scotland+m7"}
        assert {t["voice"] for t in b.meta["turns"]} == {"en-gb-x-rp+m4"}
