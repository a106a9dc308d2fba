"""`facecast train vae | probe | teacher | student | all`: training through Ray Train, resumable, with progress bars.

    facecast train vae                    the talk128 VAE on out/world/train-128 (made first if missing):
                                          `--phase full` (encoder and decoder from scratch), then `--phase
                                          decoder` (the decoder alone, further, on the frozen encoder's latents),
                                          then `--phase motion` (the decoder again, with a frame-to-frame term)
    facecast train probe                  the lip-sync probe (mouth opening + identity embedding)
    facecast train teacher                the bidirectional audio-conditioned teacher on the clips' latents
                                          (out/latents/train-128, encoded with the shipped VAE first if missing):
                                          the shipped teacher's runs in turn (`--phase base`, then `mouth`,
                                          `mouth2`, ...), each from the last one's weights with a fresh optimiser
    facecast train student                the 2-step causal student: `--phase init` (the teacher's ODE pairs,
                                          then regression onto them) and `--phase distill` (DMD with
                                          self-forcing); both in turn by default, each a resumable run
    facecast train fast-decoder           the fast streaming decoder distilled from the VAE's (on the latent cache)
    facecast train all [--profile tiny|cpu|gpu]  every stage in order into one folder, then the eval
                                          (services/cli/pipeline.py)
    --workers N --gpu                     data-parallel (DDP) on N GPU workers; on a cluster set RAY_ADDRESS
    --steps / --run-dir / --export        how long, where the resumable state lives, where the weights go

Interrupt it and run the same command again: it resumes from the run directory's last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from model_core.shipped import (LIPSYNC_PROBE, TALK128_FAST_DECODER, TALK128_STUDENT, TALK128_TEACHER, TALK128_VAE,
                                shipped_path)
from services.cli.common import EXIT_OK, UserError
from services.cli.world import default_dir

DEFAULTS = {
    "vae": {"steps": None, "export": str(shipped_path(TALK128_VAE))},
    "probe": {"steps": 1500, "export": str(shipped_path(LIPSYNC_PROBE))},
    "teacher": {"steps": None, "export": str(shipped_path(TALK128_TEACHER))},
    "student": {"steps": None, "export": str(shipped_path(TALK128_STUDENT))},
    "fast-decoder": {"steps": 1500, "export": str(shipped_path(TALK128_FAST_DECODER))},
}
COMMANDS = tuple(DEFAULTS)


class Phase(NamedTuple):
    """One run of `facecast train student` or `vae`: each phase starts from the previous one's export."""
    stage: str
    """The driver stage (`services.train.driver.STAGES`)."""
    steps: int
    export: str
    """Where it leaves its weights (the table's last phase: the shipped checkpoint, or `--export`)."""
    run: str
    """Its run directory under --run-dir."""
    recipe: Mapping[str, float] = MappingProxyType({})
    """TrainRequest fields it sets (`--learning-rate` / `--motion-weight` override them)."""


