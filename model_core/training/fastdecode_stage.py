"""`facecast train fast-decoder`: the fast streaming decoder (`model_core.fastdecode`) distilled from the full VAE's.

    FastDecoderStage(vae_dir, latents, FastDecoderTrainConfig(...))      a `loop.Stage`

Each sample is the first `window_latents` latent frames of a stream's start, decoded by the full decoder as a stream
(no gradient: the target) and by the fast decoder; the loss is their L1 difference, weighted up on the mouth (the
cache's per-latent mouth weight, upsampled to pixels), plus a small term on the frame-to-frame change so the fast
decoder keeps the full one's motion, not only its stills. A sample's latents are either a segment of the latent cache
(the truth encoded from its own first frame, as a session's stream starts) or, for `rollout_share` of them, what the
streaming student makes of that segment's reference and audio (its own 2-step rollout, as a session runs it; some
with the listening mode on): the decoder serves the student's latents, which sit off the cache's. Optionally each
sample's latents are moved a little per channel first (`latent_jitter`, off by default). The latent space is the full
VAE's: the stage refuses a cache encoded with another VAE, and the exported decoder records the VAE's digest.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import load_facecast_checkpoint
from ..config import StreamConfig
from ..fastdecode import FastDecoder, FastDecoderConfig
from ..vae import StreamingVAE, stream_decode
from .latents import LatentSource, vae_digest
from .dmd_stage import rollout
from .loop import warm_hold_decay
from .teacher_stage import Window, window_batch


@dataclasses.dataclass(frozen=True)
class FastDecoderTrainConfig:
    seed: int = 0
    steps: int = 1500
    """The schedule's length (the rate falls to 0 here)."""
    batch_size: int = 2
    window_latents: int = 5
    """Latent frames per sample (1 + 4 (n - 1) video frames: 17 for 5)."""
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    decay_from: float = 0.6
    mouth_weight: float = 4.0
    motion_weight: float = 0.5
    """Weight of the L1 difference of consecutive frames' change (the full decoder's against the fast one's)."""
    latent_jitter: float = 0.0
    """Each sample's latents moved per channel, z * (1 + jitter/2 * n1) + jitter * n2 (n1, n2 standard normal per
    sample and channel), before both decoders see them (the full decoder, the target, is defined on any latent); 0:
    off. Tried against the shipped decoder's grey cast on the green reference face (the student's latents sit off the
    cache's, per-channel means ~0.5 apart): 0.4 for the full 1,500 steps did not restore the green (G -0.12 against
    the full decoder's +0.02 on the reference still) and cost 0.12 dB on held-out clips, so it is off (BENCHMARKS)."""
    rollout_share: float = 0.5
    """Share of the samples that are the student's own streams of a cache segment's reference and audio rather than
    the segment's encoded truth (needs the student). The student's latents sit off the cache's (per-channel means
    ~0.5 apart); a decoder distilled on the cache alone turned the green reference face grey on them, which the full
    decoder does not (BENCHMARKS). 0: the cache alone."""
    listening_share: float = 0.25
    """Share of the student's streams where the frames the truth marks as not speaking get the silence embedding (the
    listening mode a call's silent avatar runs in), as the student was trained; the rest are all marked speaking."""
    channels: tuple[int, int, int, int] = FastDecoderConfig.channels
    blocks: tuple[int, int, int] = FastDecoderConfig.blocks

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "window_latents"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: at least 1")
        if self.window_latents < 2:
            raise ValueError(f"window_latents={self.window_latents} is invalid: at least 2 (the motion term)")
        for name in ("rollout_share", "listening_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: allowed 0 to 1")

    def rate(self, step: int) -> float:
        return warm_hold_decay(step, steps=self.steps, peak=self.learning_rate, warmup_steps=self.warmup_steps,
                               decay_from=self.decay_from)


