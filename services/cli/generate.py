"""`facecast generate`: reference image + speech -> lip-synced MP4, through an in-process `AvatarEngine` (no Ray).

    facecast generate --image REF --audio WAV --out OUT.mp4 [--preset --checkpoint --steps --chunk --seed --fps ...]

The audio is pushed into the engine in 40 ms pieces, as a live caller would; every chunk is written to an H.264 MP4
(the input audio muxed in) as soon as it arrives, and the command prints time to first frame, per-chunk latency and
FPS.  Knows the engine and the media helpers; nothing about the cluster.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np

from model_core.audio import SUPPORTED_BACKENDS
from model_core.config import DEVICES, DTYPES, PRESETS, get_preset
from model_core.engine import AvatarEngine, Character, iter_pieces
from model_core.models import audio_config_for
from model_core.shipped import TRAINED_PRESET
from services.api.validation import MAX_SAMPLE_RATE_HZ, MIN_SAMPLE_RATE_HZ
from services.cli.common import UserError, output_mp4, parse_device, parse_dtype, positive_float
from services.media import frames_to_uint8, image_to_tensor, load_audio, load_image
from services.video import Mp4Writer

PUSH_PIECE_S = 0.04
"""Audio pushed into the engine per call, seconds (a live caller's packet)."""


def default_checkpoint(preset_name: str) -> str | None:
    """A local checkpoint for a preset: $FACECAST_CHECKPOINTS/<preset>.safetensors, else
    ./checkpoints/<preset>.safetensors; None when neither exists (then the preset's shipped weights, if any, else
    random weights: `model_core.models.resolve_checkpoint`)."""
    directory = Path(os.environ.get("FACECAST_CHECKPOINTS", "checkpoints"))
    candidate = directory / f"{preset_name}.safetensors"
    return str(candidate) if candidate.is_file() else None


def parse_region(text: str) -> tuple[float, float, float, float]:
    """--face-region text "x0,y0,x1,y1" -> four floats (their order and range are checked by `Character`)."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise UserError(f"--face-region {text!r} must be four comma-separated fractions x0,y0,x1,y1 "
                        "(e.g. 0.25,0.1,0.75,0.7)")
    return values


def render(engine: AvatarEngine, stream, reference, prompt: str, characters, audio: np.ndarray, sample_rate_hz: int,
           out: Path, quiet: bool = False) -> tuple[int, float, list[float], float]:
    """Stream `audio` through a new engine session in live-sized pieces, every chunk written to the MP4 `out` (the
    audio muxed in) as it arrives. Returns (frames written, TTFF s, per-chunk latencies s, elapsed s)."""
    from tqdm import tqdm

    session = engine.open_session(reference, prompt, stream, characters)
    latencies, first_frame_s, frames_written = [], None, 0
    expected_frames = math.ceil(audio.shape[0] / sample_rate_hz * stream.fps)
    piece = max(1, round(PUSH_PIECE_S * sample_rate_hz))
    with Mp4Writer(out, stream.fps, stream.width, stream.height, audio, sample_rate_hz) as writer, \
            tqdm(total=expected_frames, unit="frame", desc="generating", disable=quiet) as bar:
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
    return frames_written, first_frame_s, latencies, elapsed_s


def cmd_generate(args: argparse.Namespace) -> int:
    preset = get_preset(args.preset)
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)
    image = load_image(args.image)
    audio, sample_rate_hz = load_audio(args.audio)
    if not MIN_SAMPLE_RATE_HZ <= sample_rate_hz <= MAX_SAMPLE_RATE_HZ:
        raise UserError(f"--audio {args.audio!r} has sample rate {sample_rate_hz} Hz; allowed: {MIN_SAMPLE_RATE_HZ} "
                        f"to {MAX_SAMPLE_RATE_HZ} Hz")
    out = output_mp4(args.out)

    checkpoint = args.checkpoint or default_checkpoint(preset.name)
    try:
        audio_config = audio_config_for(preset, checkpoint, args.audio_encoder, model_path=args.audio_encoder_path)
    except ValueError as error:
        raise UserError(f"--audio-encoder: {error}") from None
    engine = AvatarEngine.from_preset(preset, checkpoint=checkpoint, device=device, dtype=dtype, seed=args.seed,
                                      audio_config=audio_config, decoder=args.decoder)
    stream = engine.stream_config(steps=args.steps, chunk_latent_frames=args.chunk, seed=args.seed, fps=args.fps,
                                  width=args.width, height=args.height)
    characters = [Character(parse_region(args.face_region))] if args.face_region else None
    print(f"facecast generate: preset {preset.name}, {stream.width}x{stream.height} @ {stream.fps:g} fps, "
          f"chunk {stream.chunk_latent_frames} latent frames, {stream.steps} steps, {device}/{args.dtype}, "
          f"{args.decoder} decoder")
    print(f"  {engine.weights_note}")
    duration_s = audio.shape[0] / sample_rate_hz

    reference = image_to_tensor(image, stream.width, stream.height)
    frames_written, first_frame_s, latencies, elapsed_s = render(engine, stream, reference, args.prompt, characters,
                                                                 audio, sample_rate_hz, out, quiet=args.quiet)

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


def add_parser(commands) -> None:
    """Register `generate` on the `facecast` subparsers."""
    gen = commands.add_parser("generate", help="reference image + speech -> lip-synced MP4, streamed chunk by chunk")
    gen.add_argument("--image", required=True, help="reference image (PNG/JPEG/WebP)")
    gen.add_argument("--audio", required=True, help="speech (WAV/MP3/FLAC/OGG/M4A, any sample rate)")
    gen.add_argument("--out", required=True, help="output .mp4")
    gen.add_argument("--preset", default=TRAINED_PRESET, help=f"model preset: {', '.join(PRESETS)} (default "
                     f"{TRAINED_PRESET}, the trained one; the others are random-weight shapes for benchmarks)")
    gen.add_argument("--checkpoint", help="facecast .safetensors checkpoint (default: $FACECAST_CHECKPOINTS/<preset>"
                     ".safetensors or checkpoints/<preset>.safetensors if present, else the preset's shipped "
                     "weights, else random weights)")
    gen.add_argument("--steps", type=int, help="denoising steps per chunk, 1-4 (default: the preset's)")
    gen.add_argument("--chunk", type=int, help="latent frames per chunk (default 3)")
    gen.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    gen.add_argument("--fps", type=positive_float, help="output frames per second (default 25)")
    gen.add_argument("--width", type=int, help="output width (default: the preset's)")
    gen.add_argument("--height", type=int, help="output height (default: the preset's)")
    gen.add_argument("--prompt", default="", help="optional text prompt")
    gen.add_argument("--face-region", help="x0,y0,x1,y1 fractions: audio acts only on this region (default: all)")
    gen.add_argument("--audio-encoder", choices=SUPPORTED_BACKENDS,
                     help="audio features (default: the ones the checkpoint was trained on, the shipped student's "
                          "Whisper base through CTranslate2; random weights: the preset's): log-mel, a local "
                          "wav2vec2/whisper model, or whisper-ct2")
    gen.add_argument("--audio-encoder-path", help="local transformers directory for --audio-encoder wav2vec2/whisper "
                                                  "(a CTranslate2 Whisper directory for whisper-ct2)")
    gen.add_argument("--device", default="auto", help=f"auto, {', '.join(DEVICES)} or cuda:N (default auto)")
    gen.add_argument("--dtype", default="float32", help=f"{', '.join(DTYPES)} (default float32)")
    gen.add_argument("--decoder", choices=("full", "fast"), default="full",
                     help="the VAE's decoder (full, the reference) or the fast one distilled from it (several times "
                          "cheaper on a CPU; the preset must ship one)")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(handler=cmd_generate)
