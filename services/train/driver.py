"""Ray Train driver: one stage's resumable loop on N workers (CPU by default, `gpu` for data-parallel on GPUs).

    TrainRequest(stage="vae" | "probe" | "teacher", ...)   everything a run needs; plain data, travels to workers
    train(request) -> dict                        runs it through `ray.train.torch.TorchTrainer`, returns metrics

The same call works on this machine (a local Ray started here, one CPU worker) and on a cluster (`RAY_ADDRESS` set,
as a KubeRay RayJob sets it): each worker builds its stage from the request, wraps the trainable module with
`ray.train.torch.prepare_model` when there is more than one worker or a GPU (DDP), and runs
`model_core.training.loop.run_stage`; rank 0 writes the run directory (resumable state, log.jsonl, the export) and
hands each checkpoint to Ray Train. Re-running the same command resumes from the run directory's last checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

STAGES = ("vae", "vae-decoder", "probe", "teacher", "student-init", "distill", "fast-decoder")
LATENT_STAGES = ("teacher", "student-init", "distill", "fast-decoder")
KEEP_CHECKPOINTS = 2
"""Checkpoints Ray Train keeps in its storage (the run directory's own state.pt is always the newest)."""


@dataclasses.dataclass(frozen=True)
class TrainRequest:
    stage: str
    data: str
    run_dir: str
    steps: int
    preset: str = "talk128"
    export: str | None = None
    eval_data: str | None = None
    workers: int = 1
    gpu: bool = False
    batch_size: int | None = None
    learning_rate: float | None = None
    opening_weight: float | None = None
    """vae: the weight of the latent opening head's error (`VAETrainConfig.opening_weight`; default: the recipe's)."""
    history_corrupt: float | None = None
    """distill: the History Corrupt noise on the cached keys/values (`DistillConfig.history_corrupt`; 0: the
    ablation without it)."""
    interior_weight: float | None = None
    """vae, vae-decoder: the extra weight on the mouth interior's pixels (`VAETrainConfig.interior_weight`)."""
    motion_weight: float | None = None
    """vae-decoder: the weight of the frame-to-frame term (`DecoderTrainConfig.motion_weight`; 0: off)."""
    latent_noise: float | None = None
    """vae-decoder: the noise on the latents the decoder draws from (`DecoderTrainConfig.latent_noise`; 0: off)."""
    init: str | None = None
    """teacher: a teacher checkpoint to train further instead of starting from random weights."""
    mouth_weight: float | None = None
    """teacher: the extra weight on the mouth's latent cells in the velocity error
    (`TeacherTrainConfig.mouth_weight`)."""
    guidance: float | None = None
    """distill: classifier-free guidance on the real score's audio (`DistillConfig.real_guidance`)."""
    voice_augment: float | None = None
    """teacher, student-init, distill: the strength of the voice augmentation on the audio
    (`teacher_stage.augment_voice`; 0: off)."""
    decay_from: float | None = None
    """teacher: where the learning rate starts its linear fall to 0 at the run's end, as a fraction of the run
    (`TeacherTrainConfig.decay_from`; a phase's recipe; None: the rate holds)."""
    audio_injection_dim: int | None = None
    """teacher: the model grows the per-frame audio injection of this width (`DiTConfig.audio_injection_dim`) from its
    `init` checkpoint (a phase's recipe); None: the preset's shape."""
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    world_count: int = 768
    latents: str | None = None
    """The DiT stages' latent cache (`model_core.training.latents`), built from `data` before the run."""
    teacher: str | None = None
    """student-init, distill: the teacher checkpoint."""
    student: str | None = None
    """distill: the initialised student checkpoint; fast-decoder: the streaming student whose latents the decoder
    serves (its rollouts are half the samples)."""
    pairs: str | None = None
    """student-init, distill: the teacher's ODE pairs (`student_stage.make_ode_pairs`)."""
    vae: str | None = None
    """The DiT stages: the VAE directory whose latent space they train in (default: the preset's shipped VAE);
    vae-decoder: the finished VAE whose decoder it trains further."""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage={self.stage!r} is unknown; allowed: {', '.join(STAGES)}")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} is invalid: at least 1")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} is invalid: at least 1")
        if self.opening_weight is not None and self.stage != "vae":
            raise ValueError(f"opening_weight applies to the vae stage (its phase full), not {self.stage!r}")
        if self.history_corrupt is not None and self.stage != "distill":
            raise ValueError(f"history_corrupt applies to the distill stage, not {self.stage!r}")
        if self.interior_weight is not None and self.stage not in ("vae", "vae-decoder"):
            raise ValueError(f"interior_weight applies to the vae stages, not {self.stage!r}")
        for name, stages in (("init", ("teacher",)), ("mouth_weight", ("teacher",)), ("guidance", ("distill",)),
                             ("motion_weight", ("vae-decoder",)), ("latent_noise", ("vae-decoder",)),
                             ("audio_injection_dim", ("teacher",)), ("decay_from", ("teacher",)),
                             ("voice_augment", ("teacher", "student-init", "distill"))):
            if getattr(self, name) is not None and self.stage not in stages:
                raise ValueError(f"{name} applies to the {' and '.join(stages)} stage, not {self.stage!r}")
        needs = {"vae-decoder": ("vae",), "teacher": ("latents",), "fast-decoder": ("latents", "student"),
                 "student-init": ("latents", "teacher", "pairs"),
                 "distill": ("latents", "teacher", "student", "pairs")}.get(self.stage, ())
        missing = [name for name in needs if not getattr(self, name)]
        if missing:
            raise ValueError(f"stage {self.stage!r} needs {', '.join(missing)}")


