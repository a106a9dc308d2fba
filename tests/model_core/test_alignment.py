"""Audio-video alignment: a tone burst inside one video frame reaches exactly the latent frames whose window covers it.

The expected latent frames and window tokens come from the timeline written in model_core/stages.py's docstring
(latent frame f shows video frames [4f-3, 4f]; its tokens are the features of video frames [4(f-2)-3, 4(f+2)];
frame times are index / fps), computed by hand in tests/model_core/helpers.py, never by the code under test.
Shifting the chunk's audio window by one latent frame (160 ms of lip-sync error) fails these tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_core.audio import AudioConfig, AudioFrontend
from model_core.audio_stage import AudioStage
from model_core.engine import AvatarEngine, iter_pieces

from .helpers import (TINY, burst_audio, covering_latents, expected_first_changed_latent, reference_image,
                      tiny_config)

FPS, RATE = 25.0, 16000
RATIO, LOOKAHEAD = 4, 2          # the docstring's r and h; the tiny preset must have them
DURATION_S = 1.6                 # 40 video frames, 11 latent frames


def token_frame(latent: int, token: int) -> int:
    """The video frame whose features are token `token` of latent frame `latent` (from the docstring)."""
    return RATIO * (latent - LOOKAHEAD) - (RATIO - 1) + token


def random_pieces(audio: np.ndarray, seed: int) -> list[np.ndarray]:
    """`audio` cut at random points into pieces of 0 to 2,000 samples (empty pieces included)."""
    rng = np.random.default_rng(seed)
    cuts = np.cumsum(rng.integers(0, 2000, size=audio.shape[0]))
    cuts = cuts[cuts < audio.shape[0]]
    return np.split(audio, cuts)


def stage_windows(audio: np.ndarray, seed: int, chunk_latent_frames: int = 3):
    """Push `audio` through an AudioStage in random pieces; returns (features [L, tokens, D], speaking [L, tokens],
    the chunks' ChunkAudioInput list, total video frames), one row per latent frame of every chunk, in order."""
    stage = AudioStage(AudioConfig(), tiny_config())
    stream = TINY.stream.replace(chunk_latent_frames=chunk_latent_frames)
    session = stage.open("s", stream, 1)
    inputs = []
    for piece in random_pieces(audio, seed):
        inputs += stage.push(session, piece, RATE)
    inputs += stage.end(session)
    assert [item.chunk_index for item in inputs] == list(range(len(inputs)))
    for item in inputs:
        assert item.features.shape[:3] == (1, 1, chunk_latent_frames)
    features = torch.cat([item.features[0, 0] for item in inputs])
    speaking = torch.cat([item.speaking[0, 0] for item in inputs])
    return features, speaking, inputs, session.total_frames


def test_the_tiny_preset_has_the_docstring_timeline():
    config = tiny_config()
    assert (config.temporal_compression, config.audio_lookahead_latent_frames) == (RATIO, LOOKAHEAD)
    assert config.audio_tokens_per_frame == RATIO * (2 * LOOKAHEAD + 1)
    assert TINY.stream.fps == FPS and TINY.audio_backend == "logmel"


@pytest.mark.parametrize("burst_frame", [0, 5, 26, 29, 39])
def test_the_burst_changes_the_features_of_its_own_video_frame_only(burst_frame):
    """The premise of the tests below, on the front end alone."""
    frontend = AudioFrontend(AudioConfig(fps=FPS))
    silent = frontend.encode(burst_audio(DURATION_S, burst_frame, amplitude=0.0), RATE)
    loud = frontend.encode(burst_audio(DURATION_S, burst_frame), RATE)
    difference = (loud - silent).abs().amax(dim=1)
    assert difference.nonzero().flatten().tolist() == [burst_frame]
    assert difference[burst_frame] > 0.5


@pytest.mark.parametrize("burst_frame", [0, 3, 8, 9, 26, 28, 29])
@pytest.mark.parametrize("chunk_latent_frames", [3, 1])
def test_audio_stage_puts_the_burst_in_exactly_the_covering_window_tokens(burst_frame, chunk_latent_frames):
    silent, silent_speaking, _, total = stage_windows(burst_audio(DURATION_S, burst_frame, amplitude=0.0), seed=1,
                                                       chunk_latent_frames=chunk_latent_frames)
    loud, loud_speaking, _, _ = stage_windows(burst_audio(DURATION_S, burst_frame), seed=2,
                                              chunk_latent_frames=chunk_latent_frames)
    assert total == 40
    changed = ((loud - silent).abs().amax(dim=2) > 1e-3).nonzero().tolist()
    expected = [[latent, burst_frame - token_frame(latent, 0)] for latent in covering_latents(burst_frame)]
    assert changed == expected
    unchanged = torch.ones(silent.shape[:2], dtype=torch.bool)
    unchanged[tuple(torch.tensor(expected).T)] = False
    torch.testing.assert_close(loud[unchanged], silent[unchanged], atol=1e-5, rtol=0)
    # the changed tokens hold the front end's features of the burst's own video frame
    burst_row = AudioFrontend(AudioConfig(fps=FPS)).encode(burst_audio(DURATION_S, burst_frame), RATE)[burst_frame]
    for latent, token in expected:
        torch.testing.assert_close(loud[latent, token], burst_row, atol=1e-5, rtol=0)
    # speaking marks exactly the tokens of real video frames [0, total): frames before 0 and after the end are padding
    latents, tokens = silent_speaking.shape
    frames = torch.tensor([[token_frame(f, k) for k in range(tokens)] for f in range(latents)])
    assert torch.equal(silent_speaking, (frames >= 0) & (frames < total))
    assert torch.equal(loud_speaking, silent_speaking)


@pytest.mark.parametrize("chunk_latent_frames", [3, 1])
def test_each_chunk_shows_its_latent_frames_video_frames_and_plays_their_audio(chunk_latent_frames):
    """Chunk n holds latent frames [nC, nC + C), shows video frames [4nC - 3, 4(nC + C - 1)] and carries the audio
    of exactly those frames: the burst of video frame T is played in the chunk that shows frame T, at T's time."""
    burst_frame = 29
    audio = burst_audio(DURATION_S, burst_frame)
    _, _, inputs, total = stage_windows(audio, seed=3, chunk_latent_frames=chunk_latent_frames)
    shown = 0
    for item in inputs:
        first_latent = item.chunk_index * chunk_latent_frames
        first = max(0, RATIO * first_latent - (RATIO - 1))
        last = min(RATIO * (first_latent + chunk_latent_frames - 1), total - 1)
        assert (item.first_frame, item.num_frames) == (first, last - first + 1)
        shown += item.num_frames
        start = round(first / FPS * RATE)
        np.testing.assert_array_equal(item.audio_pcm, audio[start:start + item.audio_pcm.shape[0]])
        if first <= burst_frame <= last:
            loud = np.flatnonzero(item.audio_pcm) + start
            assert loud.min() >= burst_frame / FPS * RATE and loud.max() < (burst_frame + 1) / FPS * RATE
        else:
            assert not item.audio_pcm.any()
    assert shown == total == 40


# ------------------------------------------------------------------ through the engine


@pytest.fixture(scope="module")
def engine():
    return AvatarEngine.from_preset("tiny", seed=0)


def engine_latents(engine, audio: np.ndarray, stream, piece: int) -> torch.Tensor:
    """Clean latents [16, L, h, w] of every latent frame of every chunk, in order."""
    session = engine.open_session(reference_image(), "", stream)
    chunks = []
    for pcm in iter_pieces(audio, piece):
        chunks += engine.push_audio(session, pcm, RATE)
    chunks += engine.end_input(session)
    engine.close_session(session)
    return torch.cat([chunk.latents for chunk in chunks], dim=1)


WHOLE = round(DURATION_S * RATE)  # one push: every window's features exist when its chunk is cut


@pytest.mark.parametrize("chunk_latent_frames, burst_frame, piece",
                         [(1, 29, WHOLE), (1, 29, 700), (3, 28, 333), (3, 29, WHOLE), (3, 29, 1280)])
def test_engine_output_changes_first_at_the_first_latent_frame_whose_window_covers_the_burst(
        engine, chunk_latent_frames, burst_frame, piece):
    """With one latent frame per chunk the first changed latent frame is exact; with three, the burst is placed so
    the first covering latent frame opens (T=29 -> 6) or closes (T=28 -> 5) a chunk, so a window one latent frame
    late or early moves the first changed chunk.  Small pieces alone would miss a window that reads too far ahead:
    frames not yet received when its chunk is cut read as silence, hence the whole-clip pushes."""
    stream = engine.stream_config(chunk_latent_frames=chunk_latent_frames)
    silent = engine_latents(engine, burst_audio(DURATION_S, burst_frame, amplitude=0.0), stream, piece)
    loud = engine_latents(engine, burst_audio(DURATION_S, burst_frame), stream, piece)
    first_latent = expected_first_changed_latent(burst_frame)
    first_chunk = first_latent // chunk_latent_frames
    changed_latents = [f for f in range(silent.shape[1]) if not torch.equal(silent[:, f], loud[:, f])]
    changed_chunks = sorted({f // chunk_latent_frames for f in changed_latents})
    assert changed_chunks[0] == first_chunk, (changed_latents, first_latent)
    unchanged = first_chunk * chunk_latent_frames
    assert torch.equal(loud[:, :unchanged], silent[:, :unchanged])
    assert (loud[:, first_latent] - silent[:, first_latent]).abs().max() > 1e-4
    if chunk_latent_frames == 1:
        assert changed_latents[0] == first_latent
