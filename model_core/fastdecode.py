"""A fast streaming decoder for the project's latent space: a small causal 2D decoder distilled from the full VAE's.

    decoder = FastDecoder(FastDecoderConfig(z_dim=16))            or FastDecoder.from_pretrained(path)
    cache = decoder.new_decode_cache()
    frames, cache = decoder.decode_chunk(latents, cache)     latents [B, 16, F, h, w] normalised -> [B, 3, T, H, W]

The approach of the public tiny autoencoders for Wan latents (TAEHV / taew2_1), written for this project: every layer
is a per-frame 2D convolution, except the memory blocks, which also see their own input one frame earlier (the only
state a stream carries: one feature map per memory block), and the temporal growth layers, a 1x1 convolution whose
output channels become 2 consecutive frames. Three stages at 1x, 2x and 4x the latent size; the last stage's output
is unfolded 2x2 into pixels (pixel shuffle), so no convolution runs at the frame's full size. Two temporal
growths give Wan's 4 video frames per latent frame; at the start of a stream the first latent frame's first 3 are
dropped (Wan's first latent frame codes one video frame).

Frame counts and the latent space are the full VAE's (`StreamingVAE`): it takes the same normalised latents, gives
the same frames for them, and decoding a stream chunk by chunk equals decoding it whole (a test holds it). The full
decoder stays the reference; this one trades quality for speed (`facecast eval --decoder fast`, BENCHMARKS.md).
Trained with `facecast train fast-decoder` (`training.fastdecode_stage`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .shipped import FAST_DECODER_CONFIG as CONFIG_FILE
from .shipped import FAST_DECODER_WEIGHTS as WEIGHTS_FILE


@dataclass(frozen=True)
class FastDecoderConfig:
    z_dim: int = 16
    channels: tuple[int, int, int, int] = (64, 48, 32, 32)
    """Feature channels of the three stages (at 1x, 2x, 4x the latent size) and of the last convolution before the
    2x2 pixel unfold."""
    blocks: tuple[int, int, int] = (2, 2, 1)
    """Memory blocks per stage."""
    spatial_compression: int = 8
    temporal_compression: int = 4

    def __post_init__(self) -> None:
        if self.spatial_compression != 8 or self.temporal_compression != 4:
            raise ValueError(f"FastDecoderConfig: spatial_compression={self.spatial_compression}, temporal_compression="
                             f"{self.temporal_compression}: only Wan's 8x and 4x are supported")
        if len(self.channels) != 4 or len(self.blocks) != 3 or min(self.channels) < 1 or min(self.blocks) < 0:
            raise ValueError(f"FastDecoderConfig: channels={self.channels} (4 positive) and blocks={self.blocks} "
                             "(3, at least 0) are invalid")


@dataclass
class FastDecodeCache:
    """Per-stream state: each memory block's input of the previous video frame (None before the first chunk)."""

    memory: list = field(default_factory=list)
    started: bool = False