PHASES = {  # `facecast train student`
    "init": Phase("student-init", 1200, "<run-dir>/student-init/student-init.safetensors", "student-init"),
    "distill": Phase("distill", 3000, str(shipped_path(TALK128_STUDENT)), "distill"),
}
VAE_PHASES = {  # `facecast train vae`: the encoder and decoder from scratch, then the decoder alone (the latent space
    # stays): further on the frozen encoder's latents, then with the frame-to-frame term at a lower rate, which keeps a
    # listening face still through the decoder (BENCHMARKS, "Why the face is not still while the avatar listens"), then
    # on noisy latents, so it draws a score model's samples as it draws the encoder's (BENCHMARKS, "Where the lip sync
    # was lost, a decoder for the score model's latents, ...")
    "full": Phase("vae", 2000, "<run-dir>/vae/vae-full", "vae"),
    "decoder": Phase("vae-decoder", 1800, "<run-dir>/vae-decoder/vae-decoder", "vae-decoder"),
    "motion": Phase("vae-decoder", 1200, "<run-dir>/vae-motion/vae-motion", "vae-motion",
                    MappingProxyType({"motion_weight": 1.0, "learning_rate": 3e-4})),
    "noise": Phase("vae-decoder", 1200, str(shipped_path(TALK128_VAE)), "vae-noise",
                   MappingProxyType({"motion_weight": 1.0, "learning_rate": 3e-4, "latent_noise": 0.5})),
}
TEACHER_PHASES = {  # `facecast train teacher`: (steps, recipe); runs in <run-dir>/teacher-<phase>, each phase from
    # the previous phase's export (a fresh optimiser and warm-up: the rate schedule restarts). Each run <= 60 min on one
    # core of this CPU; together they are the shipped teacher (checkpoints/MODEL_CARD.md). Phase listen grows the model
    # the per-frame audio injection (`TEACHER_SHAPE` keys: the DiT's shape, not TeacherTrainConfig's), which starts at
    # zero: the teacher of mouth2, trained further with a direct path from each frame's audio window.
    "base": (3000, {}),
    "mouth": (2000, {"mouth_weight": 16.0, "learning_rate": 2e-4}),
    "mouth2": (6000, {"mouth_weight": 16.0, "learning_rate": 2e-4}),
    "listen": (6000, {"mouth_weight": 16.0, "learning_rate": 2e-4, "audio_injection_dim": 32}),
    # Phase hear: a new speech encoder (Whisper base, `model_core.audio_whisper`) in place of the log-mel features,
    # which carry the voice: the first audio layer starts at zero and the model learns to hear the new features
    # (BENCHMARKS, "A speech encoder that hears every voice"). Its latents are a second cache (`latents_for`).
    "hear": (6000, {"mouth_weight": 16.0, "learning_rate": 2e-4, "audio_injection_dim": 32,
                    "audio_backend": "whisper-ct2"}),
}
TEACHER_SHAPE = ("audio_injection_dim", "audio_backend")
"""Recipe keys of TEACHER_PHASES that set the DiT's shape (`DiTConfig`; the front end sets its `audio_dim`), not the
training config."""
PAIRS = {"count": 1024, "teacher_steps": 12, "guidance": 3.5}
RECIPE_FLAGS = {  # flag: (the stages it applies to, lowest, highest or None, what the bound means)
    "--interior-weight": (("vae",), 0, None, "0: off"),
    "--mouth-weight": (("teacher",), 0, None, "0: no extra weight"),
    "--motion-weight": (("vae",), 0, None, "0: off"),
    "--latent-noise": (("vae",), 0, None, "0: off"),
    "--guidance": (("student",), 1, 20, "1: no guidance"),
    "--voice-augment": (("teacher", "student"), 0, 4, "0: off"),
}
DEFAULT_LATENTS = Path("out") / "latents" / "train-128"


def latents_for(latents: str | Path, backend: str) -> Path:
    """The latent cache of one audio front end: `latents` itself for log-mel (every phase before hear), a sibling
    `<latents>-<backend>` for another (the same latents, that front end's features)."""
    return Path(latents) if backend == "logmel" else Path(f"{latents}-{backend}")


def stage_audio_backend(args: argparse.Namespace, stage: str, teacher: str, student: str | None) -> str:
    """The audio front end a DiT stage trains on: a teacher phase's recipe (`audio_backend`, else log-mel); the
    student's phases hear what their teacher heard, the fast decoder what its student hears."""
    from model_core.checkpoint import CheckpointError, audio_backend_of, read_facecast_metadata

    if stage == "teacher":
        return getattr(args, "audio_backend", None) or "logmel"
    source = teacher if stage in ("student-init", "distill") else student
    try:
        return audio_backend_of(read_facecast_metadata(source)) if source and Path(source).is_file() else "logmel"
    except CheckpointError as error:
        raise UserError(f"--{'teacher' if source == teacher else 'student'}: {error}") from None


def _teacher_default(name: str):
    from model_core.training.teacher_stage import TeacherTrainConfig

    return getattr(TeacherTrainConfig(), name)


def _ensure_world(data: str, count: int, seed: int) -> None:
    """The default dataset is made on first use (resumable, with its own progress bar)."""
    path = Path(data)
    from model_core.world.split import WorldSplit
    from model_core.world.store import MANIFEST, WorldSource, is_complete, write_shards

    if data.startswith("world:") or is_complete(path):
        return
    if path.exists() and not (path / MANIFEST).is_file():
        return  # a folder of real videos: used as it is

    print(f"making the training clips first: {path} ({count} clips)")
    try:
        write_shards(path, WorldSource(WorldSplit(seed), "train", count, 128), workers=os.cpu_count() or 1)
    except ValueError as error:
        raise UserError(f"--data: {error}") from None


