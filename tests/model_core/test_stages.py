"""Stages composed as the cluster composes them give the sequential engine's results."""

import pytest
import torch

from model_core.engine import AvatarEngine, Character, iter_pieces, region_masks, token_grid
from model_core.stages import ScoreStage

from .helpers import reference_image, speech


def run_as_the_pipelined_score_group(stages, sessions, inputs):
    """The pipelined ScoreWorkerGroup's code path, in process: stage 0 projects the audio, draws the noise and runs
    step 0; each child stage runs its own step, chunk after chunk in order; after chunk 0 the first clean latent frame
    becomes the sink on every stage (adaptive sink). Returns each chunk's clean latents."""
    latents = []
    for item in inputs:
        chunk = stages[0].run_steps(sessions[0], stages[0].begin_chunk(sessions[0], item))
        for stage, session in zip(stages[1:], sessions[1:]):
            chunk = stage.run_steps(session, chunk)
        if item.chunk_index == 0 and sessions[0].stream.adaptive_sink:
            for stage, session in zip(stages, sessions):
                stage.set_sink(session, chunk.latents[:, :, :1])
        assert len(chunk.step_s) == len(stages), "one timing per step, over all stages (score_step_k)"
        latents.append(chunk.latents)
    return latents


@pytest.mark.parametrize("steps", [2, 3])
def test_one_score_stage_per_step_equals_sequential_denoise_exactly(steps):
    engine = AvatarEngine.from_preset("tiny", seed=2)
    stream = engine.stream_config(steps=steps, seed=4)
    assert stream.adaptive_sink
    image = reference_image(seed=3)
    latent = engine.decoder.encode_reference(image)
    regions = region_masks([Character()], *token_grid(engine.dit.config, latent))
    text = engine.text_states("hello")
    audio_session = engine.audio.open("s", stream, 1)
    inputs = []
    for pcm in iter_pieces(speech(1.4, seed=12), 640):
        inputs += engine.audio.push(audio_session, pcm, 16000)
    inputs += engine.audio.end(audio_session)
    assert len(inputs) >= 3

    sequential = engine.score.open("s", stream, latent, text, regions)
    expected = [engine.score.denoise(sequential, item).latents for item in inputs]

    stages = [ScoreStage(engine.dit) for _ in range(steps)]  # one DiT: every score worker builds the same weights
    sessions = [stage.open("s", stream, latent, text, regions, steps=[k]) for k, stage in enumerate(stages)]
    pipelined = run_as_the_pipelined_score_group(stages, sessions, inputs)

    assert len(pipelined) == len(expected)
    for index, (got, want) in enumerate(zip(pipelined, expected)):
        assert torch.equal(got, want), f"chunk {index}: max difference {(got - want).abs().max()}"
    for k, session in enumerate(sessions):
        assert torch.equal(session.caches[k].prev_key, sequential.caches[k].prev_key)
        assert torch.equal(session.caches[k].sink_key, sequential.caches[k].sink_key)


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
            assert len(chunk.step_s) == streams[row].steps
            batched[row].append(chunk.latents)
    for got_session, want_session in zip(batched, alone):
        assert len(got_session) == len(want_session)
        for got, want in zip(got_session, want_session):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(alone[0][1], alone[1][1])


def test_batch_refuses_incompatible_sessions_and_duplicate_sessions():
    engine = AvatarEngine.from_preset("tiny", seed=5)
    latent = engine.decoder.encode_reference(reference_image())
    regions = region_masks([Character()], *token_grid(engine.dit.config, latent))
    a = engine.score.open("a", engine.stream_config(steps=2), latent, engine.text_states(""), regions)
    b = engine.score.open("b", engine.stream_config(steps=3), latent, engine.text_states(""), regions)
    with pytest.raises(ValueError, match="batch_key"):
        engine.score.denoise_batch([a, b], [None, None])
    with pytest.raises(ValueError, match="two chunks of one session"):
        engine.score.denoise_batch([a, a], [None, None])