class FastDecoderStage:
    name = "fast-decoder"

    def __init__(self, vae_dir: str | Path | None, latents: LatentSource,
                 train: FastDecoderTrainConfig = FastDecoderTrainConfig(), *, vae: StreamingVAE | None = None,
                 student: str | Path | None = None, stream: StreamConfig = StreamConfig(), wrap=None, device="cpu"):
        """`vae_dir` (or an already built `vae`): the full VAE whose decoder is the teacher and whose latents the
        cache holds; `student`: the streaming student checkpoint whose rollouts make `rollout_share` of the samples
        (trained in the same latent space), streamed with `stream`'s steps, shift, chunk and sink position."""
        self.seed, self.train_config, self.device = train.seed, train, torch.device(device)
        self.vae = vae if vae is not None else StreamingVAE.from_pretrained(vae_dir, device=self.device)
        latents.check_vae(self.vae)
        self.digest = vae_digest(self.vae)
        self.latents = latents
        self.student, self.stream = None, stream
        if train.rollout_share > 0:
            if student is None:
                raise ValueError(f"rollout_share={train.rollout_share} needs the student whose streams the decoder "
                                 "serves (a student checkpoint of this latent space), or rollout_share=0")
            self.student = load_facecast_checkpoint(student)[0].float().to(self.device).eval().requires_grad_(False)
            if self.student.config.in_channels != self.vae.z_dim:
                raise ValueError(f"the student {student} works in {self.student.config.in_channels} latent channels, "
                                 f"the VAE's latents have {self.vae.z_dim}")
        self.rollout_latents = -(-train.window_latents // stream.chunk_latent_frames) * stream.chunk_latent_frames
        if self.student is not None and self.rollout_latents > latents[0].segment_latents:
            raise ValueError(f"window_latents={train.window_latents} rounds up to {self.rollout_latents} latent frames "
                             f"(whole chunks of {stream.chunk_latent_frames}), longer than the cache's segments "
                             f"({latents[0].segment_latents})")
        self.decoder = FastDecoder(FastDecoderConfig(z_dim=self.vae.z_dim, channels=tuple(train.channels),
                                                     blocks=tuple(train.blocks))).to(self.device)
        self.model = wrap(self.decoder) if wrap else self.decoder
        self._optimizer = torch.optim.AdamW(self.decoder.parameters(), lr=train.learning_rate, weight_decay=0.0)

    def modules(self):
        return {"fast_decoder": self.decoder}

    def optimizer(self):
        return self._optimizer

    def batch(self, step: int, rank: int) -> dict:
        """`batch_size` segment starts, seeded by (seed, step, rank); the full decoder's frames for them."""
        config = self.train_config
        rng = np.random.default_rng([self.seed, step, rank])
        latents, mouths = [], []
        while len(latents) < config.batch_size:
            index = int(rng.integers(len(self.latents)))
            clip = self.latents[index]
            if clip.latents.shape[2] < config.window_latents:
                continue
            segment = int(rng.integers(clip.segments))
            if self.student is not None and rng.random() < config.rollout_share:
                window = Window(index, segment, 0, listening=bool(rng.random() < config.listening_share), silent=False)
                latents.append(self._stream(window, rng)[:, :config.window_latents])
            else:
                latents.append(clip.latents[segment, :, :config.window_latents].float())
            mouths.append(clip.mouth[segment, :config.window_latents].float())
        latents = torch.stack(latents).to(self.device)
        if config.latent_jitter:
            shape = (latents.shape[0], latents.shape[1], 1, 1, 1)
            noise = torch.from_numpy(rng.standard_normal((2, *shape)).astype(np.float32)).to(self.device)
            latents = latents * (1 + config.latent_jitter / 2 * noise[0]) + config.latent_jitter * noise[1]
        with torch.no_grad():
            z = self.vae.vae.post_quant_conv(self.vae.denormalize(latents).to(self.device))
            target = stream_decode(self.vae.vae, z, self.vae.new_decode_cache())
        return {"latents": latents, "target": target, "mouth": self._pixel_mouth(torch.stack(mouths), target),
                "step": step}

    def _stream(self, window: Window, rng: np.random.Generator) -> torch.Tensor:
        """The student's stream of `window` (its reference and audio from the segment's start): [16, n, h, w]."""
        stream = self.stream
        batch = {key: value.to(self.device) for key, value in
                 window_batch(self.latents, [window], self.rollout_latents, self.student.config).items()}
        noise = torch.from_numpy(rng.standard_normal(batch["x0"].shape).astype(np.float32)).to(self.device)
        out = rollout(self.student, batch, noise, steps=stream.steps, shift=stream.shift,
                      chunk=stream.chunk_latent_frames, sink_rope_offset=stream.sink_rope_offset, exit_step=0,
                      adaptive_sink=stream.adaptive_sink)
        return out.final[0].float().cpu()

    @staticmethod
    def _pixel_mouth(mouth: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[B, n, h, w] latent mouth weights -> [B, 1, T, H, W] per video frame (latent k covers frames 4k-3..4k)."""
        frames = target.shape[2]
        index = torch.clamp((torch.arange(frames) + 3) // 4, max=mouth.shape[1] - 1)
        return F.interpolate(mouth[:, index], size=target.shape[-2:], mode="nearest")[:, None].to(target.device)

    def loss(self, batch: dict):
        config = self.train_config
        for group in self._optimizer.param_groups:
            group["lr"] = config.rate(batch["step"])
        decoded = self.model(batch["latents"], self.decoder.new_decode_cache())
        target = batch["target"]
        weight = 1.0 + config.mouth_weight * batch["mouth"]
        l1 = ((decoded - target).abs() * weight).sum() / (weight.expand_as(target[:, :1]).sum() * 3)
        motion = (torch.diff(decoded, dim=2) - torch.diff(target, dim=2)).abs().mean()
        loss = l1 + config.motion_weight * motion
        mse = F.mse_loss(decoded.detach().clamp(-1, 1), target)
        return loss, {"loss": float(loss.detach()), "l1": float(l1.detach()), "motion": float(motion.detach()),
                      "psnr": float(10 * torch.log10(4.0 / mse))}

    def export(self, path: Path) -> None:
        """The fp16 decoder directory, recording the VAE it decodes for and its training recipe."""
        self.decoder.cpu().eval().save_pretrained(path, {"vae_digest": self.digest,
                                                         "train": dataclasses.asdict(self.train_config)})
