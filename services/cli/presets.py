"""`facecast presets`: list the model presets (`model_core.config.PRESETS`) with their stream defaults."""

from __future__ import annotations

import argparse

from model_core.config import PRESETS
from services.cli.common import EXIT_OK


def cmd_presets(args: argparse.Namespace) -> int:
    for name, preset in PRESETS.items():
        stream = preset.stream
        weights = f"trained: checkpoints/{preset.weights}" if preset.weights else "random weights"
        print(f"{name:10s} {preset.description}  (defaults: {stream.width}x{stream.height}, "
              f"chunk {stream.chunk_latent_frames}, {stream.steps} steps; {weights})")
    return EXIT_OK


def add_parser(commands) -> None:
    """Register `presets` on the `facecast` subparsers."""
    presets = commands.add_parser("presets", help="list the model presets")
    presets.set_defaults(handler=cmd_presets)
