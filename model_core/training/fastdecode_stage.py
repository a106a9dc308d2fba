"""`facecast train fast-decoder`: the fast streaming decoder (`model_core.fastdecode`) distilled from the full VAE's.

    FastDecoderStage(vae_dir, latents, FastDecoderTrainConfig(...))      a `loop.Stage`

Each sample is the first `window_latents` latent frames of a segment of the latent cache (a stream's start: every
segment was encoded from its own first frame, as a session's stream is), decoded by the full decoder as a stream
(no gradient: the target) and by the fast decoder (optionally each sample's latents moved a little per channel
first: `latent_jitter`, off by default); the loss is their L1 difference, weighted up on the mouth (the cache's
per-latent mouth weight, upsampled to pixels), plus a small term on the frame-to-frame change so the fast decoder
keeps the full one's motion, not only its stills. The latent space is the full VAE's: the stage refuses a cache
encoded with another VAE, and the exported decoder records the VAE's digest.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..fastdecode import FastDecoder, FastDecoderConfig
from ..vae import StreamingVAE, stream_decode
from .latents import LatentSource, vae_digest
from .loop import warm_hold_decay


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
    channels: tuple[int, int, int, int] = FastDecoderConfig.channels
    blocks: tuple[int, int, int] = FastDecoderConfig.blocks

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "window_latents"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: at least 1")
        if self.window_latents < 2:
            raise ValueError(f"window_latents={self.window_latents} is invalid: at least 2 (the motion term)")

    def rate(self, step: int) -> float:
        return warm_hold_decay(step, steps=self.steps, peak=self.learning_rate, warmup_steps=self.warmup_steps,
                               decay_from=self.decay_from)


class FastDecoderStage:
    name = "fast-decoder"

    def __init__(self, vae_dir: str | Path | None, latents: LatentSource,
                 train: FastDecoderTrainConfig = FastDecoderTrainConfig(), *, vae: StreamingVAE | None = None,
                 wrap=None, device="cpu"):
        """`vae_dir` (or an already built `vae`): the full VAE whose decoder is the teacher and whose latents the
        cache holds."""
        self.seed, self.train_config, self.device = train.seed, train, torch.device(device)
        self.vae = vae if vae is not None else StreamingVAE.from_pretrained(vae_dir, device=self.device)
        latents.check_vae(self.vae)
        self.digest = vae_digest(self.vae)
        self.latents = latents
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
            clip = self.latents[int(rng.integers(len(self.latents)))]
            if clip.latents.shape[2] < config.window_latents:
                continue
            segment = int(rng.integers(clip.segments))
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
        """The fp16 decoder directory, recording the VAE it decodes for."""
        self.decoder.cpu().eval().save_pretrained(path, {"vae_digest": self.digest})
