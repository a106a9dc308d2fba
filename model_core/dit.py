"""`CausalAvatarDiT`: a Wan2.1-layout video diffusion transformer made causal, chunked and audio-driven.

Layout (parameter names match diffusers' `WanTransformer3DModel`, so Wan2.1 checkpoints in diffusers layout load
with every base key matched; the audio and reference layers are new):

    latents ─► patch_embedding (Conv3d) ─► tokens [B, F*S, dim]
    timestep ─► condition_embedder.time_embedder / time_proj ─► per-block modulation (6 x dim)
    prompt   ─► condition_embedder.text_embedder  ─┐
    reference latent ─► reference_embedder ─► condition_embedder.image_embedder ─┤ cross-attention context
    audio features ─► audio_projection ─► audio tokens (window of 5 latent frames per frame) ─┘
                      (optional audio_injection: the window -> one vector added to the speaker's tokens)
    blocks x L:  norm1 → attn1 (3D RoPE self-attention, causal chunk mask / KV cache)
                 norm2 → attn2 (text + image + local-window audio cross-attention, audio masked to regions)
                 norm3 → ffn
    norm_out → proj_out ─► unpatchify ─► velocity [B, 16, F, H, W]

Two ways to run it, which tests hold equal:

* `forward_chunk` — the streaming path. One chunk of C latent frames attends to itself, to the previous chunk and
  to the sink, read from a `KVCache`; it writes its own keys/values back as the next "previous chunk".  Positions
  are relative (Rolling RoPE, tables from `chunk_rope` once per session): previous chunk at [0, C), current at
  [C, 2C), sink at C + sink_rope_offset.
* `forward_full` — one pass over a whole sequence with an explicit attention mask: "full" (bidirectional, plain
  absolute positions; equals diffusers) or "block_sparse" (the causal chunk mask, every chunk seeing its own
  copy of the sink at its relative position):

        keys →      sink | c0  c1  c2  c3 | sink@c0 sink@c1 sink@c2 sink@c3
        sink          #  |                |
        chunk 0          | #              |   #
        chunk 1          | #   #          |          #
        chunk 2          |     #   #      |                  #
        chunk 3          |         #   #  |                          #

Per-session state (KV caches, conditioning, sink) lives in `model_core.cache` objects passed in and out; the module
holds only weights.  This file does not know about audio front-ends, VAEs, sessions or Ray.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanTimeTextImageEmbedding

from .attention import attention, attention_with_optional_keys
from .cache import ChunkAudio, ChunkRope, ConditionCache, KVCache
from .config import DiTConfig
from .rope import apply_rope, rope_tables

SelfAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SelfAttention(nn.Module):
    """attn1: projections and q/k RMSNorm; the attention pattern itself is supplied by the caller."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [B, L, dim] -> query, key, value [B, L, H, D] (before RoPE)."""
        query = self.norm_q(self.to_q(hidden)).unflatten(2, (self.num_heads, -1))
        key = self.norm_k(self.to_k(hidden)).unflatten(2, (self.num_heads, -1))
        value = self.to_v(hidden).unflatten(2, (self.num_heads, -1))
        return query, key, value

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """attended [B, L, H, D] -> [B, L, dim]."""
        return self.to_out[1](self.to_out[0](attended.flatten(2)))


