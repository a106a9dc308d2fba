"""Stage 2: the sparse-causal student, initialised by regression onto the teacher's ODE trajectories (CausVid /
Self-Forcing's initialisation, small).

    make_ode_pairs(teacher, latents, out, ...)     the teacher's many-step CFG trajectories, kept at the student's
                                                  few-step noise levels (resumable file, progress bar)
    StudentInitStage(teacher_path, latents, pairs, StudentInitConfig(...))   a `loop.Stage`

The student is the teacher's network run in the streaming layout: the reference latent as the attention sink, then
chunks of `chunk` latent frames that see themselves, the previous chunk and the sink ("block_sparse", Rolling RoPE:
the positions a session uses). Every frame of a training sequence is at the same noise level, which is what the
per-timestep KV caches of a session hold: step k of chunk c attends to chunk c-1 as it was at step k. The student
starts from the teacher's weights and learns, at each of its steps' noise levels, to predict the clean latents the
teacher's ODE reaches from the same noise (x0 = x - sigma v), so a few Euler steps of the student land where the
teacher's many steps do. Distillation (stage 3) then removes the remaining gap with DMD on its own rollouts.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint import load_facecast_checkpoint, save_facecast_checkpoint
from ..sampler import flow_schedule
from .latents import frontend_record
from .teacher_stage import (Window, augment_voice, predict_velocity, random_windows, sigmas, update_ema, warm_rate,
                            weighted_mse, window_batch)


@dataclass(frozen=True)
class StudentInitConfig:
    seed: int = 0
    batch_size: int = 8
    learning_rate: float = 1e-4
    warmup_steps: int = 50
    frames: int = 9
    """Latent frames after the sink: `frames / chunk` chunks."""
    chunk: int = 3
    steps: int = 2
    """The student's denoising steps (a session's `StreamConfig.steps`)."""
    shift: float = 5.0
    """The student's schedule shift (a session's `StreamConfig.shift`)."""
    sink_rope_offset: int = 3
    mouth_weight: float = 4.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    voice_augment: float = 0.0
    """`teacher_stage.augment_voice` on the student's audio (0: off): its target, the teacher's trajectory from the
    window's own audio, stays, so the student learns the same face from another voice."""


def student_levels(steps: int, shift: float) -> list[float]:
    return [t.sigma for t in flow_schedule(steps, shift)]


def teacher_levels(student: list[float], teacher_steps: int, teacher_shift: float) -> list[float]:
    """The teacher's grid with the student's levels inserted, so its trajectory passes through each of them."""
    levels = sorted(set(round(s, 9) for s in sigmas(teacher_steps, teacher_shift) + student), reverse=True)
    return levels


# ============================================================================================ ODE pairs


@torch.no_grad()
def make_ode_pairs(teacher, latents, out: str | Path, *, count: int, frames: int, steps: int, shift: float,
                   teacher_steps: int = 12, guidance: float = 2.0, teacher_shift: float = 3.0, seed: int = 0,
                   batch_size: int = 8, progress: bool = True) -> Path:
    """`count` teacher trajectories on the latent cache's conditioning, kept at the student's noise levels.

    Saved (atomically, every batch, resumable) as {"states": [P, S+1, 16, F, h, w] fp16 (x at each student level,
    then the teacher's x0), "windows": P `Window`s as dicts (what conditioned each), "levels": the student's}."""
    out = Path(out)
    student = student_levels(steps, shift)
    grid = teacher_levels(student, teacher_steps, teacher_shift)
    record = {"states": [], "windows": [], "levels": student, "teacher_grid": grid,
              "guidance": guidance, "frames": frames, "count": count, "seed": seed}
    if out.is_file():
        record = torch.load(out, weights_only=False)
        if (record["levels"], record["frames"], record["guidance"]) != (student, frames, guidance):
            raise ValueError(f"{out} holds pairs for another schedule or window; remove it or choose another path")
    bar = tqdm(total=count, initial=len(record["windows"]), desc="teacher ODE pairs", unit="pair",
               disable=not progress)
    teacher = teacher.eval()
    while len(record["windows"]) < count:
        done = len(record["windows"])
        size = min(batch_size, count - done)
        rng = np.random.default_rng([seed, 71, done])
        windows = random_windows(size, len(latents), rng, lambda i: latents[i].segments,
                                 latents[0].segment_latents, frames, audio_dropout=0.0, listening_dropout=0.3)
        batch = window_batch(latents, windows, frames, teacher.config)
        x = torch.from_numpy(rng.standard_normal(batch["x0"].shape).astype(np.float32))
        kept = [x.clone()]
        silent = dict(batch, regions=torch.zeros_like(batch["regions"]))
        for sigma, sigma_next in zip(grid, grid[1:]):
            t = torch.full((size,), sigma)
            v = predict_velocity(teacher, x, t, batch, layout="full").float()
            if guidance != 1.0:
                u = predict_velocity(teacher, x, t, silent, layout="full").float()
                v = u + guidance * (v - u)
            x = x + (sigma_next - sigma) * v
            if any(abs(sigma_next - s) < 1e-6 for s in student[1:-1]):
                kept.append(x.clone())
        kept.append(x)
        record["states"].append(torch.stack(kept, 1).half())
        record["windows"] += [asdict(w) for w in windows]
        temporary = out.with_suffix(".tmp")
        torch.save(record, temporary)
        os.replace(temporary, out)
        bar.update(size)
    bar.close()
    return out


