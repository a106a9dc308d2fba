"""Weights that ship with facecast, in the repository's `checkpoints/` folder (fp16, no optimiser state).

    shipped_path(name) -> Path          where a shipped artefact lives (it may not exist yet)
    TALK128_VAE, LIPSYNC_PROBE, TALK128_TEACHER, TALK128_STUDENT, TALK128_FAST_DECODER   what the stages export
    TRAINED_PRESET                      the preset the shipped weights belong to (the commands' default)

`facecast train <stage>` writes its export here by default; presets and `facecast eval` read from here.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"
TALK128_VAE = "talk128-vae"
LIPSYNC_PROBE = "lipsync-probe.safetensors"
TALK128_TEACHER = "talk128-teacher.safetensors"
TALK128_STUDENT = "talk128-student.safetensors"
TALK128_FAST_DECODER = "talk128-fast-decoder"
TRAINED_PRESET = "talk128"
"""The preset whose weights ship (its score model `PresetConfig.weights`, its VAE `vae_weights`): what `make demo`,
`facecast generate` and `facecast serve` stream by default."""


VAE_DECODER_TRAIN = "decoder-train.json"
"""In a VAE directory whose decoder was trained further (`vae_stage.DecoderStage`): that last run's
`DecoderTrainConfig`, so the shipped VAE says how its decoder was made."""

FAST_DECODER_CONFIG = "fast-decoder.json"
FAST_DECODER_WEIGHTS = "fast-decoder.safetensors"
"""The files of a fast decoder directory (`model_core.fastdecode`)."""


def shipped_path(name: str) -> Path:
    return CHECKPOINTS / name


def fast_decoder_shipped(preset) -> bool:
    """Whether `preset` ships a fast decoder (`PresetConfig.fast_decoder_weights` present in checkpoints/)."""
    name = getattr(preset, "fast_decoder_weights", "")
    return bool(name) and (shipped_path(name) / FAST_DECODER_CONFIG).is_file()
