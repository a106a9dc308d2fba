"""`facecast eval`: how well videos follow their speech, on held-out clips of the world, as JSON.

    facecast eval [--checkpoint C] [--json]          the engine's videos (default: the preset's weights)
    facecast eval --video teacher [--checkpoint T]   the bidirectional teacher (12 steps x CFG = 24 NFE)
    facecast eval --video truth | frozen | swap | shift:K      the calibration cases (ceiling, floors, lags)
    facecast eval --video vae                        the truth through the preset's VAE (what it keeps of the mouth)
    facecast eval --horizon SECONDS [--window S] [--streams N]   N sessions (default 3), each streaming SECONDS of
                                                     speech (a held-out clip's audio looped), scored on windows of
                                                     whole loops (~S seconds) at the start and the end
    facecast eval --ablate sink | rope               the engine without the Adaptive Attention Sink (the reference
                                                     stays the sink) or without Rolling RoPE (absolute positions)
    facecast eval --vae-report [--vae DIR] [--frames N]   the VAE's reconstruction of held-out clips, and per
                                                          16-frame block along the stream

Defaults: preset talk128, the held-out set out/world/eval-128 (made first if missing), the shipped probe
checkpoints/lipsync-probe.safetensors. Keys: sync_r, sync_lag_frames, silence_motion, identity, psnr, ssim,
landmark_sync_r (with the `eval` extra), listening_change, speaking_change (the mouth box's pixels, frame to frame),
per_style, clips, wall_s, weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model_core.checkpoint import CheckpointError
from model_core.shipped import LIPSYNC_PROBE, shipped_path
from services.cli.common import EXIT_OK, UserError, print_report
from services.cli.world import default_dir

DEFAULT_PROBE = str(shipped_path(LIPSYNC_PROBE))
DEFAULT_EVAL_COUNT = 48
DEFAULT_STREAMS = 3
"""`--horizon`'s sessions: one session's lip sync on one window moves a few per cent from sampling noise alone
(BENCHMARKS: the same session on the same speech 16 s apart, +0.4 % and -4.4 %); the mean of three is steadier."""
ABLATIONS = {"sink": {"adaptive_sink": False}, "rope": {"rolling_rope": False}}
"""`--ablate NAME`: the session settings that switch one of the student's streaming mechanisms off."""


def _eval_source(data: str | None, seed: int, size: int):
    from model_core.world.split import WorldSplit
    from model_core.world.store import ShardSource, WorldSource, is_complete, open_source, write_shards

    if data:
        source = open_source(data, seed=seed, size=size)
    else:
        path = default_dir("eval", size)
        if not is_complete(path):
            print(f"making the held-out clips first: {path} ({DEFAULT_EVAL_COUNT} clips)")
            write_shards(path, WorldSource(WorldSplit(seed), "eval", DEFAULT_EVAL_COUNT, size))
        source = ShardSource(path)
    if isinstance(source, ShardSource) and source.stale:
        raise UserError(f"{source.directory} was made by another version of the world (its truth would not match); "
                        "delete it and run again")
    part = source.manifest.get("part") if isinstance(source, ShardSource) else getattr(source, "part", None)
    if part == "train":
        raise UserError("--data is a training set: evaluate on held-out clips (world:eval or an eval shard dir)")
    return source


