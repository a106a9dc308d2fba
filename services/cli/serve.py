"""`facecast serve`: run the Ray Serve cluster of a deploy config on this machine until Ctrl-C / SIGTERM.

    facecast serve [--config ray_configs/local.yaml] [--preset P] [--port 9000] [--host 127.0.0.1]
                   [--tls-cert PEM --tls-key PEM] [--no-reflection] [--num-gpus N] [--redis-url URL]
                   [--api-key-file FILE]

With no --config it serves the local layout (ray_configs/local.yaml: CPU, logical GPUs) with the trained preset
(`talk128` and its shipped weights); a --config serves that file as written, and --preset replaces its preset.

Everything that can be checked is checked before anything starts (the config, its application args, GPUs, custom
resources, the port); then a local Ray (logical GPUs on a CPU box), the Serve application and, unless a Redis URL is
given, a private redis-server (restarted with its data if it exits).  Serving stops on SIGINT/SIGTERM or when the
Ray core dies, and everything it started is stopped with it.  Knows the deploy tooling and the local cluster launcher;
nothing about the deployments' insides.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch

from model_core.checkpoint import CheckpointError
from model_core.config import ConfigError
from model_core.models import resolve_checkpoint
from model_core.shipped import TRAINED_PRESET
from services.api.keys import ApiKeyError, ApiKeyring
from services.cli.common import EXIT_FAILED, EXIT_OK, UserError, one_line
from services.deploy.serve_config import (
    DeployConfigError,
    collective_decoder_problem,
    config_custom_resources,
    config_gpus,
    config_path,
    load_serve_config,
    validate_serve_config,
)
from services.net import DEFAULT_GRPC_PORT
from services.serving.front_door import FrontDoorError, FrontDoorOptions, TlsFiles
from services.serving.settings import AppSettings
from services.store.redis_server import redact_url


def check_port_free(port: int, flag: str = "--port", host: str = "0.0.0.0") -> None:
    """Refuse a port something already listens on (the gRPC proxy would otherwise fail inside Ray, quietly)."""
    if not 1 <= port <= 65535:
        raise UserError(f"{flag} {port} is invalid: allowed 1 to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT leftover is not "in use"
        try:
            sock.bind((host, port))
        except OSError as error:
            raise UserError(f"{flag} {port} is in use ({error.strerror}); stop what listens there or pick another "
                            "port") from None


SCALABLE = ("SessionIngress", "AudioEncoder", "ScoreWorkerGroup", "VAEDecoder")
"""Deployments `--replicas` may scale (the LLM bridge keeps conversations in one replica)."""


def parse_replicas(entries: list[str] | None) -> dict[str, int]:
    """`--replicas NAME=N` entries as {deployment: replicas}; UserError naming the entry and the allowed values."""
    counts: dict[str, int] = {}
    for entry in entries or ():
        name, _, count = entry.partition("=")
        if name not in SCALABLE:
            raise UserError(f"--replicas {entry!r}: unknown or unscalable deployment {name!r}; allowed: "
                            f"{', '.join(SCALABLE)}")
        if not count.isdigit() or int(count) < 1:
            raise UserError(f"--replicas {entry!r}: the count must be a positive integer (NAME=N, e.g. "
                            "ScoreWorkerGroup=2)")
        counts[name] = int(count)
    return counts


def _replicas_plan(entries: list[str] | None, serve_config: dict) -> dict[str, dict]:
    """`--replicas NAME=N` entries applied to the config's deployments (so GPUs are counted and rules checked with
    them); returns the deployment option overrides to deploy with."""
    overrides = {name: {"num_replicas": count} for name, count in parse_replicas(entries).items()}
    if overrides:
        deployments = serve_config["applications"][0].setdefault("deployments", [])
        for name, option in overrides.items():
            entry = next((dep for dep in deployments if isinstance(dep, dict) and dep.get("name") == name), None)
            if entry is None:
                deployments.append({"name": name, **option})
            else:
                entry.pop("autoscaling_config", None)
                entry.update(option)
    return overrides


def _serve_plan(args: argparse.Namespace) -> tuple[dict, dict, int | None]:
    """Validate everything that can be checked before anything starts: (serve_config, app args, num_gpus)."""
    try:
        serve_config = load_serve_config(args.config)
        replicas = _replicas_plan(args.replicas, serve_config)
        validate_serve_config(serve_config)
    except DeployConfigError as error:
        raise UserError(f"--config {one_line(error)}") from None
    custom = config_custom_resources(serve_config)
    if custom:
        wanted = ", ".join(f"{name} (by {', '.join(users)})" for name, users in custom.items())
        raise UserError(f"--config {args.config}: its deployments need custom Ray resources {wanted}, which a local "
                        "Ray does not advertise; serve a config without them (e.g. ray_configs/local.yaml) or deploy "
                        "this one on its cluster with `serve deploy`")
    application = serve_config["applications"][0]
    app_args = dict(application.get("args") or {})
    if args.preset:
        app_args["preset"] = args.preset
    if args.decoder:
        app_args["decoder"] = args.decoder
    if args.latent_transport:
        app_args["latent_transport"] = args.latent_transport
    if args.api_key:
        raise UserError("--api-key was removed: a key on the command line is visible to every user in `ps`; put "
                        "`name=key` entries in $FACECAST_API_KEYS or in a file given with --api-key-file "
                        "(`facecast keys new` makes one)")
    try:   # the replicas get the keys' hashes only (the Serve config), never the keys
        keyring = ApiKeyring.load(app_args.get("api_keys") or {}, key_file=args.api_key_file)
    except ApiKeyError as error:
        flag = "--api-key-file" if args.api_key_file and repr(args.api_key_file) in str(error) else "api keys"
        raise UserError(f"{flag}: {error}") from None
    app_args["api_keys"] = keyring.hashes() or None
    if args.redis_url:
        app_args["redis_url"] = args.redis_url
    try:
        settings = AppSettings.from_args(app_args)
        resolve_checkpoint(settings.preset_config, settings.checkpoint)
    except ConfigError as error:
        raise UserError(f"--config {args.config}: application args: {error}") from None
    except CheckpointError as error:
        raise UserError(f"--config {args.config}: {error}") from None

    for dep in application.get("deployments") or []:    # the flags may have changed the transport since validation
        problem = dep.get("name") == "VAEDecoder" and collective_decoder_problem(settings.latent_transport, dep)
        if problem:
            raise UserError(f"--latent-transport/--replicas: {problem}")
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
    return serve_config, {**app_args, "_settings": settings, "_door": _front_door_plan(args),
                          "_replicas": replicas}, num_gpus


def _front_door_plan(args: argparse.Namespace) -> FrontDoorOptions:
    """Where clients connect and how: --host (an IP address this machine has), TLS from --tls-cert and --tls-key
    (both or neither; the pair checked now)."""
    try:
        ipaddress.ip_address(args.host)
    except ValueError:
        raise UserError(f"--host {args.host!r} is not an IP address: 127.0.0.1 (this machine only, the default), "
                        "0.0.0.0 (every interface) or one of this machine's addresses") from None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError(f"--tls-{'key' if args.tls_cert else 'cert'} is missing: TLS needs both --tls-cert and "
                        "--tls-key (PEM files)")
    door = FrontDoorOptions(args.host, TlsFiles(args.tls_cert, args.tls_key) if args.tls_cert else None)
    try:
        door.check()
    except FrontDoorError as error:
        raise UserError(str(error)) from None
    return door


def _redis_for_serve(args: argparse.Namespace):
    """(redis_url, LocalRedis or None): --redis-url, else $REDIS_URL, else a private redis-server we own."""
    from services.store.redis_server import LocalRedis

    url = args.redis_url or os.environ.get("REDIS_URL")
    if url:
        return url, None
    try:
        local = LocalRedis(supervise=True)   # restarted with its data whenever it exits: never a reason to stop
    except RuntimeError as error:
        raise UserError(one_line(error)) from None
    return local.url, local


class _Stop(BaseException):
    """SIGINT/SIGTERM while serving (BaseException so nothing on the way swallows it)."""


def cmd_serve(args: argparse.Namespace) -> int:
    if args.config is None:
        local = Path("ray_configs") / "local.yaml"
        args.config = str(local if local.is_file() else config_path("local"))
        args.preset = args.preset or TRAINED_PRESET
    serve_config, app_args, num_gpus = _serve_plan(args)
    door = app_args.pop("_door")
    replicas = app_args.pop("_replicas")
    check_port_free(args.port, host=args.host)
    check_port_free(args.http_port, "--http-port")
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

    for name in ("FACECAST_API_KEYS", "FACECAST_API_KEY_FILE"):   # hashed into the app args already: keep the
        os.environ.pop(name, None)                                  # keys out of every Ray process's environment
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
                                             http_port=args.http_port, num_cpus=args.num_cpus, num_gpus=num_gpus,
                                             front_door=door, reflection=not args.no_reflection,
                                             deployment_options=replicas)
            finally:
                ray.init = real_init
            claim_signals()
            print(f"facecast serving {args.config} on grpc {cluster.front_door.address} (preset {settings.preset}, "
                  f"layout {settings.layout}, {settings.steps} steps, {settings.device}); Ctrl-C to stop", flush=True)
            print("  transport: " + (f"TLS (certificate {door.tls.cert})" if door.tls else
                                     "plaintext, for use on this machine or a trusted network (--tls-cert/--tls-key "
                                     "to encrypt)") + ("" if args.host == "127.0.0.1" else
                                                       f"; listening on {args.host}, not only this machine"),
                  flush=True)
            print(f"  Serve's own gRPC proxy: port {cluster.grpc_port}, internal (calls that bypass the port above "
                  "are refused)", flush=True)
            if local_redis is not None:
                print(f"  redis: {local_redis.redacted_url} (local redis-server pid {local_redis.pid}: loopback "
                      "only, a generated password, an append-only file; restarted if it exits, stopped with the "
                      "cluster)", flush=True)
            else:
                print(f"  redis: {redact_url(redis_url)} (external)", flush=True)
            modes = settings.conversation_modes()
            print(f"  call page: http://127.0.0.1:{cluster.http_port}/ (conversation: "
                  f"{', '.join(modes) if modes else 'none: configure realtime_url or run `make cascade`'})",
                  flush=True)
            keys = settings.effective_api_keys()
            auth = f"an API key required (keys: {', '.join(keys.names)})" if keys else "none (no API keys configured)"
            print(f"  auth: {auth}", flush=True)
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
                  f"{one_line(error)}", file=sys.stderr, flush=True)
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
        return EXIT_FAILED
    print("facecast serve: stopped", flush=True)
    return EXIT_OK


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
    """Why the cluster can no longer serve (its Ray core processes died), or None. A redis-server that exits is
    not one: its supervisor restarts it, and the cluster streams on meanwhile."""
    dead = _dead_ray_processes()
    if dead:
        return f"the local Ray's {' and '.join(dead)} exited (killed?)"
    return None


def _stop_serving(cluster, local_redis) -> None:
    """serve.shutdown, ray.shutdown, the local Redis: each attempted even if an earlier one fails.  With the Ray
    core already dead (or never started) there is no Serve controller to ask: only ray.shutdown reaps what is left."""
    try:
        import ray

        if cluster is not None and not _dead_ray_processes():
            began = time.monotonic()
            cluster.stop(drain=True)  # streams told and ended, then serve.shutdown + ray.shutdown
            print(f"facecast serve: drained and shut down in {time.monotonic() - began:.1f} s", flush=True)
        elif ray.is_initialized():  # Ray died under us, or start was interrupted / failed half-way
            try:
                if not _dead_ray_processes():
                    from ray import serve

                    serve.shutdown()
            finally:
                ray.shutdown()
    except Exception as error:  # noqa: BLE001 - report, keep cleaning up
        print(f"facecast serve: warning: shutdown: {one_line(error)}", file=sys.stderr, flush=True)
    finally:
        if local_redis is not None:
            local_redis.close()


def add_parser(commands) -> None:
    """Register `serve` on the `facecast` subparsers."""
    srv = commands.add_parser("serve", help="run the gRPC cluster of a Serve config on this machine until Ctrl-C")
    srv.add_argument("--config", help="Ray Serve config (default: ray_configs/local.yaml with --preset "
                     f"{TRAINED_PRESET})")
    srv.add_argument("--preset", help=f"model preset, replacing the config's (default: {TRAINED_PRESET}, the "
                     "trained one, without --config; the config's own with it)")
    srv.add_argument("--decoder", choices=("full", "fast"), help="the sessions' default decoder, replacing the "
                     "config's: full (the VAE's, the reference) or fast (the preset's shipped fast decoder); a session "
                     "may still choose (default: the config's, full)")
    srv.add_argument("--latent-transport", choices=("object_store", "collective"),
                     help="how latents reach the VAEDecoder, replacing the config's: object_store (through Ray's "
                     "object store) or collective (the latent link: NCCL GPU to GPU, gloo on CPU)")
    srv.add_argument("--replicas", action="append", metavar="DEPLOYMENT=N",
                     help="run N replicas of a deployment, replacing the config's (repeatable; e.g. "
                          "ScoreWorkerGroup=2: sessions are spread over them and stay on theirs, and a replica's "
                          "sessions move to the others when it dies; on a CPU config each takes a logical GPU)")
    srv.add_argument("--port", type=int, default=DEFAULT_GRPC_PORT, help=f"gRPC port (default {DEFAULT_GRPC_PORT})")
    srv.add_argument("--host", default="127.0.0.1", help="address the gRPC port listens on (default 127.0.0.1: this "
                     "machine only; 0.0.0.0: every interface)")
    srv.add_argument("--tls-cert", help="PEM certificate (chain) for TLS on the gRPC port (with --tls-key; default: "
                     "plaintext)")
    srv.add_argument("--tls-key", help="PEM private key of --tls-cert")
    srv.add_argument("--no-reflection", action="store_true", help="turn gRPC server reflection off (on by default: "
                     "grpcurl and grpcui can list the API)")
    srv.add_argument("--http-port", type=int, default=8000, help="HTTP port of the browser call page (default 8000)")
    srv.add_argument("--num-gpus", type=int, help="GPUs for the local Ray (default: on a CPU config, as many "
                     "logical GPUs as its deployments ask for; on a cuda config, the real ones)")
    srv.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: max(cores, 4))")
    srv.add_argument("--redis-url", help="session store (default $REDIS_URL, else a private redis-server); a "
                     "URL with a password belongs in $REDIS_URL: `ps` shows arguments")
    srv.add_argument("--api-key-file", help="file of accepted API keys, one `name=key` per line (also "
                     "$FACECAST_API_KEY_FILE, and `name=key,...` in $FACECAST_API_KEYS; `facecast keys new` makes "
                     "one); none: no authentication")
    srv.add_argument("--api-key", action="append", help=argparse.SUPPRESS)   # removed: refused with the reason
    srv.add_argument("--ready-file", help="write 'ready' to this file once the app serves (removed on exit)")
    srv.set_defaults(handler=cmd_serve)
