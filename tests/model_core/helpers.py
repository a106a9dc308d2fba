"""Small builders shared by the model_core tests (tiny shapes, seeded)."""

from __future__ import annotations

import numpy as np
import torch

from model_core.config import DiTConfig, get_preset
from model_core.engine import random_dit

TINY = get_preset("tiny")


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
