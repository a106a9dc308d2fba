"""Streaming wrapper around diffusers' `AutoencoderKLWan`.

Wan's causal 3D VAE decodes latent frame by latent frame, carrying a feature cache of its causal convolutions.
Diffusers keeps that cache on the module (`self._feat_map`), which would tie one decoder to one stream.  Here the
cache is a `DecodeCache` object passed in and returned, so one decoder interleaves many sessions, and decoding a
stream chunk by chunk equals decoding the whole clip at once (a test holds it).

Frame counts: the first latent frame decodes to 1 video frame, every later one to `temporal_compression` (4).
Latents given to and returned by this wrapper are *normalised* ((z - mean) / std), the space the DiT works in.
This module knows nothing of the DiT, sessions or audio.
"""

from __future__ import annotations

import hashlib
import json
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

from .config import VAEConfig


@dataclass
class DecodeCache:
    """Per-session decoder state: causal-conv feature cache and whether the first latent frame was decoded."""

    features: list = field(default_factory=list)
    started: bool = False


def stream_decode(vae: AutoencoderKLWan, z: torch.Tensor, cache: DecodeCache, clamp: bool = True) -> torch.Tensor:
    """diffusers' decoder on the next latent frames of a stream (post_quant_conv applied), latent frame by latent
    frame through `cache` (updated in place), the patch unfolded. Training passes clamp=False: a clamped pixel has
    no gradient, and a decoder gone out of range could never come back."""
    outputs = []
    for index in range(z.shape[2]):
        outputs.append(vae.decoder(z[:, :, index:index + 1], feat_cache=cache.features, feat_idx=[0],
                                   first_chunk=not cache.started))
        cache.started = True
    frames = torch.cat(outputs, 2)
    if vae.config.patch_size is not None:
        frames = unpatchify(frames, patch_size=vae.config.patch_size)
    return frames.clamp(-1.0, 1.0) if clamp else frames


CONV3D_PATHS = ("onednn", "native")


def _onednn_conv3d_forward(self, input: torch.Tensor, weight: torch.Tensor, bias):
    """`nn.Conv3d._conv_forward` through oneDNN where PyTorch would pick its slow reference kernel. For batch 1 and
    3x3 kernels PyTorch's CPU heuristic (tuned on 2D) sends a conv3d to `slow_conv3d` (an unfold + GEMM per frame),
    which on talk128's decoder is ~80 % of a chunk; the same convolution through oneDNN is 3-5x faster and equal to
    float rounding. Inference only (no autograd graph), float32 on the CPU; everything else takes the usual path."""
    if (not torch.is_grad_enabled() and input.device.type == "cpu" and input.dtype == torch.float32
            and self.padding_mode == "zeros" and isinstance(self.padding, tuple)):
        return torch.ops.aten.mkldnn_convolution(input, weight, bias, list(self.padding), list(self.stride),
                                                 list(self.dilation), self.groups)
    return torch.nn.Conv3d._conv_forward(self, input, weight, bias)


def set_conv3d_path(vae: AutoencoderKLWan, path: str) -> None:
    """"onednn" (the default of every `StreamingVAE`): the VAE's 3D convolutions run through oneDNN on the CPU at
    inference; "native": PyTorch's own choice (the before of `facecast bench decode`)."""
    if path not in CONV3D_PATHS:
        raise ValueError(f"conv3d path {path!r} is invalid; allowed: {', '.join(CONV3D_PATHS)}")
    usable = path == "onednn" and torch.backends.mkldnn.is_available()
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d):
            if usable:
                module._conv_forward = types.MethodType(_onednn_conv3d_forward, module)
            else:
                module.__dict__.pop("_conv_forward", None)


def _place(vae: AutoencoderKLWan, device, dtype) -> AutoencoderKLWan:
    vae = vae.to(device)
    return vae if dtype == torch.float32 else vae.to(dtype=dtype)