def build_stage(request: TrainRequest, *, wrap=None, device="cpu"):
    """The stage object a worker trains (imported lazily: the driver process needs no torch model code)."""
    from model_core.config import get_preset
    from model_core.world.store import open_source

    preset = get_preset(request.preset)
    overrides = {k: v for k, v in (("batch_size", request.batch_size), ("learning_rate", request.learning_rate))
                 if v is not None}
    if request.stage in LATENT_STAGES:
        from model_core.models import build_vae
        from model_core.training.latents import LatentSource, dit_config_for_latents
        from model_core.vae import StreamingVAE

        latents = LatentSource(request.latents)
        vae = (StreamingVAE.from_pretrained(request.vae, device=device) if request.vae
               else build_vae(preset, checkpoint=None, device=device, seed=0))
        latents.check_vae(vae)
        if request.stage == "fast-decoder":
            from model_core.training.fastdecode_stage import FastDecoderStage, FastDecoderTrainConfig

            train = FastDecoderTrainConfig(seed=request.seed, steps=request.steps, **overrides)
            return FastDecoderStage(None, latents, train, vae=vae, student=request.student, stream=preset.stream,
                                    wrap=wrap, device=device)
        if request.stage == "teacher":
            from model_core.training.teacher_stage import TeacherStage, TeacherTrainConfig

            overrides.update({k: v for k, v in (("init", request.init), ("mouth_weight", request.mouth_weight),
                                                ("voice_augment", request.voice_augment),
                                                ("decay_from", request.decay_from)) if v is not None})
            shape = dit_config_for_latents(preset, latents)
            if request.audio_injection_dim is not None:
                shape = dataclasses.replace(shape, audio_injection_dim=request.audio_injection_dim)
            return TeacherStage(shape, latents,
                                TeacherTrainConfig(seed=request.seed, steps=request.steps, **overrides), wrap=wrap,
                                device=device)
        from model_core.training.student_stage import read_pairs

        pairs = read_pairs(request.pairs)
        if request.voice_augment is not None:
            overrides["voice_augment"] = request.voice_augment
        if request.stage == "student-init":
            from model_core.training.student_stage import StudentInitConfig, StudentInitStage

            return StudentInitStage(request.teacher, latents, pairs, StudentInitConfig(seed=request.seed, **overrides),
                                    wrap=wrap, device=device)
        from model_core.training.dmd_stage import DistillConfig, DistillStage

        rates = {"generator_lr": overrides.pop("learning_rate")} if "learning_rate" in overrides else {}
        if request.history_corrupt is not None:
            overrides["history_corrupt"] = request.history_corrupt
        if request.guidance is not None:
            overrides["real_guidance"] = request.guidance
        return DistillStage(request.teacher, request.student, latents, pairs,
                            DistillConfig(seed=request.seed, **overrides, **rates), device=device)
    size = preset.stream.height
    source = open_source(request.data, seed=request.seed, count=request.world_count, size=size)
    if request.stage == "vae":
        from model_core.training.vae_stage import VAEStage, VAETrainConfig

        if request.opening_weight is not None:
            overrides["opening_weight"] = request.opening_weight
        if request.interior_weight is not None:
            overrides["interior_weight"] = request.interior_weight
        return VAEStage(preset.vae, source, VAETrainConfig(seed=request.seed, **overrides), wrap=wrap, device=device)
    if request.stage == "vae-decoder":
        from model_core.training.vae_stage import DecoderStage, DecoderTrainConfig

        overrides.update({k: v for k, v in (("interior_weight", request.interior_weight),
                                            ("motion_weight", request.motion_weight),
                                            ("latent_noise", request.latent_noise)) if v is not None})
        train = DecoderTrainConfig(seed=request.seed, steps=request.steps, **overrides)
        return DecoderStage(request.vae, source, train, wrap=wrap, device=device)
    from model_core.training.probe_stage import ProbeStage, ProbeTrainConfig

    return ProbeStage(source, ProbeTrainConfig(seed=request.seed, **overrides), wrap=wrap, device=device)