# ============================================================================================ the stage


def read_pairs(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ODE pairs at {path}; `facecast train student` makes them from the teacher")
    record = torch.load(path, weights_only=False)
    record["states"] = torch.cat(record["states"]) if isinstance(record["states"], list) else record["states"]
    return record


class StudentInitStage:
    name = "student-init"

    def __init__(self, teacher_path: str | Path, latents, pairs: dict, train: StudentInitConfig = StudentInitConfig(),
                 *, wrap=None, device="cpu"):
        self.seed, self.train_config, self.device = train.seed, train, torch.device(device)
        teacher, self.teacher_metadata, _ = load_facecast_checkpoint(teacher_path)
        self.dit = teacher.float().train().to(self.device)
        self.ema = copy.deepcopy(self.dit).requires_grad_(False)
        self.source, self.pairs = latents, pairs
        if pairs["frames"] != train.frames or pairs["levels"] != student_levels(train.steps, train.shift):
            raise ValueError("the ODE pairs were made for another window or schedule than this stage trains")
        objective = _StudentObjective(self.dit, train)
        self.objective = wrap(objective) if wrap else objective
        self._optimizer = torch.optim.AdamW(self.dit.parameters(), lr=train.learning_rate, weight_decay=0.0,
                                            betas=(0.9, 0.99))
        self.grad_clip = train.grad_clip

    def modules(self):
        return {"dit": self.dit, "ema": self.ema}

    def optimizer(self):
        return self._optimizer

    def batch(self, step: int, rank: int) -> dict:
        rng = np.random.default_rng([self.seed, step, rank])
        config = self.train_config
        rows = rng.integers(0, len(self.pairs["windows"]), config.batch_size)
        windows = [Window(**self.pairs["windows"][int(r)]) for r in rows]
        batch = window_batch(self.source, windows, config.frames, self.dit.config)
        level = rng.integers(0, config.steps, config.batch_size)
        states = self.pairs["states"][torch.from_numpy(rows)].float()          # [B, S+1, 16, F, h, w]
        batch["noisy"] = states[torch.arange(len(rows)), torch.from_numpy(level)]
        batch["target"] = states[:, -1]
        batch["sigma"] = torch.tensor([self.pairs["levels"][int(k)] for k in level], dtype=torch.float32)
        batch["features"] = augment_voice(batch["features"], rng, config.voice_augment)
        batch["step"] = step
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def loss(self, batch: dict):
        warm_rate(self._optimizer, self.train_config.learning_rate, batch["step"], self.train_config.warmup_steps)
        clean = self.objective(batch["noisy"], batch["sigma"], batch)
        loss = weighted_mse(clean, batch["target"], batch["mouth"], self.train_config.mouth_weight)
        return loss, {"loss": float(loss.detach())}

    def after_step(self, step: int) -> None:
        update_ema(self.ema, self.dit, self.train_config.ema_decay, step)

    def export(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_facecast_checkpoint(copy.deepcopy(self.ema).cpu().half(), path,
                                 extra={"stage": "student-init", "train": asdict(self.train_config),
                                        **frontend_record(self.source)})


class _StudentObjective(torch.nn.Module):
    """The student's clean-latent estimate x - sigma v in the streaming layout (the module DDP wraps)."""

    def __init__(self, dit, config: StudentInitConfig):
        super().__init__()
        self.dit, self.config = dit, config

    def forward(self, noisy: torch.Tensor, sigma: torch.Tensor, batch: dict) -> torch.Tensor:
        v = predict_velocity(self.dit, noisy, sigma, batch, layout="block_sparse", chunk_frames=self.config.chunk,
                             sink_rope_offset=self.config.sink_rope_offset)
        return noisy.float() - sigma[:, None, None, None, None] * v.float()
