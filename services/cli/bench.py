"""`facecast bench engine | decode | cluster`: the benchmarks, printed as a report or as JSON.

    facecast bench engine --preset P [--steps --chunk --chunks --device --dtype --compile --decoder --sessions N]
    facecast bench decode --preset talk128 [--chunks 6]
    facecast bench gpu [--shapes full|tiny] [--out report.json] [--table table.md]
    facecast bench cluster --preset tiny [--chunks 8 --max-sessions 6] [--json]
    facecast bench soak [--preset tiny --sessions 3 --minutes 10 --kill DEPLOYMENT --kill-every 3] [--json]
    facecast bench fuzz [--examples 3000 --seed 0] [--json]

`engine` times the in-process engine per stage (`model_core.bench`; `--sessions N` adds a cross-session batch through
the session pool and through the gathered path); `decode` times the streaming decoders one after the other in one run;
`cluster` measures what the cluster costs and buys against it on one local Ray (`services.cli.bench_cluster`).  With
`--json` stdout carries the JSON alone. Every report records the machine's load when its run began
(`machine_load_at_start`), and a run begun on a busy machine says so on stderr. This module only parses, checks and
prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from model_core.config import DTYPES, PRESETS, get_preset
from services.cli.common import EXIT_OK, UserError, parse_device, parse_dtype, print_report
from services.serving.settings import DEPLOYMENT_NAMES


def machine_load() -> dict:
    """The machine's 1-minute load average and core count, read as a run begins: figures from a busy machine are not
    an idle machine's (other work takes the cores), and the report says which it was."""
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:                     # no load average on this platform
        load = None
    return {"load_1m": load, "cores": os.cpu_count()}


def busy_warning(load: dict) -> str | None:
    """A warning when the run began with more than a quarter of the machine's cores taken, else None."""
    if load["load_1m"] is None or load["load_1m"] <= 0.25 * (load["cores"] or 1):
        return None
    return (f"the machine was busy when this run began (1-minute load {load['load_1m']:g} on {load['cores']} cores): "
            "its figures are not an idle machine's")


def note_load(report: dict, load: dict) -> None:
    """The machine's load when the run began goes into the report; a busy machine is also said on stderr."""
    report["machine_load_at_start"] = load
    warning = busy_warning(load)
    if warning:
        print(f"facecast bench: warning: {warning}", file=sys.stderr)


def cmd_bench_engine(args: argparse.Namespace) -> int:
    load = machine_load()
    from model_core.bench import bench_engine, format_engine_report

    if not 1 <= args.sessions <= 64:
        raise UserError(f"--sessions {args.sessions} is invalid; allowed: 1 to 64")
    device = parse_device(args.device)
    if args.dtype is None:
        args.dtype = "bfloat16" if device.startswith("cuda") else "float32"
    report = bench_engine(args.preset, device=device, dtype=parse_dtype(args.dtype), steps=args.steps,
                          chunk=args.chunk, chunks=args.chunks, width=args.width, height=args.height,
                          compile=args.compile, progress=not args.quiet, sessions=args.sessions,
                          decoder=args.decoder)
    note_load(report, load)
    print_report(report if args.json else format_engine_report(report))
    return EXIT_OK


def cmd_bench_decode(args: argparse.Namespace) -> int:
    load = machine_load()
    from model_core.bench import bench_decode, format_decode_report

    get_preset(args.preset)
    if args.chunks < 1:
        raise UserError(f"--chunks {args.chunks} is too few; need at least 1")
    report = bench_decode(args.preset, chunks=args.chunks, progress=not args.quiet)
    note_load(report, load)
    print_report(report if args.json else format_decode_report(report))
    return EXIT_OK


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    load = machine_load()
    from model_core.bench_gpu import bench_gpu, format_gpu_table

    device = parse_device(args.device)
    if args.shapes == "full" and not device.startswith("cuda"):
        raise UserError(f"--device {args.device}: `bench gpu` needs a CUDA device for the wan shapes; on a CPU run the "
                        "dry run with --shapes tiny")
    report = bench_gpu(args.shapes, device=device, chunks=args.chunks,
                       compile_modes=(False,) if args.no_compile else None, progress=not args.quiet)
    note_load(report, load)
    table = format_gpu_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.table:
        Path(args.table).write_text(table + "\n")
    print_report(report if args.json else table)
    return EXIT_OK


