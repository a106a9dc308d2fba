"""Frozen configuration dataclasses and the named presets (`tiny`, `small`, `talk128`, `wan-1.3b`, `wan-14b`).

One config per component: `DiTConfig` (the causal score model), `VAEConfig` (the Wan VAE shape),
`StreamConfig` (how a session streams: chunk size, steps, sink, resolution, fps) and `PresetConfig`
that bundles them; and the allowed device and dtype names (`DEVICES`, `DTYPES`).  Every field is validated in
`__post_init__`; errors name the field, the bad value and what is allowed, because presets and options arrive from
users (CLI flags, gRPC options).

This module knows nothing of torch modules, Ray or the network.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


DEVICES = ("cpu", "cuda")
"""Device kinds a model may compute on (`model_core.models.resolve_device` also takes 'auto' and 'cuda:N')."""
DTYPES = ("float32", "bfloat16", "float16")
"""Model dtypes by name (`model_core.models.torch_dtype` turns one into a torch dtype)."""


class ConfigError(ValueError):
    """A user-visible configuration problem; the message names the field, the value and what is allowed."""


def _check(condition: bool, field_name: str, value, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class DiTConfig:
    """Shape of `CausalAvatarDiT` (Wan2.1 layout plus audio layers)."""

    num_layers: int
    """Number of transformer blocks."""
    num_heads: int
    """Attention heads per block."""
    head_dim: int
    """Channels per head; hidden size is num_heads * head_dim."""
    ffn_dim: int
    """Hidden size of the feed-forward layer."""
    text_dim: int
    """Channels of the prompt-encoder output fed to `condition_embedder.text_embedder`."""
    text_len: int
    """Prompt tokens per session (padded with zeros, as Wan does)."""
    image_dim: int
    """Channels of the reference-image tokens fed to `condition_embedder.image_embedder`."""
    audio_dim: int
    """Channels of one audio feature vector (one per video frame) from the audio front-end."""
    in_channels: int = 16
    """Latent channels in (16; 36 for Wan I2V checkpoints whose extra channels come from `cond.latent_condition`)."""
    out_channels: int = 16
    """Latent channels out."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """3D patch (frames, height, width)."""
    freq_dim: int = 256
    """Sinusoidal timestep-embedding channels."""
    cross_attn_norm: bool = True
    """LayerNorm before cross-attention (Wan2.1: True)."""
    eps: float = 1e-6
    """Norm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base."""
    reference_patch: tuple[int, int] = (2, 2)
    """Latent patch (h, w) that turns the reference latent into reference-image tokens."""
    audio_window: int = 5
    """Latent frames of audio each latent frame attends to, centred on itself (odd). Lookahead = window // 2."""
    audio_hidden_dim: int = 0
    """Hidden size of the audio projection MLP (0: same as the model's hidden size)."""
    temporal_compression: int = 4
    """Video frames per latent frame (the VAE's temporal stride)."""
    audio_injection_dim: int = 0
    """Per-frame audio injection (`AudioInjection`): each audio token is reduced to this many channels, the frame's
    window of them is mapped linearly to one vector and added to the tokens of the speaker's region before the
    first block. 0: off (cross-attention alone, as TalkingMachines and Wan checkpoints)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "head_dim", "ffn_dim", "text_dim", "text_len", "image_dim",
                     "audio_dim", "in_channels", "out_channels", "freq_dim", "temporal_compression"):
            _check(int(getattr(self, name)) >= 1, name, getattr(self, name), "must be a positive integer")
        _check(self.head_dim % 2 == 0 and self.head_dim >= 6, "head_dim", self.head_dim,
               "must be even and >= 6 (3D RoPE splits it into frame/height/width parts)")
        _check(int(self.audio_injection_dim) >= 0, "audio_injection_dim", self.audio_injection_dim,
               "must be >= 0 (0: off)")
        _check(self.audio_window % 2 == 1, "audio_window", self.audio_window, "must be an odd number of latent frames")
        _check(self.in_channels >= self.out_channels, "in_channels", self.in_channels,
               f"must be >= out_channels ({self.out_channels})")
        _check(len(self.patch_size) == 3 and all(p >= 1 for p in self.patch_size), "patch_size", self.patch_size,
               "must be three positive integers")
        _check(self.patch_size[0] == 1, "patch_size", self.patch_size, "temporal patch must be 1 for chunked streaming")

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def audio_lookahead_latent_frames(self) -> int:
        return self.audio_window // 2

    @property
    def audio_tokens_per_frame(self) -> int:
        """Audio tokens each latent frame attends to: window latent frames x video frames per latent frame."""
        return self.audio_window * self.temporal_compression

    def num_parameters_estimate(self) -> int:
        d, f, layers = self.dim, self.ffn_dim, self.num_layers
        per_block = 4 * d * d + 4 * d * d + 2 * d * d + 2 * d * d + 2 * d * f + 6 * d
        return layers * per_block


@dataclass(frozen=True)
class VAEConfig:
    """Shape of the diffusers `AutoencoderKLWan` used for encoding the reference and decoding chunks."""

    base_dim: int = 96
    """Base channel count (Wan2.1: 96)."""
    z_dim: int = 16
    """Latent channels."""
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multipliers per resolution level."""
    num_res_blocks: int = 2
    """Residual blocks per level."""
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    """Which levels downsample time (diffusers' spelling)."""
    patch_size: int = 1
    """Pixels folded into channels before the first convolution (Wan2.2's VAE: 2). A patch of 2 removes the
    full-resolution level, the costliest one on a CPU (~4x cheaper to train per frame at 128x128)."""
    is_residual: bool = False
    """Wan2.2's residual down/up blocks (a parameter-free space-to-channel shortcut around every level)."""

    def __post_init__(self) -> None:
        _check(self.base_dim >= 4 and self.base_dim % 4 == 0, "base_dim", self.base_dim, "must be a multiple of 4")
        _check(self.z_dim == 16, "z_dim", self.z_dim, "must be 16 (Wan latent statistics are 16-channel)")
        _check(len(self.temperal_downsample) == len(self.dim_mult) - 1, "temperal_downsample",
               self.temperal_downsample, f"needs one entry per downsampling level ({len(self.dim_mult) - 1})")
        _check(self.patch_size in (1, 2, 4), "patch_size", self.patch_size, "allowed: 1, 2, 4")
        if self.is_residual:
            _check(self.dim_mult[-1] == self.dim_mult[-2], "dim_mult", self.dim_mult,
                   "with is_residual the last two levels need the same multiplier (the last level has no "
                   "downsampling for its shortcut to absorb a channel change)")

    @property
    def spatial_compression(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    def diffusers_kwargs(self) -> dict:
        """The `AutoencoderKLWan(...)` arguments for this shape."""
        channels = 3 * self.patch_size ** 2  # diffusers counts the channels after the patch is folded in
        return dict(base_dim=self.base_dim, z_dim=self.z_dim, dim_mult=list(self.dim_mult),
                    num_res_blocks=self.num_res_blocks, temperal_downsample=list(self.temperal_downsample),
                    is_residual=self.is_residual, in_channels=channels, out_channels=channels,
                    patch_size=self.patch_size if self.patch_size > 1 else None)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temperal_downsample)


