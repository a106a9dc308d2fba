"""Stage 3: distillation — TalkingMachines' asymmetric DMD with Live Avatar's self-forcing, small.

    dmd_direction(generated, real_x0, fake_x0) -> the distribution-matching gradient on the generated latents
    dmd_surrogate(x, direction)  /  dmd_loss(generated, real_x0, fake_x0)   losses whose gradient is that direction
    rollout(dit, batch, noise, ...) -> Rollout       the generator streaming chunk by chunk, as a session does
    DistillStage(teacher_path, student_path, latents, pairs, DistillConfig(...))   a `loop.Stage`

Three networks: the frozen real score (the bidirectional teacher, with classifier-free guidance on the audio), a
trainable fake score (initialised from the teacher; it learns the generator's current distribution with the
ordinary flow-matching loss on the generator's samples) and the causal generator (initialised from stage 2). The
generator's update moves its samples along fake_x0 - real_x0 (descending it: towards the teacher, away from where it
already is), normalised per sample by |generated - real_x0| as DMD does.

Self-forcing: the generator's samples come from its own streaming rollout — every chunk denoised by
`sampler.step` through its per-timestep KV caches (step k of a chunk sees the previous chunk as it was at step k),
the reference latent as the sink and, after the first chunk, its first latent frame (Adaptive Attention Sink), all as
`ScoreStage` streams. A random exit step is drawn per rollout; each chunk's sample is its clean-latent estimate at
that step (the remaining steps still run, without gradient, so the later steps' caches hold what inference would).
History Corrupt: Gaussian noise of a random scale (up to `history_corrupt` times the cache's own spread) is added to
the cached keys and values a chunk leaves for the next one. Real clips first: early on the history a chunk sees is the
ground-truth clip noised to each step's level (teacher forcing); the share of rollouts on their own history rises to 1
over `self_forcing_ramp` steps.

Block-wise gradient accumulation (Live Avatar's Algorithm 2): the rollout runs without gradient, keeping each chunk's
exit input and the caches it read; the DMD direction is computed for the whole sequence; then each chunk's exit step is
run again with gradient and back-propagated on its own before the next, so peak memory is one chunk's graph. The
regression loss of stage 2 (ODE pairs) is added with weight `regression_weight`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoint import load_facecast_checkpoint, save_facecast_checkpoint
from ..dit import CausalAvatarDiT
from ..sampler import ChunkCondition, Timestep, flow_schedule, step
from .latents import frontend_record
from .student_stage import student_levels
from .teacher_stage import (Window, augment_voice, predict_velocity, random_windows, text_states, update_ema,
                            weighted_mse, window_batch)

# ============================================================================================ the DMD gradient


def dmd_direction(generated: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """(fake_x0 - real_x0) / mean|generated - real_x0| per sample; nothing here carries gradient."""
    with torch.no_grad():
        dims = tuple(range(1, generated.ndim))
        normaliser = (generated.detach() - real_x0.detach()).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)
        return torch.nan_to_num((fake_x0.detach() - real_x0.detach()) / normaliser)


def dmd_surrogate(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """0.5 |x - stopgrad(x - direction)|^2 / batch: its gradient with respect to x is direction / batch."""
    return 0.5 * ((x - (x.detach() - direction.detach())) ** 2).sum() / x.shape[0]


def dmd_loss(generated: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    return dmd_surrogate(generated, dmd_direction(generated, real_x0, fake_x0))


# ============================================================================================ the rollout


@dataclass
class Rollout:
    samples: torch.Tensor                      # [B, 16, F, h, w] clean estimates at the exit step (no gradient)
    final: torch.Tensor                        # [B, 16, F, h, w] after every step, what a session would output
    exit_inputs: list[torch.Tensor] = field(default_factory=list)   # per chunk: latents entering the exit step
    exit_caches: list = field(default_factory=list)                 # per chunk: the exit step's cache it read


def stream_condition(dit: CausalAvatarDiT, batch: dict, steps: int, shift: float):
    schedule = flow_schedule(steps, shift)
    size = batch["reference"].shape[0]
    device = batch["reference"].device
    cond = dit.prepare_conditions(text_states(dit.config, size, device), dit.reference_tokens(batch["reference"]),
                                  torch.tensor([t.model_timestep for t in schedule[:-1]], device=device))
    return schedule, cond


@torch.no_grad()
def rollout(dit: CausalAvatarDiT, batch: dict, noise: torch.Tensor, *, steps: int, shift: float, chunk: int,
            sink_rope_offset: int, exit_step: int, adaptive_sink: bool = True, history_corrupt: float = 0.0,
            teacher_forced: list[bool] | None = None, generator: torch.Generator | None = None) -> Rollout:
    """The generator streams `noise` [B, 16, F, h, w] chunk by chunk as a session does (see the module docstring)."""
    size, _, frames, height, width = noise.shape
    grid_h, grid_w = height // dit.config.patch_size[1], width // dit.config.patch_size[2]
    schedule, cond = stream_condition(dit, batch, steps, shift)
    rope = dit.chunk_rope(chunk, grid_h, grid_w, 1, sink_rope_offset)
    caches = [dit.allocate_cache(size, 1, chunk, grid_h * grid_w) for _ in range(steps)]
    sink_key, sink_value = dit.compute_sink(batch["reference"].to(noise.dtype), cond)
    for cache in caches:
        cache.set_sink(sink_key, sink_value)
    out = Rollout(samples=torch.zeros_like(noise), final=torch.zeros_like(noise))
    for c in range(frames // chunk):
        frames_c = slice(c * chunk, (c + 1) * chunk)
        audio = dit.project_audio(batch["features"][:, :, frames_c], batch["speaking"][:, :, frames_c],
                                  batch["regions"])
        condition = ChunkCondition(cond, audio, rope)
        before = [cache.clone() for cache in caches]
        x = noise[:, :, frames_c]
        for k in range(steps):
            if k == exit_step:
                out.exit_inputs.append(x.clone())
                out.exit_caches.append(caches[k].clone())
            entering = x
            x, caches[k] = step(dit, x, schedule[k], schedule[k + 1], caches[k], condition)
            if k == exit_step:  # the Euler step's velocity gives the clean estimate x - sigma v
                velocity = (x.float() - entering.float()) / (schedule[k + 1].sigma - schedule[k].sigma)
                out.samples[:, :, frames_c] = entering.float() - schedule[k].sigma * velocity
        out.final[:, :, frames_c] = x
        if teacher_forced is not None and teacher_forced[c]:
            _write_truth_history(dit, caches, before, batch["x0"][:, :, frames_c], schedule, condition, generator)
        if history_corrupt > 0:
            for cache in caches:
                for tensor in (cache.prev_key, cache.prev_value):
                    scale = history_corrupt * float(torch.rand((), generator=generator))
                    tensor.add_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * scale
                                * tensor.std())
        if c == 0 and adaptive_sink:
            sink_key, sink_value = dit.compute_sink(x[:, :, :1], cond)
            for cache in caches:
                cache.set_sink(sink_key, sink_value)
    return out


def _write_truth_history(dit, caches, before, truth, schedule: list[Timestep], condition, generator) -> None:
    """Teacher forcing: the history this chunk leaves is the ground truth noised to each step's level."""
    for k, cache in enumerate(caches):
        cache.prev_key.copy_(before[k].prev_key)
        cache.prev_value.copy_(before[k].prev_value)
        cache.prev_valid.copy_(before[k].prev_valid)
        sigma = schedule[k].sigma
        noisy = (1 - sigma) * truth + sigma * torch.randn(truth.shape, generator=generator)
        dit.forward_chunk(noisy.to(truth.dtype), k, cache, condition.condition, condition.audio, condition.rope)


