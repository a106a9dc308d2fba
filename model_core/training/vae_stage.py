"""The VAE stage: an `AutoencoderKLWan`-family VAE trained on the world's clips, with the mouth weighted.

    VAEStage(vae_config, source, ...)      the Stage the loop runs (encoder and decoder, from scratch)
    DecoderStage(vae_dir, source, ...)     the decoder alone, trained further on a finished VAE's posterior means:
                                           the latent space (and every cache and DiT trained in it) stays as it is
    latent_statistics(vae, source)         per-channel mean/std of the posterior means (the DiT's latent scale)
    reconstruction_report(vae, source)     PSNR/SSIM overall and on the mouth region, decode ms per frame

Loss: L1 on pixels, with the mouth region (from the truth's face boxes) weighted `mouth_weight` times more, plus a
small KL term, plus (`opening_weight`) the error of a linear head that reads each video frame's mouth opening from
the latent cells at the mouth, which trains the encoder to carry the mouth's state (world data only), and extra
weight on the mouth's inside (`interior_weight`): the shipped VAE's recipe, both on by default. Windows
are 1 + 4k frames so the causal temporal downsampling sees whole latent frames. The default run trains 17-frame
windows (5 latent frames) from the first step, so the causal caches learn the steady state a stream lives in; longer
runs go on to 33-frame windows and then to streams with carried caches (truncated backpropagation), the phases an
earlier shape needed (trained on short windows first, its streams fell to ~10 dB after frame 32). The export is a
diffusers `AutoencoderKLWan` directory in fp16 whose config carries the measured latent statistics, loadable by
`StreamingVAE.from_pretrained` (streaming decode == whole decode holds for it as for any Wan VAE).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import patchify
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from ..config import VAEConfig
from ..lipsync import psnr, ssim
from ..shipped import VAE_DECODER_TRAIN
from ..vae import DecodeCache, StreamingVAE, stream_decode
from .data import (TEMPORAL, ClipPools, frame_openings, frame_window, interior_mask, latent_mouth, mouth_crops,
                   window_openings)
from .loop import warm_hold_decay


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
    window_frames: int = 17
    """Phase 1's windows: 17 frames (5 latent frames), batch `batch_size`, from the first step. Windows this long
    train the causal caches in the state a stream lives in: at equal CPU time a VAE trained on them holds ~20 dB on
    every 16-frame block of a 49-frame stream (20.5, 20.2, 20.0, 20.1), where one trained on 5-frame windows
    (2 latent frames) decays from 21.8 to 16.4 dB, and the shipped default needs no later phase. Phases 2-4 below
    follow when a run is given more steps than `long_window_from_step` / `steady_window_from_step` /
    `stream_from_step` (the talk128 VAE before Wan2.2's layout needed all four)."""
    batch_size: int = 2
    learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    mouth_weight: float = 4.0
    seed: int = 0
    long_window_frames: int = 13
    """From `long_window_from_step` on, windows of this many frames (batch `long_window_batch`): the causal caches
    only reach their steady state after 3 latent frames, and a VAE trained on 5-frame windows alone decodes long
    streams badly (held-out PSNR 18.7 dB on 5-frame windows, 10.3 dB on 25-frame ones)."""
    long_window_from_step: int = 2000
    """Equal to `steady_window_from_step` by default: no 13-frame phase (set it lower to have one)."""
    long_window_batch: int = 2
    steady_window_frames: int = 33
    """From `steady_window_from_step` on, windows of this many frames (9 latent frames, batch `steady_window_batch`,
    rate `steady_learning_rate`), whole windows through encoder and decoder with full backpropagation: the regime a
    stream settles into. Trained on 13-frame windows (4 latent frames) alone, every fresh 13-frame window anywhere in
    a clip reconstructs at 17.6-20 dB, but the last frames of a 33-frame window at 6-10 dB, and a stream at ~10 dB
    after frame 32: the causal caches' steady state was never trained."""
    steady_window_from_step: int = 2000
    steady_window_batch: int = 1
    steady_learning_rate: float = 3e-4
    stream_from_step: int = 2200
    """From here on, phase 4: streams. Each of `stream_batch` clips is encoded and decoded 8 frames (2 latent frames)
    per step with the encoder's and decoder's causal caches carried from step to step (gradients cut between steps),
    for `stream_steps` steps (129 frames, 5 s) before new clips start: the caches' state past the 33-frame window
    (their look-back is ~20 latent frames) is trained at the cost of 8 frames a step. Started from the 13-frame
    weights it made streams worse at every rate tried; after 100 steps of 33-frame windows it lifts a stream's
    frames 48-96 from ~13.7 to ~16 dB."""
    stream_steps: int = 16
    stream_batch: int = 2
    stream_learning_rate: float = 1e-4
    """Phase 4's rate: at 1e-3 the first streams sent the training PSNR from 12 dB down to 6 dB and back."""
    stream_decoder_only: bool = False
    """Phase 4 trains the decoder alone on the encoder's posterior means when set (the encoder's steady state needs
    training too: the default trains both)."""
    grad_clip: float = 1.0
    """Largest gradient norm from the steady-window phase on (phases 1-2 ran unclipped)."""
    interior_weight: float = 30.0
    """Extra L1 weight on the pixels where the world draws the mouth's opening (`data.interior_mask`: its painted
    interior in any frame of the window, grown 2 px; ~1 % of a 128x128 frame against the mouth region's ~13 %); 0:
    off; 30 is the shipped recipe. With `opening_weight` 0.1 in the same 800-step fine-tuning, 30 lifted the decoded
    lip sync from 0.48 to 0.54."""
    opening_weight: float = 0.1
    """Weight of the opening head's error (0: off; 0.1 is the shipped recipe). A linear head (`OpeningHead`) reads the 4
    video frames' mouth openings of each latent frame from the `OpeningHead.CROP`^2 posterior-mean cells at the mouth;
    its squared error, in units of the openings' variance, is added to the loss on single-character windows of clips
    with truth, in the window phases. Fine-tuning the shipped VAE 800 steps (both halves, 17-frame windows) at 0.1
    lifted the decoded lip sync from 0.36 (the same fine-tuning without it) to 0.48 (BENCHMARKS, "A head that reads
    the mouth from the latent")."""

    def __post_init__(self) -> None:
        for name in ("window_frames", "long_window_frames", "steady_window_frames"):
            value = getattr(self, name)
            if value < 1 or (value - 1) % 4:
                raise ValueError(f"{name}={value} is invalid: 1 + 4k (1, 5, 9, ...)")
        for name in ("batch_size", "long_window_batch", "steady_window_batch", "stream_batch", "stream_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: at least 1")
        for name in ("opening_weight", "interior_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: at least 0 (0: off)")

    @property
    def stream_frames(self) -> int:
        return 1 + 8 * self.stream_steps

    def window(self, step: int) -> tuple[int, int]:
        """(frames per window, windows per batch) at this step."""
        if step >= self.steady_window_from_step:
            return self.steady_window_frames, self.steady_window_batch
        if step >= self.long_window_from_step:
            return self.long_window_frames, self.long_window_batch
        return self.window_frames, self.batch_size

    def rate(self, step: int) -> float:
        """The learning rate at this step (each phase has its own)."""
        if step >= self.stream_from_step:
            return self.stream_learning_rate
        if step >= self.steady_window_from_step:
            return self.steady_learning_rate
        return self.learning_rate


def new_vae(config: VAEConfig, seed: int, initial_logvar: float = -8.0) -> AutoencoderKLWan:
    """A fresh VAE of this shape. The posterior's log-variance starts at `initial_logvar` (the last 1x1 conv's
    log-variance rows zeroed, their bias set): at diffusers' default (about 0, unit noise on latents whose means
    are ~0.5) the decoder sees mostly noise and learns next to nothing for hundreds of steps."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**config.diffusers_kwargs())
    with torch.no_grad():
        vae.quant_conv.weight[config.z_dim:] = 0.0
        vae.quant_conv.bias[config.z_dim:] = initial_logvar
    return vae


def window_batch(pools: ClipPools, seed: int, step: int, rank: int, length: int, count: int, device) -> dict:
    """Step `step`'s batch: `count` windows of `length` frames from random clips of this step's pool, with their
    mouth masks and the truth's openings (NaN where there is no single character's; seeded by (seed, step, rank):
    the same batch on a resume)."""
    rng = np.random.default_rng([seed, step, rank])
    pool = pools.pool_for(step, rank)
    videos, masks, openings = [], [], []
    for _ in range(count):
        clip = pool[int(rng.integers(len(pool)))]
        start = int(rng.integers(0, max(1, clip.num_frames - length + 1)))
        video, mask = frame_window(clip, start, length)
        videos.append(video)
        masks.append(mask)
        openings.append(window_openings(clip, start, length))
    return {"video": torch.stack(videos).to(device), "mask": torch.stack(masks).to(device),
            "opening": torch.stack(openings).to(device), "step": step}


class OpeningHead(torch.nn.Module):
    """A linear read-out of the mouth opening of each video frame a latent frame codes, from the CROP x CROP latent
    cells centred on the mouth (`data.mouth_crops`): [B, C, F, h, w] latents, [B, F, h, w] mouth -> [B, F, 4]."""

    CROP = 4

    def __init__(self, z_dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(z_dim * self.CROP * self.CROP, TEMPORAL)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, latents: torch.Tensor, mouth: torch.Tensor) -> torch.Tensor:
        return self.linear(mouth_crops(latents, mouth, self.CROP))


OPENING_VARIANCE = 0.06
"""The world's per-frame openings' variance on speaking windows (the opening term's unit)."""


def opening_error(predicted: torch.Tensor, openings: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the head's [B, F, 4] readings against the truth's [B, T] openings (grouped as the latent
    frames code them), in units of OPENING_VARIANCE, over the windows whose openings are known (0 when none are)."""
    known = ~torch.isnan(openings).any(1)
    if not known.any():
        return predicted.sum() * 0.0
    target = frame_openings(torch.nan_to_num(openings))
    error = ((predicted - target) ** 2).mean((1, 2))
    return (error * known).sum() / known.sum() / OPENING_VARIANCE


def mouth_weighted_l1(decoded: torch.Tensor, video: torch.Tensor, mask: torch.Tensor, mouth_weight: float,
                      interior_weight: float = 0.0):
    """Mean L1 over pixels and channels, each pixel weighted 1 + `mouth_weight` inside the mouth mask, plus
    `interior_weight` where the window shows the mouth's interior (`data.interior_mask`)."""
    weight = 1.0 + mouth_weight * mask
    if interior_weight:
        weight = weight + interior_weight * interior_mask(video, mask)
    return ((decoded - video).abs() * weight).sum() / (weight.expand_as(mask).sum() * 3)


class VAEObjective(torch.nn.Module):
    """What one training step runs, as a module so data-parallel wrappers (DDP) see the whole forward pass.

    With `caches` (encoder cache, decoder cache), the frames continue a stream: they are encoded and decoded through
    the carried causal caches, which are updated in place (detached: gradients stop at the step's boundary)."""

    def __init__(self, vae: AutoencoderKLWan, decoder_only_streams: bool = False, head: OpeningHead | None = None):
        super().__init__()
        self.vae, self.decoder_only_streams, self.head = vae, decoder_only_streams, head

    def forward(self, video: torch.Tensor, caches=None, mouth: torch.Tensor | None = None):
        """(decoded, KL, the opening head's readings of the posterior means at `mouth` or None)."""
        if caches is None:
            posterior = self.vae.encode(video).latent_dist
            readings = self.head(posterior.mean, mouth) if self.head is not None and mouth is not None else None
            return self.vae.decode(posterior.sample()).sample, posterior.kl().mean(), readings
        encoder_cache, decoder_cache = caches
        if self.decoder_only_streams:  # the decoder learns from the latents inference gives it: posterior means
            with torch.no_grad():
                moments = self.vae.quant_conv(stream_encode(self.vae, video, encoder_cache))
            latents, kl = moments[:, :self.vae.config.z_dim], moments.new_zeros(())
        else:
            posterior = DiagonalGaussianDistribution(self.vae.quant_conv(stream_encode(self.vae, video,
                                                                                       encoder_cache)))
            latents, kl = posterior.sample(), None
        decoded = stream_decode(self.vae, self.vae.post_quant_conv(latents), decoder_cache, clamp=False)
        if kl is None:
            kl = posterior.kl().mean()
        for cache in caches:
            cache.features[:] = [f.detach() if isinstance(f, torch.Tensor) else f for f in cache.features]
        return decoded, kl, None


def stream_encode(vae: AutoencoderKLWan, video: torch.Tensor, cache) -> torch.Tensor:
    """The encoder on the next frames of a stream (1 + 4k on its first call, 4k after), through `cache`."""
    if vae.config.patch_size is not None:
        video = patchify(video, patch_size=vae.config.patch_size)
    outputs, start = [], 0
    if not cache.started:
        outputs.append(vae.encoder(video[:, :, :1], feat_cache=cache.features, feat_idx=[0]))
        cache.started, start = True, 1
    for first in range(start, video.shape[2], 4):
        outputs.append(vae.encoder(video[:, :, first:first + 4], feat_cache=cache.features, feat_idx=[0]))
    return torch.cat(outputs, 2)


def new_stream_caches(vae: AutoencoderKLWan):
    count = lambda module: sum(type(m).__name__ == "WanCausalConv3d" for m in module.modules())  # noqa: E731
    return DecodeCache(features=[None] * count(vae.encoder)), DecodeCache(features=[None] * count(vae.decoder))


class VAEStage:
    name = "vae"

    def __init__(self, vae_config: VAEConfig, source, train: VAETrainConfig = VAETrainConfig(), *, wrap=None,
                 device="cpu"):
        self.seed, self.train_config, self.device = train.seed, train, torch.device(device)
        self.vae = new_vae(vae_config, train.seed).to(self.device)
        self.head = OpeningHead(vae_config.z_dim).to(self.device) if train.opening_weight > 0 else None
        objective = VAEObjective(self.vae, decoder_only_streams=train.stream_decoder_only, head=self.head)
        self.objective = wrap(objective) if wrap else objective
        self._optimizer = torch.optim.AdamW(objective.parameters(), lr=train.learning_rate, weight_decay=0.0)
        self._spatial = vae_config.spatial_compression
        self.source = source
        self.pools = ClipPools(source, train.seed)
        self._step = 0
        self._stream = None  # phase 4: [stream index, (encoder cache, decoder cache), next position]

    def modules(self):
        return {"vae": self.vae, **({"opening_head": self.head} if self.head is not None else {})}

    @property
    def grad_clip(self) -> float | None:
        """The loop clips gradients to this norm (None: not at all) on the step whose loss ran last."""
        config = self.train_config
        return config.grad_clip if self._step >= config.steady_window_from_step else None

    def optimizer(self):
        return self._optimizer

    def batch(self, step: int, rank: int) -> dict:
        if step >= self.train_config.stream_from_step:
            return self._stream_batch(step, rank)
        length, count = self.train_config.window(step)
        return window_batch(self.pools, self.seed, step, rank, length, count, self.device)

    def _stream_batch(self, step: int, rank: int) -> dict:
        """Phase 4: this step's 8 frames (9 on a stream's first step) of `stream_batch` clips' streams."""
        config = self.train_config
        stream, position = divmod(step - config.stream_from_step, config.stream_steps)
        first_step = config.stream_from_step + stream * config.stream_steps
        rng = np.random.default_rng([self.seed, 53, stream, rank])
        pool = self.pools.pool_for(first_step, rank)
        long_enough = [clip for clip in pool if clip.num_frames >= config.stream_frames] or \
            [max(pool, key=lambda clip: clip.num_frames)]
        begin = 0 if position == 0 else 1 + 8 * (position - 1)
        length = 9 if position == 0 else 8
        videos, masks = [], []
        for _ in range(config.stream_batch):
            clip = long_enough[int(rng.integers(len(long_enough)))]
            start = int(rng.integers(0, max(1, clip.num_frames - config.stream_frames + 1)))
            first = min(start + begin, clip.num_frames - length)  # a short clip's stream repeats its last frames
            video, mask = frame_window(clip, max(0, first), length)
            videos.append(video)
            masks.append(mask)
        return {"video": torch.stack(videos).to(self.device), "mask": torch.stack(masks).to(self.device),
                "stream": stream, "position": position, "step": step, "rank": rank}

    def _stream_caches(self, batch: dict):
        """The carried caches for this step: new at a stream's start; after a resume mid-stream, rebuilt by replaying
        the stream's earlier steps without gradient (with the resumed weights)."""
        if self._stream is None or self._stream[0] != batch["stream"] or self._stream[2] != batch["position"]:
            caches = new_stream_caches(self.vae)
            with torch.no_grad():
                for earlier in range(batch["position"]):
                    previous = self.batch(batch["step"] - batch["position"] + earlier, batch["rank"])
                    self.objective(previous["video"], caches)
            self._stream = [batch["stream"], caches, batch["position"]]
        self._stream[2] += 1
        return self._stream[1]

    def loss(self, batch: dict):
        video = batch["video"]
        self._step = batch["step"]
        streaming = "position" in batch
        for group in self._optimizer.param_groups:
            group["lr"] = self.train_config.rate(batch["step"])
        if streaming:
            decoded, kl, readings = self.objective(video, self._stream_caches(batch))
        else:
            mouth = latent_mouth(batch["mask"], self._spatial) if self.head is not None else None
            decoded, kl, readings = self.objective(video, mouth=mouth)
        l1 = mouth_weighted_l1(decoded, video, batch["mask"], self.train_config.mouth_weight,
                               self.train_config.interior_weight)
        loss = l1 + self.train_config.kl_weight * kl
        values = {}
        if readings is not None:
            opening = opening_error(readings, batch["opening"])
            loss = loss + self.train_config.opening_weight * opening
            values["opening"] = float(opening.detach())
        elif self.head is not None:  # streams: the head idles, but data-parallel ranks still expect its gradients
            loss = loss + 0.0 * sum(p.sum() for p in self.head.parameters())
        mse = F.mse_loss(decoded.detach(), video)
        return loss, {"loss": float(loss.detach()), "l1": float(l1.detach()),
                      "psnr": float(10 * torch.log10(4.0 / mse)), **values}

    def export(self, path: Path) -> None:
        export_vae(self.vae.cpu(), self.source, Path(path))


@dataclasses.dataclass(frozen=True)
class DecoderTrainConfig:
    """`facecast train vae --phase decoder`: the decoder trained further on a finished VAE's posterior means (the
    latents inference gives it), the encoder frozen. The latent space does not move, so a latent cache and a DiT
    trained in it stay valid (their digest is the encoder's, `latents.vae_digest`). At the end of the from-scratch
    phase the encoder's latents carry more of the mouth than the decoder draws (a linear read-out of the mouth's
    opening from them: r ~0.6; the probe on the decoded frames: 0.33), and a decoder step costs about two thirds of a
    whole one; the rate warms up, holds, then falls linearly to 0 at `steps`."""
    steps: int = 1800
    """The schedule's length: the rate reaches 0 here (`facecast train vae --phase decoder --steps N` sets it)."""
    window_frames: int = 17
    batch_size: int = 2
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    decay_from: float = 0.7
    """The rate starts falling at this fraction of `steps`."""
    mouth_weight: float = 4.0
    interior_weight: float = 30.0
    """As `VAETrainConfig.interior_weight` (the shipped recipe's 30 by default)."""
    motion_weight: float = 0.0
    """Weight of the L1 difference between the decoded and the true frame-to-frame changes: what does not move in the
    clip (a listening face) should not flicker from one latent frame's group to the next. 0: off."""
    latent_noise: float = 0.0
    """Gaussian noise added to the latents before they are decoded, each sample's level drawn from [0, latent_noise]
    in units of each channel's standard deviation (`latents_std`): the decoder learns to draw the frames from latents
    near the encoder's, as a score model's samples are. 0: off."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.motion_weight < 0:
            raise ValueError(f"motion_weight={self.motion_weight} is invalid: at least 0 (0: off)")
        if self.latent_noise < 0:
            raise ValueError(f"latent_noise={self.latent_noise} is invalid: at least 0 (0: off)")
        if self.interior_weight < 0:
            raise ValueError(f"interior_weight={self.interior_weight} is invalid: at least 0 (0: off)")
        if self.window_frames < 1 or (self.window_frames - 1) % 4:
            raise ValueError(f"window_frames={self.window_frames} is invalid: 1 + 4k (1, 5, 9, ...)")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: at least 1")
        if not 0.0 <= self.decay_from <= 1.0:
            raise ValueError(f"decay_from={self.decay_from} is invalid: a fraction in [0, 1]")

    def rate(self, step: int) -> float:
        return warm_hold_decay(step, steps=self.steps, peak=self.learning_rate, warmup_steps=self.warmup_steps,
                               decay_from=self.decay_from)


class DecoderObjective(torch.nn.Module):
    """The decoder on the frozen encoder's posterior means (a module, so DDP wraps the whole forward pass)."""

    def __init__(self, vae: AutoencoderKLWan):
        super().__init__()
        self.vae = vae

    def forward(self, video: torch.Tensor, noise_levels: torch.Tensor | None = None,
                noise_seed: int = 0) -> torch.Tensor:
        """video [B, 3, T, H, W]; noise_levels [B] (None: none): each sample's latents plus that many standard
        deviations of Gaussian noise per channel (`latents_std`), drawn from `noise_seed`."""
        with torch.no_grad():
            latents = self.vae.encode(video).latent_dist.mean
            if noise_levels is not None:
                std = torch.tensor(self.vae.config.latents_std, dtype=latents.dtype, device=latents.device)
                noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(noise_seed))
                scale = noise_levels.to(latents)[:, None, None, None, None] * std[None, :, None, None, None]
                latents = latents + noise.to(latents) * scale
        return self.vae.decode(latents).sample


class DecoderStage:
    name = "vae-decoder"

    def __init__(self, vae_dir: str | Path, source, train: DecoderTrainConfig = DecoderTrainConfig(), *, wrap=None,
                 device="cpu"):
        self.seed, self.train_config, self.device = train.seed, train, torch.device(device)
        self.vae = StreamingVAE.from_pretrained(vae_dir, device=self.device, dtype=torch.float32).vae  # fp16 widened
        for module in (self.vae.encoder, self.vae.quant_conv):
            module.requires_grad_(False)
        objective = DecoderObjective(self.vae)
        self.objective = wrap(objective) if wrap else objective
        trained = [p for p in self.vae.parameters() if p.requires_grad]
        self._optimizer = torch.optim.AdamW(trained, lr=train.learning_rate, weight_decay=0.0)
        self.source = source
        self.pools = ClipPools(source, train.seed)

    def modules(self):
        return {"vae": self.vae}

    def optimizer(self):
        return self._optimizer

    def batch(self, step: int, rank: int) -> dict:
        config = self.train_config
        batch = window_batch(self.pools, self.seed, step, rank, config.window_frames, config.batch_size, self.device)
        if config.latent_noise:
            rng = np.random.default_rng([self.seed, step, rank, 7])
            batch["noise_levels"] = torch.from_numpy(rng.uniform(0, config.latent_noise, config.batch_size)).float()
            batch["noise_seed"] = int(rng.integers(2 ** 62))
        return batch

    def loss(self, batch: dict):
        for group in self._optimizer.param_groups:
            group["lr"] = self.train_config.rate(batch["step"])
        video = batch["video"]
        decoded = self.objective(video, batch.get("noise_levels"), batch.get("noise_seed", 0))
        l1 = mouth_weighted_l1(decoded, video, batch["mask"], self.train_config.mouth_weight,
                               self.train_config.interior_weight)
        mse = F.mse_loss(decoded.detach(), video)
        metrics = {"psnr": float(10 * torch.log10(4.0 / mse))}
        loss = l1
        if self.train_config.motion_weight > 0:
            motion = (torch.diff(decoded, dim=2) - torch.diff(video, dim=2)).abs().mean()
            loss = l1 + self.train_config.motion_weight * motion
            metrics["motion"] = float(motion.detach())
        return loss, {"loss": float(loss.detach()), "l1": float(l1.detach()), **metrics}

    def export(self, path: Path) -> None:
        """fp16 diffusers directory; the latent statistics are the source VAE's (the encoder did not move). Beside
        it, this run's recipe (`shipped.VAE_DECODER_TRAIN`)."""
        config = self.vae.config
        write_vae(self.vae.cpu().eval(), list(config.latents_mean), list(config.latents_std), Path(path))
        recipe = {"train": dataclasses.asdict(self.train_config)}
        (Path(path) / VAE_DECODER_TRAIN).write_text(json.dumps(recipe, indent=1) + "\n")


@torch.no_grad()
def latent_statistics(vae: AutoencoderKLWan, source, windows: int = 24, length: int = 5, seed: int = 1):
    rng = np.random.default_rng(seed)
    latents = []
    for _ in range(windows):
        clip = source[int(rng.integers(len(source)))]
        start = int(rng.integers(0, max(1, clip.num_frames - length + 1)))
        video, _ = frame_window(clip, start, length)
        latents.append(vae.encode(video[None]).latent_dist.mean)
    z = torch.cat([l.flatten(2) for l in latents], 2)[0] if len(latents) == 1 else \
        torch.cat([l.permute(1, 0, 2, 3, 4).flatten(1) for l in latents], 1)
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-3).tolist()