class CrossAttention(SelfAttention):
    """attn2: prompt and reference-image cross-attention (Wan I2V), plus local-window audio cross-attention.

    The audio keys/values come from new layers (`audio_k_proj`, `audio_v_proj`) and share the query with the text
    and image branches, as in TalkingMachines.  `audio_v_proj` starts at zero, so a Wan checkpoint with fresh
    audio layers computes exactly what the base model computes.
    """

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__(dim, num_heads, eps)   # to_q, to_k, to_v, to_out, norm_q, norm_k
        # Reference-image branch (diffusers: added_kv_proj_dim).
        self.add_k_proj = nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.norm_added_k = nn.RMSNorm(dim, eps=eps)
        # Audio branch (new).
        self.audio_k_proj = nn.Linear(dim, dim)
        self.audio_v_proj = nn.Linear(dim, dim)
        self.norm_audio_k = nn.RMSNorm(dim, eps=eps)
        nn.init.zeros_(self.audio_v_proj.weight)
        nn.init.zeros_(self.audio_v_proj.bias)

    def context_kv(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """text [B, Lt, dim], image [B, Li, dim] -> text_key, text_value, image_key, image_value [B, L*, H, D]."""
        heads = self.num_heads
        return (self.norm_k(self.to_k(text)).unflatten(2, (heads, -1)),
                self.to_v(text).unflatten(2, (heads, -1)),
                self.norm_added_k(self.add_k_proj(image)).unflatten(2, (heads, -1)),
                self.add_v_proj(image).unflatten(2, (heads, -1)))

    def forward(self, hidden: torch.Tensor, text_key, text_value, image_key, image_value,
                audio: ChunkAudio | None, audio_first_frame: int, frames: int) -> torch.Tensor:
        """hidden [B, F*S, dim]; *_key/_value [B, L, H, D]; audio covers frames [audio_first_frame, frames)."""
        query = self.norm_q(self.to_q(hidden)).unflatten(2, (self.num_heads, -1))
        attended = attention(query, text_key, text_value) + attention(query, image_key, image_value)
        if audio is not None:
            attended = self._add_audio(query, attended, audio, audio_first_frame, frames)
        return self.output(attended)

    def _add_audio(self, query, attended, audio: ChunkAudio, first_frame: int, frames: int) -> torch.Tensor:
        """Each latent frame's tokens attend only to that frame's audio window; output masked to each region."""
        batch, tokens, heads, head_dim = query.shape
        per_frame = tokens // frames
        audio_frames = frames - first_frame
        start = first_frame * per_frame
        frame_query = query[:, start:].reshape(batch * audio_frames, per_frame, heads, head_dim)
        total = torch.zeros_like(attended[:, start:])
        for character in range(audio.tokens.shape[1]):
            audio_tokens = audio.tokens[:, character].flatten(0, 1)  # [B*F, T, dim]
            key = self.norm_audio_k(self.audio_k_proj(audio_tokens)).unflatten(2, (heads, -1))
            value = self.audio_v_proj(audio_tokens).unflatten(2, (heads, -1))
            out = attention(frame_query, key, value).reshape(batch, audio_frames, per_frame, heads, head_dim)
            region = audio.regions[:, character].to(out.dtype)[:, None, :, None, None]
            total = total + (out * region).reshape(batch, audio_frames * per_frame, heads, head_dim)
        if start == 0:
            return attended + total
        return torch.cat([attended[:, :start], attended[:, start:] + total], dim=1)


class CausalAvatarBlock(nn.Module):
    """One transformer block (Wan2.1 layout). The self-attention pattern is passed in as a function."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        # 1. Self-attention
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = SelfAttention(dim, config.num_heads, eps)
        # 2. Cross-attention
        self.attn2 = CrossAttention(dim, config.num_heads, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        # 3. Feed-forward
        self.ffn = FeedForward(dim, inner_dim=config.ffn_dim, activation_fn="gelu-approximate")
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, hidden: torch.Tensor, modulation: torch.Tensor, frames: int, self_attention: SelfAttentionFn,
                context: tuple[torch.Tensor, ...], audio: ChunkAudio | None, audio_first_frame: int) -> torch.Tensor:
        """hidden [B, F*S, dim]; modulation [B, F or 1, 6, dim] float32; context = text/image keys and values."""
        batch, tokens, dim = hidden.shape
        framed = (batch, frames, tokens // frames, dim)
        shift, scale, gate, c_shift, c_scale, c_gate = (
            self.scale_shift_table[:, None] + modulation.float()).unsqueeze(3).unbind(2)  # each [B, F, 1, dim]

        # 1. Self-attention
        normed = (self.norm1(hidden.float()).view(framed) * (1 + scale) + shift).view(batch, tokens, dim)
        query, key, value = self.attn1.project(normed.type_as(hidden))
        attn_output = self.attn1.output(self_attention(query, key, value))
        hidden = ((hidden.float().view(framed) + attn_output.view(framed) * gate)
                  .view(batch, tokens, dim).type_as(hidden))

        # 2. Cross-attention
        normed = self.norm2(hidden.float()).type_as(hidden)
        hidden = hidden + self.attn2(normed, *context, audio, audio_first_frame, frames)

        # 3. Feed-forward
        normed = (self.norm3(hidden.float()).view(framed) * (1 + c_scale) + c_shift).view(batch, tokens, dim)
        ff_output = self.ffn(normed.type_as(hidden))
        hidden = (hidden.float().view(framed) + ff_output.float().view(framed) * c_gate).view(batch, tokens, dim)
        return hidden.type_as(ff_output)


class AudioProjection(nn.Module):
    """Per-video-frame audio features -> audio tokens; a learned silence embedding replaces listening frames.

    features [B, K, F, T, audio_dim], speaking [B, K, F, T] bool -> tokens [B, K, F, T, dim], where T = audio window
    (latent frames) x video frames per latent frame, and a learned position embedding marks each token's offset.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        hidden = config.audio_hidden_dim or config.dim
        self.linear_1 = nn.Linear(config.audio_dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden, config.dim)
        self.norm = FP32LayerNorm(config.dim, config.eps, elementwise_affine=True)
        self.position_embedding = nn.Parameter(torch.randn(config.audio_tokens_per_frame, config.dim) * 0.02)
        self.silence_embedding = nn.Parameter(torch.randn(config.dim) * 0.02)

    def forward(self, features: torch.Tensor, speaking: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(self.linear_2(self.act(self.linear_1(features))).float()).type_as(features)
        tokens = torch.where(speaking[..., None], tokens, self.silence_embedding.to(tokens.dtype))
        return tokens + self.position_embedding.to(tokens.dtype)


class AudioInjection(nn.Module):
    """A direct per-frame audio path: each latent frame's window of audio tokens -> one vector, added to the tokens
    of the character's region before the first block.

    tokens [B, K, F, T, dim] -> reduce (Linear dim -> r) -> flatten the window (T*r) -> Linear -> [B, K, F, dim].
    Cross-attention starts uniform over the window (a 0.8 s average, zero values) and must find the frame's own
    audio before it can use it; this linear filter over the window sees every token at its offset from the first
    step, so a lag or a coarticulation pattern is one weight each. The output layer starts at zero: a model with
    it computes what it computes without it until trained.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.reduce = nn.Linear(config.dim, config.audio_injection_dim)
        self.out = nn.Linear(config.audio_tokens_per_frame * config.audio_injection_dim, config.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden: torch.Tensor, audio: ChunkAudio, first_frame: int, frames: int) -> torch.Tensor:
        """hidden [B, F*S, dim]; audio covers frames [first_frame, frames) -> hidden with the audio added."""
        batch, tokens, dim = hidden.shape
        per_frame = tokens // frames
        vectors = self.out(self.reduce(audio.tokens).flatten(-2))            # [B, K, Fa, dim]
        added = (vectors[:, :, :, None, :] * audio.regions.to(vectors.dtype)[:, :, None, :, None]).sum(1)
        added = added.reshape(batch, (frames - first_frame) * per_frame, dim).to(hidden.dtype)
        if first_frame == 0:
            return hidden + added
        start = first_frame * per_frame
        return torch.cat([hidden[:, :start], hidden[:, start:] + added], dim=1)


class CausalAvatarDiT(nn.Module):
    """The causal, chunked, audio-conditioned score model. See the module docstring for the layout."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=dim, time_freq_dim=config.freq_dim, time_proj_dim=dim * 6, text_embed_dim=config.text_dim,
            image_embed_dim=config.image_dim)
        self.blocks = nn.ModuleList([CausalAvatarBlock(config) for _ in range(config.num_layers)])
        self.norm_out = FP32LayerNorm(dim, config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        # New layers: reference latent -> image tokens, audio features -> audio tokens.
        rh, rw = config.reference_patch
        self.reference_embedder = nn.Linear(config.out_channels * rh * rw, config.image_dim)
        self.audio_projection = AudioProjection(config)
        self.audio_injection = AudioInjection(config) if config.audio_injection_dim else None

    AUDIO_MODULES = ("audio_projection.", "audio_injection.")
    AUDIO_CROSS_ATTENTION = (".attn2.audio_", ".attn2.norm_audio_k.")

    def audio_parameters(self) -> list[nn.Parameter]:
        """The layers that read the audio (projection, injection, the audio keys/values of every cross-attention):
        what a loss may train alone to teach the model to listen without moving the rest of it."""
        return [parameter for name, parameter in self.named_parameters()
                if name.startswith(self.AUDIO_MODULES) or any(part in name for part in self.AUDIO_CROSS_ATTENTION)]

    # ------------------------------------------------------------------ session-level conditioning (once)

    def reference_tokens(self, reference_latent: torch.Tensor) -> torch.Tensor:
        """reference_latent [B, 16, 1, h, w] (normalised VAE latent) -> image tokens [B, (h/rh)*(w/rw), image_dim]."""
        rh, rw = self.config.reference_patch
        frame = reference_latent[:, :, 0]
        batch, channels, height, width = frame.shape
        patches = frame.reshape(batch, channels, height // rh, rh, width // rw, rw)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // rh) * (width // rw), -1)
        return self.reference_embedder(patches)

    def time_modulation(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timesteps [N] (sigma x 1000) -> temb [N, dim] float32, modulation [N, 6, dim] float32."""
        embedder = self.condition_embedder
        projected = embedder.timesteps_proj(timesteps.float())
        weight_dtype = embedder.time_embedder.linear_1.weight.dtype
        temb = embedder.time_embedder(projected.to(weight_dtype))
        modulation = embedder.time_proj(embedder.act_fn(temb)).unflatten(1, (6, -1))
        return temb.float(), modulation.float()

    def prepare_conditions(self, text_states: torch.Tensor, image_tokens: torch.Tensor,
                           step_timesteps: torch.Tensor) -> ConditionCache:
        """Everything that is fixed for a session, computed once.

        text_states [B, Lt, text_dim]; image_tokens [B, Li, image_dim]; step_timesteps [S] (sigma x 1000 per step).
        """
        embedder = self.condition_embedder
        text = embedder.text_embedder(text_states)
        image = embedder.image_embedder(image_tokens)
        per_block = [block.attn2.context_kv(text, image) for block in self.blocks]
        text_key, text_value, image_key, image_value = (torch.stack(parts) for parts in zip(*per_block))
        batch = text_states.shape[0]
        step_temb, step_modulation = self.time_modulation(step_timesteps.to(text_states.device))
        sink_temb, sink_modulation = self.time_modulation(torch.zeros(1, device=text_states.device))
        return ConditionCache(
            text_key=text_key, text_value=text_value, image_key=image_key, image_value=image_value,
            step_temb=step_temb[:, None].expand(-1, batch, -1).contiguous(),
            step_modulation=step_modulation[:, None].expand(-1, batch, -1, -1).contiguous(),
            sink_temb=sink_temb.expand(batch, -1).contiguous(),
            sink_modulation=sink_modulation.expand(batch, -1, -1).contiguous())

    def project_audio(self, features: torch.Tensor, speaking: torch.Tensor, regions: torch.Tensor) -> ChunkAudio:
        """features [B, K, F, T, audio_dim], speaking [B, K, F, T] bool, regions [B, K, S] -> ChunkAudio."""
        return ChunkAudio(tokens=self.audio_projection(features, speaking), regions=regions)

    # ------------------------------------------------------------------ shared pieces

    def _embed(self, latents: torch.Tensor, latent_condition: torch.Tensor | None) -> tuple[torch.Tensor, tuple]:
        """latents [B, 16, F, H, W] -> tokens [B, F*S, dim] and the post-patch grid (F, h, w)."""
        extra = self.config.in_channels - self.config.out_channels
        if extra:
            if latent_condition is None:
                latent_condition = latents.new_zeros(latents.shape[0], extra, *latents.shape[2:])
            latents = torch.cat([latents, latent_condition], dim=1)
        tokens = self.patch_embedding(latents)
        grid = tuple(tokens.shape[2:])
        return tokens.flatten(2).transpose(1, 2), grid

    def _inject(self, hidden: torch.Tensor, audio: ChunkAudio | None, first_frame: int, frames: int) -> torch.Tensor:
        if self.audio_injection is None or audio is None:
            return hidden
        return self.audio_injection(hidden, audio, first_frame, frames)

    def _head(self, hidden: torch.Tensor, temb: torch.Tensor, grid: tuple) -> torch.Tensor:
        """hidden [B, F*S, dim], temb [B, F or 1, dim] -> velocity [B, 16, F, H, W]."""
        batch, tokens, dim = hidden.shape
        frames, height, width = grid
        shift, scale = (self.scale_shift_table[:, None] + temb[:, :, None, :]).unsqueeze(3).unbind(2)
        framed = (batch, frames, tokens // frames, dim)
        normed = (self.norm_out(hidden.float()).view(framed) * (1 + scale) + shift).view(batch, tokens, dim)
        out = self.proj_out(normed.type_as(hidden))
        p_t, p_h, p_w = self.config.patch_size
        out = out.reshape(batch, frames, height, width, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _context(self, cond: ConditionCache, index: int) -> tuple[torch.Tensor, ...]:
        return cond.text_key[index], cond.text_value[index], cond.image_key[index], cond.image_value[index]

    # ------------------------------------------------------------------ streaming path

    def compute_sink(self, sink_latents: torch.Tensor, cond: ConditionCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the clean sink (t = 0), RoPE *not* applied.

        sink_latents [B, 16, Fs, h, w] -> sink_key, sink_value [L, B, Fs*S, H, D].
        The sink attends only to itself, at frame positions [0, Fs); it gets no audio.
        """
        hidden, grid = self._embed(sink_latents, None)
        frames, height, width = grid
        cos, sin = rope_tables(torch.arange(frames, device=hidden.device), height, width,
                               self.config.head_dim, self.config.rope_theta)
        keys, values = [], []

        def self_attention(query, key, value):
            keys.append(key)
            values.append(value)
            return attention(apply_rope(query, cos, sin), apply_rope(key, cos, sin), value)

        modulation = cond.sink_modulation[:, None]
        for index, block in enumerate(self.blocks):
            hidden = block(hidden, modulation, frames, self_attention, self._context(cond, index), None, 0)
        return torch.stack(keys), torch.stack(values)

    def chunk_rope(self, chunk_frames: int, grid_height: int, grid_width: int, sink_frames: int,
                   sink_rope_offset: int, device=None) -> ChunkRope:
        """The session's RoPE tables for the streaming path (see `ChunkRope`); grid = post-patch tokens."""
        device = device or next(self.parameters()).device
        head_dim, theta = self.config.head_dim, self.config.rope_theta
        sink_start = chunk_frames + sink_rope_offset

        def tables(first: int, count: int):
            return rope_tables(torch.arange(first, first + count, device=device), grid_height, grid_width,
                               head_dim, theta)

        positions = (0, 2 * chunk_frames - 1, sink_start, sink_start + sink_frames - 1)
        return ChunkRope(current=tables(chunk_frames, chunk_frames), previous=tables(0, chunk_frames),
                         sink=tables(sink_start, sink_frames), frame_positions=(min(positions), max(positions)))

    def absolute_chunk_rope(self, chunk_index: int, chunk_frames: int, grid_height: int, grid_width: int,
                            sink_frames: int, device=None) -> ChunkRope:
        """The ablation of Rolling RoPE: absolute positions. The sink sits at [0, Fs), chunk c at Fs + c*C; a chunk's
        keys are stored at their own positions (so next chunk's "previous" is where it was). Positions grow."""
        device = device or next(self.parameters()).device
        head_dim, theta = self.config.head_dim, self.config.rope_theta
        first = sink_frames + chunk_index * chunk_frames

        def tables(start: int, count: int):
            return rope_tables(torch.arange(start, start + count, device=device), grid_height, grid_width,
                               head_dim, theta)

        current = tables(first, chunk_frames)
        return ChunkRope(current=current, previous=current, sink=tables(0, sink_frames),
                         frame_positions=(0, first + chunk_frames - 1))

    def forward_chunk(self, latents: torch.Tensor, step_index: int, cache: KVCache, cond: ConditionCache,
                      audio: ChunkAudio | None, rope: ChunkRope,
                      latent_condition: torch.Tensor | None = None) -> torch.Tensor:
        """One chunk at one denoising step, attending to [sink | previous chunk | itself] through `cache`.

        latents [B, 16, C, h, w] (noisy, this step's noise level); step_index selects this step's modulation in
        `cond`; rope from `chunk_rope`. Writes this chunk's keys/values into `cache` as the next previous chunk.
        Returns the velocity [B, 16, C, h, w].
        """
        hidden, grid = self._embed(latents, latent_condition)
        hidden = self._inject(hidden, audio, 0, grid[0])
        (cos_cur, sin_cur), (cos_prev, sin_prev), (cos_sink, sin_sink) = rope.current, rope.previous, rope.sink
        modulation = cond.step_modulation[step_index][:, None]
        for index, block in enumerate(self.blocks):
            def self_attention(query, key, value, index=index):
                main_key = torch.cat([apply_rope(cache.sink_key[index], cos_sink, sin_sink),
                                      apply_rope(key, cos_cur, sin_cur)], dim=1)
                main_value = torch.cat([cache.sink_value[index], value], dim=1)
                out = attention_with_optional_keys(apply_rope(query, cos_cur, sin_cur), main_key, main_value,
                                                   cache.prev_key[index], cache.prev_value[index], cache.prev_valid)
                cache.prev_key[index].copy_(apply_rope(key, cos_prev, sin_prev))
                cache.prev_value[index].copy_(value)
                return out

            hidden = block(hidden, modulation, grid[0], self_attention, self._context(cond, index), audio, 0)
        cache.prev_valid.fill_(True)
        return self._head(hidden, cond.step_temb[step_index][:, None], grid)

    # ------------------------------------------------------------------ reference path (one pass, explicit mask)

    def forward_full(self, latents: torch.Tensor, timesteps: torch.Tensor, cond: ConditionCache,
                     audio: ChunkAudio | None = None, layout: str = "full", chunk_frames: int = 3,
                     sink_frames: int = 1, sink_rope_offset: int = 3,
                     latent_condition: torch.Tensor | None = None) -> torch.Tensor:
        """The whole sequence in one pass.

        latents [B, 16, F, h, w]; timesteps [B, F] (sigma x 1000 per frame).
        layout "full": bidirectional, absolute positions 0..F-1 (what diffusers computes); audio covers all frames.
        layout "block_sparse": the first `sink_frames` frames are the sink, then chunks of `chunk_frames`; the
        causal chunk mask of the module docstring; audio covers the non-sink frames.
        Returns the velocity [B, 16, F, h, w].
        """
        if layout not in ("full", "block_sparse"):
            raise ValueError(f"layout={layout!r} is invalid; allowed: 'full', 'block_sparse'")
        hidden, grid = self._embed(latents, latent_condition)
        frames, height, width = grid
        per_frame = height * width
        temb, modulation = self.time_modulation(timesteps.flatten())
        temb = temb.unflatten(0, timesteps.shape)
        modulation = modulation.unflatten(0, timesteps.shape)
        head_dim, theta, device = self.config.head_dim, self.config.rope_theta, hidden.device

        if layout == "full":
            cos, sin = rope_tables(torch.arange(frames, device=device), height, width, head_dim, theta)

            def self_attention(query, key, value):
                return attention(apply_rope(query, cos, sin), apply_rope(key, cos, sin), value)

            audio_first = 0
        else:
            num_chunks, remainder = divmod(frames - sink_frames, chunk_frames)
            if remainder or num_chunks < 1:
                raise ValueError(f"{frames} latent frames do not split into {sink_frames} sink frame(s) plus whole "
                                 f"chunks of {chunk_frames}")
            sink_tokens = sink_frames * per_frame
            chunk_pos = torch.arange(frames - sink_frames, device=device)
            q_pos = torch.cat([torch.arange(sink_frames, device=device), chunk_pos])
            cos_q, sin_q = rope_tables(q_pos, height, width, head_dim, theta)
            copy_pos = (torch.arange(num_chunks, device=device)[:, None] * chunk_frames + sink_rope_offset
                        + torch.arange(sink_frames, device=device)[None, :]).flatten()
            cos_copy, sin_copy = rope_tables(copy_pos, height, width, head_dim, theta)
            mask = self._block_sparse_mask(num_chunks, chunk_frames, sink_frames, per_frame, device)

            def self_attention(query, key, value):
                sink_key, sink_value = key[:, :sink_tokens], value[:, :sink_tokens]
                copies_key = apply_rope(sink_key.repeat(1, num_chunks, 1, 1), cos_copy, sin_copy)
                all_key = torch.cat([apply_rope(key, cos_q, sin_q), copies_key], dim=1)
                all_value = torch.cat([value, sink_value.repeat(1, num_chunks, 1, 1)], dim=1)
                return attention(apply_rope(query, cos_q, sin_q), all_key, all_value, mask)

            audio_first = sink_frames

        hidden = self._inject(hidden, audio, audio_first, frames)
        for index, block in enumerate(self.blocks):
            hidden = block(hidden, modulation, frames, self_attention, self._context(cond, index), audio, audio_first)
        return self._head(hidden, temb, grid)

    @staticmethod
    def _block_sparse_mask(num_chunks: int, chunk_frames: int, sink_frames: int, per_frame: int,
                           device) -> torch.Tensor:
        """bool [Lq, Lk] token mask: keys = [sink | chunks | one sink copy per chunk] (see module docstring)."""
        query_frames = sink_frames + num_chunks * chunk_frames
        key_frames = query_frames + num_chunks * sink_frames
        frame_mask = torch.zeros(query_frames, key_frames, dtype=torch.bool, device=device)
        frame_mask[:sink_frames, :sink_frames] = True
        for chunk in range(num_chunks):
            rows = slice(sink_frames + chunk * chunk_frames, sink_frames + (chunk + 1) * chunk_frames)
            first_visible = sink_frames + max(chunk - 1, 0) * chunk_frames
            frame_mask[rows, first_visible:rows.stop] = True
            copy_start = query_frames + chunk * sink_frames
            frame_mask[rows, copy_start:copy_start + sink_frames] = True
        return frame_mask.repeat_interleave(per_frame, 0).repeat_interleave(per_frame, 1)

    # ------------------------------------------------------------------ cache construction

    def allocate_cache(self, batch: int, sink_frames: int, chunk_frames: int, tokens_per_frame: int,
                       device=None, dtype=None) -> KVCache:
        parameter = next(self.parameters())
        return KVCache.allocate(num_layers=self.config.num_layers, batch=batch,
                                sink_tokens=sink_frames * tokens_per_frame,
                                chunk_tokens=chunk_frames * tokens_per_frame, num_heads=self.config.num_heads,
                                head_dim=self.config.head_dim, device=device or parameter.device,
                                dtype=dtype or parameter.dtype)