def _conv(n_in: int, n_out: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class MemoryBlock(nn.Module):
    """A residual block of three 3x3 convolutions over the frame and its own input one frame earlier."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * channels, channels), nn.ReLU(), _conv(channels, channels), nn.ReLU(),
                                  _conv(channels, channels))

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(torch.cat([x, past], 1)) + x)


class TemporalGrow(nn.Module):
    """One frame -> two consecutive frames (a 1x1 convolution to 2C channels, split in time)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 2 * channels, 1, bias=False)

    def forward(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        frames, channels, height, width = x.shape            # frames = batch * T, time-major within each batch row
        return self.conv(x).reshape(batch, frames // batch * 2, channels, height, width).flatten(0, 1)


class FastDecoder(nn.Module):
    def __init__(self, config: FastDecoderConfig = FastDecoderConfig()):
        super().__init__()
        self.config = config
        c0, c1, c2, c3 = config.channels
        self.input = _conv(config.z_dim, c0)
        self.stages = nn.ModuleList([nn.ModuleList(MemoryBlock(c) for _ in range(n))
                                     for c, n in zip((c0, c1, c2), config.blocks)])
        self.project = nn.ModuleList([_conv(c0, c1), _conv(c1, c2), _conv(c2, c3)])
        self.grow = nn.ModuleList([TemporalGrow(c2), TemporalGrow(c3)])
        self.output = _conv(c3, 3 * 4)
        self.z_dim = config.z_dim
        self.spatial_compression = config.spatial_compression
        self.temporal_compression = config.temporal_compression

    # ------------------------------------------------------------------ weights

    @property
    def device(self) -> torch.device:
        return self.input.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.input.weight.dtype

    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype=torch.float32) -> "FastDecoder":
        """A directory holding `fast-decoder.json` and `fast-decoder.safetensors` (what `save_pretrained` writes)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a fast decoder: it needs {CONFIG_FILE} and {WEIGHTS_FILE} (train "
                                    "one with `facecast train fast-decoder`)")
        raw = json.loads((path / CONFIG_FILE).read_text())
        config = FastDecoderConfig(**{key: tuple(value) if isinstance(value, list) else value
                                      for key, value in raw["config"].items()})
        decoder = cls(config)
        decoder.load_state_dict({k: v.float() for k, v in load_file(str(path / WEIGHTS_FILE)).items()})
        return decoder.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, path: str | Path, metadata: dict | None = None) -> None:
        """fp16 weights and the config (plus `metadata`, e.g. the VAE it was distilled from)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()},
                  str(path / WEIGHTS_FILE))
        (path / CONFIG_FILE).write_text(json.dumps({"config": asdict(self.config), **(metadata or {})}, indent=1))

    # ------------------------------------------------------------------ decoding

    def new_decode_cache(self) -> FastDecodeCache:
        return FastDecodeCache(memory=[None] * sum(self.config.blocks))

    def frames_for_latents(self, first_latent_frame: int, count: int) -> int:
        return count * 4 - (3 if first_latent_frame == 0 else 0)

    def forward(self, latents: torch.Tensor, cache: FastDecodeCache) -> torch.Tensor:
        """latents [B, z, F, h, w] (normalised, the stream's next F latent frames) -> frames [B, 3, T, 8h, 8w]
        unclamped (training's output); `cache` is updated in place."""
        batch, _, count, height, width = latents.shape
        x = latents.to(self.dtype).permute(0, 2, 1, 3, 4).flatten(0, 1)                     # [B*F, z, h, w]
        x = torch.relu(self.input(torch.tanh(x / 3) * 3))
        block = 0
        for stage, blocks in enumerate(self.stages):
            for layer in blocks:
                x = layer(x, self._past(x, batch, cache, block))
                block += 1
            if stage < 2:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = self.project[stage](x)
            if stage >= 1:
                x = self.grow[stage - 1](x, batch)
        x = F.pixel_shuffle(self.output(torch.relu(x)), 2)                                    # [B*T, 3, H, W]
        frames = x.reshape(batch, -1, 3, x.shape[-2], x.shape[-1]).permute(0, 2, 1, 3, 4)
        if not cache.started:
            frames = frames[:, :, 3:]
            cache.started = True
        return frames

    @staticmethod
    def _past(x: torch.Tensor, batch: int, cache: FastDecodeCache, block: int) -> torch.Tensor:
        """Each frame's input one frame earlier: the previous chunk's last frame (zeros at the start), then this
        chunk's frames shifted by one; the chunk's last frame is kept for the next chunk."""
        frames = x.reshape(batch, -1, *x.shape[1:])
        previous = cache.memory[block]
        if previous is None:
            previous = torch.zeros_like(frames[:, :1])
        cache.memory[block] = frames[:, -1:].detach()
        return torch.cat([previous, frames[:, :-1]], 1).flatten(0, 1)

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, cache: FastDecodeCache) -> tuple[torch.Tensor, FastDecodeCache]:
        """latents [B, 16, F, h, w] (normalised) -> frames [B, 3, T, H, W] in [-1, 1] and the updated cache."""
        return self.forward(latents.to(self.device), cache).clamp(-1.0, 1.0), cache

    @torch.no_grad()
    def decode_chunk_batch(self, latents: list[torch.Tensor],
                           caches: list[FastDecodeCache]) -> list[tuple[torch.Tensor, FastDecodeCache]]:
        """`decode_chunk` for several streams in one pass (their memories stacked); one call per stream when some are
        on their first chunk or the chunks differ in shape."""
        if (len(caches) == 1 or not all(cache.started for cache in caches)
                or len({tuple(z.shape) for z in latents}) != 1):
            return [self.decode_chunk(z, cache) for z, cache in zip(latents, caches)]
        stacked = FastDecodeCache(memory=[torch.cat(entries) for entries in zip(*(c.memory for c in caches))],
                                  started=True)
        frames, stacked = self.decode_chunk(torch.cat(latents), stacked)
        for row, cache in enumerate(caches):
            cache.memory = [entry[row:row + 1] for entry in stacked.memory]
        return [(frames[row:row + 1], cache) for row, cache in enumerate(caches)]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """A whole clip from its first latent frame. latents [B, 16, F, h, w] -> [B, 3, 1 + 4 (F - 1), H, W]."""
        return self.decode_chunk(latents, self.new_decode_cache())[0]
