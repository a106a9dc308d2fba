"""The talking-face world: its truth agrees with its pixels, its split never leaks, it is deterministic, and its
shard cache and video-folder loader give back what went in."""

import numpy as np
import pytest

from model_core.world.clips import clip_spec, make_clip
from model_core.world.identity import STYLES, identity
from model_core.world.render import MOUTH_INSIDE, FrameState, Renderer
from model_core.world.sentences import POOL_SIZE, sentence
from model_core.world.speech import HELD_OUT_VOICE, PIPER_VOICES, Voice, espeak_available, speak, speak_fresh
from model_core.world.split import WorldSplit
from model_core.world.store import ShardSource, VideoFolderSource, WorldSource, write_shards
from model_core.world.visemes import CLOSED, OPEN, mouth_track, viseme_of

pytestmark = pytest.mark.skipif(not espeak_available(), reason="libespeak-ng missing: run `make espeak-ng`")


@pytest.fixture(scope="module")
def split():
    return WorldSplit(seed=0)


@pytest.fixture(scope="module")
def clip(split):
    # a two-turn single-character clip: speech, a listening gap, speech
    for index in range(40):
        spec = clip_spec(split, "train", index)
        if len(spec.identities) == 1 and len(spec.turns) == 2:
            return make_clip(spec, Renderer(128))
    raise AssertionError("no two-turn single clip in the first 40 specs")


