"""Training windows from any clip source (world shards, the world on the fly, a folder of real videos).

    ClipPools(source, pool_size)        which clips are in memory for a given step (whole shards where possible)
    frame_window(clip, start, length)   frames [3, F, H, W] in [-1, 1] and the mouth weight map [1, F, H, W]
    mouth_mask(face_box, size)          the lower-face region the truth's face box implies
    window_openings(clip, start, length)  the first character's mouth opening per frame (NaN without a single one)
    latent_mouth(mask, spatial)         the mouth weight per latent position: [B, 1, T, H, W] -> [B, F, h, w]
    frame_openings(openings)            per-frame openings grouped as the latent frames cover them: [B, T] -> [B, F, 4]
    mouth_crops(latents, mouth, crop)   the crop x crop latent cells centred on the mouth, per latent frame
    interior_mask(video, mask)          the world's painted mouth interior, any frame of the window, dilated

Reading one window per random clip would load a whole shard each step; instead a group of steps shares one pool of
clips (one shard for shard sources), and the pool for step k is picked by a seeded permutation of k // steps_per_pool.
"""

from __future__ import annotations

import numpy as np
import torch

from ..world.clips import Clip
from ..world.render import MOUTH_INSIDE


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


TEMPORAL = 4
"""Video frames per latent frame after the first (the Wan VAE's causal temporal compression)."""


def window_openings(clip: Clip, start: int, length: int) -> torch.Tensor:
    """[length] the truth's mouth opening of a single-character clip's character per frame; NaN for clips with two
    characters or no truth (what a per-frame opening means there is not one number)."""
    truth = clip.truth
    if truth is None or truth.mouth_open.shape[1] != 1:
        return torch.full((length,), float("nan"))
    return torch.from_numpy(np.array(truth.mouth_open[start:start + length, 0], np.float32))


def latent_mouth(mask: torch.Tensor, spatial: int) -> torch.Tensor:
    """[B, 1, T, H, W] pixel mouth mask (T = 1 + 4k) -> [B, F, H / spatial, W / spatial]: each latent frame's mean
    over the video frames it codes (the first alone, then groups of TEMPORAL) and its spatial cell."""
    frames = mask[:, 0]
    groups = [frames[:, :1]] + [frames[:, k:k + TEMPORAL] for k in range(1, frames.shape[1], TEMPORAL)]
    return torch.nn.functional.avg_pool2d(torch.stack([g.mean(1) for g in groups], 1), spatial)


def frame_openings(openings: torch.Tensor) -> torch.Tensor:
    """[B, T] per-frame openings (T = 1 + 4k) -> [B, F, TEMPORAL]: latent frame 0 codes frame 0 alone (repeated),
    latent frame k >= 1 codes frames 4k-3 .. 4k."""
    first = openings[:, :1].expand(-1, TEMPORAL)[:, None]
    return torch.cat([first, openings[:, 1:].reshape(openings.shape[0], -1, TEMPORAL)], 1)


def mouth_crops(latents: torch.Tensor, mouth: torch.Tensor, crop: int) -> torch.Tensor:
    """latents [B, C, F, h, w], mouth [B, F, h, w] -> [B, F, C * crop * crop]: the crop x crop cells centred on the
    mouth weight's centroid in each latent frame (clamped inside the latent; differentiable in the latents)."""
    batch, channels, frames, height, width = latents.shape
    if height < crop or width < crop:
        raise ValueError(f"latents of {height}x{width} cells are smaller than the {crop}x{crop} mouth crop")
    weight = mouth.float().clamp(min=0)
    total = weight.sum((2, 3)).clamp(min=1e-6)
    device = latents.device
    rows = (weight.sum(3) * torch.arange(height, device=device)).sum(2) / total               # [B, F]
    cols = (weight.sum(2) * torch.arange(width, device=device)).sum(2) / total
    top = (rows - (crop - 1) / 2).round().long().clamp(0, height - crop)
    left = (cols - (crop - 1) / 2).round().long().clamp(0, width - crop)
    offsets = torch.arange(crop, device=device)
    row_index = (top[..., None] + offsets)[..., :, None].expand(-1, -1, crop, crop)   # [B, F, crop, crop]
    col_index = (left[..., None] + offsets)[..., None, :].expand(-1, -1, crop, crop)
    b = torch.arange(batch, device=device)[:, None, None, None].expand_as(row_index)
    f = torch.arange(frames, device=device)[None, :, None, None].expand_as(row_index)
    cells = latents.permute(0, 2, 3, 4, 1)[b, f, row_index, col_index]                 # [B, F, crop, crop, C]
    return cells.permute(0, 1, 4, 2, 3).flatten(2)


INTERIOR_TOLERANCE = 0.12
"""How close (max over RGB, in [-1, 1] units: ~15 of 255) a pixel must be to the world's mouth-interior colour."""


def interior_mask(video: torch.Tensor, mask: torch.Tensor, dilate: int = 2) -> torch.Tensor:
    """[B, 3, T, H, W] frames in [-1, 1], [B, 1, T, H, W] mouth mask -> [B, 1, 1, H, W]: the pixels inside the mouth
    mask that show the world's mouth interior (`render.MOUTH_INSIDE`, the one colour the renderer paints it) in any
    frame of the window, grown by `dilate` pixels so the lips around it count too. The pixels where the opening is
    drawn, open or closed; empty for clips without truth (their mouth mask is empty)."""
    inside = torch.tensor(MOUTH_INSIDE, dtype=video.dtype, device=video.device).div(127.5).sub(1.0)
    near = ((video - inside[:, None, None, None]).abs().amax(1, keepdim=True) < INTERIOR_TOLERANCE) & (mask > 0)
    seen = near.any(2).float()                                                          # [B, 1, H, W]
    grown = torch.nn.functional.max_pool2d(seen, 2 * dilate + 1, 1, dilate) if dilate else seen
    return grown[:, :, None]


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