def cmd_eval(args: argparse.Namespace) -> int:
    from model_core.config import get_preset
    from model_core.evaluate import check_video, evaluate
    from model_core.training.probe_stage import load_probe

    try:
        check_video(args.video)
    except ValueError as error:
        raise UserError(f"--video: {error}") from None
    preset = get_preset(args.preset)
    if args.horizon is not None:
        if args.video != "model":
            raise UserError(f"--horizon streams long sessions of the engine: it needs --video model, not --video "
                            f"{args.video}")
        if args.window <= 0 or args.horizon < 2 * args.window:
            raise UserError(f"--horizon {args.horizon:g} is invalid: at least two --window spans "
                            f"({2 * max(args.window, 0):g} s; --window must be > 0)")
        for mark in args.at or ():
            if not args.window <= mark <= args.horizon - 2 * args.window:
                raise UserError(f"--at {mark:g} is invalid: allowed {args.window:g} to "
                                f"{args.horizon - 2 * args.window:g} s (after the first window, a window before the "
                                "last)")
        args.streams = DEFAULT_STREAMS if args.streams is None else args.streams
        if args.streams < 1:
            raise UserError(f"--streams {args.streams} is invalid: at least 1 session")
    elif args.at:
        raise UserError("--at scores a window of a long run: it needs --horizon SECONDS")
    elif args.streams is not None:
        raise UserError("--streams sets the sessions of a long run: it needs --horizon SECONDS")
    if args.listen and (args.video != "model" or args.horizon is not None):
        raise UserError("--listen sets the streaming engine's character listening where the clip's truth says so: it "
                        "needs --video model and no --horizon")
    if args.vae and args.decoder != "full":
        raise UserError("--vae DIR replaces the preset's VAE; its fast decoder belongs to the preset's VAE: use "
                        "--decoder full")
    if args.vae and not args.vae_report:     # the score model and the truth in another VAE's latent space
        import dataclasses

        if not Path(args.vae).is_dir():
            raise UserError(f"--vae {args.vae}: not a VAE directory (`facecast train vae --export DIR` makes one)")
        preset = dataclasses.replace(preset, vae_weights=str(Path(args.vae).resolve()))
    if args.ablate:
        if args.video != "model":
            raise UserError(f"--ablate {args.ablate} switches off a mechanism of the streaming engine: it needs "
                            f"--video model, not --video {args.video}")
        import dataclasses

        preset = dataclasses.replace(preset, stream=preset.stream.replace(**ABLATIONS[args.ablate]))
    source = _eval_source(args.data, args.seed, preset.stream.height)
    if args.vae_report:
        return _vae_report(args, preset, source)
    probe = load_probe(args.probe)
    engine, weights = None, None
    if args.video == "teacher":
        engine, weights = _teacher_sampler(args, preset)
    elif args.video in ("model", "vae"):
        from model_core.engine import AvatarEngine

        try:
            engine = AvatarEngine.from_preset(preset, checkpoint=args.checkpoint, seed=args.seed,
                                              decoder=args.decoder, fast_decoder=args.fast_decoder)
        except (CheckpointError, FileNotFoundError) as error:
            raise UserError(f"--fast-decoder: {error}" if args.fast_decoder else str(error)) from None
        # --video vae scores the truth through the VAE alone: the score model's weights play no part
        shipped = f"the {preset.name} preset's VAE ({preset.vae_weights or 'random weights'})"
        weights = engine.weights_note if args.video == "model" else (args.vae or args.checkpoint or shipped)
    try:
        if args.horizon is not None:
            from model_core.evaluate import horizon

            report = horizon(source, probe, engine, args.horizon, window_s=args.window, seed=args.seed,
                             progress=True, at=tuple(args.at or ()), streams=args.streams)
        else:
            report = evaluate(source, probe, args.video, engine=engine, clips=args.clips, seed=args.seed,
                              progress=True, listen=args.listen)
    except ValueError as error:
        raise UserError(f"--horizon: {error}" if args.horizon is not None else str(error)) from None
    report["weights"] = weights
    if args.ablate:
        report["ablation"] = {"sink": "no Adaptive Attention Sink", "rope": "no Rolling RoPE"}[args.ablate]
    print_report(report, indent=None if args.json else 1)
    return EXIT_OK


def _teacher_sampler(args: argparse.Namespace, preset):
    from model_core.audio import AudioConfig, AudioFrontend
    from model_core.checkpoint import audio_backend_of, load_facecast_checkpoint
    from model_core.evaluate import TeacherSampler
    from model_core.models import build_vae
    from model_core.shipped import TALK128_TEACHER

    path = args.checkpoint or str(shipped_path(TALK128_TEACHER))
    try:
        teacher, metadata, _ = load_facecast_checkpoint(path)
        vae = build_vae(preset, checkpoint=None, device="cpu", seed=args.seed)
    except CheckpointError as error:
        raise UserError(f"--checkpoint: {error} (train the teacher with `facecast train teacher`)") from None
    if metadata.get("stage") != "teacher":
        raise UserError(f"--checkpoint: {path} is a {metadata.get('stage', 'non-teacher')!r} checkpoint; "
                        "--video teacher samples the bidirectional teacher")
    frontend = AudioFrontend(AudioConfig(backend=audio_backend_of(metadata), fps=preset.stream.fps))
    return (TeacherSampler(teacher.float(), vae, frontend, steps=args.teacher_steps, guidance=args.guidance,
                           seed=args.seed), f"weights: {path} (teacher, {args.teacher_steps} steps x CFG "
                                            f"{args.guidance})")


