"""Stages composed as the cluster composes them give the engine's frames."""

import torch

from model_core.engine import AvatarEngine, Character, iter_pieces, region_masks, token_grid
from model_core.stages import ScoreStage

from .helpers import reference_image, speech


def test_one_score_stage_per_step_equals_the_sequential_engine():
    engine = AvatarEngine.from_preset("tiny", seed=2)
    stream = engine.stream_config(steps=3, seed=4)
    image, audio = reference_image(seed=3), speech(1.4, seed=12)

    # the engine, sequential (all steps in one ScoreStage)
    session = engine.open_session(image, "hello", stream)
    expected = []
    for pcm in iter_pieces(audio, 640):
        expected += engine.push_audio(session, pcm, 16000)
    expected += engine.end_input(session)

    # the cluster's pipelined layout: separate ScoreStage objects, each owning one step and its cache
    stages = [ScoreStage(engine.dit) for _ in range(stream.steps)]
    latent = engine.decoder.encode_reference(image)
    regions = region_masks([Character()], *token_grid(engine.dit.config, latent))
    text = engine.text_states("hello")
    sessions = [stage.open("s", stream, latent, text, regions, steps=[k]) for k, stage in enumerate(stages)]
    audio_session = engine.audio.open("s", stream, 1)
    decode = engine.decoder.open()
    inputs = []
    for pcm in iter_pieces(audio, 640):
        inputs += engine.audio.push(audio_session, pcm, 16000)
    inputs += engine.audio.end(audio_session)
    frames = []
    for item in inputs:
        chunk = stages[0].begin_chunk(sessions[0], item)
        for stage, session_k in zip(stages, sessions):
            chunk = stage.run_steps(session_k, chunk)
        if item.chunk_index == 0:  # adaptive sink: the first clean frame flows back to every stage
            for stage, session_k in zip(stages, sessions):
                stage.set_sink(session_k, chunk.latents[:, :, :1])
        frames.append(engine.decoder.decode(decode, chunk.latents, item.num_frames)[0])
    assert len(frames) == len(expected)
    for got, want in zip(frames, expected):
        torch.testing.assert_close(got, want.frames, atol=0, rtol=0)


def test_cross_session_batch_equals_each_session_alone():
    engine = AvatarEngine.from_preset("tiny", seed=5)
    stage = engine.score
    streams = [engine.stream_config(seed=seed) for seed in (1, 2, 3)]
    images = [reference_image(seed=seed) for seed in (4, 5, 6)]
    audios = [speech(1.2, seed=seed) for seed in (7, 8, 9)]

    def open_all():
        sessions, feeds = [], []
        for index, (stream, image, audio) in enumerate(zip(streams, images, audios)):
            latent = engine.decoder.encode_reference(image)
            regions = region_masks([Character()], *token_grid(engine.dit.config, latent))
            sessions.append(stage.open(f"s{index}", stream, latent, engine.text_states(f"p{index}"), regions))
            audio_session = engine.audio.open(f"s{index}", stream, 1)
            inputs = engine.audio.push(audio_session, audio, 16000) + engine.audio.end(audio_session)
            feeds.append(inputs)
        return sessions, feeds

    sessions, feeds = open_all()
    alone = [[stage.denoise(session, item).latents for item in feed] for session, feed in zip(sessions, feeds)]
    sessions, feeds = open_all()
    batched = [[] for _ in sessions]
    for position in range(max(len(feed) for feed in feeds)):
        rows = [row for row, feed in enumerate(feeds) if position < len(feed)]
        results = stage.denoise_batch([sessions[row] for row in rows], [feeds[row][position] for row in rows])
        for row, chunk in zip(rows, results):
            batched[row].append(chunk.latents)
    for got_session, want_session in zip(batched, alone):
        assert len(got_session) == len(want_session)
        for got, want in zip(got_session, want_session):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(alone[0][1], alone[1][1])


def test_batch_refuses_incompatible_sessions_and_duplicate_sessions():
    import pytest

    engine = AvatarEngine.from_preset("tiny", seed=5)
    latent = engine.decoder.encode_reference(reference_image())
    regions = region_masks([Character()], *token_grid(engine.dit.config, latent))
    a = engine.score.open("a", engine.stream_config(steps=2), latent, engine.text_states(""), regions)
    b = engine.score.open("b", engine.stream_config(steps=3), latent, engine.text_states(""), regions)
    with pytest.raises(ValueError, match="batch_key"):
        engine.score.denoise_batch([a, b], [None, None])
    with pytest.raises(ValueError, match="two chunks of one session"):
        engine.score.denoise_batch([a, a], [None, None])
