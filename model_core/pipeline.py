"""Timestep-forcing pipeline (Live Avatar's TPP), in process: one worker per denoising step.

    chunk n+1 ─► [stage 1: step t1, owns cache@t1] ─► [stage 2: step t2, owns cache@t2] ─► ... ─► clean latents
                         (works on chunk n+1)              (works on chunk n)

Each stage calls the same `sampler.step` as sequential sampling and owns only its own step's `KVCache`, built
from that step's noisy inputs, so no cache ever crosses stages: only latents move.  Stages are threads here
(torch releases the GIL inside kernels); the Ray score group runs the same loop with one actor per stage.

Adaptive Attention Sink needs the first chunk's clean output before any stage may start chunk 1 (the "secondary
warm-up" of Live Avatar): `run` holds chunk 1 back until chunk 0 has left the last stage and `after_first` ran.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

from .cache import KVCache
from .sampler import ChunkCondition, Timestep, step

_DONE = object()


def run_pipeline(model, schedule: list[Timestep], caches: list[KVCache], noises: list[torch.Tensor],
                 conds: list[ChunkCondition], after_first: Callable[[torch.Tensor], None] | None = None,
                 step_fn=step) -> list[torch.Tensor]:
    """Denoise chunks `noises[i]` with conditions `conds[i]` through one stage per step. Returns clean latents."""
    stage_count = len(schedule) - 1
    queues = [queue.Queue() for _ in range(stage_count + 1)]
    errors: list[BaseException] = []

    def stage(index: int) -> None:
        t, t_next = schedule[index], schedule[index + 1]
        inbox, outbox = queues[index], queues[index + 1]
        while True:
            item = inbox.get()
            if item is _DONE:
                outbox.put(_DONE)
                return
            chunk_id, latents = item
            try:
                with torch.no_grad():
                    latents, caches[index] = step_fn(model, latents, t, t_next, caches[index], conds[chunk_id])
            except BaseException as error:  # surface in the caller, stop the pipeline
                errors.append(error)
                outbox.put(_DONE)
                return
            outbox.put((chunk_id, latents))

    workers = [threading.Thread(target=stage, args=(index,), daemon=True) for index in range(stage_count)]
    for worker in workers:
        worker.start()
    outputs: list[torch.Tensor] = []
    hold_back = after_first is not None
    queues[0].put((0, noises[0]))
    next_chunk = 1
    if not hold_back:
        for chunk_id in range(1, len(noises)):
            queues[0].put((chunk_id, noises[chunk_id]))
        next_chunk = len(noises)
        queues[0].put(_DONE)
    while True:
        item = queues[-1].get()
        if item is _DONE:
            break
        chunk_id, latents = item
        outputs.append(latents)
        if hold_back and chunk_id == 0:
            after_first(latents)
            for chunk_id in range(next_chunk, len(noises)):
                queues[0].put((chunk_id, noises[chunk_id]))
            queues[0].put(_DONE)
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return outputs