def export_vae(vae: AutoencoderKLWan, source, path: Path) -> None:
    """fp16 diffusers directory with the measured latent statistics in its config."""
    vae = vae.eval()
    mean, std = latent_statistics(vae, source)
    write_vae(vae, mean, std, path)


def write_vae(vae: AutoencoderKLWan, mean: list, std: list, path: Path) -> None:
    """`vae` as an fp16 diffusers directory whose config carries these latent statistics."""
    vae.register_to_config(latents_mean=mean, latents_std=std)
    path.mkdir(parents=True, exist_ok=True)
    half = AutoencoderKLWan.from_config(vae.config)
    half.load_state_dict(vae.state_dict())
    half.to(torch.float16).save_pretrained(path, safe_serialization=True)
    config_path = path / "config.json"  # diffusers writes back its init defaults here; the measured ones win
    config = json.loads(config_path.read_text())
    config.update(latents_mean=mean, latents_std=std)
    config.pop("_name_or_path", None)  # where the source was loaded from on this machine: not part of the weights
    config_path.write_text(json.dumps(config, indent=2))


STREAM_BLOCK = 16
"""Frames per block of `reconstruction_report`'s `psnr_by_block`: how quality holds up along a stream."""


@torch.no_grad()
def reconstruction_report(vae: StreamingVAE, source, clips: int = 8, length: int = 25, fast=None) -> dict:
    """Encode and stream-decode `length`-frame windows of held-out clips; PSNR/SSIM overall and on the mouth box,
    and the PSNR of each STREAM_BLOCK-frame block along the stream (`psnr_by_block`: a VAE that drifts falls).
    With `fast` (a `fastdecode.FastDecoder`), the same latents through it too: its scores against the truth, against
    the full decoder's frames (`psnr_vs_full`, `ssim_vs_full`) and its decode cost, under "fast"."""
    from .data import mouth_mask

    decoders = {"full": vae, **({"fast": fast} if fast is not None else {})}
    rows = {name: [] for name in decoders}
    seconds = {name: 0.0 for name in decoders}
    decoded_frames = 0
    for index in range(min(clips, len(source))):
        clip = source[index]
        video, _ = frame_window(clip, 0, min(length, clip.num_frames - (clip.num_frames - 1) % 4))
        latents = vae.normalize(vae.vae.encode(video[None].to(vae.device, vae.dtype)).latent_dist.mean)
        truth = (video.permute(1, 2, 3, 0).numpy() + 1) / 2
        masks = mouth_mask(clip.truth.face_box[:len(truth)], truth.shape[1]) if clip.truth is not None else None
        outputs = {}
        for name, decoder in decoders.items():
            began = time.perf_counter()
            frames, _ = decoder.decode_chunk(latents, decoder.new_decode_cache())
            seconds[name] += time.perf_counter() - began
            outputs[name] = (frames[0].float().permute(1, 2, 3, 0).cpu().numpy() + 1) / 2
        decoded_frames += len(truth)
        for name, output in outputs.items():
            for t in range(len(truth)):
                row = {"psnr": psnr(output[t], truth[t]), "ssim": ssim(output[t], truth[t]),
                       "style": clip.meta.get("styles", ["?"])[0], "block": t // STREAM_BLOCK}
                if name != "full":
                    row["psnr_vs_full"] = psnr(output[t], outputs["full"][t])
                    row["ssim_vs_full"] = ssim(output[t], outputs["full"][t])
                if masks is not None and masks[t].any():
                    ys, xs = np.nonzero(masks[t])
                    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
                    row["mouth_psnr"] = psnr(output[t][box], truth[t][box])
                rows[name].append(row)

    def mean(key, subset):
        values = [r[key] for r in subset if key in r]
        return round(float(np.mean(values)), 3) if values else None

    def summary(name: str) -> dict:
        subset = rows[name]
        styles = sorted({r["style"] for r in subset})
        report = {"psnr": mean("psnr", subset), "ssim": mean("ssim", subset), "mouth_psnr": mean("mouth_psnr", subset),
                  "per_style": {s: {"psnr": mean("psnr", [r for r in subset if r["style"] == s]),
                                    "ssim": mean("ssim", [r for r in subset if r["style"] == s])} for s in styles},
                  "psnr_by_block": [mean("psnr", [r for r in subset if r["block"] == b])
                                    for b in range(max(r["block"] for r in subset) + 1)],
                  "frames": len(subset),
                  "decode_ms_per_frame": round(1000 * seconds[name] / max(1, decoded_frames), 2)}
        if name != "full":
            report.update(psnr_vs_full=mean("psnr_vs_full", subset), ssim_vs_full=mean("ssim_vs_full", subset),
                          speedup=round(seconds["full"] / max(seconds[name], 1e-9), 2))
        return report

    report = summary("full")
    if fast is not None:
        report["fast"] = summary("fast")
    return report