def cmd_bench_cluster(args: argparse.Namespace) -> int:
    load = machine_load()
    get_preset(args.preset)
    if args.chunks < 2:
        raise UserError(f"--chunks {args.chunks} is too few; need at least 2 to measure time between chunks")
    if not 1 <= args.max_sessions <= 64:
        raise UserError(f"--max-sessions {args.max_sessions} is invalid; allowed: 1 to 64")
    from services.cli.bench_cluster import bench_cluster, format_cluster_report  # Ray: only once the args are good

    report = bench_cluster(args.preset, chunks=args.chunks, max_sessions=args.max_sessions,
                           progress=not args.quiet, decoder=args.decoder, latent_transport=args.latent_transport)
    note_load(report, load)
    print_report(report if args.json else format_cluster_report(report))
    return EXIT_OK


def cmd_bench_call(args: argparse.Namespace) -> int:
    load = machine_load()
    if not 2 <= args.turns <= 50:
        raise UserError(f"--turns {args.turns} is invalid; allowed: 2 to 50 (p95 wants at least 10)")
    from services.llm.offline import missing_packages

    if missing_packages():   # the caller's questions are spoken by the cascade's voice in both modes
        raise UserError(f"the offline cascade needs {', '.join(missing_packages())}: run `make cascade`")
    from services.cli.bench_call import bench_call, format_call_report  # Ray: only once the args are good

    report = bench_call(args.turns, decoder=args.decoder, mode=args.mode, progress=not args.quiet)
    note_load(report, load)
    print_report(report if args.json else format_call_report(report))
    return EXIT_OK


def cmd_bench_soak(args: argparse.Namespace) -> int:
    load = machine_load()
    get_preset(args.preset)
    if not 1 <= args.sessions <= 64:
        raise UserError(f"--sessions {args.sessions} is invalid; allowed: 1 to 64")
    if not args.minutes > 0:
        raise UserError(f"--minutes {args.minutes:g} is invalid: must be > 0")
    if args.kill and not args.kill_every > 0:
        raise UserError(f"--kill-every {args.kill_every:g} is invalid: must be > 0 minutes")
    from services.cli.bench_soak import bench_soak, format_soak_report
    from services.cli.serve import parse_replicas

    parse_replicas(args.replicas)     # a bad entry is refused here, not after serve started
    report = bench_soak(args.preset, args.sessions, args.minutes, kill=args.kill, kill_every_min=args.kill_every,
                        buffer_ms=args.buffer_ms, config=args.config, log_dir=args.log_dir, progress=not args.quiet,
                        replicas=args.replicas)
    note_load(report, load)
    print_report(report if args.json else format_soak_report(report))
    return EXIT_OK


def cmd_bench_fuzz(args: argparse.Namespace) -> int:
    load = machine_load()
    if args.examples < 1:
        raise UserError(f"--examples {args.examples} is invalid: at least 1")
    from services.cli.bench_soak import bench_fuzz, format_fuzz_report

    report = bench_fuzz(args.preset, args.examples, seed=args.seed, log_dir=args.log_dir, progress=not args.quiet)
    note_load(report, load)
    print_report(report if args.json else format_fuzz_report(report))
    return EXIT_OK


