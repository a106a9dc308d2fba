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
    assert frozen["listening_change"] == frozen["speaking_change"] == 0.0, "nothing moves in a frozen face"


def test_the_truths_mouth_box_moves_while_it_speaks_and_rests_while_it_listens(truth):
    """The pixel measure the browser call's check uses, on the world's own frames: the mouth box changes several
    times more from frame to frame while the character speaks than while it listens."""
    assert truth["speaking_change"] > 4 * truth["listening_change"] + 0.2, truth


def test_the_mouth_box_change_on_known_frames():
    """A face box over a 20 x 20 frame: only its lower part (the mouth box) is counted; pairs count as listening or
    speaking when both frames do."""
    from model_core.lipsync import mouth_change

    frames = np.zeros((4, 20, 20, 3), np.uint8)
    frames[1, 18:, 8:12] = 90            # inside the mouth box of the face box (0, 0)-(20, 20): x 4-16, y 12.4-20
    frames[3, 0:6] = 200                 # the forehead: outside the mouth box
    speaking = np.array([True, True, False, False])
    boxes = np.tile(np.array([0, 0, 20, 20], np.float32), (4, 1))
    changes = mouth_change(frames, boxes, speaking)
    box = (20 - 12) * (16 - 4)                                   # rows 12..19, columns 4..15
    assert changes["speaking_change"] == pytest.approx(90 * 2 * 4 / box)     # frame 0 -> 1: 2 x 4 pixels by 90
    assert changes["listening_change"] == 0.0                    # frame 2 -> 3 changed only outside the mouth box
    assert mouth_change(frames, boxes, np.ones(4, bool))["listening_change"] is None


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


class LoopedTruth:
    """A protocol-level engine whose k-th session streams the k-th clip's own truth frames for the audio it is fed
    (frame t = clip frame t mod N), optionally fading to grey after `fade_after[k]` frames: the long horizon's
    independent expectation."""

    def __init__(self, clips, fade_after=(), fps=25.0):
        from model_core.config import get_preset
        self.preset, self.clips, self.fps = get_preset("talk128"), list(clips), fps
        self.fade_after = dict(enumerate(fade_after))
        self.opened = 0

    def open_session(self, image):
        self.opened += 1
        return {"samples": 0, "sent": 0, "clip": self.clips[self.opened - 1],
                "fade_after": self.fade_after.get(self.opened - 1)}

    def _frames(self, session, count):
        import torch

        clip = session["clip"]
        index = np.arange(session["sent"], session["sent"] + count)
        frames = clip.frames[index % clip.num_frames].astype(np.float32)
        if session["fade_after"] is not None:
            frames[index >= session["fade_after"]] = 128.0
        session["sent"] += count
        return [type("Chunk", (), {"frames": torch.from_numpy(frames).permute(0, 3, 1, 2) / 127.5 - 1.0})]

    def push_audio(self, session, pcm, rate):
        session["samples"] += len(pcm)
        return self._frames(session, int(session["samples"] * self.fps / rate) - session["sent"])

    def end_input(self, session):
        return self._frames(session, int(np.ceil(session["samples"] * self.fps / 16000)) - session["sent"])

    def close_session(self, session):
        pass


