"""What every `facecast` command shares: the user-error type, the exit codes, and the argument helpers that turn a
user's text into a value or into a one-line error naming the flag, the bad value and what is allowed.

A command raises `UserError` (or `MediaError`, `ConfigError`, `CheckpointError`, `FileNotFoundError`, see
`services.cli.main.USER_ERRORS`) for anything the user can fix; `main` prints it as one line and exits with
`EXIT_USAGE`.  Nothing here knows a particular command.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
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


_report_stream = None


@contextlib.contextmanager
def stdout_for_the_report_only():
    """While a `--json` command runs: everything written to standard output (by this process's Python and C code,
    its threads, and the processes it starts — Ray's raylet, GCS and workers inherit the descriptor) goes to standard
    error instead, and `print_report` writes to the real standard output, so the command's stdout is its JSON and
    nothing else (`facecast bench cluster --json | jq` works). Progress bars and logs stay on stderr.

    Where stdout is not a file descriptor (a test's captured stream) only Python's `sys.stdout` is redirected."""
    global _report_stream
    sys.stdout.flush()
    try:
        descriptor = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        descriptor = None
    previous = _report_stream
    if descriptor is None:
        _report_stream = sys.stdout
        try:
            with contextlib.redirect_stdout(sys.stderr):
                yield
        finally:
            _report_stream = previous
        return
    saved = os.dup(descriptor)
    try:
        sys.stderr.flush()
        os.dup2(sys.stderr.fileno(), descriptor)
        with os.fdopen(os.dup(saved), "w", encoding="utf-8", closefd=True) as report:
            _report_stream = report
            try:
                with contextlib.redirect_stdout(sys.stderr):
                    yield
            finally:
                _report_stream = previous
                report.flush()
    finally:
        sys.stdout.flush()
        os.dup2(saved, descriptor)
        os.close(saved)


def print_report(report, indent: int | None = 2) -> None:
    """The command's result on standard output: a dict as JSON (`indent` None: one line), text as it is. Inside
    `stdout_for_the_report_only` this is the only thing that reaches stdout."""
    text = report if isinstance(report, str) else json.dumps(report, indent=indent)
    print(text, file=_report_stream or sys.stdout, flush=True)


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


def client_api_key(args: argparse.Namespace) -> str | None:
    """A client command's API key: the first key of --api-key-file (the server's key-file format,
    `services.api.keys.parse_api_keys`: `name=key` or a bare key per line, # comments), else $FACECAST_API_KEY, else
    None. --api-key is refused: `ps` shows it."""
    if getattr(args, "api_key", None):
        raise UserError("--api-key was removed: a key on the command line is visible to every user in `ps`; use "
                        "$FACECAST_API_KEY or --api-key-file")
    path = getattr(args, "api_key_file", None)
    if not path:
        return os.environ.get("FACECAST_API_KEY") or None
    from services.api.keys import ApiKeyError, parse_api_keys

    try:
        keys = parse_api_keys(Path(path).read_text(encoding="utf-8"), f"--api-key-file {path!r}")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--api-key-file {path!r} cannot be read: {getattr(error, 'strerror', None) or error}")
    except ApiKeyError as error:
        raise UserError(str(error)) from None
    if not keys:
        raise UserError(f"--api-key-file {path!r} holds no key")
    return next(iter(keys.values()))   # the server's file format: the first key is the client's


def client_tls(args: argparse.Namespace) -> bool | bytes:
    """A client command's TLS choice for `AvatarClient`: the PEM of --tls-ca, True for --tls, else False."""
    path = getattr(args, "tls_ca", None)
    if not path:
        return bool(getattr(args, "tls", False))
    try:
        pem = Path(path).read_bytes()
    except OSError as error:
        raise UserError(f"--tls-ca {path!r} cannot be read: {error.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise UserError(f"--tls-ca {path!r} is not a PEM certificate")
    return pem
