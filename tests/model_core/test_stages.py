"""Stages composed as the cluster composes them give the sequential engine's results."""

import pytest
import torch

from model_core.engine import AvatarEngine, Character, iter_pieces, region_masks, token_grid
from model_core.sampler import step
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
    for session in sessions:
        stage.close(session)
    sessions, feeds = open_all()
    pool = sessions[0].pool
    assert [pool.slot_of(session) for session in sessions] == [0, 1, 2]
    batched = [[] for _ in sessions]
    for position in range(max(len(feed) for feed in feeds)):
        # every session, then the first and the last only: consecutive slots (a view of the pool) and not (gathered)
        rows = [0, 1, 2] if position < 1 else [row for row in (2, 0) if position < len(feeds[row])]
        gathered = pool.gathered_bytes
        results = stage.denoise_batch([sessions[row] for row in rows], [feeds[row][position] for row in rows])
        assert (pool.gathered_bytes == gathered) == (len(rows) != 2), "only slots 0 and 2 need a gather"
        for row, chunk in zip(rows, results):
            assert len(chunk.step_s) == streams[row].steps
            batched[row].append(chunk.latents)
    for row in (0, 2):
        assert len(batched[row]) == len(alone[row]) >= 3, "two gathered batches: the second reads what the first wrote"
    for got_session, want_session in zip(batched, alone):
        for got, want in zip(got_session, want_session):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(alone[0][1], alone[1][1])


def _open_sessions(engine, stage, seeds):
    sessions, feeds = [], []
    for seed in seeds:
        stream = engine.stream_config(seed=seed)
        latent = engine.decoder.encode_reference(reference_image(seed=seed + 10))
        regions = region_masks([Character()], *token_grid(engine.dit.config, latent))
        sessions.append(stage.open(f"s{seed}", stream, latent, engine.text_states(f"p{seed}"), regions))
        audio_session = engine.audio.open(f"s{seed}", stream, 1)
        feeds.append(engine.audio.push(audio_session, speech(1.2, seed=seed + 20), 16000)
                     + engine.audio.end(audio_session))
    return sessions, feeds


def test_a_batch_of_consecutive_slots_reads_and_writes_the_pool_in_place():
    engine = AvatarEngine.from_preset("tiny", seed=5)
    stage = ScoreStage(engine.dit, pool_capacity=4)
    sessions, feeds = _open_sessions(engine, stage, (1, 2, 3))
    pool = sessions[0].pool
    seen = []

    def recording_step(model, latents, t, t_next, cache, cond):
        seen.append((cache.prev_key.untyped_storage().data_ptr(), cond.condition.text_key.untyped_storage().data_ptr(),
                     cache.prev_key.shape[1]))
        return step(model, latents, t, t_next, cache, cond)

    stage.step_fn = recording_step
    stage.denoise_batch(sessions, [feed[0] for feed in feeds])
    steps = engine.stream_config().steps
    assert len(seen) == steps
    for k, (cache_ptr, condition_ptr, batch) in enumerate(seen):
        assert batch == 3
        assert cache_ptr == pool.caches[k].prev_key.untyped_storage().data_ptr(), "the step read a copy of the caches"
        assert condition_ptr == pool.condition.text_key.untyped_storage().data_ptr()
    assert pool.gathered_bytes == 0


def test_closing_and_growing_move_sessions_without_changing_their_streams():
    """A pool of one slot grows twice for three sessions; closing the first moves the last into slot 0; every
    later chunk equals the chunk of a stage where nothing moved."""
    engine = AvatarEngine.from_preset("tiny", seed=5)
    reference_stage = ScoreStage(engine.dit, pool_capacity=8)
    sessions, feeds = _open_sessions(engine, reference_stage, (1, 2, 3))
    expected = [[reference_stage.denoise(session, item).latents for item in feed] for session, feed in
                zip(sessions, feeds)]

    stage = ScoreStage(engine.dit, pool_capacity=1)
    sessions, feeds = _open_sessions(engine, stage, (1, 2, 3))
    pool = sessions[0].pool
    assert (pool.capacity, pool.growths) == (4, 2)
    got = [[stage.denoise(session, feed[0]).latents] for session, feed in zip(sessions, feeds)]
    stage.close(sessions[0])
    assert pool.slot_of(sessions[2]) == 0 and len(pool) == 2
    for position in range(1, len(feeds[1])):     # both survivors, batched: slots 0 and 1, a view of the pool
        chunks = stage.denoise_batch([sessions[1], sessions[2]], [feeds[1][position], feeds[2][position]])
        got[1].append(chunks[0].latents)
        got[2].append(chunks[1].latents)
    assert pool.gathered_bytes == 0
    for row in (1, 2):
        assert len(got[row]) == len(expected[row])
        for index, (have, want) in enumerate(zip(got[row], expected[row])):
            torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4, msg=f"session {row}, chunk {index}")
    stage.close(sessions[1])
    stage.close(sessions[2])
    assert stage.pools == {} and stage.held_bytes == 0


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


def test_a_chunks_denoising_steps_never_wait_for_the_device(monkeypatch):
    """Sequential, pipelined (one step per stage) and batched chunks under `no_host_sync`, which refuses every call
    that would make the host wait for a GPU; the same guard refuses a step that reads a value back (`.item()`)."""
    from model_core.syncguard import HostSyncError, no_host_sync

    engine = AvatarEngine.from_preset("tiny", seed=5)
    stage = ScoreStage(engine.dit)
    sessions, feeds = _open_sessions(engine, stage, (1, 2))
    steps = engine.stream_config().steps
    pipeline = [ScoreStage(engine.dit) for _ in range(steps)]
    latent = engine.decoder.encode_reference(reference_image(seed=11))
    regions = region_masks([Character()], *token_grid(engine.dit.config, latent))
    split = [each.open("p", engine.stream_config(seed=1), latent, engine.text_states("p"), regions, steps=[k])
             for k, each in enumerate(pipeline)]
    with no_host_sync():
        stage.denoise(sessions[0], feeds[0][0])
        stage.denoise_batch(sessions, [feeds[0][1], feeds[1][0]])
        chunk = pipeline[0].begin_chunk(split[0], feeds[0][0])
        for each, session in zip(pipeline, split):
            chunk = each.run_steps(session, chunk)
        assert len(chunk.step_s) == steps

    def reads_back(model, latents, t, t_next, cache, cond):
        latents, cache = step(model, latents, t, t_next, cache, cond)
        if latents.abs().max().item() > 1e6:          # the kind of check that stalls a GPU every step
            raise RuntimeError("diverged")
        return latents, cache

    stage.step_fn = reads_back
    with pytest.raises(HostSyncError, match="item"):
        with no_host_sync():
            stage.denoise(sessions[1], feeds[1][1])


@pytest.mark.parametrize("call", [
    lambda x: x.sum().item(), lambda x: bool(x.any()), lambda x: x.tolist(), lambda x: x.cpu(),
    lambda x: x[x > 0], lambda x: torch.nonzero(x), lambda x: int(x[0]), lambda x: x.numpy(),
])
def test_the_guard_refuses_each_kind_of_host_sync(call):
    from model_core.syncguard import HostSyncError, no_host_sync, result_leaves_device

    x = torch.randn(4)
    with no_host_sync():
        x = x * 2 + 1                                    # device work passes
        with pytest.raises(HostSyncError):
            call(x)
        with result_leaves_device():                     # the one place a result may leave
            call(x)
    call(x)                                              # outside the guard, anything goes
