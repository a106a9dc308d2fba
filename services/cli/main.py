"""The `facecast` entry point: wires each command module's parser and turns user errors into one line and exit 2.

    facecast generate | converse | bench engine | bench cluster | presets | serve | call | keys | world | train | eval
    (one module each in services/cli/)

A command module exposes `add_parser(commands)`, which registers its subcommand and sets `handler`; `main` parses,
runs the handler (with `--json` inside `common.stdout_for_the_report_only`: stdout is the report alone), and prints
anything in `USER_ERRORS` as `facecast <command>: error: <message>` with status 2 (no traceback), Ctrl-C as status
130.
"""

from __future__ import annotations

import argparse
import sys

from model_core.checkpoint import CheckpointError
from model_core.config import ConfigError
from services.cli import bench, call, converse, eval as eval_command, generate, keys, presets, serve, train, world
from services.cli.common import EXIT_INTERRUPTED, EXIT_USAGE, UserError, stdout_for_the_report_only
from services.media import MediaError

USER_ERRORS = (UserError, MediaError, ConfigError, CheckpointError, FileNotFoundError)
"""Errors a user causes and can fix: one line on stderr, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facecast", description="Real-time audio-driven avatar video.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (generate, converse, bench, presets, serve, call, keys, world, train, eval_command):
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "json", False):   # stdout carries the JSON report and nothing else
            with stdout_for_the_report_only():
                return args.handler(args)
        return args.handler(args)
    except USER_ERRORS as error:
        print(f"facecast {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