def _worker_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from model_core.training.loop import LOG_FILE, STATE_FILE, run_stage

    request = TrainRequest(**config)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    device = ray.train.torch.get_device() if request.gpu else torch.device("cpu")
    parallel = world_size > 1 or request.gpu
    stage = build_stage(request, wrap=ray.train.torch.prepare_model if parallel else None, device=device)
    run_dir = Path(request.run_dir)

    def report(metrics: dict, checkpointed: bool) -> None:
        if not (checkpointed and rank == 0):
            ray.train.report(metrics)
            return
        # Ray gets a directory holding only the resumable state (hard-linked, not copied); never the run directory
        # itself, which holds Ray's storage: handing that over copies every earlier checkpoint into the next one.
        with tempfile.TemporaryDirectory(dir=run_dir) as handoff:
            for name in (STATE_FILE, LOG_FILE):
                if (run_dir / name).exists():
                    os.link(run_dir / name, Path(handoff) / name)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(handoff))

    run_stage(stage, run_dir, request.steps, checkpoint_every=request.checkpoint_every,
              log_every=request.log_every, rank=rank, report=report,
              export_to=request.export)


def quiet_local_workers() -> None:
    """Runs in each worker of the local (dashboard-less) cluster. Ray Train's placement-group cleaner asks the state
    API, which lives in the dashboard, whether the controller is alive, and logs a warning every second when it
    cannot: hours of noise around the progress bar. A cluster (RAY_ADDRESS) has its dashboard and is left alone."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def train(request: TrainRequest) -> dict:
    """Run `request` through Ray Train; starts a local Ray (one CPU per worker) unless one is already reachable."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = Path(request.run_dir).resolve()
    request = dataclasses.replace(request, run_dir=str(run_dir),
                                  **{name: str(Path(getattr(request, name)).resolve())
                                     for name in ("latents", "teacher", "student", "pairs", "vae", "init")
                                     if getattr(request, name)},
                                  export=str(Path(request.export).resolve()) if request.export else None,
                                  data=request.data if request.data.startswith("world:")
                                  else str(Path(request.data).resolve()))
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=max(request.workers, 1) + 1, num_gpus=1 if request.gpu else 0,
                     include_dashboard=False, log_to_driver=True,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
                                  "worker_process_setup_hook": "services.train.driver.quiet_local_workers"})
    trainer = TorchTrainer(_worker_loop, train_loop_config=dataclasses.asdict(request),
                           scaling_config=ScalingConfig(num_workers=request.workers, use_gpu=request.gpu,
                                                        resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"facecast-{request.stage}", storage_path=str(run_dir / "ray"),
                                                checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS)))
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}")
    return dict(result.metrics or {})