def _ensure_latents(data: str, latents: str, preset_name: str, count: int, seed: int,
                    vae_dir: str | None = None, backend: str = "logmel") -> None:
    """The DiT stages train on the clips' latents, encoded once with `vae_dir` or the preset's shipped VAE and the
    audio front end `backend` (resumable)."""
    from model_core.audio import AudioConfig, AudioFrontend
    from model_core.checkpoint import CheckpointError
    from model_core.config import get_preset
    from model_core.models import build_vae
    from model_core.training.latents import LatentSource, build_latent_cache, is_latent_cache_complete
    from model_core.vae import StreamingVAE
    from model_core.world.store import open_source

    preset = get_preset(preset_name)
    try:
        vae = StreamingVAE.from_pretrained(vae_dir) if vae_dir else build_vae(preset, checkpoint=None, device="cpu",
                                                                               seed=0)
    except (CheckpointError, FileNotFoundError) as error:
        raise UserError(f"--vae: {error}" if vae_dir else str(error)) from None
    if is_latent_cache_complete(Path(latents)):
        try:  # here, before Ray starts: a stale cache is one line, not a worker's traceback
            cache = LatentSource(latents)
            cache.check_vae(vae)
        except ValueError as error:
            raise UserError(f"--latents: {error} (delete it, or pass the --vae it was encoded with)") from None
        try:
            cache.check_frontend(backend)
        except ValueError as error:
            raise UserError(f"--latents: {error}") from None
        return
    print(f"encoding the training clips into latents first: {latents}")
    try:
        source = open_source(data, seed=seed, count=count, size=preset.stream.height)
        frontend = AudioFrontend(AudioConfig(backend=backend, fps=preset.stream.fps))
        build_latent_cache(source, vae, frontend, preset.dit, latents, seed=seed)
    except ValueError as error:
        raise UserError(f"--latents: {error}") from None


def _ensure_pairs(teacher: str, latents: str, pairs: str, seed: int, count: int = PAIRS["count"],
                  guidance: float = PAIRS["guidance"]) -> None:
    """The teacher's ODE pairs for the student's initialisation (resumable: an interrupted file is continued)."""
    from model_core.checkpoint import CheckpointError, load_facecast_checkpoint
    from model_core.training.latents import LatentSource
    from model_core.training.student_stage import StudentInitConfig, make_ode_pairs

    if not Path(teacher).is_file():
        raise UserError(f"--teacher: {teacher} does not exist; train it first with `facecast train teacher`")
    try:
        model = load_facecast_checkpoint(teacher)[0].float()
    except CheckpointError as error:
        raise UserError(f"--teacher: {error}") from None
    config = StudentInitConfig()
    Path(pairs).parent.mkdir(parents=True, exist_ok=True)
    try:
        make_ode_pairs(model, LatentSource(latents), pairs, count=count, frames=config.frames,
                       steps=config.steps, shift=config.shift, teacher_steps=PAIRS["teacher_steps"],
                       guidance=guidance, seed=seed)
    except ValueError as error:
        raise UserError(f"--pairs: {error}") from None


