"""Multi-character sessions (the rules in model_core/stages.py's docstring), through AudioStage and AvatarEngine.

A chunk waits for every speaking character's audio; a character set not-speaking holds nothing back; turning a
character to speaking behind the others starts its speech now; the video lasts as long as the longest track; the
chunk's audio is the mix of every character's track, clipped to [-1, 1]; all characters send at one sample rate.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model_core.audio import AudioConfig, AudioFrontend
from model_core.audio_stage import AudioStage
from model_core.config import ConfigError
from model_core.engine import AvatarEngine, Character, iter_pieces

from .helpers import TINY, reference_image, speech, tiny_config

FPS, RATE = 25.0, 16000
LEFT, RIGHT = Character((0.0, 0.0, 0.5, 1.0)), Character((0.5, 0.0, 1.0, 1.0))


def token_frame(latent: int, token: int) -> int:
    """Video frame of token `token` of latent frame `latent` (model_core/stages.py's timeline, r = 4, h = 2)."""
    return 4 * (latent - 2) - 3 + token


def new_stage(characters: int = 2):
    stage = AudioStage(AudioConfig(), tiny_config())
    return stage, stage.open("s", TINY.stream, characters)


def push_all(stage, session, audio: np.ndarray, character: int, piece: int = 640) -> list:
    return [item for pcm in iter_pieces(audio, piece) for item in stage.push(session, pcm, RATE, character)]


def per_frame(inputs, character: int, total: int):
    """(features [total, D], speaking [total]) of one character by video frame, read back from the chunks' windows
    (a frame appears in several windows: its flags must agree, and its features too where it is speaking; a
    not-speaking frame the track had not reached yet reads as zeros, later as the padded silence's features)."""
    features, speaking = {}, {}
    for item in inputs:
        for row in range(item.features.shape[2]):
            latent = item.chunk_index * item.features.shape[2] + row
            for token in range(item.features.shape[3]):
                frame = token_frame(latent, token)
                if 0 <= frame < total:
                    value, flag = item.features[0, character, row, token], bool(item.speaking[0, character, row, token])
                    if frame in features:
                        assert speaking[frame] == flag and (not flag or torch.equal(features[frame], value)), frame
                    features[frame], speaking[frame] = value, flag
    assert sorted(features) == list(range(total))
    return torch.stack([features[t] for t in range(total)]), torch.tensor([speaking[t] for t in range(total)])


# ------------------------------------------------------------------ AudioStage


def test_a_late_second_character_holds_the_chunk_until_its_audio_arrives():
    stage, session = new_stage()
    first, second = speech(2.0, seed=1), speech(2.0, seed=2)
    assert push_all(stage, session, first, character=0) == []
    inputs = push_all(stage, session, second, character=1)
    assert len(inputs) >= 3
    inputs += stage.end(session)
    frontend = AudioFrontend(AudioConfig(fps=FPS))
    for character, audio in ((0, first), (1, second)):
        features, speaking = per_frame(inputs, character, total=50)
        assert speaking.all()
        torch.testing.assert_close(features, frontend.encode(audio, RATE), atol=1e-5, rtol=0)


def test_a_character_set_not_speaking_does_not_hold_chunks_back_and_reads_as_silence():
    stage, session = new_stage()
    alone_stage, alone = new_stage(characters=1)
    stage.set_speaking(session, 1, False)
    audio = speech(2.0, seed=3)
    inputs = push_all(stage, session, audio, character=0)
    assert len(inputs) == len(push_all(alone_stage, alone, audio, character=0)) >= 3
    for item in inputs:
        assert not item.speaking[0, 1].any()
    silence = AudioFrontend(AudioConfig(fps=FPS)).encode(np.zeros(audio.shape[0], np.float32), RATE)
    torch.testing.assert_close(per_frame(inputs + stage.end(session), 1, total=50)[0], silence, atol=0, rtol=0)
    assert (session.characters[1].samples_received, session.characters[1].silence_samples) == (0, audio.shape[0])


def test_a_turn_change_keeps_the_stream_flowing_and_starts_the_new_speaker_now():
    """0 speaks 1.2 s, then 1 speaks 1.0 s (1 sends nothing during 0's turn): chunks keep coming during 1's turn
    exactly as for one character speaking the whole 2.2 s, and 1's speech lands at 1.2 s, not at 0 s."""
    stage, session = new_stage()
    stage.set_speaking(session, 1, False)
    turn_0, turn_1 = speech(1.2, seed=4), speech(1.0, seed=5)
    inputs = push_all(stage, session, turn_0, character=0)
    stage.set_speaking(session, 0, False)
    stage.set_speaking(session, 1, True)
    inputs += push_all(stage, session, turn_1, character=1, piece=4000)
    one_stage, one = new_stage(characters=1)
    assert len(inputs) == len(push_all(one_stage, one, np.concatenate([turn_0, turn_1]), character=0)) >= 4
    inputs += stage.end(session)
    assert session.total_frames == (19200 + 16000) // 640 == 55   # 2.2 s at 25 fps
    assert sum(item.num_frames for item in inputs) == 55
    frontend = AudioFrontend(AudioConfig(fps=FPS))
    features_0, speaking_0 = per_frame(inputs, 0, 55)
    features_1, speaking_1 = per_frame(inputs, 1, 55)
    assert speaking_0.tolist() == [True] * 30 + [False] * 25   # 1.2 s = 30 frames, flags follow the audio's time
    assert speaking_1.tolist() == [False] * 30 + [True] * 25
    torch.testing.assert_close(features_0[:30], frontend.encode(turn_0, RATE), atol=1e-5, rtol=0)
    track_1 = np.concatenate([np.zeros(turn_0.shape[0], np.float32), turn_1])
    torch.testing.assert_close(features_1[30:], frontend.encode(track_1, RATE)[30:], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.concatenate([item.audio_pcm for item in inputs]),
                                  np.concatenate([turn_0, turn_1]))
    assert (session.characters[1].samples_received, session.characters[1].silence_samples) == (16000, 19200)


def test_every_character_sends_at_the_session_rate():
    stage, session = new_stage()
    stage.push(session, np.zeros(1600, np.float32), RATE, character=0)
    with pytest.raises(ConfigError, match="sample_rate_hz=48000 for character=1") as error:
        stage.push(session, np.zeros(4800, np.float32), 48000, character=1)
    assert "(16000,)" in str(error.value)
    assert session.characters[1].state.n_input_samples == 0
    stage.push(session, np.zeros(1600, np.float32), RATE, character=1)


# ------------------------------------------------------------------ AvatarEngine


@pytest.fixture(scope="module")
def engine():
    return AvatarEngine.from_preset("tiny", seed=0)


def test_engine_output_audio_is_the_mix_and_the_video_follows_the_longest_character(engine):
    session = engine.open_session(reference_image(), "", characters=[LEFT, RIGHT])
    short, long = 1.6 * speech(1.0, seed=6), 1.6 * speech(1.4, seed=7)
    chunks = []
    pieces_long = list(iter_pieces(long, 500))
    for index, pcm in enumerate(iter_pieces(short, 700)):
        chunks += engine.push_audio(session, pcm, RATE, character=0)
        for extra in pieces_long[index * 2:index * 2 + 2]:
            chunks += engine.push_audio(session, extra, RATE, character=1)
    for extra in pieces_long[2 * len(list(iter_pieces(short, 700))):]:
        chunks += engine.push_audio(session, extra, RATE, character=1)
    chunks += engine.end_input(session)
    engine.close_session(session)
    assert sum(chunk.num_frames for chunk in chunks) == math.ceil(1.4 * FPS) == 35
    assert chunks[-1].final
    mix = long.copy()
    mix[:short.shape[0]] += short
    expected = np.clip(mix, -1.0, 1.0)
    assert (np.abs(mix) > 1.0).any()
    np.testing.assert_array_equal(np.concatenate([chunk.audio_pcm for chunk in chunks]), expected)


def test_engine_late_character_and_turn_change(engine):
    """Through the engine: nothing comes out while the second (speaking) character is silent on the wire; after a
    turn change the chunks keep coming and the video lasts the whole conversation."""
    session = engine.open_session(reference_image(), "", characters=[LEFT, RIGHT])
    turn_0, turn_1 = speech(1.2, seed=8), speech(1.0, seed=9)
    assert [c for pcm in iter_pieces(turn_0, 640) for c in engine.push_audio(session, pcm, RATE, character=0)] == []
    engine.set_speaking(session, 1, False)   # released chunks come out with the next push
    chunks = engine.push_audio(session, np.zeros(0, np.float32), RATE, character=0)
    assert len(chunks) >= 2
    engine.set_speaking(session, 0, False)
    engine.set_speaking(session, 1, True)
    during_turn_1 = [c for pcm in iter_pieces(turn_1, 640) for c in engine.push_audio(session, pcm, RATE, character=1)]
    assert len(during_turn_1) >= 2
    chunks += during_turn_1 + engine.end_input(session)
    engine.close_session(session)
    assert [chunk.chunk_index for chunk in chunks] == list(range(len(chunks)))
    assert sum(chunk.num_frames for chunk in chunks) == 55
    np.testing.assert_array_equal(np.concatenate([chunk.audio_pcm for chunk in chunks]),
                                  np.concatenate([turn_0, turn_1]))
    assert torch.isfinite(torch.cat([chunk.frames for chunk in chunks])).all()
