"""AvatarEngine: sessions, timing of chunk emission, frame accounting, adaptive sink, checkpoints, long rollouts."""

import math
import os

import numpy as np
import pytest
import torch

from model_core import dit as dit_module
from model_core.checkpoint import save_facecast_checkpoint
from model_core.config import ConfigError, get_preset
from model_core.engine import AvatarEngine, iter_pieces

from .helpers import reference_image, speech


@pytest.fixture(scope="module")
def engine():
    return AvatarEngine.from_preset("tiny", seed=0)


def run_alone(engine, image, audio, stream=None, piece=640):
    session = engine.open_session(image, "", stream)
    chunks = []
    for pcm in iter_pieces(audio, piece):
        chunks += engine.push_audio(session, pcm, 16000)
    chunks += engine.end_input(session)
    engine.close_session(session)
    return chunks


def video(chunks):
    return torch.cat([chunk.frames for chunk in chunks])


def test_frame_count_matches_audio_duration_and_chunks_have_wan_frame_counts(engine):
    audio = speech(1.7, seed=1)
    chunks = run_alone(engine, reference_image(), audio)
    expected = math.ceil(1.7 * 25)
    assert sum(chunk.num_frames for chunk in chunks) == expected
    assert [chunk.num_frames for chunk in chunks[:-1]] == [9] + [12] * (len(chunks) - 2)
    assert chunks[-1].final and not any(chunk.final for chunk in chunks[:-1])
    assert [chunk.first_frame for chunk in chunks] == list(np.cumsum([0] + [c.num_frames for c in chunks[:-1]]))
    assert sum(chunk.audio_pcm.shape[0] for chunk in chunks) == pytest.approx(audio.shape[0], abs=2)
    assert torch.isfinite(video(chunks)).all() and video(chunks).abs().max() <= 1.0


def test_other_fps_gives_matching_frame_count(engine):
    chunks = run_alone(engine, reference_image(), speech(1.1, seed=2), engine.stream_config(fps=30.0))
    assert sum(chunk.num_frames for chunk in chunks) == math.ceil(1.1 * 30)


def test_a_chunk_comes_out_as_soon_as_its_audio_window_is_complete(engine):
    """Chunk 0 (latent frames 0-2) needs audio features up to video frame 4*(2+2) = 16, i.e. 17 frames."""
    session = engine.open_session(reference_image(), "")
    lookahead_s = engine.frontend(25.0).lookahead_s
    needed = math.ceil((17 / 25 + lookahead_s) * 16000) + 1
    audio = speech(2.0, seed=3)
    before = engine.push_audio(session, audio[: int(16 / 25 * 16000)], 16000)
    assert before == []
    after = engine.push_audio(session, audio[int(16 / 25 * 16000):needed], 16000)
    assert len(after) == 1 and after[0].chunk_index == 0
    engine.close_session(session)


def test_interleaved_sessions_equal_each_alone(engine):
    image_a, image_b = reference_image(seed=1), reference_image(seed=2)
    audio_a, audio_b = speech(1.3, seed=4), speech(1.6, seed=5)
    stream_b = engine.stream_config(seed=11)
    alone_a = video(run_alone(engine, image_a, audio_a))
    alone_b = video(run_alone(engine, image_b, audio_b, stream_b, piece=333))
    a = engine.open_session(image_a, "")
    b = engine.open_session(image_b, "", stream_b)
    out_a, out_b = [], []
    pieces_b = list(iter_pieces(audio_b, 333))
    for index, pcm in enumerate(iter_pieces(audio_a, 640)):
        out_a += engine.push_audio(a, pcm, 16000)
        for extra in pieces_b[2 * index:2 * index + 2]:
            out_b += engine.push_audio(b, extra, 16000)
    for extra in pieces_b[2 * len(list(iter_pieces(audio_a, 640))):]:
        out_b += engine.push_audio(b, extra, 16000)
    out_b += engine.end_input(b)
    out_a += engine.end_input(a)
    torch.testing.assert_close(video(out_a), alone_a, atol=0, rtol=0)
    torch.testing.assert_close(video(out_b), alone_b, atol=0, rtol=0)
    assert not torch.allclose(alone_a[:9], alone_b[:9])


def test_adaptive_sink_replaces_the_reference_with_the_first_generated_frame(engine):
    session = engine.open_session(reference_image(), "")
    state = engine.session(session).score
    reference_sink = state.caches[0].sink_key.clone()
    chunks = []
    for pcm in iter_pieces(speech(1.2, seed=6), 640):
        chunks += engine.push_audio(session, pcm, 16000)
        if chunks:
            break
    first_latent = chunks[0].latents[None, :, :1]
    expected_key, _ = engine.dit.compute_sink(first_latent, state.condition)
    for cache in state.caches.values():
        torch.testing.assert_close(cache.sink_key, expected_key)
    assert not torch.allclose(reference_sink, expected_key)
    engine.close_session(session)

    fixed = engine.open_session(reference_image(), "", engine.stream_config(adaptive_sink=False))
    before = engine.session(fixed).score.caches[0].sink_key.clone()
    for pcm in iter_pieces(speech(1.2, seed=6), 640):
        if engine.push_audio(fixed, pcm, 16000):
            break
    torch.testing.assert_close(engine.session(fixed).score.caches[0].sink_key, before, atol=0, rtol=0)
    engine.close_session(fixed)