@dataclass(frozen=True)
class StreamConfig:
    """How a session streams. Users may override these per session (CLI flags, gRPC options)."""

    width: int = 256
    """Output width in pixels (multiple of VAE spatial stride x patch)."""
    height: int = 256
    """Output height in pixels."""
    fps: float = 25.0
    """Output frames per second."""
    chunk_latent_frames: int = 3
    """Latent frames per chunk (C). 3 -> 12 video frames (9 for the first chunk)."""
    steps: int = 2
    """Denoising steps per chunk (1-4)."""
    shift: float = 5.0
    """Flow-matching timestep shift (sigma' = shift*s / (1 + (shift-1)*s))."""
    solver: str = "euler"
    """'euler' (deterministic flow ODE) or 'renoise' (x0 prediction then fresh noise, as DMD students sample)."""
    sink_frames: int = 1
    """Latent frames in the attention sink."""
    sink_rope_offset: int = 3
    """Temporal RoPE position of the sink relative to the current chunk's first frame (Rolling RoPE)."""
    adaptive_sink: bool = True
    """Adaptive Attention Sink: after the first chunk the sink becomes the model's own first generated latent frame."""
    rolling_rope: bool = True
    """Rolling RoPE (relative, bounded positions). False is the ablation: absolute positions, the sink at 0 and chunk
    c at 1 + c*C, so the distance to the sink grows with the stream (what Live Avatar's ablation removes)."""
    seed: int = 0
    """Seed of the session's noise generator."""
    decoder: str = ""
    """'full' (the VAE's decoder, the reference) or 'fast' (the small decoder distilled from it, when one is
    loaded); '': the engine's or server's default."""
    listening_hold: float = 0.5
    """While every character listens (none in speaking mode in the video frames a latent frame shows:
    `set_speaking(False)`, as a call sets its avatar between replies), each shown latent frame moves only this share of
    the way from the one before to the model's new one, so a listening face stays still (`stages.hold_listening`).
    1: off."""

    def __post_init__(self) -> None:
        _check(16 <= self.width <= 4096, "width", self.width, "must be in [16, 4096]")
        _check(16 <= self.height <= 4096, "height", self.height, "must be in [16, 4096]")
        _check(1.0 <= float(self.fps) <= 120.0, "fps", self.fps, "must be in [1, 120]")
        _check(1 <= self.chunk_latent_frames <= 21, "chunk_latent_frames", self.chunk_latent_frames,
               "must be in [1, 21]")
        _check(1 <= self.steps <= 4, "steps", self.steps, "must be 1, 2, 3 or 4")
        _check(self.shift > 0, "shift", self.shift, "must be > 0")
        _check(self.solver in ("euler", "renoise"), "solver", self.solver, "allowed: 'euler', 'renoise'")
        _check(1 <= self.sink_frames <= 4, "sink_frames", self.sink_frames, "must be in [1, 4]")
        _check(-64 <= self.sink_rope_offset <= 64, "sink_rope_offset", self.sink_rope_offset, "must be in [-64, 64]")
        _check(0 <= self.seed < 2**63, "seed", self.seed, "must be in [0, 2^63)")
        _check(self.decoder in ("", "full", "fast"), "decoder", self.decoder, "allowed: 'full', 'fast'")
        _check(0 < self.listening_hold <= 1, "listening_hold", self.listening_hold, "must be in (0, 1] (1: off)")

    def replace(self, **changes) -> "StreamConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown stream option(s) {sorted(unknown)}; allowed: "
                              f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PresetConfig:
    """A named bundle: model shape, VAE shape, default stream options and the audio front-end."""

    name: str
    dit: DiTConfig
    vae: VAEConfig
    stream: StreamConfig
    audio_backend: str = "logmel"
    text_encoder: str = "bytes"
    description: str = ""
    vae_weights: str = ""
    """A trained VAE shipped in `checkpoints/` (a diffusers directory name) used when no checkpoint carries one."""
    weights: str = ""
    """The trained score model shipped in `checkpoints/` (a facecast checkpoint file name) used when no checkpoint is
    given; empty: the preset's shape with seeded random weights (the benchmark shapes)."""
    fast_decoder_weights: str = ""
    """The fast decoder distilled from the shipped VAE (`model_core.fastdecode`, a directory in `checkpoints/`):
    sessions may choose it with decoder='fast'; empty: the preset has none."""

    def check_resolution(self, stream: StreamConfig) -> None:
        """Height and width must tile into whole DiT patches and whole reference-token patches."""
        ph, pw = self.dit.patch_size[1], self.dit.patch_size[2]
        rh, rw = self.dit.reference_patch
        stride_h = self.vae.spatial_compression * math.lcm(ph, rh)
        stride_w = self.vae.spatial_compression * math.lcm(pw, rw)
        _check(stream.height % stride_h == 0, "height", stream.height, f"must be a multiple of {stride_h}")
        _check(stream.width % stride_w == 0, "width", stream.width, f"must be a multiple of {stride_w}")