# ============================================================================================ the stage


@dataclass(frozen=True)
class DistillConfig:
    seed: int = 0
    batch_size: int = 2
    generator_lr: float = 2e-5
    fake_lr: float = 1e-4
    frames: int = 9
    chunk: int = 3
    steps: int = 2
    shift: float = 5.0
    sink_rope_offset: int = 3
    real_guidance: float = 3.5
    """Classifier-free guidance on the real score's audio (the shipped student's; 1: none)."""
    fake_updates: int = 4
    """Fake-score updates per generator update (the generator updates every `fake_updates` steps)."""
    regression_weight: float = 0.25
    history_corrupt: float = 0.1
    self_forcing_ramp: int = 600
    """Steps over which the share of rollouts on their own history rises from 0 to 1 (real clips first)."""
    sigma_range: tuple[float, float] = (0.02, 0.98)
    mouth_weight: float = 4.0
    audio_dropout: float = 0.1
    listening_dropout: float = 0.5
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    voice_augment: float = 0.0
    """`teacher_stage.augment_voice` on the audio every model of a step hears (generator, real and fake score; the
    regression's windows too), 0: off."""


def average_gradients(module: torch.nn.Module) -> None:
    """Data-parallel: the mean of every rank's gradients (the rollout calls the model outside DDP's forward)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for parameter in module.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            parameter.grad.div_(world)


class DistillStage:
    name = "distill"

    def __init__(self, teacher_path: str | Path, student_path: str | Path, latents, pairs: dict | None,
                 train: DistillConfig = DistillConfig(), *, wrap=None, device="cpu"):
        del wrap  # gradients are averaged explicitly (`average_gradients`): the rollout bypasses a wrapper's forward
        self.seed, self.train_config, self.device = train.seed, train, torch.device(device)
        teacher, _, _ = load_facecast_checkpoint(teacher_path)
        self.real = teacher.float().to(self.device).eval().requires_grad_(False)
        self.fake = copy.deepcopy(self.real).train().requires_grad_(True)
        student, _, _ = load_facecast_checkpoint(student_path)
        self.generator = student.float().to(self.device).train()
        self.ema = copy.deepcopy(self.generator).requires_grad_(False)
        self.source, self.pairs = latents, pairs
        if pairs is not None and pairs["levels"] != student_levels(train.steps, train.shift):
            raise ValueError("the ODE pairs were made for another schedule than this stage distils to")
        self.generator_optimizer = torch.optim.AdamW(self.generator.parameters(), lr=train.generator_lr,
                                                     betas=(0.0, 0.99), weight_decay=0.0)
        self.fake_optimizer = torch.optim.AdamW(self.fake.parameters(), lr=train.fake_lr, betas=(0.0, 0.99),
                                                weight_decay=0.0)

    def modules(self):
        return {"generator": self.generator, "fake": self.fake, "ema": self.ema}

    def optimizer(self):
        return self.generator_optimizer

    def optimizers(self):
        return {"generator": self.generator_optimizer, "fake": self.fake_optimizer}

    def batch(self, step_index: int, rank: int) -> dict:
        config = self.train_config
        rng = np.random.default_rng([self.seed, step_index, rank])
        windows = random_windows(config.batch_size, len(self.source), rng, lambda i: self.source[i].segments,
                                 self.source[0].segment_latents, config.frames, audio_dropout=config.audio_dropout,
                                 listening_dropout=config.listening_dropout)
        batch = window_batch(self.source, windows, config.frames, self.generator.config)
        own = min(1.0, step_index / max(1, config.self_forcing_ramp))
        batch.update(
            noise=torch.from_numpy(rng.standard_normal(batch["x0"].shape).astype(np.float32)),
            exit_step=int(rng.integers(config.steps)),
            teacher_forced=[bool(rng.random() >= own) for _ in range(config.frames // config.chunk)],
            sigma=float(rng.uniform(*config.sigma_range)),
            fake_sigma=torch.from_numpy(rng.uniform(*config.sigma_range, config.batch_size)).float(),
            score_noise=torch.from_numpy(rng.standard_normal(batch["x0"].shape).astype(np.float32)),
            fake_noise=torch.from_numpy(rng.standard_normal(batch["x0"].shape).astype(np.float32)),
            rollout_seed=int(rng.integers(2 ** 62)), step=step_index,
            generator_update=(step_index + 1) % config.fake_updates == 0)
        batch["features"] = augment_voice(batch["features"], rng, config.voice_augment)
        if self.pairs is not None and batch["generator_update"]:
            rows = rng.integers(0, len(self.pairs["windows"]), config.batch_size)
            pair_windows = [Window(**self.pairs["windows"][int(r)]) for r in rows]
            pair_batch = window_batch(self.source, pair_windows, config.frames, self.generator.config)
            states = self.pairs["states"][torch.from_numpy(rows)].float()
            level = rng.integers(0, config.steps, config.batch_size)
            pair_batch.update(noisy=states[torch.arange(len(rows)), torch.from_numpy(level)], target=states[:, -1],
                              sigma=torch.tensor([self.pairs["levels"][int(k)] for k in level]))
            pair_batch["features"] = augment_voice(pair_batch["features"], rng, config.voice_augment)
            batch["pairs"] = pair_batch
        return _to(batch, self.device)

    def _rollout(self, batch: dict) -> Rollout:
        config = self.train_config
        return rollout(self.generator, batch, batch["noise"], steps=config.steps, shift=config.shift,
                       chunk=config.chunk, sink_rope_offset=config.sink_rope_offset, exit_step=batch["exit_step"],
                       history_corrupt=config.history_corrupt, teacher_forced=batch["teacher_forced"],
                       generator=torch.Generator().manual_seed(batch["rollout_seed"]))

    def train_step(self, batch: dict) -> dict:
        generated = self._rollout(batch)
        metrics = {"fake_loss": self._update_fake(batch, generated.samples)}
        if batch["generator_update"]:
            metrics.update(self._update_generator(batch, generated))
        return metrics

    def _update_fake(self, batch: dict, samples: torch.Tensor) -> float:
        sigma = batch["fake_sigma"]
        s = sigma[:, None, None, None, None]
        noisy = (1 - s) * samples + s * batch["fake_noise"]
        velocity = predict_velocity(self.fake, noisy, sigma, batch, layout="full")
        loss = weighted_mse(velocity, batch["fake_noise"] - samples, batch["mouth"], self.train_config.mouth_weight)
        self.fake_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.fake)
        torch.nn.utils.clip_grad_norm_(self.fake.parameters(), self.train_config.grad_clip)
        self.fake_optimizer.step()
        return float(loss.detach())

    def _scores(self, batch: dict, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """real_x0 (teacher with CFG on audio) and fake_x0 at one noise level of the DMD schedule."""
        size = samples.shape[0]
        sigma = torch.full((size,), batch["sigma"], device=samples.device)
        noisy = (1 - batch["sigma"]) * samples + batch["sigma"] * batch["score_noise"]
        with torch.no_grad():
            real_v = predict_velocity(self.real, noisy, sigma, batch, layout="full").float()
            if self.train_config.real_guidance != 1.0:
                silent = dict(batch, regions=torch.zeros_like(batch["regions"]))
                uncond = predict_velocity(self.real, noisy, sigma, silent, layout="full").float()
                real_v = uncond + self.train_config.real_guidance * (real_v - uncond)
            fake_v = predict_velocity(self.fake, noisy, sigma, batch, layout="full").float()
        return noisy - batch["sigma"] * real_v, noisy - batch["sigma"] * fake_v

    def _update_generator(self, batch: dict, generated: Rollout) -> dict:
        config = self.train_config
        real_x0, fake_x0 = self._scores(batch, generated.samples)
        direction = dmd_direction(generated.samples, real_x0, fake_x0)
        self.generator_optimizer.zero_grad(set_to_none=True)
        schedule, cond = stream_condition(self.generator, batch, config.steps, config.shift)
        height, width = generated.samples.shape[-2:]
        patch = self.generator.config.patch_size
        rope = self.generator.chunk_rope(config.chunk, height // patch[1], width // patch[2], 1,
                                         config.sink_rope_offset)
        sigma = schedule[batch["exit_step"]].sigma
        total = 0.0
        for c, (x, cache) in enumerate(zip(generated.exit_inputs, generated.exit_caches)):
            frames_c = slice(c * config.chunk, (c + 1) * config.chunk)
            if c:  # the conditioning's graph is consumed by each backward: rebuild it per chunk
                schedule, cond = stream_condition(self.generator, batch, config.steps, config.shift)
            audio = self.generator.project_audio(batch["features"][:, :, frames_c], batch["speaking"][:, :, frames_c],
                                                 batch["regions"])
            velocity = self.generator.forward_chunk(x, batch["exit_step"], cache.clone(), cond, audio, rope)
            estimate = x.float() - sigma * velocity.float()
            loss = dmd_surrogate(estimate, direction[:, :, frames_c])
            loss.backward()
            total += float(loss.detach())
        metrics = {"dmd": total, "dmd_gap": float((fake_x0 - real_x0).abs().mean())}
        if self.pairs is not None and config.regression_weight > 0:
            pairs = batch["pairs"]
            v = predict_velocity(self.generator, pairs["noisy"], pairs["sigma"], pairs, layout="block_sparse",
                                 chunk_frames=config.chunk, sink_rope_offset=config.sink_rope_offset)
            clean = pairs["noisy"] - pairs["sigma"][:, None, None, None, None] * v.float()
            regression = weighted_mse(clean, pairs["target"], pairs["mouth"], config.mouth_weight)
            (config.regression_weight * regression).backward()
            metrics["regression"] = float(regression.detach())
        average_gradients(self.generator)
        torch.nn.utils.clip_grad_norm_(self.generator.parameters(), config.grad_clip)
        self.generator_optimizer.step()
        update_ema(self.ema, self.generator, self.train_config.ema_decay)
        return metrics

    def export(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = asdict(self.train_config)
        save_facecast_checkpoint(copy.deepcopy(self.ema).cpu().half(), path,
                                 extra={"stage": "distill", "train": config,
                                        "stream": {"steps": config["steps"], "shift": config["shift"],
                                                   "chunk_latent_frames": config["chunk"],
                                                   "sink_rope_offset": config["sink_rope_offset"]},
                                        **frontend_record(self.source)})


def _to(batch: dict, device) -> dict:
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            out[key] = value.to(device)
        elif isinstance(value, dict):
            out[key] = _to(value, device)
        else:
            out[key] = value
    return out

