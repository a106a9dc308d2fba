"""What every `facecast` command shares: the user-error type, the exit codes, and the argument helpers that turn a
user's text into a value or into a one-line error naming the flag, the bad value and what is allowed.

A command raises `UserError` (or `MediaError`, `ConfigError`, `CheckpointError`, `FileNotFoundError`, see
`services.cli.main.USER_ERRORS`) for anything the user can fix; `main` prints it as one line and exits with
`EXIT_USAGE`.  Nothing here knows a particular command.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1
"""The command ran and failed (the server went away, the stream ended early): not the user's input."""
EXIT_USAGE = 2
"""The user's input is wrong (a flag, a file, a value): one line on stderr names it."""
EXIT_INTERRUPTED = 130
"""Ctrl-C."""

class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def one_line(error: Exception) -> str:
    """An error's text on one line (multi-line problem lists joined with '; ')."""
    return "; ".join(line.strip(" -") for line in str(error).splitlines() if line.strip())


def parse_dtype(name: str):
    """--dtype text (`model_core.config.DTYPES`) -> torch.dtype; a bad name is a ConfigError naming --dtype."""
    from model_core.models import torch_dtype

    return torch_dtype(name, "--dtype")


def parse_device(name: str) -> str:
    """--device text (auto, cpu, cuda, cuda:N) -> a torch device string; auto picks CUDA when present.  A bad name
    or CUDA on a machine without it is a ConfigError naming --device."""
    from model_core.models import resolve_device

    return str(resolve_device(name, "--device"))


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


def output_mp4(text: str) -> Path:
    """--out text -> Path: it must end in .mp4 and its directory must exist."""
    out = Path(text)
    if out.suffix.lower() != ".mp4":
        raise UserError(f"--out {str(out)!r} must end in .mp4")
    if not out.parent.exists():
        raise UserError(f"--out: directory {str(out.parent)!r} does not exist")
    return out