def cmd_train(args: argparse.Namespace) -> int:
    stage = args.stage
    if stage == "all":
        from services.cli.pipeline import check_profile, run_pipeline

        given = [flag for flag, value in (("--steps", args.steps), ("--export", args.export), ("--phase", args.phase),
                                          ("--data", args.data), ("--latents", args.latents), ("--vae", args.vae),
                                          ("--teacher", args.teacher), ("--student", args.student),
                                          ("--pairs", args.pairs), ("--opening-weight", args.opening_weight),
                                          ("--interior-weight", args.interior_weight),
                                          ("--history-corrupt", args.history_corrupt), ("--init", args.init),
                                          ("--mouth-weight", args.mouth_weight), ("--guidance", args.guidance),
                                          ("--motion-weight", args.motion_weight),
                                          ("--voice-augment", args.voice_augment),
                                          ("--latent-noise", args.latent_noise))
                 if value is not None]
        if given:
            raise UserError(f"{', '.join(given)}: not for `facecast train all`, which makes every input itself "
                            "(choose --profile and --run-dir)")
        check_profile(args.profile)
        return run_pipeline(args)
    if args.profile != "cpu":
        raise UserError(f"--profile applies to `facecast train all` only, not {stage!r}")
    if args.opening_weight is not None:
        if stage != "vae" or args.phase == "decoder":
            raise UserError(f"--opening-weight applies to `facecast train vae` (its phase full), not "
                            f"{' '.join([stage] + (['--phase', args.phase] if args.phase else []))}")
        if args.opening_weight < 0:
            raise UserError(f"--opening-weight {args.opening_weight:g} is invalid: at least 0 (0: off)")
    if args.history_corrupt is not None:
        if stage != "student" or args.phase != "distill":
            raise UserError("--history-corrupt applies to `facecast train student --phase distill`")
        if not 0 <= args.history_corrupt <= 1:
            raise UserError(f"--history-corrupt {args.history_corrupt:g} is invalid: allowed 0 to 1 (0: off)")
    for flag, (applies_to, low, high, meaning) in RECIPE_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if stage not in applies_to:
            raise UserError(f"{flag} applies to {' and '.join(f'`facecast train {s}`' for s in applies_to)}, "
                            f"not {stage}")
        if value < low or (high is not None and value > high):
            bounds = f"allowed {low:g} to {high:g}" if high is not None else f"at least {low:g}"
            raise UserError(f"{flag} {value:g} is invalid: {bounds} ({meaning})")
    if args.init is not None:
        if stage != "teacher":
            raise UserError(f"--init applies to `facecast train teacher`, not {stage}")
        if not Path(args.init).is_file():
            raise UserError(f"--init: {args.init} does not exist (a teacher checkpoint to train further)")
    if stage == "teacher":
        if args.phase and args.phase not in TEACHER_PHASES:
            raise UserError(f"--phase={args.phase!r} is not a phase of `facecast train teacher`; allowed: "
                            f"{', '.join(TEACHER_PHASES)}")
        if not args.phase and args.steps is not None:
            raise UserError(f"--steps applies to one phase: add --phase {' or --phase '.join(TEACHER_PHASES)}")
        return run_teacher(args, Path(args.run_dir or Path("out") / "train"),
                           args.export or DEFAULTS["teacher"]["export"], [args.phase] if args.phase else None)
    table = {"student": PHASES, "vae": VAE_PHASES}.get(stage)
    if table is None:
        if args.phase:
            raise UserError(f"--phase applies to `facecast train student` and `vae` only, not {stage!r}")
        steps = args.steps if args.steps is not None else DEFAULTS[stage]["steps"]
        if stage == "fast-decoder" and args.vae and not args.export:
            raise UserError("--vae: a fast decoder for another VAE needs its own --export (the default is the "
                            "shipped VAE's fast decoder)")
        return _run(args, stage, steps, args.export or DEFAULTS[stage]["export"],
                    args.run_dir or str(Path("out") / "train" / stage))
    if args.phase and args.phase not in table:
        raise UserError(f"--phase={args.phase!r} is not a phase of `facecast train {stage}`; allowed: "
                        f"{', '.join(table)}")
    phases = [args.phase] if args.phase else list(table)
    if len(phases) > 1 and args.steps is not None:
        raise UserError(f"--steps applies to one phase: add --phase {' or --phase '.join(table)}")
    root = Path(args.run_dir or Path("out") / "train")
    names = list(table)
    decoder_flags = [flag for flag, value in (("--motion-weight", args.motion_weight),
                                              ("--latent-noise", args.latent_noise)) if value is not None]
    if stage == "vae" and ((args.vae and phases[0] == "full") or (decoder_flags and phases == ["full"])):
        flag = "--vae" if args.vae and phases[0] == "full" else decoder_flags[0]
        raise UserError(f"{flag} applies to the decoder phases of `facecast train vae` (--phase "
                        f"{' or '.join(names[1:])}), not to phase full")
    if args.export and len(phases) == 1 and phases[0] != names[-1]:
        following = names[names.index(phases[0]) + 1]
        raise UserError(f"--export applies to phase {names[-1]}, not {phases[0]}: phase {phases[0]} leaves its "
                        f"weights in {phase_export(root, table, phases[0])} for phase {following}")
    for position, phase in enumerate(phases):
        spec = table[phase]
        index = names.index(phase)
        run_dir = root / spec.run
        steps = args.steps if args.steps is not None else spec.steps
        export = phase_export(root, table, phase) if index < len(names) - 1 else args.export or spec.export
        values = {name: getattr(args, name) if getattr(args, name, None) is not None else spec.recipe.get(name)
                  for name in ("learning_rate", "motion_weight", "latent_noise")}
        run_args = argparse.Namespace(**{**vars(args), **values})
        if spec.stage == "vae-decoder":  # the decoder trained further on a finished VAE: --vae, or the phase before
            previous = phase_export(root, table, names[index - 1])
            source = args.vae if args.vae and position == 0 else previous
            if not (Path(source) / "config.json").is_file():
                raise UserError(f"--vae: {source} is not a VAE directory; run `facecast train vae --phase "
                                f"{names[index - 1]}` first, or pass the finished VAE whose decoder to train")
            _run(run_args, spec.stage, steps, export, str(run_dir), vae_source=source)
        else:
            _run(run_args, spec.stage, steps, export, str(run_dir),
                 init_export=phase_export(root, PHASES, "init"))
    return EXIT_OK


