"""The resumable training loop every stage runs in, on one process or as one worker of Ray Train.

    run_stage(stage, run_dir, steps, ...) -> final metrics
    Stage                 what a stage provides: modules, optimiser, batch(step), loss(batch), export(path);
                          optionally `grad_clip` (max gradient norm), `after_step(step)` (e.g. an EMA update),
                          `optimizers()` (several, by name: all are checkpointed) and `train_step(batch)` (a stage
                          that runs its own backward passes and optimiser steps, as distillation does)

Determinism: step k's batch comes from a generator seeded with (seed, k, rank), and the checkpoint holds the model,
the optimiser and the torch RNG state, so a run interrupted after step k and resumed gives the same weights as one
that never stopped (a test holds it). Checkpoints (`state.pt`, with optimiser state, for resuming) are written
atomically every `checkpoint_every` steps; the stage's `export` writes the small fp16 weights a release ships.
Losses go to `log.jsonl` in the run directory and to the progress bar.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from tqdm import tqdm

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"


class Stage(Protocol):
    name: str
    seed: int

    def modules(self) -> dict[str, torch.nn.Module]: ...

    def optimizer(self) -> torch.optim.Optimizer: ...

    def batch(self, step: int, rank: int) -> dict: ...

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]: ...

    def export(self, path: Path) -> None: ...


def warm_hold_decay(step: int, *, steps: int, peak: float, warmup_steps: int, decay_from: float) -> float:
    """The learning rate at `step`: a linear warm-up over `warmup_steps`, `peak` until `decay_from` of `steps`,
    then a linear fall to 0 at `steps` (`decay_from` 1: no fall, whatever `steps` is)."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    fall = int(steps * decay_from)
    if decay_from >= 1.0 or step < fall:
        return peak * warm
    return peak * warm * max(0.0, (steps - step) / max(1, steps - fall))


def _optimizers(stage: Stage) -> dict[str, torch.optim.Optimizer]:
    return stage.optimizers() if hasattr(stage, "optimizers") else {"optimizer": stage.optimizer()}


def save_state(stage: Stage, run_dir: Path, step: int) -> None:
    state = {"step": step, "modules": {k: m.state_dict() for k, m in stage.modules().items()},
             "optimizers": {k: o.state_dict() for k, o in _optimizers(stage).items()},
             "torch_rng": torch.get_rng_state(), "stage": stage.name}
    temporary = run_dir / (STATE_FILE + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, run_dir / STATE_FILE)


def load_state(stage: Stage, run_dir: Path) -> int:
    """Restore the last checkpoint in `run_dir` into `stage`; returns the step to continue from (0: none)."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("stage") != stage.name:
        raise ValueError(f"{run_dir} holds a {state.get('stage')!r} run, not {stage.name!r}: choose another --run-dir")
    for key, module in stage.modules().items():
        module.load_state_dict(state["modules"][key])
    saved = state["optimizers"] if "optimizers" in state else {"optimizer": state["optimizer"]}
    for key, optimizer in _optimizers(stage).items():
        optimizer.load_state_dict(saved[key])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def run_stage(stage: Stage, run_dir: str | Path, steps: int, *, checkpoint_every: int = 100, log_every: int = 10,
              rank: int = 0, progress: bool = True,
              report: Callable[[dict, bool], None] | None = None, export_to: str | Path | None = None) -> dict:
    """Train `stage` up to `steps` optimiser steps, resuming from `run_dir`. Only rank 0 writes files.

    `report(metrics, checkpointed)` is called every `log_every` steps and after each checkpoint (Ray Train's
    `ray.train.report` in a cluster run)."""
    if steps < 1:
        raise ValueError(f"steps={steps} is invalid: at least 1")
    run_dir = Path(run_dir)
    main = rank == 0
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    start = load_state(stage, run_dir)
    if main and start > 0:
        _truncate_log(run_dir, start)
    if start == 0:
        torch.manual_seed(stage.seed * 1000003 + rank)
    optimizer = stage.optimizer()
    bar = tqdm(total=steps, initial=min(start, steps), desc=f"train {stage.name}", unit="step",
               disable=not (progress and main))
    metrics: dict[str, float] = {}
    window: list[dict] = []
    began = time.perf_counter()
    for step in range(start, steps):
        batch = stage.batch(step, rank)
        if hasattr(stage, "train_step"):
            values = stage.train_step(batch)
        else:
            loss, values = stage.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if getattr(stage, "grad_clip", None):
                torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]],
                                               stage.grad_clip)
            optimizer.step()
        if hasattr(stage, "after_step"):
            stage.after_step(step)
        window.append(values)
        done = step + 1
        bar.update(1)
        if done % log_every == 0 or done == steps:
            keys = list(dict.fromkeys(key for values in window for key in values))  # some keys only on some steps
            metrics = {key: float(np.mean([v[key] for v in window if key in v])) for key in keys}
            metrics.update(step=done, seconds=round(time.perf_counter() - began, 2))
            window = []
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k not in ("step", "seconds")})
            if main:
                with open(run_dir / LOG_FILE, "a") as log:
                    log.write(json.dumps(metrics) + "\n")
        checkpointed = done % checkpoint_every == 0 or done == steps
        if checkpointed and main:
            save_state(stage, run_dir, done)
        if report is not None and (done % log_every == 0 or checkpointed):
            report(dict(metrics), checkpointed)
    bar.close()
    if main and export_to is not None:
        stage.export(Path(export_to))
    return metrics


def _truncate_log(run_dir: Path, step: int) -> None:
    """Drop log rows past the checkpoint a run resumes from (they will be logged again)."""
    rows = [row for row in read_log(run_dir) if row.get("step", 0) <= step]
    (run_dir / LOG_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
