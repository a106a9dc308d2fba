"""Training windows from any clip source (world shards, the world on the fly, a folder of real videos).

    ClipPools(source, pool_size)        which clips are in memory for a given step (whole shards where possible)
    frame_window(clip, start, length)   frames [3, F, H, W] in [-1, 1] and the mouth weight map [1, F, H, W]
    mouth_mask(face_box, size)          the lower-face region the truth's face box implies

Reading one window per random clip would load a whole shard each step; instead a group of steps shares one pool of
clips (one shard for shard sources), and the pool for step k is picked by a seeded permutation of k // steps_per_pool.
"""

from __future__ import annotations

import numpy as np
import torch

from ..world.clips import Clip


def mouth_mask(face_box: np.ndarray, size: int) -> np.ndarray:
    """[T, C, 4] face boxes -> [T, size, size] float mask of the mouth region (lower 45 %, central 64 % of each
    face). Boxes that are NaN (padding) contribute nothing."""
    masks = np.zeros((face_box.shape[0], size, size), np.float32)
    ys, xs = np.arange(size)[:, None] + 0.5, np.arange(size)[None, :] + 0.5
    for t in range(face_box.shape[0]):
        for x0, y0, x1, y1 in face_box[t]:
            if not np.isfinite(x0):
                continue
            w, h = x1 - x0, y1 - y0
            inside = ((xs > x0 + 0.18 * w) & (xs < x1 - 0.18 * w) & (ys > y0 + 0.55 * h) & (ys < y1 - 0.02 * h))
            masks[t] = np.maximum(masks[t], inside)
    return masks


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(frames)).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def frame_window(clip: Clip, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    frames = clip.frames[start:start + length]
    size = frames.shape[1]
    if clip.truth is not None:
        mask = mouth_mask(clip.truth.face_box[start:start + length], size)
    else:
        mask = np.zeros((len(frames), size, size), np.float32)
    return frames_to_tensor(frames), torch.from_numpy(mask)[None]


class ClipPools:
    """Pools of clips held in memory; step k uses pool `order[k // steps_per_pool]`."""

    def __init__(self, source, seed: int, steps_per_pool: int = 16, pool_size: int = 8):
        self.source, self.seed, self.steps_per_pool = source, seed, steps_per_pool
        shard = getattr(source, "shard_size", None)
        self.pool_size = int(shard) if shard else pool_size
        self.pools = max(1, (len(source) + self.pool_size - 1) // self.pool_size)
        self._loaded: tuple[int, list[Clip]] | None = None

    def pool_for(self, step: int, rank: int = 0) -> list[Clip]:
        group = step // self.steps_per_pool
        epoch, position = divmod(group, self.pools)
        order = np.random.default_rng([self.seed, 31, epoch]).permutation(self.pools)
        number = int(order[(position + rank) % self.pools])
        if self._loaded is None or self._loaded[0] != number:
            first = number * self.pool_size
            if getattr(self.source, "shard_size", None):
                indices = range(first, min(len(self.source), first + self.pool_size))
            else:  # unsharded sources: a seeded sample of clips for this pool
                rng = np.random.default_rng([self.seed, 37, number])
                indices = rng.choice(len(self.source), size=min(self.pool_size, len(self.source)), replace=False)
            self._loaded = (number, [self.source[int(i)] for i in indices])
        return self._loaded[1]
