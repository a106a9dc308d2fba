"""`facecast world generate | info | preview`: the talking-face world's clips, cached to disk with their truth.

    facecast world generate --part train --count 768 --out out/world/train-128     (sharded, resumable, progress)
    facecast world info out/world/train-128                                          the manifest and the split
    facecast world preview --out grid.png                                            a grid of identities and styles
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from services.cli.common import EXIT_OK, UserError

DEFAULT_SIZE = 128


def default_dir(part: str, size: int = DEFAULT_SIZE) -> Path:
    return Path("out") / "world" / f"{part}-{size}"


def cmd_generate(args: argparse.Namespace) -> int:
    from model_core.world.speech import EspeakMissing, espeak_available
    from model_core.world.split import WorldSplit
    from model_core.world.store import WorldSource, write_shards

    if not espeak_available():
        raise UserError(str(EspeakMissing("libespeak-ng is not installed: run `make espeak-ng` "
                                          "(Debian: sudo apt-get install espeak-ng libespeak-ng1)")))
    if args.eval_voice and args.part != "eval":
        raise UserError("--eval-voice applies to --part eval (the held-out clips' voice)")
    out = Path(args.out) if args.out else default_dir(args.part, args.size)
    if args.eval_voice and not args.out:
        raise UserError("--eval-voice needs its own --out: the default directory holds the held-out voice's clips")
    try:
        split = WorldSplit(args.seed, identity_count=args.identities,
                           **({"held_out_voice": args.eval_voice} if args.eval_voice else {}))
        source = WorldSource(split, args.part, args.count, args.size)
        manifest = write_shards(out, source, shard_size=args.shard_size, progress=not args.quiet,
                                workers=args.workers or os.cpu_count() or 1)
    except ValueError as error:
        raise UserError(str(error)) from None
    written = manifest["written"]
    print(f"{out}: {args.count} {args.part} clips ({written['shards']} new shards, {written['frames']} frames in "
          f"{written['seconds']} s, {written['frames_per_s']} frames/s)")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from model_core.world.store import ShardSource

    try:
        source = ShardSource(args.directory)
    except ValueError as error:
        raise UserError(str(error)) from None
    manifest = dict(source.manifest)
    manifest["split"] = {k: v for k, v in manifest["split"].items() if k != "held_out_identities"} | {
        "held_out_identities": len(source.split.identities("eval"))}
    print(json.dumps(manifest, indent=1))
    return EXIT_OK


def cmd_preview(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from model_core.world.identity import identity
    from model_core.world.render import FrameState, Renderer

    renderer = Renderer(args.size)
    tiles = []
    for k in range(args.rows * args.columns):
        state = FrameState(opening=(k % 4) / 3, width=(0.7, 1.0, 1.3)[k % 3], blink=float(k % 7 == 6))
        tiles.append(renderer.frame([(identity(args.seed, args.first + k), state)])[0])
    rows = [np.concatenate(tiles[r * args.columns:(r + 1) * args.columns], 1) for r in range(args.rows)]
    Image.fromarray(np.concatenate(rows, 0)).save(args.out)
    print(f"wrote {args.out}: identities {args.first}..{args.first + len(tiles) - 1}")
    return EXIT_OK


def add_parser(commands) -> None:
    """Register `world` on the `facecast` subparsers."""
    world = commands.add_parser("world", help="the talking-face world: generate clips with ground truth")
    verbs = world.add_subparsers(dest="verb", required=True)
    generate = verbs.add_parser("generate", help="render clips to a sharded, resumable cache")
    generate.add_argument("--part", choices=("train", "eval"), default="train")
    generate.add_argument("--count", type=int, default=768, help="clips (default 768)")
    generate.add_argument("--out", help="directory (default out/world/<part>-<size>)")
    generate.add_argument("--size", type=int, default=DEFAULT_SIZE, help="frame side in pixels (default 128)")
    generate.add_argument("--seed", type=int, default=0, help="world seed: fixes identities, split and clips")
    generate.add_argument("--identities", type=int, default=1200, help="identities in the world (default 1200)")
    generate.add_argument("--shard-size", type=int, default=32, help="clips per shard file (default 32)")
    generate.add_argument("--workers", type=int, help="shards rendered at once in separate processes (default: one "
                                                        "per CPU; the shards are identical for any count)")
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    generate.add_argument("--eval-voice", help="--part eval: speak the held-out clips (the same identities and "
                                               "sentences) in this voice instead of the held-out one, e.g. a training "
                                               "voice, to measure how much the lip sync depends on the voice")
    generate.set_defaults(handler=cmd_generate)
    info = verbs.add_parser("info", help="print a cached dataset's manifest and split")
    info.add_argument("directory")
    info.set_defaults(handler=cmd_info)
    preview = verbs.add_parser("preview", help="a PNG grid of identities in their styles")
    preview.add_argument("--out", default="world-preview.png")
    preview.add_argument("--size", type=int, default=DEFAULT_SIZE)
    preview.add_argument("--seed", type=int, default=0)
    preview.add_argument("--first", type=int, default=0)
    preview.add_argument("--rows", type=int, default=4)
    preview.add_argument("--columns", type=int, default=6)
    preview.set_defaults(handler=cmd_preview)
