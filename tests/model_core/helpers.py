"""Small builders shared by the model_core tests (tiny shapes, seeded)."""

from __future__ import annotations

import math

import numpy as np
import torch

from model_core.config import DiTConfig, VAEConfig, get_preset
from model_core.models import random_dit

TINY = get_preset("tiny")
WAN22_VAE = VAEConfig(base_dim=8, num_res_blocks=1, dim_mult=(1, 2, 2), temperal_downsample=(True, True),
                      patch_size=2, is_residual=True)
"""A tiny VAE in Wan2.2's layout: 2x2 pixels folded into channels, residual down/up blocks (8x spatial, 4x time)."""


def tiny_config(**changes) -> DiTConfig:
    import dataclasses
    return dataclasses.replace(TINY.dit, **changes)


def tiny_model(seed: int = 0, **changes):
    return random_dit(tiny_config(**changes), seed).eval()


def speech(duration_s: float, seed: int = 0, sample_rate_hz: int = 16000) -> np.ndarray:
    """Deterministic speech-like float audio: random-pitch harmonics under a syllable envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(duration_s * sample_rate_hz)) / sample_rate_hz
    pitch = rng.uniform(100, 220) + 30 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate_hz
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0, None)
    return (0.3 * voice * envelope + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def reference_image(height: int = 64, width: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, height, width, generator=generator) * 2 - 1


# ------------------------------------------------------------------ audio-video alignment (a known impulse)


def burst_audio(duration_s: float, burst_frame: int, fps: float = 25.0, sample_rate_hz: int = 16000,
                amplitude: float = 0.5, tone_hz: float = 1000.0) -> np.ndarray:
    """[round(duration_s * sample_rate_hz)] float32 silence with a Hann-tapered tone burst inside one video frame.

    The burst spans [(T + 0.3) / fps, (T + 0.7) / fps) s for T = burst_frame.  With the logmel front end at 25 fps
    (4 mel windows of 25 ms per video frame) video frame t reads the audio in [t/fps - 7.5 ms, (t+1)/fps + 7.5 ms),
    so only frame T's features see the burst (4.5 ms to spare; test_alignment checks this on the front end).
    amplitude=0 gives the same-length silent reference: run both, and the outputs may differ only from
    `expected_first_changed_latent(burst_frame)` on.
    """
    samples = np.zeros(round(duration_s * sample_rate_hz), np.float32)
    start, stop = math.ceil((burst_frame + 0.3) / fps * sample_rate_hz), math.floor((burst_frame + 0.7) / fps
                                                                                     * sample_rate_hz)
    if stop > samples.shape[0]:
        raise ValueError(f"burst_frame={burst_frame} ends at {stop / sample_rate_hz:.3f} s, past duration_s="
                         f"{duration_s}; allowed: a burst_frame inside the clip")
    time_s = np.arange(stop - start) / sample_rate_hz
    samples[start:stop] = amplitude * np.hanning(stop - start) * np.sin(2 * np.pi * tone_hz * time_s)
    return samples


def covering_latents(video_frame: int, ratio: int = 4, lookahead: int = 2) -> range:
    """The latent frames whose audio window holds the features of `video_frame` (T).

    Written from the timeline in model_core/stages.py's docstring, not from its code: latent frame f's tokens are the
    features of video frames [ratio*(f - lookahead) - (ratio - 1), ratio*(f + lookahead)], token k being frame
    ratio*(f - lookahead) - (ratio - 1) + k.  So f covers T iff ceil((T - ratio*lookahead) / ratio) <= f <=
    floor((T + ratio - 1 + ratio*lookahead) / ratio), and f >= 0.
    """
    first = max(0, -((ratio * lookahead - video_frame) // ratio))
    last = (video_frame + ratio - 1 + ratio * lookahead) // ratio
    return range(first, last + 1)


def expected_first_changed_latent(burst_frame: int, ratio: int = 4, lookahead: int = 2) -> int:
    """The first latent frame whose output must change when `burst_audio(..., burst_frame)` replaces silence.

    Every latent frame before it must be bit-equal to the silent run (generation is causal), and so must every chunk
    before the one holding it (chunk index = latent frame // chunk_latent_frames): through the engine or a cluster,
    compare the chunks of the two runs and expect the first differing chunk to be exactly that one.
    """
    return covering_latents(burst_frame, ratio, lookahead)[0]


def split_points(n: int, rng: np.random.Generator, max_piece: int) -> list[tuple[int, int]]:
    """Random split of ``[0, n)`` into pieces of 0..max_piece samples (empty pieces included): streaming input as a
    caller might push it."""
    pieces, a = [], 0
    while a < n:
        size = int(rng.integers(0, max_piece + 1))
        pieces.append((a, min(n, a + size)))
        a += size
    return pieces