def _output_flags(parser, what: str = "print the report as JSON") -> None:
    parser.add_argument("--json", action="store_true",
                        help=f"{what} (stdout: the JSON alone; progress and logs on stderr)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parser(commands) -> None:
    """Register `bench engine`, `decode`, `gpu`, `cluster`, `call`, `soak` and `fuzz` on the `facecast` subparsers."""
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
    engine.add_argument("--dtype", default=None, help=f"{', '.join(DTYPES)} (default: bfloat16 on CUDA, float32 "
                        "on CPU)")
    engine.add_argument("--compile", action="store_true", help="torch.compile the denoising step")
    engine.add_argument("--decoder", choices=("full", "fast"), default="full",
                        help="the VAE's decoder (full) or the fast one distilled from it")
    engine.add_argument("--sessions", type=int, default=1,
                        help="also batch this many sessions in one forward per step: through the session pool's view "
                             "and through the gathered path (default 1: no batch)")
    _output_flags(engine)
    engine.set_defaults(handler=cmd_bench_engine)
    decode = targets.add_parser("decode", help="streaming decode per chunk by decoder: the full VAE before and after "
                                               "its CPU convolution fix, and the fast decoder")
    decode.add_argument("--preset", default="talk128", help=f"{', '.join(PRESETS)} (default talk128: the trained one)")
    decode.add_argument("--chunks", type=int, default=6, help="measured chunks after one warm-up (default 6)")
    _output_flags(decode)
    decode.set_defaults(handler=cmd_bench_decode)
    gpu = targets.add_parser("gpu", help="wan-1.3b / wan-14b steps and the Wan2.1 VAE decode on one GPU against the "
                                         "FLOP bound, and the 1+1 / 4+1 layouts' projected FPS and TTFF")
    gpu.add_argument("--shapes", choices=("full", "tiny"), default="full",
                     help="full: the wan shapes (needs a GPU); tiny: the same code on tiny shapes (the CPU dry run)")
    gpu.add_argument("--device", default="auto")
    gpu.add_argument("--chunks", type=int, default=3, help="measured chunks per case after one warm-up (default 3)")
    gpu.add_argument("--no-compile", action="store_true", help="eager steps only (skip the compiled cases)")
    gpu.add_argument("--out", help="also write the JSON report to this file")
    gpu.add_argument("--table", help="also write the BENCHMARKS.md tables (Markdown) to this file")
    _output_flags(gpu, "print the JSON report instead of the tables")
    gpu.set_defaults(handler=cmd_bench_gpu)
    cluster = targets.add_parser("cluster", help="cluster vs engine overhead, disaggregated vs self-contained, "
                                                 "real-time sessions per score group with/without batching")
    cluster.add_argument("--preset", default="tiny", help=f"{', '.join(PRESETS)} (default tiny: CPU-sized)")
    cluster.add_argument("--chunks", type=int, default=8, help="chunks per measured stream (default 8)")
    cluster.add_argument("--max-sessions", type=int, default=6, help="largest concurrent load tried (default 6)")
    cluster.add_argument("--latent-transport", choices=("object_store", "collective"), default="object_store",
                         help="how the disaggregated layouts move latents to the VAEDecoder (default object_store)")
    cluster.add_argument("--decoder", choices=("full", "fast"), default="full",
                         help="the sessions' decoder (fast: the preset must ship one)")
    _output_flags(cluster)
    cluster.set_defaults(handler=cmd_bench_cluster)
    call = targets.add_parser("call", help="a scripted caller's turns on a local cluster: end of speech -> first "
                                           "avatar frame of the answer, p50/p95 (offline cascade or realtime peer)")
    call.add_argument("--turns", type=int, default=10, help="measured turns after one warm-up turn (default 10)")
    call.add_argument("--decoder", choices=("full", "fast"), default="fast",
                      help="the sessions' decoder (default fast)")
    call.add_argument("--mode", choices=("offline", "realtime"), default="offline",
                      help="offline: the on-server cascade (default); realtime: against the local protocol peer "
                           "(a scripted reply: what the avatar adds to the LLM's first audio)")
    _output_flags(call)
    call.set_defaults(handler=cmd_bench_call)
    soak = targets.add_parser("soak", help="N real-time sessions through `facecast serve` for M minutes: sessions "
                                           "lost, deadline attainment, stalls, time between chunks, memory slope")
    soak.add_argument("--preset", default="tiny", help=f"{', '.join(PRESETS)} (default tiny: CPU-sized)")
    soak.add_argument("--sessions", type=int, default=3, help="concurrent sessions (default 3)")
    soak.add_argument("--minutes", type=float, default=10.0, help="how long each session streams (default 10)")
    soak.add_argument("--kill", choices=DEPLOYMENT_NAMES, help="kill a replica of this deployment on a schedule")
    soak.add_argument("--kill-every", type=float, default=3.0, help="minutes between kills (default 3)")
    soak.add_argument("--replicas", action="append", metavar="DEPLOYMENT=N",
                      help="run N replicas of a deployment (`facecast serve --replicas`; repeatable): with --kill, "
                           "the killed replica's sessions move to a survivor")
    soak.add_argument("--buffer-ms", type=float, default=200.0, help="the viewer's jitter buffer (default 200)")
    soak.add_argument("--config", help="Serve config for `facecast serve` (default: its own)")
    soak.add_argument("--log-dir", default="out", help="where the server's log goes (default out/)")
    _output_flags(soak)
    soak.set_defaults(handler=cmd_bench_soak)
    fuzz = targets.add_parser("fuzz", help="the hostile-input property test, longer, against `facecast serve`")
    fuzz.add_argument("--preset", default="tiny", help=f"{', '.join(PRESETS)} (default tiny)")
    fuzz.add_argument("--examples", type=int, default=3000, help="hostile calls (default 3000; the test runs 150)")
    fuzz.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    fuzz.add_argument("--log-dir", default="out", help="where the server's log goes (default out/)")
    _output_flags(fuzz)
    fuzz.set_defaults(handler=cmd_bench_fuzz)