def mouth_interior(frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """The open mouth's height in pixels: rows of the lower face (from the face box only, not the truth's mouth
    numbers) that hold mouth-interior, teeth or tongue colours."""
    colours = np.array([MOUTH_INSIDE, (245, 245, 240), (200, 80, 90)])
    heights = []
    for frame, (x0, y0, x1, y1) in zip(frames, boxes[:, 0]):
        region = frame[int((y0 + y1) / 2):int(y1), int(x0 + 0.3 * (x1 - x0)):int(x1 - 0.3 * (x1 - x0))].astype(int)
        near = (np.abs(region[:, :, None, :] - colours).sum(-1) < 40).any(-1)
        heights.append(int(near.any(1).sum()))
    return np.array(heights, float)


def test_mouth_pixels_follow_recorded_opening(clip):
    measured = mouth_interior(clip.frames, clip.truth.face_box)
    truth = clip.truth.mouth_open[:, 0]
    assert np.corrcoef(measured, truth)[0, 1] > 0.9
    # lag 0 fits best; 160 ms (4 frames) of misalignment is far off
    r0 = np.corrcoef(measured, truth)[0, 1]
    shifted = {k: np.corrcoef(measured[k:], truth[:len(truth) - k])[0, 1] for k in (1, 2, 4)}
    assert shifted[1] < r0 and shifted[2] < r0 - 0.05 and shifted[4] < r0 - 0.3
    assert measured[truth < 0.02].max() == 0  # a closed mouth shows no interior


def test_listening_frames_are_closed_and_speaking_frames_move(clip):
    speaking = clip.truth.speaking[:, 0]
    assert 0.3 < speaking.mean() < 0.95
    opening = clip.truth.mouth_open[:, 0]
    assert opening[~speaking].mean() < 0.1 < opening[speaking].mean()
    assert (clip.truth.viseme[~speaking, 0] == CLOSED).all()


def test_face_box_holds_the_face(clip):
    frame, (x0, y0, x1, y1) = clip.frames[0], clip.truth.face_box[0, 0]
    skin = np.array(identity(0, int(clip.truth.identity[0])).skin)
    assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    cy, cx = int((y0 + y1) / 2), int((x0 + x1) / 2)
    patch = frame[cy - 3:cy + 3, int(x0 + 0.25 * (x1 - x0)):int(x0 + 0.35 * (x1 - x0))].reshape(-1, 3).astype(int)
    if identity(0, int(clip.truth.identity[0])).style == 0:  # flat: the cheek is the identity's skin colour
        assert (np.abs(patch - skin).sum(-1) < 30).mean() > 0.5


def test_speech_has_phoneme_times_and_visemes_follow_them():
    utterance = speak("Mama saw a bee.", Voice("en-us+m1"))
    starts = [p[0] for p in utterance.phonemes]
    assert starts == sorted(starts) and utterance.phonemes[-1][1] <= utterance.duration_s + 1e-6
    track = mouth_track(utterance.phonemes, utterance.pcm, 16000, 100.0, int(utterance.duration_s * 100))
    times = (np.arange(len(track.opening)) + 0.5) / 100
    m_start, m_end, _ = utterance.phonemes[0]  # /m/ of "Mama"
    a_start, a_end, _ = next(p for p in utterance.phonemes if p[2].startswith("a") or p[2].startswith("ɑ"))
    during_m = track.opening[(times > m_start + 0.01) & (times < m_end - 0.01)]
    during_a = track.opening[(times > a_start) & (times < a_end)]
    assert during_m.min() < 0.1 and during_a.max() > 0.35  # coarticulated between two closures
    assert OPEN in set(track.viseme.tolist())


def speech_span(pcm: np.ndarray, window_s: float = 0.01) -> tuple[float, float]:
    """First and last 10 ms window whose RMS is above 5 % of the loudest: where the audio says speech is."""
    n = int(16000 * window_s)
    rms = np.sqrt(np.mean(pcm[:len(pcm) // n * n].reshape(-1, n) ** 2, axis=1))
    loud = np.nonzero(rms > 0.05 * rms.max())[0]
    return loud[0] * window_s, (loud[-1] + 1) * window_s


@pytest.mark.parametrize("pitch", [15, 85])
def test_piper_voice_times_follow_its_audio_at_any_pitch(pitch):
    """Piper's pitch is a resampling: every phoneme time must shrink with the audio, or the mouth drifts off the
    speech (13 % at pitch 85). Held against the audio's own energy, not against the code's arithmetic."""
    voice = Voice(next(iter(PIPER_VOICES)), pitch=pitch, rate=140)
    utterance = speak("Mama saw a bee.", voice)
    assert [p[2] for p in utterance.phonemes][:3] == ["m", "ɑː", "m"]  # espeak-ng's spelling: visemes apply
    assert viseme_of(utterance.phonemes[0][2]) == CLOSED
    onset, offset = speech_span(utterance.pcm)
    first, last = utterance.phonemes[0][0], utterance.phonemes[-1][1]
    assert abs(first - onset) < 0.03
    assert 0.97 < (last - first) / (offset - onset) < 1.12
    again = speak_fresh([("Mama saw a bee.", voice)])[0]  # deterministic: another process, the same samples
    np.testing.assert_array_equal(again.pcm, utterance.pcm)
    assert again.phonemes == utterance.phonemes


def test_a_missing_piper_install_is_named(monkeypatch):
    from model_core.world import speech

    monkeypatch.setitem(speech.PIPER_VOICES, "piper:nobody", "no_such_voice_package")
    with pytest.raises(speech.PiperMissing, match="no_such_voice_package.*make venv"):
        speak("Hello.", Voice("piper:nobody"))


def test_split_never_leaks(split):
    held_ids = set(split.identities("eval"))
    assert len(held_ids) == 120 and len(split.identities("train")) == 1080
    for index in range(150):
        spec = clip_spec(split, "train", index)
        assert not held_ids & set(spec.identities)
        for turn in spec.turns:
            assert not split.held_out_sentence(turn.sentence)
            assert turn.voice.name != HELD_OUT_VOICE
        spec = clip_spec(split, "eval", index)
        assert set(spec.identities) <= held_ids
        assert all(split.held_out_sentence(t.sentence) and t.voice.name == HELD_OUT_VOICE for t in spec.turns)
    # held-out sentence *texts* never appear as training texts (the pool is a bijection of indices to texts)
    rng = np.random.default_rng(5)
    held_texts = {sentence(split.sample_sentence(rng, "eval")) for _ in range(300)}
    train_texts = {sentence(split.sample_sentence(rng, "train")) for _ in range(3000)}
    assert not held_texts & train_texts
    assert len({sentence(i) for i in range(0, POOL_SIZE, POOL_SIZE // 5000)}) == len(range(0, POOL_SIZE,
                                                                                         POOL_SIZE // 5000))
    # the split is a function of the seed, and its record rebuilds it
    assert WorldSplit.from_record(split.record()) == split
    assert set(WorldSplit(seed=1).identities("eval")) != held_ids


def test_identities_are_distinct_and_styles_balanced():
    people = [identity(0, i) for i in range(1200)]
    keys = {(p.skin, p.hair, p.hair_style, p.iris, round(p.face_w, 3), p.background) for p in people}
    assert len(keys) == 1200
    assert {p.style for p in people} == set(range(len(STYLES)))
    assert identity(0, 17) == identity(0, 17) and identity(0, 17) != identity(1, 17)


def test_clips_are_deterministic_in_any_order(split, tmp_path):
    source = WorldSource(split, "train", 3, 64)
    later, first = source[2], source[0]
    again = WorldSource(split, "train", 3, 64)[2]
    assert np.array_equal(later.frames, again.frames) and np.array_equal(later.audio, again.audio)
    assert later.meta == again.meta and first.meta != later.meta


def test_shards_round_trip_and_resume(split, tmp_path):
    source = WorldSource(split, "eval", 3, 64)
    write_shards(tmp_path, source, shard_size=2, progress=False)
    (tmp_path / "shard-00001.npz").unlink()
    manifest = write_shards(tmp_path, source, shard_size=2, progress=False)
    assert manifest["written"]["shards"] == 1  # only the missing shard was rendered again
    cached = ShardSource(tmp_path)
    assert len(cached) == 3
    for index in (0, 2):
        a, b = cached[index], source[index]
        assert np.array_equal(a.frames, b.frames) and a.meta == b.meta
        np.testing.assert_allclose(a.audio, b.audio, atol=1 / 32767)
        np.testing.assert_array_equal(a.truth.viseme, b.truth.viseme)
        np.testing.assert_allclose(a.truth.face_box, b.truth.face_box)
    with pytest.raises(ValueError, match="different dataset"):
        write_shards(tmp_path, WorldSource(split, "eval", 4, 64), shard_size=2, progress=False)


def test_video_folder_source_reads_real_videos(split, tmp_path):
    from services.video import Mp4Writer

    clip = WorldSource(split, "train", 1, 64)[0]
    with Mp4Writer(tmp_path / "talk.mp4", 25.0, 64, 64, clip.audio, 16000) as writer:
        writer.write(clip.frames)
    loaded = VideoFolderSource(tmp_path, size=64)[0]
    assert loaded.truth is None
    assert abs(loaded.num_frames - clip.num_frames) <= 1
    assert abs(len(loaded.audio) - len(clip.audio)) < 16000 * 0.1
    error = np.abs(loaded.frames[:5].astype(int) - clip.frames[:5].astype(int)).mean()
    assert error < 12  # H.264 at crf 20


def test_renderer_rejects_bad_sizes_and_crowds():
    with pytest.raises(ValueError, match="multiple of 16"):
        Renderer(100)
    with pytest.raises(ValueError, match="1 or 2 characters"):
        Renderer(64).frame([(identity(0, i), FrameState()) for i in range(3)])


def test_the_demo_assets_are_held_out(split):
    """`make demo`'s face and speech are a held-out identity, held-out sentences and the held-out voice, as
    assets/demo.json records them; the image is that identity's reference render, pixel for pixel."""
    import json
    from pathlib import Path

    from PIL import Image

    from model_core.evaluate import reference_render

    assets = Path(__file__).resolve().parents[3] / "assets"
    record = json.loads((assets / "demo.json").read_text())
    assert record["world_seed"] == split.seed
    assert split.held_out_identity(record["identity"])
    assert record["sentences"] and all(split.held_out_sentence(i) for i in record["sentences"])
    assert record["text"] == " ".join(sentence(i) for i in record["sentences"])
    assert record["voice"] == HELD_OUT_VOICE
    assert STYLES[identity(split.seed, record["identity"]).style] == record["style"]
    shipped = np.asarray(Image.open(assets / "reference.png").convert("RGB"))
    rendered, _ = reference_render(record["identity"], split.seed, record["reference_size"])
    assert np.array_equal(shipped, rendered)