def _vae_report(args: argparse.Namespace, preset, source) -> int:
    """Reconstruction of held-out clips through the preset's VAE (or --vae DIR): PSNR/SSIM overall, per style and on
    the mouth region, and the streaming decode's cost per frame on this machine."""
    from model_core.models import build_vae
    from model_core.training.vae_stage import reconstruction_report
    from model_core.vae import StreamingVAE

    if args.frames < 1 or (args.frames - 1) % 4:
        raise UserError(f"--frames={args.frames} is invalid: 1 + 4k frames (5, 9, ..., 25, ..., 97)")
    vae = StreamingVAE.from_pretrained(args.vae) if args.vae else build_vae(preset, checkpoint=args.checkpoint,
                                                                             device="cpu", seed=args.seed)
    fast = None
    if args.decoder == "fast":
        from model_core.models import build_fast_decoder

        try:
            fast = build_fast_decoder(preset, vae, path=args.fast_decoder)
        except (CheckpointError, FileNotFoundError) as error:
            raise UserError(f"--fast-decoder: {error}") from None
        if fast is None:
            raise UserError(f"--decoder fast: preset {preset.name!r} has no fast decoder for this VAE; train one with "
                            "`facecast train fast-decoder` or pass --fast-decoder DIR")
    report = reconstruction_report(vae, source, clips=args.clips, length=args.frames, fast=fast)
    report["vae"] = args.vae or preset.vae_weights or "random"
    print_report(report, indent=None if args.json else 1)
    return EXIT_OK


def add_parser(commands) -> None:
    """Register `eval` on the `facecast` subparsers."""
    parser = commands.add_parser("eval", help="lip-sync, identity and image scores on held-out clips (JSON)")
    parser.add_argument("--checkpoint", help="facecast checkpoint to evaluate (default: the preset's weights)")
    parser.add_argument("--preset", default="talk128")
    parser.add_argument("--video", default="model",
                        help="what to score: model (default), teacher, truth, vae (the truth through the VAE), "
                             "frozen, swap or shift:K")
    parser.add_argument("--teacher-steps", type=int, default=12, help="--video teacher: Euler steps (default 12)")
    parser.add_argument("--guidance", type=float, default=2.0,
                        help="--video teacher: classifier-free guidance on the audio (default 2.0)")
    parser.add_argument("--data", help="held-out clips: an eval shard directory or world:eval "
                                       "(default out/world/eval-128, made if missing)")
    parser.add_argument("--probe", default=DEFAULT_PROBE, help=f"lip-sync probe (default {DEFAULT_PROBE})")
    parser.add_argument("--clips", type=int, default=12,
                        help="single-character clips to score, taken round-robin over the styles (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="world seed (must match the eval set's)")
    parser.add_argument("--json", action="store_true", help="the report as one line of JSON: stdout carries it "
                        "alone (progress bars and logs on stderr)")
    parser.add_argument("--vae-report", action="store_true",
                        help="instead: the VAE's reconstruction of held-out clips (PSNR/SSIM, mouth, decode ms)")
    parser.add_argument("--vae", help="a VAE directory in the preset's place (default: the preset's): for "
                        "--vae-report, "
                        "and for the videos (the score model, the teacher and the truth in its latent space)")
    parser.add_argument("--decoder", choices=("full", "fast"), default="full",
                        help="decode with the VAE's decoder (full, the reference) or the fast one distilled from it; "
                             "with --vae-report, fast adds its scores against the full decoder and its cost")
    parser.add_argument("--fast-decoder", metavar="DIR", help="a fast decoder directory (default: the preset's "
                                                               "shipped one)")
    parser.add_argument("--horizon", type=float, metavar="SECONDS",
                        help="the long horizon: stream SECONDS of speech through --streams sessions and score the "
                             "first and last window of each (the video is not kept in between)")
    parser.add_argument("--window", type=float, default=10.0,
                        help="--horizon: seconds scored at each end, rounded to whole loops of the clip so every "
                             "window hears the same speech (default 10)")
    parser.add_argument("--streams", type=int,
                        help="--horizon: sessions, one after another, each on its own held-out clip and character "
                             "(round-robin over the styles); each window's metrics are their mean "
                             f"(default {DEFAULT_STREAMS})")
    parser.add_argument("--at", type=float, action="append", metavar="SECONDS",
                        help="--horizon: also score the window starting at SECONDS (repeatable), e.g. --horizon 3600 "
                             "--at 1000")
    parser.add_argument("--ablate", choices=sorted(ABLATIONS),
                        help="score the engine with one streaming mechanism off: sink (the reference stays the "
                             "attention sink) or rope (absolute positions instead of Rolling RoPE)")
    parser.add_argument("--listen", action="store_true",
                        help="set the character not speaking where the clip's truth says it listens, as a call sets "
                             "its avatar between replies (silence mode, with the session's listening hold)")
    parser.add_argument("--frames", type=int, default=25,
                        help="with --vae-report: frames of each clip streamed through the VAE (default 25; "
                             "psnr_by_block shows each 16-frame block)")
    parser.set_defaults(handler=cmd_eval)