# Audio features: the built-in log-mel front-end gives n_mels * subframes = 80 * 4 channels per video frame; Whisper
# base's encoder (`whisper-ct2`, the trained preset's) its d_model.
LOGMEL_AUDIO_DIM = 320
WHISPER_BASE_AUDIO_DIM = 512

_TINY = PresetConfig(
    name="tiny",
    dit=DiTConfig(num_layers=2, num_heads=2, head_dim=16, ffn_dim=64, text_dim=16, text_len=8, image_dim=32,
                  audio_dim=LOGMEL_AUDIO_DIM, audio_hidden_dim=32),
    vae=VAEConfig(base_dim=8, num_res_blocks=1),
    stream=StreamConfig(width=64, height=64, steps=2),
    description="unit tests: 2 blocks, 32 channels, 64x64",
)

_SMALL = PresetConfig(
    name="small",
    dit=DiTConfig(num_layers=4, num_heads=4, head_dim=64, ffn_dim=1024, text_dim=64, text_len=32, image_dim=256,
                  audio_dim=LOGMEL_AUDIO_DIM, audio_hidden_dim=256, reference_patch=(4, 4)),
    vae=VAEConfig(base_dim=16, num_res_blocks=1),
    stream=StreamConfig(width=256, height=256, steps=2),
    description="CPU demo: 4 blocks, 256 channels, 256x256",
)

