"""Per-session state of the causal DiT, as typed objects passed in and returned — never kept on a module.

* `KVCache` — one denoising step's self-attention cache: the sink's keys/values (stored *without* RoPE) and the
  previous chunk's keys/values (rotated to the fixed previous-chunk positions `[0, C)`).  Preallocated once per
  session with static shapes; a chunk overwrites the previous-chunk slot in place.  Nothing else is kept, so
  memory per session is constant however long the stream runs.
* `ConditionCache` — what is computed once per session: cross-attention keys/values of the prompt and the
  reference-image tokens for every block, and the timestep modulation of every denoising step and of the sink.
* `ChunkAudio` — the audio tokens (after the audio projection) of one chunk, per character, with each
  character's spatial region mask.

Shapes use L = blocks, B = batch (sessions), H = heads, D = head channels.  What may live here: the state objects
and their in-place updates (static shapes, no host syncs); nothing that computes attention or knows about Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Self-attention cache of one denoising step.

    sink_key, sink_value: [L, B, Ls, H, D]   sink tokens, no RoPE applied
    prev_key, prev_value: [L, B, Lp, H, D]   previous chunk, RoPE at frame positions [0, C)
    prev_valid:           [B] bool           False until the first chunk has run
    """

    sink_key: torch.Tensor
    sink_value: torch.Tensor
    prev_key: torch.Tensor
    prev_value: torch.Tensor
    prev_valid: torch.Tensor

    @classmethod
    def allocate(cls, *, num_layers: int, batch: int, sink_tokens: int, chunk_tokens: int, num_heads: int,
                 head_dim: int, device, dtype) -> "KVCache":
        def zeros(tokens):
            return torch.zeros(num_layers, batch, tokens, num_heads, head_dim, device=device, dtype=dtype)

        return cls(zeros(sink_tokens), zeros(sink_tokens), zeros(chunk_tokens), zeros(chunk_tokens),
                   torch.zeros(batch, dtype=torch.bool, device=device))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sink_key, self.sink_value, self.prev_key,
                                                             self.prev_value, self.prev_valid))

    def set_sink(self, sink_key: torch.Tensor, sink_value: torch.Tensor) -> None:
        """Overwrite the sink (e.g. Adaptive Attention Sink) in place. sink_key/value: [L, B, Ls, H, D]."""
        self.sink_key.copy_(sink_key)
        self.sink_value.copy_(sink_value)

    def clone(self) -> "KVCache":
        return KVCache(*(t.clone() for t in (self.sink_key, self.sink_value, self.prev_key, self.prev_value,
                                             self.prev_valid)))


@dataclass
class ConditionCache:
    """Per-session conditioning, computed once when the session opens.

    text_key, text_value:   [L, B, Lt, H, D]   prompt cross-attention keys/values per block
    image_key, image_value: [L, B, Li, H, D]   reference-image cross-attention keys/values per block
    step_temb:              [S, B, dim]        time embedding per denoising step (S = steps)
    step_modulation:        [S, B, 6, dim]     block modulation per denoising step
    sink_temb, sink_modulation: [B, dim], [B, 6, dim]  the same for the clean sink (t = 0)
    """

    text_key: torch.Tensor
    text_value: torch.Tensor
    image_key: torch.Tensor
    image_value: torch.Tensor
    step_temb: torch.Tensor
    step_modulation: torch.Tensor
    sink_temb: torch.Tensor
    sink_modulation: torch.Tensor


@dataclass
class ChunkAudio:
    """Audio conditioning for the latent frames of one chunk.

    tokens:  [B, K, F, T, dim]  projected audio tokens per character (K), latent frame (F) and window token (T)
    regions: [B, K, S] float    1 where a character's audio may act on a spatial token (S = tokens per frame)
    """

    tokens: torch.Tensor
    regions: torch.Tensor


@dataclass
class ChunkRope:
    """RoPE tables of the streaming path, fixed for a session (Rolling RoPE: positions never grow).

    Each is a (cos, sin) pair of [tokens, D/2] float32: `current` at frame positions [C, 2C), `previous` at [0, C)
    (used once, to store the chunk's keys as the next previous chunk), `sink` at C + sink_rope_offset.
    """

    current: tuple[torch.Tensor, torch.Tensor]
    previous: tuple[torch.Tensor, torch.Tensor]
    sink: tuple[torch.Tensor, torch.Tensor]
    frame_positions: tuple[int, int]  # (min, max) frame position used, for bounds checks
