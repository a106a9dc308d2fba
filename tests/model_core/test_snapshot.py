"""model_core.snapshot: a session moved to fresh stages mid-stream (audio front end, score caches and noise
generator, decode cache, each through bytes) continues with exactly the frames of the run that never moved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_core.audio_stage import AudioSession
from model_core.config import StreamConfig
from model_core.engine import AvatarEngine, Character
from model_core.snapshot import SnapshotError, pack, restore_score, snapshot_score, to_device, unpack

from tests.model_core.helpers import reference_image, speech


def _frames(chunks) -> list[torch.Tensor]:
    return [chunk.frames for chunk in chunks]


def _run(engine: AvatarEngine, session_id: str, pieces: list[np.ndarray], end: bool) -> list:
    chunks = []
    for piece in pieces:
        chunks += engine.push_audio(session_id, piece, 16000)
    if end:
        chunks += engine.end_input(session_id)
    return chunks


@pytest.mark.parametrize("solver, adaptive_sink, listening", [("renoise", True, False), ("euler", False, False),
                                                               ("euler", True, True)])
def test_a_session_moved_mid_stream_to_fresh_stages_continues_with_the_same_frames(solver, adaptive_sink, listening):
    """listening: the character listens throughout, so what is shown is held (`stages.hold_listening`) and the move
    must carry the last frame shown."""
    image, audio = reference_image(seed=3), (speech(3.6, seed=7) * 32767).astype(np.int16)
    pieces = np.array_split(audio, 17)      # odd pieces: the front end holds samples between pushes
    stream = StreamConfig(width=64, height=64, steps=2, solver=solver, adaptive_sink=adaptive_sink)
    first = AvatarEngine.from_preset("tiny", seed=0)
    sid = first.open_session(image, prompt="a person talking", stream=stream,
                             characters=[Character((0.0, 0.0, 1.0, 1.0))], session_id="a")
    if listening:
        first.set_speaking(sid, 0, False)
    before = _run(first, sid, pieces[:11], end=False)
    assert len(before) >= 2, "the move must happen after the adaptive sink and a few chunks"
    session = first.session(sid)
    audio_bytes, score_bytes = pack(session.audio), snapshot_score(session.score)
    decode_bytes = pack(session.decode)
    sink = before[0].latents[None, :, :1].clone() if adaptive_sink else None
    reference = before + _run(first, sid, pieces[11:], end=True)      # the uninterrupted run goes on

    moved = AvatarEngine.from_preset("tiny", seed=0)
    moved.open_session(image, prompt="a person talking", stream=stream,
                       characters=[Character((0.0, 0.0, 1.0, 1.0))], session_id="a")
    target = moved.session(sid)
    target.audio = unpack(audio_bytes)
    restore_score(moved.score, target.score, score_bytes, sink)
    target.decode = to_device(unpack(decode_bytes), moved.vae.device)
    after = _run(moved, sid, pieces[11:], end=True)

    assert [chunk.chunk_index for chunk in after] == [chunk.chunk_index for chunk in reference[len(before):]]
    for got, want in zip(after, reference[len(before):]):
        assert torch.equal(got.frames, want.frames), f"chunk {got.chunk_index} differs after the move"
        assert np.array_equal(got.audio_pcm, want.audio_pcm)


def test_a_move_without_the_score_caches_or_generator_is_visible():
    """The same move with a fresh generator (or empty caches) gives other frames: the test above would catch a
    snapshot that dropped either."""
    image, audio = reference_image(seed=3), (speech(2.0, seed=7) * 32767).astype(np.int16)
    pieces = np.array_split(audio, 10)
    engine = AvatarEngine.from_preset("tiny", seed=0)
    sid = engine.open_session(image, session_id="a")
    before = _run(engine, sid, pieces[:5], end=False)
    score_bytes = snapshot_score(engine.session(sid).score)
    audio_bytes, decode_bytes = pack(engine.session(sid).audio), pack(engine.session(sid).decode)
    want = _run(engine, sid, pieces[5:], end=True)
    for spoil in ("generator", "caches"):
        moved = AvatarEngine.from_preset("tiny", seed=0)
        moved.open_session(image, session_id="a")
        target = moved.session(sid)
        target.audio, target.decode = unpack(audio_bytes), unpack(decode_bytes)
        restore_score(moved.score, target.score, score_bytes, before[0].latents[None, :, :1])
        if spoil == "generator":
            target.score.generator.manual_seed(1234)
        else:
            for cache in target.score.caches.values():
                cache.prev_key.zero_()
        got = _run(moved, sid, pieces[5:], end=True)
        assert not torch.equal(got[0].frames, want[0].frames), spoil


def test_snapshots_refuse_what_they_cannot_hold_and_corrupt_bytes():
    class Foreign:
        pass

    with pytest.raises(SnapshotError, match="cannot snapshot a Foreign"):
        pack({"x": Foreign()})
    with pytest.raises(SnapshotError, match="string keys"):
        pack({1: 2})
    with pytest.raises(SnapshotError, match="unreadable snapshot"):
        unpack(b"not a snapshot")
    state = unpack(pack({"a": (1, 2.5, "x", None), "b": [np.arange(3, dtype=np.int16)]}))
    assert state["a"] == (1, 2.5, "x", None) and state["b"][0].dtype == np.int16


def test_a_score_snapshot_holds_the_sessions_caches_not_the_pool_they_live_in():
    """A session's caches are views into a pool shared with other sessions: the snapshot copies the session's slice
    (saving a view would save the whole pool's storage, 4 sessions' worth here)."""
    engine = AvatarEngine.from_preset("tiny", seed=0)
    sids = [engine.open_session(reference_image(seed=i), session_id=f"s{i}") for i in range(4)]
    session = engine.session(sids[1]).score
    own = sum(getattr(cache, name).nbytes for cache in session.caches.values()
              for name in ("prev_key", "prev_value", "prev_valid"))
    size = len(snapshot_score(session))
    assert own < size < 1.5 * own + 16384, (size, own)
    audio = engine.session(sids[1]).audio
    assert isinstance(unpack(pack(audio)), AudioSession)