def phase_export(root: Path, table: dict, phase: str) -> str:
    """Where a phase of `table` that feeds the next one leaves its weights (its export, in its run directory)."""
    return str(root / table[phase].export.removeprefix("<run-dir>/"))


def teacher_phase_export(root: Path, phase: str) -> Path:
    """Where a teacher phase that is not the last one leaves its weights (the next phase's `--init`)."""
    return root / f"teacher-{phase}" / "teacher.safetensors"


def run_teacher(args: argparse.Namespace, root: Path, export: str, phases: list[str] | None = None,
                steps: dict | None = None) -> int:
    """`phases` of TEACHER_PHASES in turn (default all), each in <root>/teacher-<phase> and from the previous
    phase's weights; the last phase of the table writes `export`. `--learning-rate` / `--mouth-weight` override every
    phase's recipe, `--init` is the first phase run's starting point, `steps` (phase -> steps) each phase's length."""
    names = list(TEACHER_PHASES)
    phases = phases or names
    for position, phase in enumerate(phases):
        index = names.index(phase)
        default_steps, recipe = TEACHER_PHASES[phase]
        init = args.init if position == 0 else None
        if init is None and index > 0:
            init = str(teacher_phase_export(root, names[index - 1]))
            if not Path(init).is_file():
                raise UserError(f"--phase {phase} starts from phase {names[index - 1]}'s teacher, {init}, which does "
                                f"not exist: run `facecast train teacher --phase {names[index - 1]}` first, or pass "
                                "--init")
        values = {name: getattr(args, name) if getattr(args, name, None) is not None else recipe.get(name)
                  for name in ("learning_rate", "mouth_weight", "audio_injection_dim", "audio_backend", "decay_from")}
        last = index == len(names) - 1 or (len(phases) == 1 and getattr(args, "export", None))
        run_args = argparse.Namespace(**{**vars(args), **values, "init": init})
        count = (steps or {}).get(phase) or getattr(args, "steps", None) or default_steps
        _run(run_args, "teacher", count, export if last else str(teacher_phase_export(root, phase)),
             str(root / f"teacher-{phase}"))
    return EXIT_OK