class StreamingVAE:
    def __init__(self, vae: AutoencoderKLWan, conv3d: str = "onednn"):
        self.vae = vae.eval()
        set_conv3d_path(vae, conv3d)
        config = vae.config
        self.z_dim = config.z_dim
        self.spatial_compression = (config.patch_size or 1) * 2 ** (len(config.dim_mult) - 1)
        self.temporal_compression = 2 ** sum(config.temperal_downsample)
        self._conv_count = sum(type(m).__name__ == "WanCausalConv3d" for m in vae.decoder.modules())
        parameter = next(vae.parameters())
        self._mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.device, self.dtype = parameter.device, parameter.dtype

    @classmethod
    def from_config(cls, config: VAEConfig, seed: int = 0, device="cpu", dtype=torch.float32) -> "StreamingVAE":
        """A VAE with this shape and seeded random weights (for tests and benchmarks)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKLWan(**config.diffusers_kwargs())
        return cls(_place(vae, device, dtype))

    @classmethod
    def from_state(cls, config: dict, state: dict, device="cpu", dtype=torch.float32) -> "StreamingVAE":
        """Rebuild from a config dict (diffusers' `vae.config`) and a state dict (as stored in facecast checkpoints)."""
        init_keys = ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales",
                     "temperal_downsample", "dropout", "latents_mean", "latents_std", "is_residual", "in_channels",
                     "out_channels", "patch_size", "scale_factor_temporal", "scale_factor_spatial")
        vae = AutoencoderKLWan(**{key: config[key] for key in init_keys if key in config})
        vae.load_state_dict(state, strict=True)
        return cls(_place(vae, device, dtype))

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32) -> "StreamingVAE":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"VAE directory {str(path)!r} has no config.json "
                                    "(diffusers AutoencoderKLWan layout)")
        vae = AutoencoderKLWan.from_pretrained(path, local_files_only=True, torch_dtype=dtype,
                                               low_cpu_mem_usage=False)   # (also silences the `accelerate` hint)
        return cls(vae.to(device))

    def save_pretrained(self, path: str | Path) -> None:
        self.vae.save_pretrained(path)

    def config_dict(self) -> dict:
        """diffusers' config as plain JSON (a VAE loaded from a `Path` carries it in `_name_or_path`)."""
        return json.loads(json.dumps(dict(self.vae.config), default=str))

    # ------------------------------------------------------------------ latent space

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z.float() - self._mean.to(z.device)) * self._inv_std.to(z.device)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float() / self._inv_std.to(latents.device) + self._mean.to(latents.device)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] -> normalised latent [B, 16, 1, H/8, W/8] (posterior mean)."""
        video = image[:, :, None].to(self.device, self.dtype)
        posterior = self.vae.encode(video).latent_dist
        return self.normalize(posterior.mean).to(self.dtype)

    # ------------------------------------------------------------------ streaming decode

    def new_decode_cache(self) -> DecodeCache:
        return DecodeCache(features=[None] * self._conv_count)

    def frames_for_latents(self, first_latent_frame: int, count: int) -> int:
        """Video frames that latent frames [first, first+count) decode to."""
        return count * self.temporal_compression - (self.temporal_compression - 1 if first_latent_frame == 0 else 0)

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, cache: DecodeCache) -> tuple[torch.Tensor, DecodeCache]:
        """latents [B, 16, F, h, w] (normalised) -> frames [B, 3, T, H, W] in [-1, 1] and the updated cache."""
        z = self.denormalize(latents).to(self.device, self.dtype)
        return stream_decode(self.vae, self.vae.post_quant_conv(z), cache), cache

    @staticmethod
    def batchable(caches: list[DecodeCache]) -> bool:
        """Decode caches can be stacked when every session is past its first latent frame and the caches agree
        entry by entry (tensors of one shape, or the same marker)."""
        if not all(cache.started for cache in caches):
            return False
        for entries in zip(*(cache.features for cache in caches)):
            first = entries[0]
            if isinstance(first, torch.Tensor):
                if not all(isinstance(e, torch.Tensor) and e.shape == first.shape for e in entries):
                    return False
            elif not all(not isinstance(e, torch.Tensor) and e == first for e in entries):
                return False
        return True

    @torch.no_grad()
    def decode_chunk_batch(self, latents: list[torch.Tensor],
                           caches: list[DecodeCache]) -> list[tuple[torch.Tensor, DecodeCache]]:
        """`decode_chunk` for several sessions in one pass: latents[i] [1, 16, F, h, w] with its own caches[i].

        Stacks the per-session caches along the batch, decodes once, and writes each session's slice back; falls
        back to one call per session when the caches cannot be stacked (a session on its first chunk)."""
        if len(caches) == 1 or not self.batchable(caches) or len({tuple(z.shape) for z in latents}) != 1:
            return [self.decode_chunk(z, cache) for z, cache in zip(latents, caches)]
        stacked = DecodeCache(features=[torch.cat(entries) if isinstance(entries[0], torch.Tensor) else entries[0]
                                        for entries in zip(*(cache.features for cache in caches))], started=True)
        frames, stacked = self.decode_chunk(torch.cat(latents), stacked)
        out = []
        for row, cache in enumerate(caches):
            cache.features = [entry[row:row + 1].clone() if isinstance(entry, torch.Tensor) else entry
                              for entry in stacked.features]
            out.append((frames[row:row + 1], cache))
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Whole-clip decode through diffusers' own path. latents [B, 16, F, h, w] -> [B, 3, T, H, W]."""
        z = self.denormalize(latents).to(self.device, self.dtype)
        return self.vae.decode(z, return_dict=False)[0]


LATENT_SPACE_WEIGHTS = ("encoder.", "quant_conv.")
"""The weights that fix a VAE's latent space (the posterior's mean); the decoder's are not among them."""


def vae_digest(vae) -> str:
    """A short digest of what names a VAE's latent space: the encoder's weights and the statistics that normalise
    its output. The decoder is left out: a VAE whose decoder alone was trained further (`facecast train vae
    --phase decoder`) encodes the same latents, so a cache and a DiT trained on them stay valid."""
    digest = hashlib.sha256()
    for key, value in sorted(vae.vae.state_dict().items()):
        if key.startswith(LATENT_SPACE_WEIGHTS):
            digest.update(key.encode())
            digest.update(value.detach().float().cpu().numpy().tobytes())
    for name in ("latents_mean", "latents_std"):
        digest.update(name.encode())
        digest.update(np.asarray(getattr(vae.vae.config, name), np.float64).tobytes())
    return digest.hexdigest()[:16]