def test_listening_character_audio_content_does_not_change_the_video(engine):
    def run(audio):
        session = engine.open_session(reference_image(), "")
        engine.set_speaking(session, 0, False)
        chunks = []
        for pcm in iter_pieces(audio, 800):
            chunks += engine.push_audio(session, pcm, 16000)
        chunks += engine.end_input(session)
        return video(chunks)

    quiet, loud = run(speech(1.0, seed=7) * 0.01), run(speech(1.0, seed=8))
    torch.testing.assert_close(quiet, loud, atol=0, rtol=0)
    talking_a = video(run_alone(engine, reference_image(), speech(1.0, seed=7) * 0.01))
    talking_b = video(run_alone(engine, reference_image(), speech(1.0, seed=8)))
    assert not torch.allclose(talking_a, talking_b)


def test_renoise_solver_is_seeded(engine):
    stream = engine.stream_config(solver="renoise", steps=3, seed=5)
    audio = speech(0.9, seed=9)
    first = video(run_alone(engine, reference_image(), audio, stream))
    again = video(run_alone(engine, reference_image(), audio, stream))
    other = video(run_alone(engine, reference_image(), audio, engine.stream_config(solver="renoise", steps=3, seed=6)))
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, other)


def test_checkpoint_round_trip_reproduces_the_frames(engine, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_facecast_checkpoint(engine.dit, path, vae=engine.vae)
    loaded = AvatarEngine.from_preset("tiny", checkpoint=str(path), seed=1234)
    audio = speech(0.8, seed=10)
    torch.testing.assert_close(video(run_alone(loaded, reference_image(), audio)),
                               video(run_alone(engine, reference_image(), audio)), atol=0, rtol=0)
    assert str(path) in loaded.weights_note


def test_bad_engine_inputs_name_the_problem(engine):
    with pytest.raises(ConfigError, match="reference_image has shape"):
        engine.open_session(torch.zeros(3, 32, 64))
    with pytest.raises(ConfigError, match="steps=9"):
        engine.stream_config(steps=9)
    with pytest.raises(ConfigError, match="width=72 is invalid: must be a multiple of 16"):
        engine.stream_config(width=72)
    with pytest.raises(ConfigError, match="unknown stream option"):
        engine.preset.stream.replace(colour="red")
    session = engine.open_session(reference_image(), "")
    with pytest.raises(ConfigError, match="character=3 is invalid"):
        engine.push_audio(session, np.zeros(100, np.float32), 16000, character=3)
    engine.end_input(session)
    with pytest.raises(ConfigError, match="end_of_input"):
        engine.push_audio(session, np.zeros(100, np.float32), 16000)
    engine.close_session(session)
    with pytest.raises(KeyError, match="not open"):
        engine.push_audio(session, np.zeros(100, np.float32), 16000)
    with pytest.raises(ConfigError, match="preset='huge' is unknown; allowed: tiny, small, talk128, wan-1.3b, wan-14b"):
        get_preset("huge")


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _state_bytes(state) -> int:
    tensors = [t for cache in state.score.caches.values() for t in (cache.sink_key, cache.sink_value, cache.prev_key,
                                                                    cache.prev_value)]
    tensors += [f for audio in state.audio.characters for f in audio.features]
    total = sum(t.numel() * t.element_size() for t in tensors)
    total += sum(a.nbytes for audio in state.audio.characters for a in audio.pcm)
    total += sum(f.nbytes for f in state.decode.features if isinstance(f, torch.Tensor))
    return total


@pytest.mark.slow
def test_thousand_chunk_rollout_stays_bounded(engine, monkeypatch):
    """1,000 chunks (~8 minutes of video) at 32x32: no NaN, RoPE positions bounded, session state and RSS flat."""
    positions = []
    original = dit_module.rope_tables

    def recording(frame_positions, *args, **kwargs):
        positions.append(float(frame_positions.abs().max()))
        return original(frame_positions, *args, **kwargs)

    monkeypatch.setattr(dit_module, "rope_tables", recording)
    stream = engine.stream_config(width=32, height=32)
    session = engine.open_session(reference_image(32, 32), "", stream)
    state = engine.session(session)
    chunk_audio = speech(12 * 40 / 25, seed=11)  # audio for 40 chunks, replayed
    piece = 12 * 16000 // 25                     # one chunk of audio per push
    chunks, state_sizes, rss = 0, [], []
    while chunks < 1000:
        for pcm in iter_pieces(chunk_audio, piece):
            for chunk in engine.push_audio(session, pcm, 16000):
                assert torch.isfinite(chunk.frames).all() and torch.isfinite(chunk.latents).all()
                chunks += 1
                if chunks in (100, 1000) or chunks % 100 == 0:
                    state_sizes.append(_state_bytes(state))
                    rss.append(_rss_bytes())
            if chunks >= 1000:
                break
    engine.close_session(session)
    bound = 2 * stream.chunk_latent_frames + abs(stream.sink_rope_offset) + stream.sink_frames
    assert max(positions) <= bound
    assert max(abs(p) for p in state.score.rope.frame_positions) <= bound
    assert max(state_sizes) - min(state_sizes) <= 64 * 1024, state_sizes
    growth_mib = (rss[-1] - rss[1]) / 2**20
    assert growth_mib < 40, f"RSS grew {growth_mib:.1f} MiB between chunk 200 and chunk 1000: {rss}"
