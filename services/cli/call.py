"""`facecast call`: the reference gRPC client run as a command: one session, the audio streamed, the frames to an MP4.

    facecast call --image REF --audio WAV --out OUT.mp4 [--target 127.0.0.1:9000] [--api-key-file F]
                  [--tls | --tls-ca PEM] [--no-realtime]

The WAV is sent in real time (or as fast as possible with --no-realtime) through `services.api.client.AvatarClient`;
the received JPEG frames are written to an H.264 MP4 with the input audio, and the command prints TTFF, the time
between chunks and the delivered FPS.  A refused request (bad image, wrong key, unknown session, overload) exits 2
naming the status; a server that is not there or a stream that breaks exits 1.  Knows the client and the media
helpers; nothing about the cluster.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

import grpc
import numpy as np

from services.api.client import AvatarClient
from services.cli.common import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, UserError, client_api_key, client_tls, one_line,
                                 output_mp4, positive_float)
from services.media import load_audio
from services.video import Mp4Writer
from services.net import DEFAULT_GRPC_PORT

CALL_USER_ERRORS = ("INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "RESOURCE_EXHAUSTED")
"""gRPC status codes that mean the caller's input was refused: exit status 2, like any other user error."""


def _decode_jpegs(frames: list[bytes], width: int, height: int) -> np.ndarray:
    import PIL.Image

    pixels = []
    for data in frames:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height))
            pixels.append(np.asarray(image))
    return np.stack(pixels)


def _ms_stats(values_s: list[float]) -> str:
    values = np.asarray(values_s) * 1000
    return (f"mean {values.mean():.0f} / p50 {np.percentile(values, 50):.0f} / p95 {np.percentile(values, 95):.0f} "
            f"/ max {values.max():.0f} ms")


