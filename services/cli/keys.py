"""`facecast keys`: make API keys and the hashes a server config holds instead of them.

    facecast keys new [--name ops]      # a fresh key (print once, give to the client) and its config line
    facecast keys hash [--name ops]     # the config line for a key read from standard input (never from argv)

A server accepts keys from `$FACECAST_API_KEYS` (`name=key,...`), a key file (`facecast serve --api-key-file`,
`$FACECAST_API_KEY_FILE`; one `name=key` per line) or, hashed, the Serve config's `api_keys:` mapping
(`services.api.keys`).  Keys never go on a command line: `ps` shows every process's arguments.
"""

from __future__ import annotations

import argparse
import secrets
import sys

from services.api.keys import ApiKeyError, hash_api_key, parse_api_keys
from services.cli.common import EXIT_OK, UserError


def cmd_keys(args: argparse.Namespace) -> int:
    name = args.name
    try:
        parse_api_keys(f"{name}={'x' * 43}", "--name")      # the name's own check, with a placeholder key
    except ApiKeyError as error:
        raise UserError(str(error).replace("--name entry 1: ", "--name: ")) from None
    if args.keys_command == "new":
        key = secrets.token_urlsafe(32)
        print(f"key (give it to the client; it is not stored anywhere): {key}")
        print(f"for $FACECAST_API_KEYS or a key file:  {name}={key}")
    else:
        if sys.stdin.isatty():
            print("paste the key and press Enter:", file=sys.stderr, flush=True)
        key = sys.stdin.readline().strip()
        try:
            parse_api_keys(f"{name}={key}", "the key on standard input")
        except ApiKeyError as error:
            raise UserError(str(error).replace(" entry 1", "")) from None
    print(f"for the Serve config's application args (api_keys:):  {name}: \"{hash_api_key(key)}\"")
    return EXIT_OK


def add_parser(commands) -> None:
    """Register `keys` on the `facecast` subparsers."""
    keys = commands.add_parser("keys", help="make an API key, or hash one for a Serve config")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    for command, text in (("new", "make a fresh API key and print it with its config lines"),
                          ("hash", "read a key from standard input and print its api_keys: config line")):
        parser = sub.add_parser(command, help=text)
        parser.add_argument("--name", default="default", help="the key's name, for rotation and per-key limits "
                            "(letters, digits, '.', '_', '-'; default: default)")
        parser.set_defaults(handler=cmd_keys)
