"""3D rotary position embedding (Wan layout) evaluated at arbitrary frame positions.

Wan splits each head's channels into frame / height / width parts (`t = D - 2*2*(D//6)`, `h = w = 2*(D//6)`)
and rotates interleaved channel pairs `(x[2i], x[2i+1])`.  Diffusers precomputes a table for positions
`0..max_seq_len`; here the frame position is an argument, because the causal engine places chunks at
*relative* positions (Rolling RoPE): previous chunk at `[0, C)`, current chunk at `[C, 2C)`, sink at
`C + sink_rope_offset`, whatever the chunk's index in the stream.  Positions therefore stay bounded forever.

Frequencies are computed in float64 and cast to float32, as diffusers does, so the two agree to rounding.
This module does not know about caches or chunks; callers pass positions.
"""

from __future__ import annotations

import torch


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis (frame, height, width) for one head."""
    h_dim = w_dim = 2 * (head_dim // 6)
    return head_dim - h_dim - w_dim, h_dim, w_dim


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """positions: [N] float64 -> angles [N, dim // 2] float64."""
    exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)[: dim // 2] / dim
    inv_freq = 1.0 / (theta ** exponents)
    return positions[:, None] * inv_freq[None, :]


def rope_tables(frame_positions: torch.Tensor, height: int, width: int, head_dim: int,
                theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for tokens laid out frame-major (f, h, w).

    frame_positions: [F] (any numbers; integers in practice). Returns (cos, sin), each [F*height*width, head_dim//2]
    float32, for `apply_rope`.
    """
    t_dim, h_dim, w_dim = rope_split(head_dim)
    device = frame_positions.device
    frames = frame_positions.to(torch.float64)
    ang_t = _axis_angles(frames, t_dim, theta)
    ang_h = _axis_angles(torch.arange(height, dtype=torch.float64, device=device), h_dim, theta)
    ang_w = _axis_angles(torch.arange(width, dtype=torch.float64, device=device), w_dim, theta)
    num_frames = frames.shape[0]
    angles = torch.cat([
        ang_t[:, None, None, :].expand(num_frames, height, width, -1),
        ang_h[None, :, None, :].expand(num_frames, height, width, -1),
        ang_w[None, None, :, :].expand(num_frames, height, width, -1),
    ], dim=-1).reshape(num_frames * height * width, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs.

    x: [B, L, H, D]; cos, sin: [L, D//2] (or broadcastable [B, L, 1, D//2]). Returns x's shape and dtype.
    """
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)
