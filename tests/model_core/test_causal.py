"""The foundation equalities of the streaming path, and its long-run behaviour.

* chunked generation with per-step KV caches == one full-sequence pass under the block-sparse mask (same noise);
  (one stage per step == sequential denoising, on the code the cluster serves, is in test_stages.py)
* silence mode: a listening character's audio content does not reach the output;
* a compiled step is reused for every chunk (no recompiles).
"""

import pytest
import torch

from model_core.engine import region_masks, Character
from model_core.sampler import ChunkCondition, denoise, flow_schedule, step

from .helpers import tiny_model

H = W = 8           # latent grid of a 64x64 video
S = (H // 2) * (W // 2)


def make_inputs(model, chunks, chunk_frames, characters=1, seed=0, speaking=None):
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    text = torch.randn(1, config.text_len, config.text_dim, generator=generator)
    reference = torch.randn(1, 16, 1, H, W, generator=generator)
    frames = chunks * chunk_frames
    features = torch.randn(1, characters, frames, config.audio_tokens_per_frame, config.audio_dim, generator=generator)
    if speaking is None:
        speaking = torch.rand(1, characters, frames, config.audio_tokens_per_frame, generator=generator) > 0.2
    noises = [torch.randn(1, 16, chunk_frames, H, W, generator=generator) for _ in range(chunks)]
    regions = region_masks([Character((0, 0, 0.5, 1)), Character((0.5, 0, 1, 1))][:characters]
                           if characters > 1 else [Character()], H // 2, W // 2)
    return text, reference, features, speaking, regions, noises


def chunked(model, schedule, text, reference, features, speaking, regions, noises, chunk_frames, offset,
            sink_frames=1):
    cond = model.prepare_conditions(text, model.reference_tokens(reference),
                                    torch.tensor([t.model_timestep for t in schedule[:-1]]))
    caches = [model.allocate_cache(1, sink_frames, chunk_frames, S) for _ in schedule[:-1]]
    sink_key, sink_value = model.compute_sink(reference.repeat(1, 1, sink_frames, 1, 1), cond)
    for cache in caches:
        cache.set_sink(sink_key, sink_value)
    outputs = []
    for index, noise in enumerate(noises):
        frames = slice(index * chunk_frames, (index + 1) * chunk_frames)
        audio = model.project_audio(features[:, :, frames], speaking[:, :, frames], regions)
        rope = model.chunk_rope(chunk_frames, H // 2, W // 2, sink_frames, offset)
        outputs.append(denoise(model, noise, schedule, range(len(schedule) - 1), caches,
                               ChunkCondition(cond, audio, rope)))
    return torch.cat(outputs, dim=2), caches, cond


def full_sequence(model, schedule, text, reference, features, speaking, regions, noises, chunk_frames, offset,
                  sink_frames=1):
    cond = model.prepare_conditions(text, model.reference_tokens(reference), torch.tensor([0.0]))
    audio = model.project_audio(features, speaking, regions)
    latents = torch.cat(noises, dim=2)
    sink = reference.repeat(1, 1, sink_frames, 1, 1)
    for t, t_next in zip(schedule[:-1], schedule[1:]):
        timesteps = torch.tensor([[0.0] * sink_frames + [t.model_timestep] * latents.shape[2]])
        velocity = model.forward_full(torch.cat([sink, latents], 2), timesteps, cond, audio, layout="block_sparse",
                                      chunk_frames=chunk_frames, sink_frames=sink_frames, sink_rope_offset=offset)
        latents = latents + (t_next.sigma - t.sigma) * velocity[:, :, sink_frames:]
    return latents


@pytest.mark.parametrize("steps,chunk_frames,offset,characters,sink_frames,injection", [
    (2, 3, 3, 1, 1, 0),
    (3, 2, -5, 2, 1, 0),
    (1, 3, 0, 1, 2, 0),
    (2, 3, 3, 2, 1, 8),
    (1, 2, 0, 1, 2, 8),
])
def test_chunked_with_caches_equals_full_sequence_block_sparse(steps, chunk_frames, offset, characters, sink_frames,
                                                               injection):
    model = tiny_model(seed=steps, audio_injection_dim=injection)
    schedule = flow_schedule(steps, shift=5.0)
    inputs = make_inputs(model, chunks=4, chunk_frames=chunk_frames, characters=characters)
    with torch.no_grad():
        streamed, _, _ = chunked(model, schedule, *inputs, chunk_frames, offset, sink_frames)
        whole = full_sequence(model, schedule, *inputs, chunk_frames, offset, sink_frames)
    assert streamed.shape == whole.shape == (1, 16, 4 * chunk_frames, H, W)
    torch.testing.assert_close(streamed, whole, atol=1e-4, rtol=1e-4)


def test_equality_test_can_fail_when_the_mask_is_wrong():
    """Sanity: a plain causal-everything (full) pass does NOT match the chunked stream."""
    model = tiny_model()
    schedule = flow_schedule(2, 5.0)
    text, reference, features, speaking, regions, noises = make_inputs(model, chunks=3, chunk_frames=3)
    with torch.no_grad():
        streamed, _, _ = chunked(model, schedule, text, reference, features, speaking, regions, noises, 3, 3)
        cond = model.prepare_conditions(text, model.reference_tokens(reference), torch.tensor([0.0]))
        latents = torch.cat(noises, 2)
        timesteps = torch.full((1, latents.shape[2]), schedule[0].model_timestep)
        velocity = model.forward_full(latents, timesteps, cond, model.project_audio(features, speaking, regions))
    assert not torch.allclose(streamed, latents + (schedule[1].sigma - 1.0) * velocity, atol=1e-2)


def test_caches_are_per_timestep_and_hold_only_previous_chunk_and_sink():
    model = tiny_model()
    schedule = flow_schedule(2, 5.0)
    inputs = make_inputs(model, chunks=3, chunk_frames=3)
    with torch.no_grad():
        _, caches, _ = chunked(model, schedule, *inputs, 3, 3)
    config = model.config
    for cache in caches:
        assert cache.prev_key.shape == (config.num_layers, 1, 3 * S, config.num_heads, config.head_dim)
        assert cache.sink_key.shape == (config.num_layers, 1, S, config.num_heads, config.head_dim)
        assert bool(cache.prev_valid.all())
    assert not torch.allclose(caches[0].prev_key, caches[1].prev_key), "each step keeps its own noisy-input cache"


def test_silence_mode_output_ignores_a_listening_characters_audio():
    model = tiny_model(seed=5)
    schedule = flow_schedule(2, 5.0)
    text, reference, features, speaking, regions, noises = make_inputs(model, 2, 3, characters=2)
    speaking[:, 1] = False                       # character 1 listens throughout
    other = features.clone()
    other[:, 1] = torch.randn_like(other[:, 1]) * 3
    with torch.no_grad():
        a, _, _ = chunked(model, schedule, text, reference, features, speaking, regions, noises, 3, 3)
        b, _, _ = chunked(model, schedule, text, reference, other, speaking, regions, noises, 3, 3)
        speaking_both = speaking.clone()
        speaking_both[:, 1] = True
        c, _, _ = chunked(model, schedule, text, reference, features, speaking_both, regions, noises, 3, 3)
        d, _, _ = chunked(model, schedule, text, reference, other, speaking_both, regions, noises, 3, 3)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(c, d, atol=1e-4), "while speaking, the character's audio must matter"


def test_audio_window_is_local_and_region_masked():
    """Changing audio tokens of latent frame f only affects frames within the window (+ later frames via
    attention), and with a region mask a character's audio only acts inside its region at the first block."""
    model = tiny_model(seed=6, num_layers=1)
    text, reference, features, speaking, regions, noises = make_inputs(model, 1, 3, characters=2)
    speaking[:] = True
    other = features.clone()
    other[:, 0] = torch.randn_like(other[:, 0])
    with torch.no_grad():
        cond = model.prepare_conditions(text, model.reference_tokens(reference), torch.tensor([1000.0]))
        cache = model.allocate_cache(1, 1, 3, S)
        key, value = model.compute_sink(reference, cond)
        cache.set_sink(key, value)
        rope = model.chunk_rope(3, H // 2, W // 2, 1, 3)
        out_a = model.forward_chunk(noises[0], 0, cache.clone(), cond,
                                    model.project_audio(features, speaking, regions), rope)
        out_b = model.forward_chunk(noises[0], 0, cache.clone(), cond,
                                    model.project_audio(other, speaking, regions), rope)
    changed = (out_a - out_b).abs().amax(dim=(0, 1, 2))  # [H, W]
    # With one block the audio of character 0 (left half) reaches the right half only through self-attention in
    # later blocks — there are none, so the right half is untouched.
    assert changed[:, W // 2:].max() == 0
    assert changed[:, : W // 2].max() > 0


def test_compiled_step_does_not_recompile_across_chunks():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(seed=7)
    schedule = flow_schedule(2, 5.0)
    text, reference, features, speaking, regions, noises = make_inputs(model, 6, 3)
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="eager")
    graphs = []
    with torch.no_grad():
        cond = model.prepare_conditions(text, model.reference_tokens(reference),
                                        torch.tensor([t.model_timestep for t in schedule[:-1]]))
        caches = [model.allocate_cache(1, 1, 3, S) for _ in schedule[:-1]]
        key, value = model.compute_sink(reference, cond)
        for cache in caches:
            cache.set_sink(key, value)
        for index, noise in enumerate(noises):
            audio = model.project_audio(features[:, :, 3 * index:3 * index + 3],
                                        speaking[:, :, 3 * index:3 * index + 3], regions)
            chunk_cond = ChunkCondition(cond, audio, model.chunk_rope(3, H // 2, W // 2, 1, 3))
            latents = denoise(model, noise, schedule, range(len(schedule) - 1), caches, chunk_cond, step_fn=compiled)
            if index == 0:  # the adaptive sink rewrites the caches in place: must not trigger a recompile either
                key, value = model.compute_sink(latents[:, :, :1], cond)
                for cache in caches:
                    cache.set_sink(key, value)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == len(schedule) - 1, "one graph per denoising step"
    assert graphs[-1] == graphs[0], f"recompiled across chunks: graphs per chunk {graphs}"


def test_absolute_positions_ablation_streams_with_growing_positions():
    """`rolling_rope=False` (the Rolling RoPE ablation): chunk c sits at 1 + c*C from the sink at 0 and stores its keys
    where it sat; the stream runs and differs from Rolling RoPE's from the first chunk on."""
    from model_core.engine import AvatarEngine

    from .helpers import reference_image, speech

    engine = AvatarEngine.from_preset("tiny", seed=0)
    latents = {}
    for rolling in (True, False):
        session = engine.open_session(reference_image(), stream=engine.stream_config(rolling_rope=rolling))
        chunks = engine.push_audio(session, speech(2.0), 16000) + engine.end_input(session)
        latents[rolling] = torch.cat([chunk.latents for chunk in chunks], 1)
    assert latents[True].shape == latents[False].shape
    assert not torch.allclose(latents[True][:, :3], latents[False][:, :3])
    rope = engine.dit.absolute_chunk_rope(5, 3, 4, 4, 1)
    assert rope.frame_positions == (0, 1 + 5 * 3 + 2)
    torch.testing.assert_close(rope.previous[0], rope.current[0])
