"""The `facecast` command line.

    facecast generate --image REF --audio WAV --out OUT.mp4 [--preset --checkpoint --steps --chunk --seed --fps ...]
    facecast bench engine --preset P [--json]
    facecast presets

`generate` streams the audio into an in-process `AvatarEngine` in 40 ms pieces, as a live caller would, writes every
chunk to an H.264 MP4 with the input audio muxed as soon as it arrives, and prints time to first frame, per-chunk
latency and FPS.  User mistakes (a non-image, empty or unreadable audio, an unknown preset, an impossible option)
print one line naming the problem and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from model_core.checkpoint import CheckpointError
from model_core.config import PRESETS, ConfigError, get_preset
from model_core.audio import SUPPORTED_BACKENDS, AudioConfig
from model_core.engine import AvatarEngine, Character, iter_pieces
from services.media import MediaError, Mp4Writer, frames_to_uint8, image_to_tensor, load_audio, load_image

EXIT_USAGE = 2
PUSH_PIECE_S = 0.04


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def _dtype(name: str) -> torch.dtype:
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise UserError(f"--dtype {name!r} is unknown; allowed: {', '.join(dtypes)}")
    return dtypes[name]


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but this machine has no CUDA device; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device {name!r} is unknown; allowed: auto, cpu, cuda, cuda:N")
    return name


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return value


# ---------------------------------------------------------------------------------------------- generate


def default_checkpoint(preset_name: str) -> str | None:
    """The best checkpoint on this machine for a preset: $FACECAST_CHECKPOINTS/<preset>.safetensors, else
    ./checkpoints/<preset>.safetensors; None (random weights) when neither exists."""
    directory = Path(os.environ.get("FACECAST_CHECKPOINTS", "checkpoints"))
    candidate = directory / f"{preset_name}.safetensors"
    return str(candidate) if candidate.is_file() else None


def parse_region(text: str) -> tuple[float, float, float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise UserError(f"--face-region {text!r} must be four comma-separated fractions x0,y0,x1,y1 "
                        "(e.g. 0.25,0.1,0.75,0.7)")
    return values


def cmd_generate(args) -> int:
    preset = get_preset(args.preset)
    device, dtype = _device(args.device), _dtype(args.dtype)
    image = load_image(args.image)
    audio, sample_rate_hz = load_audio(args.audio)
    if not 8000 <= sample_rate_hz <= 96000:
        raise UserError(f"--audio {args.audio!r} has sample rate {sample_rate_hz} Hz; allowed: 8000 to 96000 Hz")
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise UserError(f"--out {str(out)!r} must end in .mp4")
    if not out.parent.exists():
        raise UserError(f"--out: directory {str(out.parent)!r} does not exist")

    checkpoint = args.checkpoint or default_checkpoint(preset.name)
    try:
        audio_config = AudioConfig(backend=args.audio_encoder, model_path=args.audio_encoder_path)
    except ValueError as error:
        raise UserError(f"--audio-encoder: {error}") from None
    engine = AvatarEngine.from_preset(preset, checkpoint=checkpoint, device=device, dtype=dtype, seed=args.seed,
                                      audio_config=audio_config)
    stream = engine.stream_config(steps=args.steps, chunk_latent_frames=args.chunk, seed=args.seed, fps=args.fps,
                                  width=args.width, height=args.height)
    characters = [Character(parse_region(args.face_region))] if args.face_region else None
    print(f"facecast generate: preset {preset.name}, {stream.width}x{stream.height} @ {stream.fps:g} fps, "
          f"chunk {stream.chunk_latent_frames} latent frames, {stream.steps} steps, {device}/{args.dtype}")
    print(f"  {engine.weights_note}")
    duration_s = audio.shape[0] / sample_rate_hz
    expected_frames = math.ceil(duration_s * stream.fps)

    reference = image_to_tensor(image, stream.width, stream.height)
    session = engine.open_session(reference, args.prompt, stream, characters)
    latencies, first_frame_s, frames_written = [], None, 0
    from tqdm import tqdm

    piece = max(1, round(PUSH_PIECE_S * sample_rate_hz))
    with Mp4Writer(out, stream.fps, stream.width, stream.height, audio, sample_rate_hz) as writer, \
            tqdm(total=expected_frames, unit="frame", desc="generating", disable=args.quiet) as bar:
        started = time.perf_counter()

        def consume(chunks):
            nonlocal first_frame_s, frames_written
            for chunk in chunks:
                if first_frame_s is None:
                    first_frame_s = time.perf_counter() - started
                latencies.append(chunk.timings.total_s)
                writer.write(frames_to_uint8(chunk.frames))
                frames_written += chunk.num_frames
                bar.update(chunk.num_frames)

        for pcm in iter_pieces(audio, piece):
            consume(engine.push_audio(session, pcm, sample_rate_hz))
        consume(engine.end_input(session))
        elapsed_s = time.perf_counter() - started
    engine.close_session(session)

    fps = frames_written / elapsed_s if elapsed_s > 0 else float("inf")
    print(f"wrote {out}: {frames_written} frames ({frames_written / stream.fps:.2f} s) with audio")
    print(f"  TTFF {first_frame_s * 1000:.0f} ms (audio pushed as fast as it decodes; includes the "
          f"{engine.dit.config.audio_lookahead_latent_frames * engine.dit.config.temporal_compression}-frame "
          "audio lookahead)")
    print("  per-chunk latency ms: " + " ".join(f"{s * 1000:.0f}" for s in latencies[:24])
          + (" ..." if len(latencies) > 24 else ""))
    print(f"  mean {np.mean(latencies) * 1000:.0f} ms, max {np.max(latencies) * 1000:.0f} ms over "
          f"{len(latencies)} chunks; {fps:.2f} FPS; real-time factor {elapsed_s / duration_s:.2f} "
          "(< 1 is faster than real time)")
    return 0


# ---------------------------------------------------------------------------------------------- bench


def cmd_bench_engine(args) -> int:
    from model_core.bench import bench_engine, format_engine_report

    report = bench_engine(args.preset, device=_device(args.device), dtype=_dtype(args.dtype), steps=args.steps,
                          chunk=args.chunk, chunks=args.chunks, width=args.width, height=args.height,
                          compile=args.compile, progress=not args.quiet and not args.json)
    print(json.dumps(report, indent=2) if args.json else format_engine_report(report))
    return 0


# ---------------------------------------------------------------------------------------------- main


def cmd_presets(args) -> int:
    for name, preset in PRESETS.items():
        stream = preset.stream
        print(f"{name:10s} {preset.description}  (defaults: {stream.width}x{stream.height}, "
              f"chunk {stream.chunk_latent_frames}, {stream.steps} steps)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facecast", description="Real-time audio-driven avatar video.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="reference image + speech -> lip-synced MP4, streamed chunk by chunk")
    gen.add_argument("--image", required=True, help="reference image (PNG/JPEG/WebP)")
    gen.add_argument("--audio", required=True, help="speech (WAV/MP3/FLAC/OGG/M4A, any sample rate)")
    gen.add_argument("--out", required=True, help="output .mp4")
    gen.add_argument("--preset", default="small", help=f"model preset: {', '.join(PRESETS)} (default small)")
    gen.add_argument("--checkpoint", help="facecast .safetensors checkpoint (default: checkpoints/<preset>.safetensors "
                     "or $FACECAST_CHECKPOINTS/<preset>.safetensors if present, else random weights)")
    gen.add_argument("--steps", type=int, help="denoising steps per chunk, 1-4 (default: the preset's)")
    gen.add_argument("--chunk", type=int, help="latent frames per chunk (default 3)")
    gen.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    gen.add_argument("--fps", type=_positive_float, help="output frames per second (default 25)")
    gen.add_argument("--width", type=int, help="output width (default: the preset's)")
    gen.add_argument("--height", type=int, help="output height (default: the preset's)")
    gen.add_argument("--prompt", default="", help="optional text prompt")
    gen.add_argument("--face-region", help="x0,y0,x1,y1 fractions: audio acts only on this region (default: all)")
    gen.add_argument("--audio-encoder", default="logmel", choices=SUPPORTED_BACKENDS,
                     help="audio features: built-in log-mel (default), or a local wav2vec2/whisper model")
    gen.add_argument("--audio-encoder-path", help="local transformers directory for --audio-encoder wav2vec2/whisper")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    gen.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(handler=cmd_generate)

    bench = commands.add_parser("bench", help="benchmarks")
    targets = bench.add_subparsers(dest="target", required=True)
    engine = targets.add_parser("engine", help="TTFF, time between chunks per stage, FPS, RTF, peak memory")
    engine.add_argument("--preset", default="small", help=f"{', '.join(PRESETS)}")
    engine.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    engine.add_argument("--chunk", type=int, help="latent frames per chunk (default 3)")
    engine.add_argument("--chunks", type=int, default=6, help="measured chunks after one warm-up chunk (default 6)")
    engine.add_argument("--width", type=int)
    engine.add_argument("--height", type=int)
    engine.add_argument("--device", default="auto")
    engine.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    engine.add_argument("--compile", action="store_true", help="torch.compile the denoising step")
    engine.add_argument("--json", action="store_true", help="print the report as JSON")
    engine.add_argument("--quiet", action="store_true")
    engine.set_defaults(handler=cmd_bench_engine)

    presets = commands.add_parser("presets", help="list the model presets")
    presets.set_defaults(handler=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "dtype", "") is None:
        args.dtype = "bfloat16" if _device(args.device).startswith("cuda") else "float32"
    try:
        return args.handler(args)
    except (UserError, MediaError, ConfigError, CheckpointError, FileNotFoundError) as error:
        print(f"facecast {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