def _run(args: argparse.Namespace, stage: str, steps: int, export: str, run_dir: str,
         init_export: str | None = None, vae_source: str | None = None) -> int:
    from services.train.driver import LATENT_STAGES, TrainRequest, train

    data = args.data or str(default_dir("train"))
    takes_vae = stage in LATENT_STAGES or stage == "vae-decoder"   # fast-decoder: the VAE it is distilled from
    teacher = args.teacher or DEFAULTS["teacher"]["export"]
    pairs = args.pairs or str(Path(init_export or "").parent / "ode-pairs.pt")
    extra = {}
    if stage in ("student-init", "distill"):
        extra = {"teacher": teacher, "pairs": pairs}
    if stage == "distill":
        extra["student"] = args.student or init_export
    if stage == "fast-decoder":
        if args.vae and not args.student:
            raise UserError("--vae: a fast decoder for another VAE needs --student, a streaming student trained in "
                            "that VAE's latent space (its streams are half of what the decoder learns from)")
        extra["student"] = args.student or DEFAULTS["student"]["export"]
        if not Path(extra["student"]).is_file():
            raise UserError(f"--student: {extra['student']} does not exist (the streaming student whose latents the "
                            "fast decoder serves; `facecast train student` makes it)")
    backend = stage_audio_backend(args, stage, teacher, extra.get("student"))
    latents = str(latents_for(args.latents or DEFAULT_LATENTS, backend)) if stage in LATENT_STAGES else None
    if getattr(args, "voice_augment", None) and backend != "logmel":
        raise UserError(f"--voice-augment reshapes log-mel features; this {stage} run hears {backend!r} features "
                        "(a speech encoder's, which need no voice augmentation)")
    if getattr(args, "opening_weight", None) is not None and stage == "vae":
        extra["opening_weight"] = args.opening_weight
    if getattr(args, "history_corrupt", None) is not None and stage == "distill":
        extra["history_corrupt"] = args.history_corrupt
    for name, stages in (("init", ("teacher",)), ("mouth_weight", ("teacher",)), ("guidance", ("distill",)),
                         ("voice_augment", ("teacher", "student-init", "distill")),
                         ("audio_injection_dim", ("teacher",)), ("decay_from", ("teacher",))):
        if getattr(args, name, None) is not None and stage in stages:
            extra[name] = getattr(args, name)
    if getattr(args, "interior_weight", None) is not None and stage in ("vae", "vae-decoder"):
        extra["interior_weight"] = args.interior_weight
    for name in ("motion_weight", "latent_noise"):
        if getattr(args, name, None) is not None and stage == "vae-decoder":
            extra[name] = getattr(args, name)
    try:
        request = TrainRequest(stage=stage, data=data, run_dir=run_dir, steps=steps, export=export,
                               workers=args.workers, gpu=args.gpu, batch_size=args.batch_size,
                               learning_rate=args.learning_rate, seed=args.seed, world_count=args.world_count,
                               checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                               latents=latents, vae=vae_source or (args.vae if takes_vae else None), **extra)
    except ValueError as error:
        raise UserError(str(error)) from None
    if args.gpu:
        import torch

        if not torch.cuda.is_available() and "RAY_ADDRESS" not in __import__("os").environ:
            raise UserError("--gpu: this machine has no CUDA device (on a cluster, set RAY_ADDRESS)")
    if stage == "distill" and not Path(extra["student"]).is_file():
        raise UserError(f"--student: {extra['student']} does not exist; run `facecast train student --phase init` "
                        "first")
    _ensure_world(data, args.world_count, args.seed)
    if latents:
        _ensure_latents(data, latents, request.preset, args.world_count, args.seed, request.vae, backend)
    if stage == "student-init":
        guidance = args.guidance if getattr(args, "guidance", None) is not None else PAIRS["guidance"]
        _ensure_pairs(teacher, latents, pairs, args.seed, args.pairs_count, guidance)
    metrics = train(request)
    print(json.dumps({"stage": stage, "run_dir": run_dir, "export": export, **metrics}, indent=1))
    return EXIT_OK


