"""The `facecast` command line.

    facecast generate --image REF --audio WAV --out OUT.mp4 [--preset --checkpoint --steps --chunk --seed --fps ...]
    facecast bench engine --preset P [--json]
    facecast presets
    facecast serve [--config ray_configs/local.yaml] [--port 9000] [--num-gpus N] [--redis-url URL] [--api-key K]
    facecast call --image REF --audio WAV --out OUT.mp4 [--target 127.0.0.1:9000] [--api-key K] [--no-realtime]

`generate` streams the audio into an in-process `AvatarEngine` in 40 ms pieces, as a live caller would, writes every
chunk to an H.264 MP4 with the input audio muxed as soon as it arrives, and prints time to first frame, per-chunk
latency and FPS.  `serve` runs the Ray Serve cluster of a deploy config on this machine (local Ray, logical GPUs
on a CPU box, its own redis-server unless a Redis URL is given) until Ctrl-C/SIGTERM; `call` is the reference gRPC
client: one session, the WAV streamed in real time, the received frames written to an MP4.  User mistakes (a non-image, empty or unreadable audio, an unknown preset, an impossible option)
print one line naming the problem and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import socket
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


# ---------------------------------------------------------------------------------------------- serve

DEFAULT_SERVE_CONFIG = Path(__file__).resolve().parents[2] / "ray_configs" / "local.yaml"
DEFAULT_GRPC_PORT = 9000


def _one_line(error: Exception) -> str:
    return "; ".join(line.strip(" -") for line in str(error).splitlines() if line.strip())


def _replica_count(entry: dict) -> int:
    replicas = entry.get("num_replicas", 1)
    if isinstance(replicas, int):
        return max(replicas, 0)
    autoscaling = entry.get("autoscaling_config") or {}
    return max(int(autoscaling.get("max_replicas") or autoscaling.get("min_replicas") or 1), 1)


def config_gpus(serve_config: dict) -> int:
    """GPUs a Serve config's deployments ask for: per replica, the sum of its placement group bundles' GPUs when it
    has bundles (the replica's own num_gpus lives in bundle 0), else ray_actor_options.num_gpus."""
    total = 0.0
    for application in serve_config.get("applications") or []:
        for entry in application.get("deployments") or []:
            bundles = entry.get("placement_group_bundles")
            if bundles:
                per_replica = sum(float(bundle.get("GPU", 0)) for bundle in bundles)
            else:
                per_replica = float((entry.get("ray_actor_options") or {}).get("num_gpus", 0) or 0)
            total += per_replica * _replica_count(entry)
    return math.ceil(total)


def config_custom_resources(serve_config: dict) -> dict[str, list[str]]:
    """Custom Ray resources (e.g. score_slot) each deployment needs: a local Ray advertises none."""
    needed: dict[str, list[str]] = {}
    for application in serve_config.get("applications") or []:
        for entry in application.get("deployments") or []:
            names = set((entry.get("ray_actor_options") or {}).get("resources") or {})
            for bundle in entry.get("placement_group_bundles") or []:
                names |= set(bundle) - {"CPU", "GPU", "memory"}
            for name in sorted(names):
                needed.setdefault(name, []).append(entry.get("name", "?"))
    return needed


def check_port_free(port: int) -> None:
    """Refuse a port something already listens on (the gRPC proxy would otherwise fail inside Ray, quietly)."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is invalid: allowed 1 to 65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is not "in use"
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as error:
            raise UserError(f"--port {port} is in use ({error.strerror}); stop what listens there or pick another "
                            "port") from None


def _serve_plan(args) -> tuple[dict, dict, int | None]:
    """Validate everything that can be checked before anything starts: (serve_config, app args, num_gpus)."""
    from services.deploy.serve_config import DeployConfigError, load_serve_config, validate_serve_config
    from services.serving.settings import AppSettings

    try:
        serve_config = load_serve_config(args.config)
        validate_serve_config(serve_config)
    except DeployConfigError as error:
        raise UserError(f"--config {_one_line(error)}") from None
    custom = config_custom_resources(serve_config)
    if custom:
        wanted = ", ".join(f"{name} (by {', '.join(users)})" for name, users in custom.items())
        raise UserError(f"--config {args.config}: its deployments need custom Ray resources {wanted}, which a local "
                        "Ray does not advertise; serve a config without them (e.g. ray_configs/local.yaml) or deploy "
                        "this one on its cluster with `serve deploy`")
    application = serve_config["applications"][0]
    app_args = dict(application.get("args") or {})
    api_keys = list(args.api_key or [])
    api_keys += [key.strip() for key in os.environ.get("FACECAST_API_KEYS", "").split(",") if key.strip()]
    if api_keys:
        app_args["api_keys"] = sorted(set(api_keys))
    if args.redis_url:
        app_args["redis_url"] = args.redis_url
    try:
        settings = AppSettings.from_args(app_args)
    except ConfigError as error:
        raise UserError(f"--config {args.config}: application args: {error}") from None

    needed = config_gpus(serve_config)
    real = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if settings.device == "cuda" and not real:
        raise UserError(f"--config {args.config} computes on device cuda, but this machine has no CUDA device; "
                        "serve ray_configs/local.yaml (CPU) instead")
    if args.num_gpus is not None:
        num_gpus = args.num_gpus
        if num_gpus < needed:
            raise UserError(f"--num-gpus {num_gpus} is too few: the deployments of {args.config} ask for {needed} GPUs")
    elif settings.device == "cuda":
        if real < needed:
            raise UserError(f"{args.config} asks for {needed} GPUs; this machine has {real}")
        num_gpus = None  # Ray counts the real ones
    else:
        num_gpus = needed  # logical GPUs: the CPU workers only use them for placement
    if args.num_cpus is not None and args.num_cpus < 1:
        raise UserError(f"--num-cpus {args.num_cpus} is invalid: at least 1")
    return serve_config, {**app_args, "_settings": settings}, num_gpus


def _redis_for_serve(args):
    """(redis_url, LocalRedis or None): --redis-url, else $REDIS_URL, else a private redis-server we own."""
    from services.store.sessions import LocalRedis

    url = args.redis_url or os.environ.get("REDIS_URL")
    if url:
        return url, None
    try:
        local = LocalRedis()
    except RuntimeError as error:
        raise UserError(_one_line(error)) from None
    return local.url, local


class _Stop(BaseException):
    """SIGINT/SIGTERM while serving (BaseException so nothing on the way swallows it)."""


def cmd_serve(args) -> int:
    if args.config is None:
        local = Path("ray_configs") / "local.yaml"
        args.config = str(local if local.is_file() else DEFAULT_SERVE_CONFIG)
    serve_config, app_args, num_gpus = _serve_plan(args)
    check_port_free(args.port)
    settings = app_args.pop("_settings")
    ready_file = Path(args.ready_file) if args.ready_file else None
    if ready_file is not None:
        if not ready_file.parent.is_dir():
            raise UserError(f"--ready-file: directory {str(ready_file.parent)!r} does not exist")
        ready_file.unlink(missing_ok=True)

    signals_seen: list[int] = []

    def on_signal(signum, frame):
        signals_seen.append(signum)
        if len(signals_seen) == 1:
            raise _Stop()

    def claim_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    claim_signals()
    import ray

    real_init = ray.init

    def init_keeping_our_signals(*init_args, **init_kwargs):
        # ray.init installs Ray's crash handler on SIGTERM (dump + die: no cleanup, an orphaned redis-server); take
        # SIGINT/SIGTERM back right away so a stop during the (long) deploy still shuts everything down.
        try:
            return real_init(*init_args, **init_kwargs)
        finally:
            claim_signals()

    redis_url, local_redis, cluster, failed = None, None, None, False
    try:
        try:
            redis_url, local_redis = _redis_for_serve(args)
            app_args["redis_url"] = redis_url
            from services.deploy.local_cluster import LocalCluster

            ray.init = init_keeping_our_signals

            print(f"facecast serve: starting a local Ray ({num_gpus if num_gpus is not None else 'all'} "
                  f"{'logical ' if settings.device == 'cpu' else ''}GPUs) and deploying {args.config} ...",
                  flush=True)
            try:
                cluster = LocalCluster.start(app_args, config=args.config, grpc_port=args.port,
                                             num_cpus=args.num_cpus, num_gpus=num_gpus)
            finally:
                ray.init = real_init
            claim_signals()
            print(f"facecast serving {args.config} on grpc {cluster.target} (preset {settings.preset}, layout "
                  f"{settings.layout}, {settings.steps} steps, {settings.device}); Ctrl-C to stop", flush=True)
            if local_redis is not None:
                print(f"  redis: {redis_url} (local redis-server pid {local_redis.pid}, stopped with the cluster)",
                      flush=True)
            else:
                print(f"  redis: {redis_url} (external)", flush=True)
            keys = settings.effective_api_keys()
            print(f"  auth: {'%d API key(s) required' % len(keys) if keys else 'none (no API keys configured)'}",
                  flush=True)
            if ready_file is not None:
                partial = ready_file.with_name(ready_file.name + ".partial")
                partial.write_text("ready\n")
                partial.replace(ready_file)
            problem = None
            while problem is None:
                time.sleep(1.0)
                problem = _serving_problem(local_redis)
            print(f"facecast serve: error: {problem}; stopping", file=sys.stderr, flush=True)
            failed = True
        except _Stop:
            name = signal.Signals(signals_seen[0]).name if signals_seen else "signal"
            print(f"facecast serve: {name}: stopping ...", flush=True)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - Ray/Serve failed to start the app: one line, not a traceback
            print(f"facecast serve: error: could not start {args.config}: {type(error).__name__}: "
                  f"{_one_line(error)}", file=sys.stderr, flush=True)
            failed = True
    finally:
        for sig in previous:  # a second Ctrl-C during the shutdown is ignored, not a traceback
            signal.signal(sig, signal.SIG_IGN)
        _stop_serving(cluster, local_redis)
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        return 1
    print("facecast serve: stopped", flush=True)
    return 0


def _dead_ray_processes() -> list[str]:
    """Names of the local Ray node's core processes (GCS, raylet) that have exited; [] when unknown."""
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
        if node is None:
            return []
        return sorted({kind for kind, _ in node.dead_processes() if kind in ("gcs_server", "raylet")})
    except Exception:  # noqa: BLE001 - private API: no verdict rather than a false alarm
        return []


def _serving_problem(local_redis) -> str | None:
    """Why the cluster can no longer serve (its Ray core processes or its redis-server died), or None."""
    dead = _dead_ray_processes()
    if dead:
        return f"the local Ray's {' and '.join(dead)} exited (killed?)"
    if local_redis is not None and not local_redis.running:
        return f"the local redis-server (pid {local_redis.pid}) exited"
    return None


def _stop_serving(cluster, local_redis) -> None:
    """serve.shutdown, ray.shutdown, the local Redis: each attempted even if an earlier one fails.  With the Ray
    core already dead (or never started) there is no Serve controller to ask: only ray.shutdown reaps what is left."""
    try:
        import ray

        if cluster is not None and not _dead_ray_processes():
            cluster.stop()  # serve.shutdown + ray.shutdown
        elif ray.is_initialized():  # Ray died under us, or start was interrupted / failed half-way
            try:
                if not _dead_ray_processes():
                    from ray import serve

                    serve.shutdown()
            finally:
                ray.shutdown()
    except Exception as error:  # noqa: BLE001 - report, keep cleaning up
        print(f"facecast serve: warning: shutdown: {_one_line(error)}", file=sys.stderr, flush=True)
    finally:
        if local_redis is not None:
            local_redis.close()


# ---------------------------------------------------------------------------------------------- call

CALL_USER_ERRORS = ("INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND", "RESOURCE_EXHAUSTED")


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


def cmd_call(args) -> int:
    import grpc

    from services.api.client import AvatarClient

    image_path = Path(args.image)
    if not image_path.is_file():
        raise UserError(f"--image {args.image!r}: file not found")
    reference = image_path.read_bytes()  # the server validates and crops it
    audio, sample_rate_hz = load_audio(args.audio)
    out = Path(args.out)
    if out.suffix.lower() != ".mp4":
        raise UserError(f"--out {str(out)!r} must end in .mp4")
    if not out.parent.exists():
        raise UserError(f"--out: directory {str(out.parent)!r} does not exist")
    pcm = (np.clip(audio, -1, 1) * 32767).round().astype(np.int16)
    options = {name: value for name, value in (("fps", args.fps), ("width", args.width), ("height", args.height),
                                               ("steps", args.steps), ("chunk_latent_frames", args.chunk),
                                               ("seed", args.seed)) if value is not None}
    api_key = args.api_key or os.environ.get("FACECAST_API_KEY")
    client = AvatarClient(args.target, api_key=api_key)
    session = None
    try:
        session = client.create_session(reference, prompt=args.prompt, options=options, timeout_s=args.timeout)
        effective = session.options
        fps, width, height = effective.fps, effective.width, effective.height
        duration_s = pcm.shape[0] / sample_rate_hz
        expected = math.ceil(duration_s * fps)
        print(f"facecast call: session {session.session_id} at {args.target}: {width}x{height} @ {fps:g} fps, "
              f"chunk {effective.chunk_latent_frames} latent frames, {effective.steps} steps; streaming "
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
            return 1
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
        return 0
    except grpc.RpcError as error:
        code = error.code()
        name = code.name if code is not None else "UNKNOWN"
        details = error.details() or ""
        message = f"facecast call: error: {name}: {details}"
        if name == "UNAVAILABLE":
            message += f" (is `facecast serve` running at {args.target}?)"
        print(message, file=sys.stderr)
        return EXIT_USAGE if name in CALL_USER_ERRORS else 1
    except RuntimeError as error:  # the stream broke more often than the client re-attaches
        print(f"facecast call: error: {_one_line(error)}", file=sys.stderr)
        return 1
    finally:
        if session is not None:
            try:
                client.close_session(session.session_id, session.session_token)
            except grpc.RpcError:
                pass  # the session ends on its own (its record expires)
        client.close()


def cmd_bench_cluster(args) -> int:
    from services.cli.bench_cluster import bench_cluster, format_cluster_report

    get_preset(args.preset)
    if args.chunks < 2:
        raise UserError(f"--chunks {args.chunks} is too few; need at least 2 to measure time between chunks")
    if not 1 <= args.max_sessions <= 64:
        raise UserError(f"--max-sessions {args.max_sessions} is invalid; allowed: 1 to 64")
    report = bench_cluster(args.preset, chunks=args.chunks, max_sessions=args.max_sessions,
                           progress=not args.quiet and not args.json)
    print(json.dumps(report, indent=2) if args.json else format_cluster_report(report))
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
    cluster = targets.add_parser("cluster", help="cluster vs engine overhead, disaggregated vs self-contained, "
                                                 "real-time sessions per score group with/without batching")
    cluster.add_argument("--preset", default="tiny", help=f"{', '.join(PRESETS)} (default tiny: CPU-sized)")
    cluster.add_argument("--chunks", type=int, default=8, help="chunks per measured stream (default 8)")
    cluster.add_argument("--max-sessions", type=int, default=6, help="largest concurrent load tried (default 6)")
    cluster.add_argument("--json", action="store_true", help="print the report as JSON")
    cluster.add_argument("--quiet", action="store_true")
    cluster.set_defaults(handler=cmd_bench_cluster)

    presets = commands.add_parser("presets", help="list the model presets")
    presets.set_defaults(handler=cmd_presets)

    srv = commands.add_parser("serve", help="run the gRPC cluster of a Serve config on this machine until Ctrl-C")
    srv.add_argument("--config", help="Ray Serve config (default ray_configs/local.yaml)")
    srv.add_argument("--port", type=int, default=DEFAULT_GRPC_PORT, help="gRPC port (default 9000)")
    srv.add_argument("--num-gpus", type=int, help="GPUs for the local Ray (default: on a CPU config, as many "
                     "logical GPUs as its deployments ask for; on a cuda config, the real ones)")
    srv.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: max(cores, 4))")
    srv.add_argument("--redis-url", help="session store (default $REDIS_URL, else a private redis-server)")
    srv.add_argument("--api-key", action="append", help="accepted API key (repeatable; also $FACECAST_API_KEYS, "
                     "comma-separated); none: no authentication")
    srv.add_argument("--ready-file", help="write 'ready' to this file once the app serves (removed on exit)")
    srv.set_defaults(handler=cmd_serve)

    call = commands.add_parser("call", help="reference client: stream a WAV to `facecast serve`, write the MP4")
    call.add_argument("--image", required=True, help="reference image (sent as is; the server validates it)")
    call.add_argument("--audio", required=True, help="speech (WAV/MP3/FLAC/OGG/M4A), sent at its own rate, mono")
    call.add_argument("--out", required=True, help="output .mp4")
    call.add_argument("--target", default=f"127.0.0.1:{DEFAULT_GRPC_PORT}", help="host:port (default 127.0.0.1:9000)")
    call.add_argument("--api-key", help="API key (default $FACECAST_API_KEY)")
    call.add_argument("--fps", type=_positive_float, help="frames per second (default: the server's, 25)")
    call.add_argument("--width", type=int, help="width (default: the served preset's)")
    call.add_argument("--height", type=int, help="height (default: the served preset's)")
    call.add_argument("--steps", type=int, help="denoising steps (must match the cluster's; default: its)")
    call.add_argument("--chunk", type=int, help="latent frames per chunk (default: the server's)")
    call.add_argument("--seed", type=int, help="noise seed (default: the server's)")
    call.add_argument("--prompt", default="", help="optional text prompt")
    call.add_argument("--no-realtime", action="store_true", help="send the audio as fast as possible, not paced")
    call.add_argument("--timeout", type=_positive_float, default=120.0, help="seconds for CreateSession (default 120)")
    call.add_argument("--quiet", action="store_true", help="no progress bar")
    call.set_defaults(handler=cmd_call)
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
