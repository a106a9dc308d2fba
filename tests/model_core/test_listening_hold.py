"""What a session shows while its characters listen (`stages.hold_listening`, `StreamConfig.listening_hold`): each
listening latent frame moves only part of the way from the one shown before, speech is shown as the model made it,
and the model's own history is untouched."""

import numpy as np
import pytest
import torch

from model_core.config import ConfigError, StreamConfig
from model_core.engine import AvatarEngine, iter_pieces
from model_core.stages import hold_listening

from .helpers import reference_image, speech


def test_a_listening_frame_moves_part_of_the_way_from_the_one_shown_before():
    latents = torch.tensor([4.0, 8.0, 0.0]).reshape(1, 1, 3, 1, 1)
    listening = torch.tensor([True, True, False])
    shown = torch.zeros(1, 1, 1, 1, 1)
    held = hold_listening(latents, listening, shown, True, 0.5)
    assert held.flatten().tolist() == [2.0, 5.0, 0.0]          # 0 -> 4 halfway: 2; 2 -> 8 halfway: 5; speech as made
    # after a speaking frame the first listening frame is the model's; with no frame shown before, too
    assert hold_listening(latents, listening, shown, False, 0.5).flatten().tolist() == [4.0, 6.0, 0.0]
    assert hold_listening(latents, listening, None, True, 0.5).flatten().tolist() == [4.0, 6.0, 0.0]
    assert torch.equal(hold_listening(latents, listening, shown, True, 1.0), latents)     # 1: off
    assert latents.flatten().tolist() == [4.0, 8.0, 0.0], "the model's latents are not changed in place"
    with pytest.raises(ConfigError, match=r"listening_hold=0 is invalid: must be in \(0, 1\] \(1: off\)"):
        StreamConfig(listening_hold=0)


def _stream(engine, hold: float, listen_until_s: float | None) -> list:
    """A session that listens (speaking mode off) for the first `listen_until_s` seconds of its audio, then speaks."""
    stream = StreamConfig(width=64, height=64, listening_hold=hold)
    session = engine.open_session(reference_image(seed=2), "", stream)
    audio = np.concatenate([speech(1.2, seed=4) * 0.05, speech(1.2, seed=5)]).astype(np.float32)
    chunks = []
    if listen_until_s is not None:
        engine.set_speaking(session, 0, False)
    for start, pcm in zip(range(0, len(audio), 640), iter_pieces(audio, 640)):
        if listen_until_s is not None and start == int(listen_until_s * 16000):
            engine.set_speaking(session, 0, True)
        chunks += engine.push_audio(session, pcm, 16000)
    chunks += engine.end_input(session)
    engine.close_session(session)
    return chunks


def _latents(chunks) -> torch.Tensor:
    return torch.cat([chunk.latents for chunk in chunks], 1)     # [16, F, h, w]


def test_a_listening_face_is_held_and_speech_and_the_models_history_are_not():
    engine = AvatarEngine.from_preset("tiny", seed=0)
    held, free = (_latents(_stream(engine, hold, 1.2)) for hold in (0.5, 1.0))
    change = lambda z: (z[:, 1:] - z[:, :-1]).abs().mean(dim=(0, 2, 3))     # per consecutive pair
    frames = held.shape[1]
    listening = slice(1, 7)                 # pairs of latent frames 1-7, which show only listening
    assert change(held)[listening].mean() < 0.6 * change(free)[listening].mean()
    assert not torch.equal(held[:, listening], free[:, listening])
    # once the character speaks (from video frame 30: latent frame 8), the frames are the model's, identical with or
    # without the hold: the model's caches never saw the held frames (the last latent frame shows frames past the
    # audio's end, where no one speaks: held)
    speaking = slice(8, frames - 1)
    assert frames >= 14 and torch.equal(held[:, speaking], free[:, speaking])


def test_a_latent_frame_listens_when_the_video_frames_it_shows_do():
    """The flag the hold reads, from the audio stage's window tokens: latent frame f shows video frames 4f-3..4f
    (frame 0 alone); set speaking again at video frame 30, frames 0-7 listen (up to video frame 28) and 8 on speak."""
    engine = AvatarEngine.from_preset("tiny", seed=0)
    session_id = engine.open_session(reference_image(seed=2), "", StreamConfig(width=64, height=64))
    session = engine.session(session_id)
    audio = speech(2.4, seed=6).astype(np.float32)
    engine.set_speaking(session_id, 0, False)
    inputs = []
    for start, pcm in zip(range(0, len(audio), 640), iter_pieces(audio, 640)):
        if start == 30 * 640:                        # 640 samples a video frame at 16 kHz, 25 fps
            engine.set_speaking(session_id, 0, True)
        inputs += engine.audio.push(session.audio, pcm, 16000)
    flags = torch.cat([engine.score.begin_chunk(session.score, item).listening for item in inputs]).tolist()
    engine.close_session(session_id)
    assert flags[:8] == [True] * 8 and not any(flags[8:]) and len(flags) >= 12, flags