_TALK128 = PresetConfig(
    name="talk128",
    dit=DiTConfig(num_layers=4, num_heads=3, head_dim=64, ffn_dim=768, text_dim=64, text_len=32, image_dim=192,
                  audio_dim=WHISPER_BASE_AUDIO_DIM, audio_hidden_dim=192, patch_size=(1, 4, 4),
                  reference_patch=(4, 4)),
    vae=VAEConfig(base_dim=16, num_res_blocks=1, dim_mult=(1, 2, 2), temperal_downsample=(True, True),
                  patch_size=2, is_residual=True),
    stream=StreamConfig(width=128, height=128, steps=2),
    audio_backend="whisper-ct2",
    description="the trained one, for the talking-face world: 128x128, a Wan2.2-layout VAE (2x2 patches, residual "
                "blocks, 16x16x16 latents), DiT patch 4 (16 tokens a latent frame), 4 blocks, 192 channels, "
                "hearing through Whisper base",
    vae_weights="talk128-vae",
    weights="talk128-student.safetensors",
    fast_decoder_weights="talk128-fast-decoder",
)

_WAN_1_3B = PresetConfig(
    name="wan-1.3b",
    dit=DiTConfig(num_layers=30, num_heads=12, head_dim=128, ffn_dim=8960, text_dim=4096, text_len=512,
                  image_dim=1280, audio_dim=LOGMEL_AUDIO_DIM, audio_hidden_dim=1536, reference_patch=(4, 4)),
    vae=VAEConfig(),
    stream=StreamConfig(width=512, height=512, steps=2),
    description="Wan2.1 1.3B shape (random weights unless a checkpoint is given), 512x512",
)

_WAN_14B = PresetConfig(
    name="wan-14b",
    dit=DiTConfig(num_layers=40, num_heads=40, head_dim=128, ffn_dim=13824, text_dim=4096, text_len=512,
                  image_dim=1280, audio_dim=LOGMEL_AUDIO_DIM, audio_hidden_dim=5120, reference_patch=(4, 4)),
    vae=VAEConfig(),
    stream=StreamConfig(width=512, height=512, steps=2),
    description="Wan2.1 14B shape (random weights unless a checkpoint is given), 512x512",
)

PRESETS: dict[str, PresetConfig] = {p.name: p for p in (_TINY, _SMALL, _TALK128, _WAN_1_3B, _WAN_14B)}


def get_preset(name: str) -> PresetConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset={name!r} is unknown; allowed: {', '.join(PRESETS)}") from None


__all__ = ["ConfigError", "DiTConfig", "VAEConfig", "StreamConfig", "PresetConfig", "PRESETS", "get_preset",
           "LOGMEL_AUDIO_DIM", "DEVICES", "DTYPES"]