def add_parser(commands) -> None:
    """Register `train` on the `facecast` subparsers."""
    train = commands.add_parser("train", help="train a stage (vae, probe, teacher, student, fast-decoder) through "
                                              "Ray Train")
    train.add_argument("stage", choices=tuple(DEFAULTS) + ("all",),
                       help="one stage, or `all`: world, vae, probe, teacher, student and its eval in one command "
                            "(into --run-dir, default out/pipeline-<profile>)")
    train.add_argument("--data", help="world shard directory, world:train, or a folder of videos "
                                      "(default out/world/train-128, generated if missing)")
    train.add_argument("--steps", type=int, help="optimiser steps of one stage or phase (defaults: vae " +
                       " + ".join(f"{p} {v.steps}" for p, v in VAE_PHASES.items()) + ", " +
                       ", ".join(f"{k} {v['steps']}" for k, v in DEFAULTS.items() if v["steps"]) + ", teacher " +
                       " + ".join(f"{p} {v[0]}" for p, v in TEACHER_PHASES.items()) + ", student " +
                       " + ".join(f"{p} {v.steps}" for p, v in PHASES.items()) + ")")
    train.add_argument("--phase", help="one phase only (default all in turn): student init|distill, vae "
                                       f"{'|'.join(VAE_PHASES)}, teacher {'|'.join(TEACHER_PHASES)}")
    train.add_argument("--teacher", help=f"student: the teacher checkpoint (default {DEFAULTS['teacher']['export']})")
    train.add_argument("--student", help=f"student --phase distill: the initialised student (default "
                                         f"{PHASES['init'].export}); fast-decoder: the streaming student whose latents "
                                         f"it decodes (default {DEFAULTS['student']['export']})")
    train.add_argument("--pairs", help="student: the teacher's ODE pairs file (default "
                                       "<run-dir>/student-init/ode-pairs.pt, made first if missing)")
    train.add_argument("--run-dir", help="resumable state and log.jsonl (default out/train/<stage>; for teacher, "
                                         "student and vae the folder holding their phases' run directories, default "
                                         "out/train)")
    train.add_argument("--export", help="where the trained weights go (defaults: " +
                       ", ".join(f"{k} {v['export']}" for k, v in DEFAULTS.items()) + ")")
    train.add_argument("--workers", type=int, default=1, help="Ray Train workers (data-parallel; default 1)")
    train.add_argument("--gpu", action="store_true", help="one GPU per worker")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--learning-rate", type=float, help="the stage's peak rate (default: its recipe's; teacher: "
                       "3e-4 in phase base, 2e-4 after; vae: 1e-3, 3e-4 in phase motion)")
    train.add_argument("--opening-weight", type=float, help="vae: weight of the latent opening head's error (a linear "
                       "read-out of each frame's mouth opening from the latent at the mouth; default 0.1, the shipped "
                       "recipe; 0: off)")
    train.add_argument("--history-corrupt", type=float, help="student --phase distill: History Corrupt noise on the "
                       "cached keys/values (default 0.1; 0: the ablation without it)")
    train.add_argument("--interior-weight", type=float, help="vae: extra L1 weight on the pixels where the world draws "
                       "the mouth's inside (both phases; default 30, the shipped recipe; 0: off)")
    train.add_argument("--motion-weight", type=float, help="vae: weight of the frame-to-frame term in the decoder "
                       "phases (decoded against true change between frames; default "
                       f"{VAE_PHASES['motion'].recipe['motion_weight']:g} in phase motion, 0 before it; 0: off)")
    train.add_argument("--latent-noise", type=float, help="vae: the decoder phases' noise on the latents they draw "
                       "from, each sample's level up to this many standard deviations per channel (default "
                       f"{VAE_PHASES['noise'].recipe['latent_noise']:g} in phase noise, 0 before it; 0: off)")
    train.add_argument("--init", help="teacher: a teacher checkpoint the first phase run trains further (its weights; "
                                      "the optimiser starts fresh; default: random weights for phase base, the "
                                      "previous phase's teacher after it)")
    train.add_argument("--mouth-weight", type=float, help="teacher: extra weight on the mouth's latent cells in the "
                       f"velocity error (default {_teacher_default('mouth_weight'):g} in phase base, "
                       f"{TEACHER_PHASES['mouth'][1]['mouth_weight']:g} after)")
    train.add_argument("--guidance", type=float, help="student: classifier-free guidance on the teacher's audio, for "
                       f"the ODE pairs (init) and the real score (distill); default {PAIRS['guidance']:g}")
    train.add_argument("--voice-augment", type=float, help="teacher, student: strength of the voice augmentation "
                       "(each training sample's speech shifted along the mel axis, tilted and gained: voices the world "
                       "did not record; 1: shifts up to 4 mel bins, tilt and gain up to 6 dB; 0: off; default: the "
                       "phase's recipe)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--world-count", type=int, default=768, help="clips when the default dataset is made")
    train.add_argument("--latents", help=f"the DiT stages' latent cache (default {DEFAULT_LATENTS}, encoded from "
                                         "--data with the shipped VAE if missing); stages on another audio front "
                                         "end than log-mel (teacher phase hear, and the students of its teacher) "
                                         "use <latents>-<front end>, e.g. -whisper-ct2")
    train.add_argument("--vae", help="the DiT stages and fast-decoder: the VAE directory whose latents they train "
                                     "on (default: the preset's shipped VAE, checkpoints/talk128-vae); vae --phase "
                                     "decoder|motion: the finished VAE whose decoder to train (default: the phase "
                                     "before's export, <run-dir>/vae/vae-full or <run-dir>/vae-decoder/vae-decoder)")
    train.add_argument("--profile", default="cpu",
                       help="`all`: tiny (a few steps of each stage: the dry run), cpu (each stage's shipped "
                            "defaults) or gpu (the DiT stages' batches scaled up; with --gpu)")
    train.add_argument("--quiet", action="store_true", help="`all`: no world-generation progress bars")
    train.add_argument("--checkpoint-every", type=int, default=100)
    train.add_argument("--log-every", type=int, default=10)
    train.set_defaults(handler=cmd_train, pairs_count=PAIRS["count"])  # `train all` profiles set their own