def cmd_call(args: argparse.Namespace) -> int:
    image_path = Path(args.image)
    if not image_path.is_file():
        raise UserError(f"--image {args.image!r}: file not found")
    reference = image_path.read_bytes()  # the server validates and crops it
    audio, sample_rate_hz = load_audio(args.audio)
    out = output_mp4(args.out)
    pcm = (np.clip(audio, -1, 1) * 32767).round().astype(np.int16)
    options = {name: value for name, value in (("fps", args.fps), ("width", args.width), ("height", args.height),
                                               ("steps", args.steps), ("chunk_latent_frames", args.chunk),
                                               ("seed", args.seed), ("decoder", args.decoder)) if value is not None}
    client = AvatarClient(args.target, api_key=client_api_key(args), tls=client_tls(args))
    session = None
    try:
        session = client.create_session(reference, prompt=args.prompt, options=options, timeout_s=args.timeout)
        effective = session.options
        fps, width, height = effective.fps, effective.width, effective.height
        duration_s = pcm.shape[0] / sample_rate_hz
        expected = math.ceil(duration_s * fps)
        print(f"facecast call: session {session.session_id} at {args.target}: {width}x{height} @ {fps:g} fps, "
              f"chunk {effective.chunk_latent_frames} latent frames, {effective.steps} steps, "
              f"{effective.decoder or 'full'} decoder; streaming "
              f"{duration_s:.2f} s of audio at {sample_rate_hz} Hz "
              f"{'as fast as possible' if args.no_realtime else 'in real time'}", flush=True)
        from tqdm import tqdm

        frames_written = 0
        with Mp4Writer(out, fps, width, height, audio, sample_rate_hz) as writer, \
                tqdm(total=expected, unit="frame", desc="receiving", disable=args.quiet) as bar:
            def on_chunk(chunk):
                nonlocal frames_written
                if chunk.frames:
                    writer.write(_decode_jpegs(list(chunk.frames), width, height))
                    frames_written += len(chunk.frames)
                    bar.update(len(chunk.frames))

            result = client.stream(session, pcm, sample_rate_hz, realtime=not args.no_realtime, on_chunk=on_chunk,
                                   timeout_s=args.timeout + 2 * duration_s)
        if not result.chunks:
            print("facecast call: error: the stream ended without a single video chunk", file=sys.stderr)
            return EXIT_FAILED
        elapsed = result.arrival_s[-1]
        print(f"wrote {out}: {frames_written} frames ({frames_written / fps:.2f} s) with audio")
        print(f"  TTFF {result.ttff_s * 1000:.0f} ms (first audio sent -> first chunk received)")
        intervals = result.intervals_s
        if intervals:
            print(f"  between chunks: {_ms_stats(intervals)} over {len(result.chunks)} chunks")
        else:
            print("  between chunks: n/a (1 chunk)")
        print(f"  frames {frames_written}, {frames_written / elapsed if elapsed > 0 else float('inf'):.2f} FPS "
              f"delivered")
        if result.reattaches:
            print(f"  re-attached {result.reattaches} time(s) after the stream broke")
        return EXIT_OK
    except grpc.RpcError as error:
        code = error.code()
        name = code.name if code is not None else "UNKNOWN"
        details = error.details() or ""
        message = f"facecast call: error: {name}: {details}"
        if name == "UNAVAILABLE":
            message += f" (is `facecast serve` running at {args.target}?)"
        print(message, file=sys.stderr)
        return EXIT_USAGE if name in CALL_USER_ERRORS else EXIT_FAILED
    except RuntimeError as error:  # the stream broke more often than the client re-attaches
        print(f"facecast call: error: {one_line(error)}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if session is not None:
            try:
                client.close_session(session.session_id, session.session_token)
            except grpc.RpcError:
                pass  # the session ends on its own (its record expires)
        client.close()


def add_parser(commands) -> None:
    """Register `call` on the `facecast` subparsers."""
    call = commands.add_parser("call", help="reference client: stream a WAV to `facecast serve`, write the MP4")
    call.add_argument("--image", required=True, help="reference image (sent as is; the server validates it)")
    call.add_argument("--audio", required=True, help="speech (WAV/MP3/FLAC/OGG/M4A), sent at its own rate, mono")
    call.add_argument("--out", required=True, help="output .mp4")
    call.add_argument("--target", default=f"127.0.0.1:{DEFAULT_GRPC_PORT}",
                      help=f"host:port (default 127.0.0.1:{DEFAULT_GRPC_PORT})")
    call.add_argument("--api-key-file", help="file holding the API key (default $FACECAST_API_KEY; a key on the "
                      "command line would be visible in `ps`)")
    call.add_argument("--api-key", help=argparse.SUPPRESS)   # removed: refused with the reason
    call.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's certificate "
                      "authorities (default: plaintext)")
    call.add_argument("--tls-ca", help="connect with TLS, trusting this PEM certificate (a private CA or the "
                      "server's self-signed certificate)")
    call.add_argument("--fps", type=positive_float, help="frames per second (default: the server's, 25)")
    call.add_argument("--width", type=int, help="width (default: the served preset's)")
    call.add_argument("--height", type=int, help="height (default: the served preset's)")
    call.add_argument("--steps", type=int, help="denoising steps (must match the cluster's; default: its)")
    call.add_argument("--chunk", type=int, help="latent frames per chunk (default: the server's)")
    call.add_argument("--decoder", choices=("full", "fast"), help="this session's decoder: full (the VAE's) or fast "
                      "(where the server ships one; default: the server's)")
    call.add_argument("--seed", type=int, help="noise seed (default: the server's)")
    call.add_argument("--prompt", default="", help="optional text prompt")
    call.add_argument("--no-realtime", action="store_true", help="send the audio as fast as possible, not paced")
    call.add_argument("--timeout", type=positive_float, default=120.0, help="seconds for CreateSession (default 120)")
    call.add_argument("--quiet", action="store_true", help="no progress bar")
    call.set_defaults(handler=cmd_call)
