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
