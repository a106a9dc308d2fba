"""The lip-sync measure, validated on cases whose answers are known: the ground truth scores sync_r near 1 at lag 0,
the same clips delayed by k frames report lag k, a frozen face scores sync_r 0, another identity scores low identity.
Uses the shipped probe (checkpoints/lipsync-probe.safetensors), on held-out clips rendered here."""

import numpy as np
import pytest

from model_core.evaluate import check_video, evaluate
from model_core.lipsync import pearson, psnr, ssim, sync_scores
from model_core.shipped import LIPSYNC_PROBE, shipped_path
from model_core.training.probe_stage import load_probe
from model_core.world.speech import espeak_available
from model_core.world.split import WorldSplit
from model_core.world.store import WorldSource

pytestmark = pytest.mark.skipif(not espeak_available(), reason="libespeak-ng missing: run `make espeak-ng`")


@pytest.fixture(scope="module")
def probe():
    return load_probe(shipped_path(LIPSYNC_PROBE))


@pytest.fixture(scope="module")
def held_out():
    source = WorldSource(WorldSplit(0), "eval", 6, 128)
    cached = [source[i] for i in range(len(source))]

    class Cached:
        def __len__(self):
            return len(cached)

        def __getitem__(self, index):
            return cached[index]
    return Cached()


@pytest.fixture(scope="module")
def truth(probe, held_out):
    return evaluate(held_out, probe, "truth", progress=False)


def test_ground_truth_scores_sync_near_one_at_lag_zero(truth):
    assert truth["clips"] >= 3
    assert truth["sync_r"] > 0.85 and truth["sync_lag_frames"] == 0
    assert truth["silence_motion"] < 0.5
    assert truth["psnr"] == 100.0 and truth["ssim"] == pytest.approx(1.0)
    assert set(truth["per_style"]) <= {"flat", "shaded", "lineart"} and truth["per_style"]


@pytest.mark.parametrize("k", [2, 4, -3])
def test_a_shifted_clip_reports_its_lag(probe, held_out, truth, k):
    shifted = evaluate(held_out, probe, f"shift:{k}", progress=False)
    assert shifted["sync_lag_frames"] == k
    if abs(k) >= 4:
        assert shifted["sync_r"] < truth["sync_r"] - 0.3


def test_a_frozen_face_scores_no_sync(probe, held_out):
    frozen = evaluate(held_out, probe, "frozen", progress=False)
    assert abs(frozen["sync_r"]) < 0.1


def test_another_identity_scores_low_identity(probe, held_out, truth):
    swapped = evaluate(held_out, probe, "swap", progress=False)
    assert swapped["identity"] < truth["identity"] - 0.3


def test_the_landmark_reader_independently_agrees_with_the_truth(truth):
    from model_core.landmarks import LandmarkReader

    if not LandmarkReader.available():
        pytest.skip("dlib not installed (pip install 'facecast[eval]')")
    assert truth["landmark_sync_r"] > 0.5


def test_measures_on_known_signals():
    t = np.arange(200)
    truth = (np.sin(t / 3) + 1) / 2
    speaking = np.ones(200, bool)
    speaking[80:120] = False
    late = np.concatenate([np.full(5, truth[0]), truth[:-5]])
    assert sync_scores(late, truth, speaking)["sync_lag_frames"] == 5
    assert sync_scores(truth, truth, speaking)["sync_r"] == pytest.approx(1.0)
    assert pearson(np.ones(10), np.arange(10)) == 0.0
    image = np.random.default_rng(0).random((32, 32, 3))
    assert psnr(image, image) == 100.0 and ssim(image, image) == pytest.approx(1.0)
    assert psnr(image, np.clip(image + 0.1, 0, 1)) < 25
    with pytest.raises(ValueError, match="allowed model, teacher, truth, vae"):
        check_video("shift:two")
