"""Stage 1: the teacher — the bidirectional, audio-conditioned flow-matching model (TalkingMachines' teacher, small).

    TeacherStage(dit_config, latents, TeacherTrainConfig(...))   a `loop.Stage`
    teacher_sample(dit, batch, steps=12, guidance=..., shift=...) -> clean latents (many-step Euler, CFG on audio)
    sigmas(steps, shift)                                           the many-step schedule

Objective (rectified flow, Wan's convention): x_t = (1 - t) x0 + t noise, the model predicts v = noise - x0; t is
drawn logit-normal (sigmoid of a standard normal), the same t for every frame of a sample (the teacher is
bidirectional: "full" layout, absolute positions), with the reference latent as a clean first frame of the sequence
(`predict_velocity`). The squared error is weighted up on the mouth region (the truth's
face boxes say where).

That alone does not teach lip sync: the mouth's opening moves a small direction of the latent cells around the mouth
(head motion, blinks and framing move them far more), so the audio explains well under 1 % of the velocity error and
the shipped teacher ignores the audio (BENCHMARKS, "Teaching the teacher to listen"). An optional sync term
(`sync_weight`, off by default) does what a lip-sync expert loss does in pixel space (Wav2Lip): a `LatentLipReader`,
a linear read-out of the opening from the 4x4 latent cells around the mouth fitted (ridge) to the truth's openings in
the cache before training, reads the model's clean estimate x0 = x_t - t v and the true latent, and the squared
difference of the two readings (over the readings' variance) is added, on single-character samples that hear their
audio; `sync_layers` chooses whether it trains every weight or only the layers that read the audio. Measured on
talk128 it makes the teacher follow the audio in latent space (the reading's error 41 % lower with the window's own
audio than with another's) but not in decoded video, and it costs the picture: the reader's direction is only
weakly drawn by the VAE's decoder. It stays for the next attempt, with a reader the decoder renders.

Conditioning, as a session gives it: the reference latent (the identity's neutral render) through the reference
tokens, the empty prompt, and the audio tokens each latent frame sees (`latents.audio_windows`, the windows
`AudioStage` cuts). Audio dropout: a `audio_dropout` share of samples has no audio at all (every character's region
zeroed, which is exactly `audio=None`), so classifier-free guidance on audio works at sampling time; and a
`listening_dropout` share marks the frames where the truth says a character is not speaking as not speaking (the
silence embedding), so `set_speaking(False)` means a closed, listening mouth.

The exported checkpoint is the EMA of the weights (decay `ema_decay`), a facecast checkpoint with the stage's
settings in its metadata.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..checkpoint import save_facecast_checkpoint
from ..config import DiTConfig
from ..dit import CausalAvatarDiT
from ..text import BytePromptEncoder
from .data import ClipPools, mouth_crops
from .latents import audio_windows, frontend_record
from .loop import warm_hold_decay

MAX_CHARACTERS = 2


@dataclass(frozen=True)
class TeacherTrainConfig:
    seed: int = 0
    batch_size: int = 8
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    frames: int = 9
    """Latent frames per sample (33 video frames, 1.3 s)."""
    mouth_weight: float = 4.0
    audio_dropout: float = 0.1
    listening_dropout: float = 0.5
    voice_augment: float = 0.0
    """Strength of `augment_voice` on each sample's audio features (0: off, the shipped recipe; 1: shifts up to 4 mel
    bins, tilt and gain up to 6 dB): the held-out clips speak with a voice no training clip has, so each training
    voice is shifted, tilted and made louder or softer in the log-mel domain."""
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    sync_weight: float = 0.0
    """Weight of the latent lip-reading term (0: off, the velocity error alone: the shipped teacher's recipe). Measured
    at 1.0 and 0.2 it made the teacher listen in latent space but not in decoded video, and cost the picture
    (BENCHMARKS, "Teaching the teacher to listen"); kept for the next attempt (a reader the decoder renders)."""
    sync_fit_clips: int = 256
    """Clips of the cache the lip reader is fitted on (single-character ones; every fifth held out for its r)."""
    sync_layers: str = "audio"
    """What the sync term trains: "audio" (only the layers that read the audio, `CausalAvatarDiT.audio_parameters`;
    the rest learns from the velocity error alone) or "all" (every weight). Both cost the picture on talk128
    (BENCHMARKS): through every weight the term dominates the update; through the audio layers alone they learn to
    push the hidden state, not the mouth."""
    init: str | None = None
    """A teacher checkpoint to start from (its weights, also the EMA's start) instead of random weights: training a
    shipped teacher further. The optimiser starts fresh (checkpoints keep no optimiser state), with its warm-up."""
    decay_from: float = 1.0
    """Where the learning rate starts its linear fall to 0 at `steps`, as a fraction of the run (1: no fall, the rate
    holds after the warm-up, as in every shipped phase; 0: it falls over the whole run, under the warm-up's ramp)."""
    steps: int = 0
    """The run's length, where a falling rate reaches 0 (the driver sets it; needed when `decay_from` < 1)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay_from <= 1.0:
            raise ValueError(f"decay_from={self.decay_from!r} is invalid: a fraction in [0, 1] (1: no fall)")
        if self.decay_from < 1.0 and self.steps < 1:
            raise ValueError(f"decay_from={self.decay_from!r} needs steps (the run's length, where the rate reaches 0)")
        if self.voice_augment < 0:
            raise ValueError(f"voice_augment={self.voice_augment!r} is invalid: at least 0 (0: off)")
        if self.sync_layers not in ("audio", "all"):
            raise ValueError(f"sync_layers={self.sync_layers!r} is invalid; allowed: 'audio', 'all'")


def sigmas(steps: int, shift: float) -> list[float]:
    """`steps + 1` noise levels from 1 to 0, shifted as Wan samples: s' = shift*s / (1 + (shift - 1) s)."""
    if steps < 1:
        raise ValueError(f"steps={steps} is invalid: at least 1")
    raw = np.linspace(1.0, 0.0, steps + 1)
    return [float(shift * s / (1.0 + (shift - 1.0) * s)) for s in raw]


class LatentLipReader:
    """The mouth opening read linearly from the `CROP` x `CROP` latent cells centred on the mouth.

        reader = LatentLipReader.fit(clips)            ridge on the cache's latents and the truth's openings
        reader.read(latents [B, C, F, h, w], mouth [B, F, h, w]) -> openings [B, F]

    The crop's centre is the mouth weight's centroid (the truth's face box, per latent frame), so the same cells are
    read from a prediction and from the truth. `heldout_r`: correlation with the truth on the held-out clips;
    `scale`: the spread (std) of its readings of the true latents, which the sync term is measured in.

    The ridge is the strongest of `RIDGE` that keeps `KEEP` of the best held-out correlation: in a loss, a reader
    with large weights amplifies every error of the clean estimate in the crop (at t = 0.9 the best-reading ridge
    makes the term 6x the openings' variance for a model that cannot know them), while a strong ridge reads the
    opening's own direction (talk128: r 0.71 -> 0.58, weight norm 1.12 -> 0.065).
    """

    CROP = 4
    RIDGE = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)
    KEEP = 0.8

    def __init__(self, weight: torch.Tensor, bias: float, scale: float, heldout_r: float):
        self.weight, self.bias, self.scale, self.heldout_r = weight.float(), float(bias), float(scale), heldout_r

    @classmethod
    def crops(cls, latents: torch.Tensor, mouth: torch.Tensor) -> torch.Tensor:
        """latents [B, C, F, h, w], mouth [B, F, h, w] -> [B, F, C * CROP * CROP] (differentiable in latents)."""
        return mouth_crops(latents, mouth, cls.CROP)

    def read(self, latents: torch.Tensor, mouth: torch.Tensor) -> torch.Tensor:
        return self.crops(latents.float(), mouth) @ self.weight.to(latents.device) + self.bias

    @classmethod
    def fit(cls, clips, max_clips: int = 256) -> "LatentLipReader":
        """Ridge regression of the first character's opening on the crops, over the single-character clips among
        the first `max_clips` of `clips` (frames whose mouth is off screen are left out); the ridge strength is the
        strongest of `RIDGE` whose reading of the held-out clips (every fifth) keeps `KEEP` of the best one's
        correlation, refitted on all."""
        features, targets, held = [], [], []
        for index in range(min(len(clips), max_clips)):
            clip = clips[index]
            if clip.regions.shape[0] != 1:
                continue
            mouth = clip.mouth.float()
            visible = mouth.sum((2, 3)) > 0                                                   # [G, n]
            crops = cls.crops(clip.latents.float(), mouth)                                    # [G, n, D]
            features.append(crops[visible])
            targets.append(clip.opening[0].float()[visible])
            held.append(torch.full((int(visible.sum()),), index % 5 == 4))
        if not features:
            raise ValueError("no single-character clips with a visible mouth to fit the latent lip reader on")
        x, y, held = torch.cat(features).double(), torch.cat(targets).double(), torch.cat(held)

        def solve(rows, strength):
            a, t = x[rows], y[rows]
            mean_x, mean_y = a.mean(0), t.mean()
            a = a - mean_x
            gram = a.T @ a + strength * len(a) / 100 * torch.eye(a.shape[1], dtype=a.dtype)
            weight = torch.linalg.solve(gram, a.T @ (t - mean_y))
            return weight, float(mean_y - mean_x @ weight)

        def correlation(rows, weight, bias):
            predicted = x[rows] @ weight + bias
            return float(torch.corrcoef(torch.stack([predicted, y[rows]]))[0, 1])

        best, best_r = cls.RIDGE[-1], float("nan")
        if held.any() and (~held).sum() > 1:
            scores = {strength: correlation(held, *solve(~held, strength)) for strength in cls.RIDGE}
            scores = {k: (-1.0 if np.isnan(v) else v) for k, v in scores.items()}
            top = max(scores.values())
            best = max(k for k, v in scores.items() if v >= cls.KEEP * top)
            best_r = scores[best]
        weight, bias = solve(torch.ones_like(held), best)
        scale = float((x @ weight + bias).std().clamp(min=1e-6))
        return cls(weight.float(), bias, scale, best_r)


GROWABLE = ("num_layers", "audio_injection_dim", "audio_dim")
"""The shape fields a teacher may grow by when it is trained further (`TeacherTrainConfig.init`): more blocks (after
its own), the per-frame audio injection where it had none, and another audio front end's width (a new speech encoder:
the first audio layer starts at zero, so the model starts deaf and learns to hear the new features)."""
NEW_AUDIO_INPUT = "audio_projection.linear_1.weight"
"""The one layer that reads the front end's features."""
NEW_BLOCK_OUTPUTS = ("attn1.to_out.0.", "attn2.to_out.0.", "ffn.net.2.")
"""The layers of a block that write into the residual stream: zero in a grown block, so it starts as the identity."""


def initial_weights(path: str, fresh: CausalAvatarDiT) -> dict:
    """The state dict of the teacher checkpoint at `path` for `fresh`'s shape: the same shape, or one it grows into
    (`GROWABLE`; the new weights taken from `fresh`, with every layer that writes a new block's output and the
    injection's output at zero, so the grown model computes exactly what the checkpoint computes until it is trained;
    for a new front end's `audio_dim`, `NEW_AUDIO_INPUT` at zero: every audio token is then the same).
    Any other difference is a clear error naming both shapes."""
    from ..checkpoint import load_facecast_checkpoint

    model, metadata, _ = load_facecast_checkpoint(path)
    if metadata.get("stage", "teacher") != "teacher":
        raise ValueError(f"init={path}: a {metadata['stage']} checkpoint, not a teacher")
    theirs, ours = asdict(model.config), asdict(fresh.config)
    differing = [k for k in ours if theirs.get(k) != ours[k]]
    grows = (set(differing) <= set(GROWABLE) and theirs["num_layers"] <= ours["num_layers"]
             and theirs["audio_injection_dim"] in (0, ours["audio_injection_dim"]))
    if not grows:
        described = ", ".join(f"{k} {theirs[k]!r} (this run: {ours[k]!r})" for k in differing)
        raise ValueError(f"init={path}: the checkpoint's shape differs from this run's: {described}; it may only grow: "
                         "more num_layers, audio_injection_dim from 0, another audio_dim")
    state = {key: value.float() for key, value in model.state_dict().items()}
    if theirs["audio_dim"] != ours["audio_dim"]:
        state[NEW_AUDIO_INPUT] = torch.zeros_like(fresh.state_dict()[NEW_AUDIO_INPUT], dtype=torch.float32)
    if not differing:
        return state
    new = {key: value.detach().clone().float() for key, value in fresh.state_dict().items() if key not in state}
    for key in new:
        block = key.startswith("blocks.") and int(key.split(".")[1]) >= theirs["num_layers"]
        if (block and key.split(".", 2)[2].startswith(NEW_BLOCK_OUTPUTS)) or key.startswith("audio_injection.out."):
            new[key].zero_()
    return {**state, **new}


def sync_mask(batch: dict) -> torch.Tensor:
    """[B] 1 for samples the lip reader can judge: one character, and it hears its audio (not dropped)."""
    regions = batch["regions"]
    return ((regions[:, 0].sum(-1) > 0) & (regions[:, 1:].sum((1, 2)) == 0)).float()


def text_states(config: DiTConfig, batch: int, device) -> torch.Tensor:
    """The empty prompt's states (the world's clips have no prompt), [batch, Lt, text_dim]."""
    return BytePromptEncoder(config.text_dim, config.text_len)([""]).to(device).expand(batch, -1, -1)


@dataclass(frozen=True)
class Window:
    """One training window: clip `clip` (index into a latent source), its segment, the first latent frame in it;
    `listening`: frames the truth marks as not speaking get the silence embedding; `silent`: no audio at all."""

    clip: int
    segment: int
    offset: int
    listening: bool = False
    silent: bool = False


def random_windows(count: int, clips: int, rng: np.random.Generator, segments, segment_latents: int, frames: int, *,
                   audio_dropout: float, listening_dropout: float) -> list[Window]:
    """`count` windows drawn uniformly; `segments(i)` is clip i's segment count."""
    if segment_latents < frames:
        raise ValueError(f"the latent cache's segments ({segment_latents} latent frames) are shorter than "
                         f"frames={frames}")
    windows = []
    for _ in range(count):
        clip = int(rng.integers(clips))
        windows.append(Window(clip, int(rng.integers(segments(clip))),
                              int(rng.integers(0, segment_latents - frames + 1)),
                              listening=bool(rng.random() < listening_dropout),
                              silent=bool(rng.random() < audio_dropout)))
    return windows


def window_batch(clips, windows: list[Window], frames: int, dit_config: DiTConfig, ratio: int = 4) -> dict:
    """The batch for `windows` of `clips` (indexable LatentClips), characters padded to MAX_CHARACTERS."""
    rows = {key: [] for key in ("x0", "reference", "features", "speaking", "regions", "mouth")}
    for window in windows:
        clip = clips[window.clip]
        segment, offset = window.segment, window.offset
        speaking = clip.speaking if window.listening else torch.ones_like(clip.speaking)
        first_latent = int(clip.starts[segment]) // ratio + offset
        features, talk = audio_windows(clip.features.float(), speaking, first_latent, frames, ratio,
                                       dit_config.audio_window)
        pad = MAX_CHARACTERS - features.shape[0]
        regions = torch.zeros_like(clip.regions.float()) if window.silent else clip.regions.float()
        rows["x0"].append(clip.latents[segment, :, offset:offset + frames].float())
        rows["reference"].append(clip.reference.float())
        rows["features"].append(torch.cat([features, features.new_zeros(pad, *features.shape[1:])]))
        rows["speaking"].append(torch.cat([talk, talk.new_zeros(pad, *talk.shape[1:])]))
        rows["regions"].append(torch.cat([regions, regions.new_zeros(pad, regions.shape[1])]))
        rows["mouth"].append(clip.mouth[segment, offset:offset + frames].float())
    return {key: torch.stack(value) for key, value in rows.items()}


VOICE_SHIFT_BINS = 4
"""`augment_voice` at strength 1: mel bins a voice is shifted by, at most (80 bins over 0-8 kHz)."""
VOICE_GAIN = 0.15
"""At strength 1: the loudness change at most, in feature units ((log10 mel + 4) / 4: 0.15 = 6 dB)."""
VOICE_TILT = 0.15
"""At strength 1: the spectral tilt at most, in feature units from the lowest mel bin to the highest (6 dB)."""


def augment_voice(features: torch.Tensor, rng: np.random.Generator, strength: float = 1.0,
                  n_mels: int = 80) -> torch.Tensor:
    """features [B, K, F, T, subframes * n_mels] (the log-mel front-end's layout: subframes of n_mels each) -> the
    same speech in another voice, one per sample and character, the same over its whole window: the mel axis shifted
    by up to `VOICE_SHIFT_BINS` x strength bins (formants and pitch move along it; the edge bin repeated), a tilt and a
    gain added (`VOICE_TILT`, `VOICE_GAIN`). Silence stays at the front-end's floor's level plus the gain. Strength 0
    returns `features` without drawing from `rng` (a recipe without it keeps its batches)."""
    if not strength:
        return features
    if features.shape[-1] % n_mels:
        raise ValueError(f"augment_voice: feature width {features.shape[-1]} is not a whole number of {n_mels}-mel "
                         "subframes (the log-mel front-end's layout)")
    batch, people = features.shape[:2]
    limit = int(round(VOICE_SHIFT_BINS * strength))
    shifts = rng.integers(-limit, limit + 1, (batch, people))
    gains = rng.uniform(-1.0, 1.0, (batch, people)) * VOICE_GAIN * strength
    tilts = rng.uniform(-1.0, 1.0, (batch, people)) * VOICE_TILT * strength
    mels = features.unflatten(-1, (-1, n_mels))                                   # [B, K, F, T, S, n_mels]
    bins = torch.arange(n_mels)
    out = torch.empty_like(mels)
    ramp = (bins.float() / (n_mels - 1) - 0.5).to(features.dtype)
    for b in range(batch):
        for k in range(people):
            source = (bins - int(shifts[b, k])).clamp(0, n_mels - 1)
            out[b, k] = mels[b, k][..., source] + float(gains[b, k]) + float(tilts[b, k]) * ramp
    return out.flatten(-2)


def sample_batch(clips: list, rng: np.random.Generator, frames: int, dit_config: DiTConfig, *, batch_size: int,
                 audio_dropout: float, listening_dropout: float) -> dict:
    """A random training batch of `frames`-latent windows of the clips' segments."""
    if not clips:
        raise ValueError("no clips to sample from")
    windows = random_windows(batch_size, len(clips), rng, lambda i: clips[i].segments, clips[0].segment_latents,
                             frames, audio_dropout=audio_dropout, listening_dropout=listening_dropout)
    return window_batch(clips, windows, frames, dit_config)


class TeacherObjective(nn.Module):
    """The velocity the DiT predicts for a batch at noise levels `sigma` [B] (the module DDP wraps)."""

    def __init__(self, dit: CausalAvatarDiT):
        super().__init__()
        self.dit = dit

    def forward(self, noisy: torch.Tensor, sigma: torch.Tensor, batch: dict) -> torch.Tensor:
        return predict_velocity(self.dit, noisy, sigma, batch, layout="full")


def predict_velocity(dit: CausalAvatarDiT, noisy: torch.Tensor, sigma: torch.Tensor, batch: dict, *,
                     layout: str, **layout_options) -> torch.Tensor:
    """v for `noisy` [B, 16, F, h, w] at noise levels sigma [B], conditioned on `batch`.

    The reference latent goes first in the sequence as a clean frame (t = 0): in the teacher's "full" layout every
    frame sees it (TalkingMachines' reference in self-attention), and in the student's "block_sparse" layout it is
    the attention sink, as a session starts. Only the F generated frames' velocities are returned."""
    size, frames = noisy.shape[0], noisy.shape[2]
    device = noisy.device
    cond = dit.prepare_conditions(text_states(dit.config, size, device), dit.reference_tokens(batch["reference"]),
                                  torch.zeros(1, device=device))
    features, speaking = batch["features"], batch["speaking"]
    if layout == "full":  # audio covers every frame: the reference frame hears silence
        features = torch.cat([features.new_zeros(*features.shape[:2], 1, *features.shape[3:]), features], dim=2)
        speaking = torch.cat([speaking.new_zeros(*speaking.shape[:2], 1, speaking.shape[3]), speaking], dim=2)
    audio = dit.project_audio(features, speaking, batch["regions"])
    timesteps = torch.cat([torch.zeros(size, 1, device=device), (sigma * 1000.0)[:, None].expand(-1, frames)], 1)
    sequence = torch.cat([batch["reference"].to(noisy.dtype), noisy], dim=2)
    if layout == "block_sparse":
        layout_options.setdefault("sink_frames", 1)
    return dit.forward_full(sequence, timesteps, cond, audio, layout=layout, **layout_options)[:, :, 1:]


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, mouth: torch.Tensor, mouth_weight: float):
    """Mean squared error with the mouth cells weighted (1 + mouth_weight * mouth); mouth [B, F, h, w]."""
    weight = (1.0 + mouth_weight * mouth)[:, None]
    return ((prediction.float() - target.float()) ** 2 * weight).sum() / (weight.sum() * prediction.shape[1])


def sync_loss(reader: LatentLipReader, estimate: torch.Tensor, x0: torch.Tensor, mouth: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the lip reader's readings of `estimate` and `x0` [B, C, F, h, w] over the readings'
    variance (1: no better than a constant), on the samples `mask` [B] selects (0 when none)."""
    difference = (reader.read(estimate, mouth) - reader.read(x0, mouth).detach()) / reader.scale
    per_sample = (difference ** 2).mean(1)
    return (per_sample * mask).sum() / mask.sum().clamp(min=1.0)


def warm_rate(optimizer: torch.optim.Optimizer, rate: float, step: int, warmup_steps: int, *, steps: int = 0,
              decay_from: float = 1.0) -> None:
    """Linear warm-up of the learning rate over `warmup_steps`; with `decay_from` < 1, then a linear fall to 0 at
    `steps` from `decay_from` of them (`loop.warm_hold_decay`)."""
    for group in optimizer.param_groups:
        group["lr"] = warm_hold_decay(step, steps=steps, peak=rate, warmup_steps=warmup_steps, decay_from=decay_from)


@torch.no_grad()
def update_ema(ema: nn.Module, live: nn.Module, decay: float, step: int | None = None) -> None:
    """ema <- decay * ema + (1 - decay) * live; with `step`, the decay ramps up as (1 + step) / (10 + step)."""
    if step is not None:
        decay = min(decay, (1 + step) / (10 + step))
    for average, parameter in zip(ema.parameters(), live.parameters()):
        average.lerp_(parameter.detach(), 1.0 - decay)


class TeacherStage:
    name = "teacher"

    def __init__(self, dit_config: DiTConfig, latents, train: TeacherTrainConfig = TeacherTrainConfig(), *,
                 wrap=None, device="cpu"):
        self.seed, self.train_config, self.device = train.seed, train, torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(train.seed)
            self.dit = CausalAvatarDiT(dit_config).to(self.device)
        if train.init:
            self.dit.load_state_dict(initial_weights(train.init, self.dit))
        self.ema = copy.deepcopy(self.dit).requires_grad_(False)
        objective = TeacherObjective(self.dit)
        self.objective = wrap(objective) if wrap else objective
        self._optimizer = torch.optim.AdamW(self.dit.parameters(), lr=train.learning_rate, weight_decay=0.01,
                                            betas=(0.9, 0.99))
        self.grad_clip = train.grad_clip
        self.source = latents
        self.pools = ClipPools(latents, train.seed, steps_per_pool=32)
        self.reader = None
        self._audio_layers = self.dit.audio_parameters()   # the sync term's only weights with sync_layers="audio"
        if train.sync_weight:
            try:
                self.reader = LatentLipReader.fit(latents, train.sync_fit_clips)
            except ValueError as error:   # e.g. only two-character clips: train on the velocity error alone
                warnings.warn(f"teacher: the sync term is off: {error}", stacklevel=2)

    def modules(self):
        return {"dit": self.dit, "ema": self.ema}

    def optimizer(self):
        return self._optimizer

    def batch(self, step: int, rank: int) -> dict:
        rng = np.random.default_rng([self.seed, step, rank])
        config = self.train_config
        batch = sample_batch(self.pools.pool_for(step, rank), rng, config.frames, self.dit.config,
                             batch_size=config.batch_size, audio_dropout=config.audio_dropout,
                             listening_dropout=config.listening_dropout)
        size = config.batch_size
        batch["sigma"] = torch.sigmoid(torch.from_numpy(rng.standard_normal(size)).float())
        batch["noise"] = torch.from_numpy(rng.standard_normal(batch["x0"].shape).astype(np.float32))
        batch["features"] = augment_voice(batch["features"], rng, config.voice_augment)
        batch["step"] = step
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def loss(self, batch: dict):
        config = self.train_config
        warm_rate(self._optimizer, config.learning_rate, batch["step"], config.warmup_steps, steps=config.steps,
                  decay_from=config.decay_from)
        sigma = batch["sigma"]
        s = sigma[:, None, None, None, None]
        noisy = (1.0 - s) * batch["x0"] + s * batch["noise"]
        velocity = self.objective(noisy, sigma, batch)
        mse = weighted_mse(velocity, batch["noise"] - batch["x0"], batch["mouth"], self.train_config.mouth_weight)
        if self.reader is None:
            return mse, {"loss": float(mse.detach())}
        sync = sync_loss(self.reader, noisy - s * velocity.float(), batch["x0"], batch["mouth"], sync_mask(batch))
        weighted = self.train_config.sync_weight * sync
        values = {"loss": float((mse + weighted).detach()), "mse": float(mse.detach()), "sync": float(sync.detach())}
        if self.train_config.sync_layers == "all":
            return mse + weighted, values
        # the sync term's gradient for the audio layers alone, added through a surrogate whose gradient it is (one
        # backward more; the optimiser sees the velocity error's gradient plus this, every rank the same sum)
        grads = torch.autograd.grad(weighted, self._audio_layers, retain_graph=True, allow_unused=True)
        surrogate = sum((layer * grad).sum() for layer, grad in zip(self._audio_layers, grads) if grad is not None)
        return mse + surrogate, values

    def after_step(self, step: int) -> None:
        update_ema(self.ema, self.dit, self.train_config.ema_decay, step)

    def export(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        model = copy.deepcopy(self.ema).cpu().half()
        extra = {"stage": "teacher", "train": asdict(self.train_config),
                 "latents": getattr(self.source, "manifest", {}), **frontend_record(self.source)}
        if self.reader is not None:
            extra["lip_reader_heldout_r"] = self.reader.heldout_r
        save_facecast_checkpoint(model, path, extra=extra)


# ============================================================================================ sampling


@torch.no_grad()
def teacher_sample(dit: CausalAvatarDiT, batch: dict, noise: torch.Tensor, *, steps: int = 12, guidance: float = 2.0,
                   shift: float = 3.0) -> torch.Tensor:
    """Many-step Euler from `noise` [B, 16, F, h, w] to clean latents; classifier-free guidance on the audio
    (the unconditional pass has every region zeroed: no audio). steps x 2 network evaluations (24 NFE at 12)."""
    levels = sigmas(steps, shift)
    latents = noise.float()
    silent = dict(batch, regions=torch.zeros_like(batch["regions"]))
    for sigma, sigma_next in zip(levels, levels[1:]):
        t = torch.full((latents.shape[0],), sigma, device=latents.device)
        conditional = predict_velocity(dit, latents, t, batch, layout="full").float()
        if guidance != 1.0:
            unconditional = predict_velocity(dit, latents, t, silent, layout="full").float()
            conditional = unconditional + guidance * (conditional - unconditional)
        latents = latents + (sigma_next - sigma) * conditional
    return latents


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