def test_the_long_horizon_scores_windows_of_whole_loops_against_the_looped_truth(probe, held_out):
    """Every window spans whole loops of the clip and starts on a loop boundary, so the looped truth scores the same
    in each, lip sync included (change exactly 0; windows cut anywhere in the loop moved its sync_r by up to 15 %)."""
    from model_core.evaluate import _balanced_singles, horizon, horizon_windows

    clip = _balanced_singles(held_out, 1)[0]
    period = clip.num_frames
    seconds, window = 4 * period / 25, period / 25
    # asked for 1.3 loops: scored on one (1.3 would hear a third of the loop twice in one window and once in another)
    steady = horizon(held_out, probe, LoopedTruth([clip]), seconds=seconds, window_s=1.3 * window, progress=False)
    assert steady["frames"] == 4 * period and steady["streams"] == 1
    assert steady["first"]["sync_r"] > 0.8 and steady["first"]["psnr"] == 100.0
    assert steady["change"] == {"sync_r": 0.0, "identity": 0.0, "psnr": 0.0, "ssim": 0.0}
    assert steady["first"]["span_s"] == [[0.0, window]]
    assert steady["last"]["span_s"] == [[round(3 * window, 2), round(4 * window, 2)]]
    fade = 2 * period + period // 2
    faded = horizon(held_out, probe, LoopedTruth([clip], fade_after=[fade]), seconds=seconds, window_s=window,
                    progress=False, at=(window, 2 * window))
    # [N, 2N) is before the fade, [2N, 3N) straddles it, [3N, 4N) is grey
    assert faded["change_at_" + f"{window:g}"] == steady["change"]
    assert faded["change_at_" + f"{2 * window:g}"]["psnr"] < 0.0
    assert faded["change"]["psnr"] < faded["change_at_" + f"{2 * window:g}"]["psnr"] < 0.0
    # windows round to whole loops and loop boundaries, whatever was asked
    windows = horizon_windows(1000.0, 10.0, 160, 25.0, at=(500.0,))
    assert windows == {"first": (0, 320), "at_500": (12480, 12800), "last": (24640, 24960)}
    assert horizon_windows(100.0, 1.0, 160, 25.0)["first"] == (0, 160)       # at least one loop
    with pytest.raises(ValueError, match="at=5 is invalid"):           # its loop boundary is inside the first window
        horizon_windows(1000.0, 10.0, 160, 25.0, at=(5.0,))
    with pytest.raises(ValueError, match="at least two windows"):
        horizon(held_out, probe, LoopedTruth([clip]), seconds=1.5 * window, window_s=window, progress=False)


def test_the_long_horizon_averages_its_streams_each_on_its_own_clip(probe, held_out):
    from model_core.evaluate import _balanced_singles, horizon

    clips = _balanced_singles(held_out, 2)
    seconds = 4 * max(clip.num_frames for clip in clips) / 25
    report = horizon(held_out, probe, LoopedTruth(clips, fade_after=[None, 2 * clips[1].num_frames]), seconds=seconds,
                     window_s=1.0, progress=False, streams=2)
    first, second = report["per_stream"]
    assert report["streams"] == 2 and first["identity_index"] != second["identity_index"]
    assert [first["clip_frames"], second["clip_frames"]] == [clip.num_frames for clip in clips]
    assert first["change"]["psnr"] == 0.0 and second["change"]["psnr"] < 0.0      # only the second faded
    assert report["last"]["psnr"] == pytest.approx((first["last"]["psnr"] + second["last"]["psnr"]) / 2, abs=1e-4)
    assert report["first"]["span_s"] == [first["first"]["span_s"], second["first"]["span_s"]]
    with pytest.raises(ValueError, match="streams=7 is invalid: the evaluation set has"):
        horizon(held_out, probe, LoopedTruth(clips), seconds=seconds, window_s=1.0, progress=False, streams=7)


def test_listen_sets_the_character_listening_where_the_truth_listens(held_out):
    """`evaluate(listen=True)` / `facecast eval --listen`: the engine's character is set not speaking exactly where
    the clip's truth says it listens (checked at each 200 ms piece of audio), and only for the model's video."""
    from model_core.evaluate import model_video

    class Modes(LoopedTruth):
        def open_session(self, image):
            return {**super().open_session(image), "modes": []}

        def set_speaking(self, session, character, speaking):
            session["modes"].append((session["samples"], character, speaking))

        def close_session(self, session):
            self.session = session

    clip = next(held_out[i] for i in range(len(held_out)) if held_out[i].truth.speaking[:, 0].any()
                and not held_out[i].truth.speaking[:, 0].all())
    speaking = clip.truth.speaking[:, 0].astype(bool)
    engine = Modes([clip])
    model_video(engine, clip.frames[0], clip.audio, clip.sample_rate, clip.num_frames, ~speaking)
    modes = engine.session["modes"]
    piece = clip.sample_rate // 5
    for start in range(0, len(clip.audio), piece):
        current = next((mode for sample, _, mode in reversed(modes) if sample <= start), True)
        assert current == bool(speaking[min(int(start / clip.sample_rate * 25), len(speaking) - 1)]), start
    assert {character for _, character, _ in modes} == {0} and len(modes) >= 2
    with pytest.raises(ValueError, match="listen sets the streaming engine's speaking mode: it needs video='model'"):
        evaluate(held_out, None, "truth", listen=True, progress=False)
