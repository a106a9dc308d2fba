"""Few-step flow-matching sampling: one pure step function and the one loop around it.

    step(model, latents, t, t_next, cache, cond) -> (latents, cache)
    denoise(model, latents, schedule, step_indices, caches, cond) -> latents     step for each index, in order

Every denoising in the project is `denoise`: sequential sampling (one worker runs every step — the TalkingMachines
1-GPU score), one stage per step (each owning that step's `KVCache` — Live Avatar's timestep-forcing pipeline, which
the cluster's pipelined score group runs as `ScoreStage`s owning one step each) and a cross-session batch; training
rollouts are to call it too.  The flow convention is Wan's: x_sigma = (1 - sigma) * x0 + sigma * noise, and the
model predicts the velocity v = noise - x0.

Solvers:
* "euler"   — x_next = x + (sigma_next - sigma) * v   (deterministic ODE step)
* "renoise" — x0 = x - sigma * v, then x_next = (1 - sigma_next) * x0 + sigma_next * fresh_noise (how DMD /
  self-forcing students sample); the fresh noise for each step comes with the chunk's conditioning.

This module knows the model only through `forward_chunk`; it knows nothing of sessions or devices.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass

import torch

from .cache import ChunkAudio, ChunkRope, ConditionCache, KVCache
from .syncguard import result_leaves_device


@dataclass(frozen=True)
class Timestep:
    """One point of the schedule: `index` into the session's precomputed step embeddings, and its sigma."""

    index: int
    sigma: float

    @property
    def model_timestep(self) -> float:
        return self.sigma * 1000.0


def flow_schedule(steps: int, shift: float) -> list[Timestep]:
    """`steps + 1` timesteps from pure noise (sigma 1) to clean (sigma 0), shifted: s' = shift*s / (1 + (shift-1)*s)."""
    if not 1 <= steps <= 4:
        raise ValueError(f"steps={steps} is invalid; allowed: 1, 2, 3 or 4")
    raw = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    shifted = shift * raw / (1.0 + (shift - 1.0) * raw)
    return [Timestep(index, float(sigma)) for index, sigma in enumerate(shifted)]


@dataclass
class ChunkCondition:
    """Everything one chunk's denoising steps read besides the latents and the cache.

    condition: the session's precomputed `ConditionCache`
    audio: this chunk's audio tokens (None: no audio branch)
    rope: the session's RoPE tables (`CausalAvatarDiT.chunk_rope`; Rolling RoPE, fixed positions)
    solver: "euler" or "renoise"
    renoise: [S, B, 16, C, h, w] fresh noise per step for the "renoise" solver (None for "euler")
    latent_condition: extra input channels for I2V-layout checkpoints (None: zeros)
    """

    condition: ConditionCache
    audio: ChunkAudio | None
    rope: ChunkRope
    solver: str = "euler"
    renoise: torch.Tensor | None = None
    latent_condition: torch.Tensor | None = None


def step(model, latents: torch.Tensor, t: Timestep, t_next: Timestep, cache: KVCache,
         cond: ChunkCondition) -> tuple[torch.Tensor, KVCache]:
    """Denoise one chunk from `t` to `t_next`.

    latents: [B, 16, C, h, w] at noise level t.sigma. The cache is this step's own (built from this step's noisy
    inputs of the previous chunk); it is updated with this chunk's keys/values and returned.
    """
    velocity = model.forward_chunk(latents, t.index, cache, cond.condition, cond.audio, cond.rope,
                                   cond.latent_condition)
    if cond.solver == "euler":
        latents = (latents.float() + (t_next.sigma - t.sigma) * velocity.float()).to(latents.dtype)
        return latents, cache
    clean = latents.float() - t.sigma * velocity.float()
    if t_next.sigma > 0:
        clean = (1.0 - t_next.sigma) * clean + t_next.sigma * cond.renoise[t.index].float()
    return clean.to(latents.dtype), cache


def denoise(model, latents: torch.Tensor, schedule: list[Timestep], step_indices: Iterable[int],
            caches: MutableMapping[int, KVCache] | list[KVCache], cond: ChunkCondition, step_fn=step,
            on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the steps `step_indices` (ascending) of one chunk: for each index k, `step_fn` from schedule[k] to
    schedule[k + 1] with its own cache `caches[k]`, which is replaced by the cache the step returns.

    latents: [B, 16, C, h, w] at noise level schedule[first index].sigma -> returned at schedule[last index + 1].
    caches: step index -> that step's `KVCache`: a list indexed by step, a dict holding only the owned steps, or
        anything else that reads and assigns by step index (a batch's stacked view, `stages._BatchedCaches`).
    on_step(k, latents): called after step k, e.g. to time it; it must not change the latents.
    """
    for index in step_indices:
        latents, caches[index] = step_fn(model, latents, schedule[index], schedule[index + 1], caches[index], cond)
        if on_step is not None:
            on_step(index, latents)
    return latents


class StepClock:
    """`on_step` of `sampler.denoise`: each step's seconds, into `durations_s` when `finish` is called.

    On CUDA an event is recorded after each step and nothing waits in between, so the next step's launches overlap
    this step's compute; `finish` (once per chunk, where the chunk's latents are handed on) waits for the last event
    and reads the elapsed times. On the CPU the clock is read after each step (the step has run by then).
    """

    def __init__(self, device: torch.device, durations_s: list[float]):
        self.device, self.durations_s = device, durations_s
        self.events = []
        if device.type == "cuda":
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[0].record()
        self.last = time.perf_counter()

    def __call__(self, index: int, latents: torch.Tensor) -> None:
        if self.events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
            return
        now = time.perf_counter()
        self.durations_s.append(now - self.last)
        self.last = now

    def finish(self) -> None:
        if len(self.events) > 1:
            with result_leaves_device():
                self.events[-1].synchronize()
            self.durations_s.extend(start.elapsed_time(end) / 1000.0
                                    for start, end in zip(self.events, self.events[1:]))
            self.events = self.events[-1:]
