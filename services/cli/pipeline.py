"""`facecast train all`: every stage in order, in one resumable command, into one folder.

    world (train + held-out clips) -> vae (full, decoder, motion, noise) -> probe -> latents -> teacher -> ODE pairs
    -> student init -> distill -> the student with its VAE in one checkpoint -> `facecast eval` of it (held-out clips)

Profiles: `tiny` (a few steps of each stage on a handful of clips: the dry run that proves the command end to end
before a GPU is spent on it), `cpu` (each stage's shipped default, as `facecast train <stage>` runs it) and `gpu`
(the same schedules with the DiT stages' batches scaled up; run it with `--gpu`). Everything lands in `--root`:

    <root>/world/{train,eval}  <root>/vae/  <root>/lipsync-probe.safetensors  <root>/latents/
    <root>/teacher.safetensors  <root>/student.safetensors (DiT + VAE)  <root>/runs/<stage>/  <root>/summary.json

Nothing under `checkpoints/` is touched. Run the same command again after an interruption: finished stages are
skipped (their exports exist) and the interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

from services.cli.common import EXIT_OK, UserError


@dataclasses.dataclass(frozen=True)
class Profile:
    train_clips: int
    eval_clips: int
    steps: dict
    """Optimiser steps per run (vae, vae-decoder, vae-motion, vae-noise, probe, student-init, distill); for the teacher,
    a dict of steps per phase (`services.cli.train.TEACHER_PHASES`)."""
    pairs: int
    """The teacher's ODE pairs for the student's initialisation."""
    scored_clips: int
    """Held-out clips the final eval scores."""
    batch_sizes: dict = dataclasses.field(default_factory=dict)
    """Batch-size overrides per driver stage (none: each stage's default)."""


def _shipped_steps() -> dict:
    from services.cli.train import DEFAULTS, PHASES, TEACHER_PHASES, VAE_PHASES

    return {"vae": VAE_PHASES["full"].steps, "vae-decoder": VAE_PHASES["decoder"].steps,
            "vae-motion": VAE_PHASES["motion"].steps, "vae-noise": VAE_PHASES["noise"].steps,
            "probe": DEFAULTS["probe"]["steps"],
            "teacher": {phase: steps for phase, (steps, _) in TEACHER_PHASES.items()},
            "student-init": PHASES["init"].steps,
            "distill": PHASES["distill"].steps}


def profiles() -> dict[str, Profile]:
    from services.cli.train import PAIRS, TEACHER_PHASES

    shipped = _shipped_steps()
    return {
        "tiny": Profile(train_clips=6, eval_clips=3, pairs=4, scored_clips=3,
                        steps={"vae": 3, "vae-decoder": 2, "vae-motion": 2, "vae-noise": 2, "probe": 3,
                               "teacher": dict.fromkeys(TEACHER_PHASES, 2), "student-init": 3, "distill": 2}),
        "cpu": Profile(train_clips=768, eval_clips=48, pairs=PAIRS["count"], scored_clips=12, steps=shipped),
        "gpu": Profile(train_clips=768, eval_clips=48, pairs=4 * PAIRS["count"], scored_clips=12, steps=shipped,
                       batch_sizes={"teacher": 32, "student-init": 32}),
    }


def _stage_args(args: argparse.Namespace, **values) -> argparse.Namespace:
    """The namespace `services.cli.train._run` reads, for one stage of the pipeline."""
    base = dict(data=None, latents=None, teacher=None, student=None, pairs=None, vae=None, workers=args.workers,
                gpu=args.gpu, batch_size=None, learning_rate=None, seed=args.seed, world_count=None,
                checkpoint_every=args.checkpoint_every, log_every=args.log_every)
    base.update(values)
    return argparse.Namespace(**base)


def run_pipeline(args: argparse.Namespace) -> int:
    from model_core.world.split import WorldSplit
    from model_core.world.store import WorldSource, is_complete, write_shards
    from services.cli.train import VAE_PHASES, _run, phase_export, run_teacher

    chosen = profiles()[args.profile]
    root = Path(args.run_dir or Path("out") / f"pipeline-{args.profile}")
    root.mkdir(parents=True, exist_ok=True)
    world = {part: root / "world" / part for part in ("train", "eval")}
    vae_dir, probe = root / "vae", root / "lipsync-probe.safetensors"
    latents, teacher = root / "latents", root / "teacher.safetensors"
    init, student = root / "runs" / "student-init" / "student-init.safetensors", root / "student.safetensors"
    distilled = root / "runs" / "distill" / "student.safetensors"
    pairs = root / "runs" / "student-init" / "ode-pairs.pt"
    summary_path = root / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update(profile=args.profile, root=str(root))
    walls = summary.setdefault("wall_s", {})

    def timed(name: str, done: bool, work) -> None:
        if done:
            print(f"[{name}] done already")
            return
        print(f"[{name}] ...")
        began = time.perf_counter()
        work()
        walls[name] = round(time.perf_counter() - began, 1)
        summary_path.write_text(json.dumps(summary, indent=1))

    def make_world() -> None:
        for part, count in (("train", chosen.train_clips), ("eval", chosen.eval_clips)):
            if not is_complete(world[part]):
                write_shards(world[part], WorldSource(WorldSplit(args.seed), part, count, 128),
                             progress=not args.quiet, workers=os.cpu_count() or 1)

    def stage(name: str, export: Path, driver_stage: str | None = None, **values):
        def work():
            _run(_stage_args(args, data=str(world["train"]), world_count=chosen.train_clips,
                             batch_size=chosen.batch_sizes.get(name), pairs_count=chosen.pairs, **values),
                 driver_stage or name, chosen.steps[name], str(export), str(root / "runs" / name),
                 init_export=str(init))
        return work

    dit = dict(latents=str(latents), vae=str(vae_dir), teacher=str(teacher), pairs=str(pairs))
    timed("world", all(is_complete(path) for path in world.values()), make_world)
    full_vae, decoder_vae, motion_vae = (Path(phase_export(root / "runs", VAE_PHASES, phase))
                                         for phase in ("full", "decoder", "motion"))
    finished = [(path / "config.json").is_file() for path in (full_vae, decoder_vae, motion_vae, vae_dir)]
    timed("vae", any(finished), stage("vae", full_vae))
    timed("vae-decoder", any(finished[1:]), stage("vae-decoder", decoder_vae, vae=str(full_vae)))
    timed("vae-motion", any(finished[2:]), stage("vae-motion", motion_vae, "vae-decoder", vae=str(decoder_vae),
                                                 **VAE_PHASES["motion"].recipe))
    timed("vae-noise", finished[3], stage("vae-noise", vae_dir, "vae-decoder", vae=str(motion_vae),
                                          **VAE_PHASES["noise"].recipe))
    timed("probe", probe.is_file(), stage("probe", probe))
    timed("teacher", teacher.is_file(), lambda: run_teacher(
        _stage_args(args, data=str(world["train"]), world_count=chosen.train_clips, latents=str(latents),
                    vae=str(vae_dir), batch_size=chosen.batch_sizes.get("teacher"), init=None, mouth_weight=None),
        root / "runs", str(teacher), steps=chosen.steps["teacher"]))
    timed("student-init", init.is_file(), stage("student-init", init, **dit))
    timed("distill", distilled.is_file(), stage("distill", distilled, student=str(init), **dit))
    timed("package", student.is_file(), lambda: package_student(distilled, vae_dir, student))
    timed("eval", "eval" in summary, lambda: summary.update(eval=evaluate_student(
        student, probe, world["eval"], chosen.scored_clips, args.seed, progress=not args.quiet)))
    summary["wall_s_total"] = round(sum(walls.values()), 1)
    summary_path.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return EXIT_OK


def package_student(student: Path, vae_dir: Path, out: Path) -> None:
    """The distilled student and the VAE of its latent space in one facecast checkpoint (what `--checkpoint`
    loads: the engine takes the VAE from the checkpoint when it carries one)."""
    import torch

    from model_core.checkpoint import FORMAT_KEY, load_facecast_checkpoint, save_facecast_checkpoint
    from model_core.vae import StreamingVAE

    model, metadata, _ = load_facecast_checkpoint(student)
    extra = {key: value for key, value in metadata.items() if key not in (FORMAT_KEY, "dit_config", "vae_config")}
    save_facecast_checkpoint(model.half(), out, vae=StreamingVAE.from_pretrained(vae_dir, dtype=torch.float16),
                             extra=extra)


def evaluate_student(student: Path, probe: Path, eval_dir: Path, clips: int, seed: int, progress: bool) -> dict:
    from model_core.engine import AvatarEngine
    from model_core.evaluate import evaluate
    from model_core.training.probe_stage import load_probe
    from model_core.world.store import ShardSource

    engine = AvatarEngine.from_preset("talk128", checkpoint=str(student), seed=seed)
    report = evaluate(ShardSource(eval_dir), load_probe(probe), "model", engine=engine, clips=clips, seed=seed,
                      progress=progress)
    return {key: value for key, value in report.items() if key != "per_style"}


def check_profile(name: str) -> None:
    if name not in profiles():
        raise UserError(f"--profile={name!r} is unknown; allowed: {', '.join(profiles())}")
