"""Attention backends behind one switch: flash-attn where it imports on CUDA, torch SDPA otherwise.

Tensors use the flash-attn layout throughout: `[B, L, H, D]` (batch, tokens, heads, head channels).

Two entry points:

* `attention(query, key, value, mask=None)` — dense attention, optional boolean mask (True = may attend).
* `attention_with_optional_keys(query, key, value, opt_key, opt_value, opt_valid)` — attention over
  `key ++ opt_key` where the optional block is ignored for batch rows whose `opt_valid` is False.  The causal
  chunk attention uses it for the previous-chunk cache, which is absent for a session's first chunk:

      keys:        [ sink | current chunk ]   [ previous chunk ]
      batch row 0:   ####   #############       ##############     (opt_valid = True)
      batch row 1:   ####   #############       ..............     (opt_valid = False, first chunk)

  SDPA does it with a key mask; flash-attn (no arbitrary masks) computes the two blocks separately and merges
  them exactly with their log-sum-exp, so shapes stay static either way.

The switch: `set_attention_backend("auto" | "sdpa" | "math" | "flash")`, or `FACECAST_ATTENTION` in the
environment.  "math" forces SDPA's reference kernel (used by tests to hold kernels equal).
This module changes no global torch settings.  What may live here: kernels and the switch between them; nothing
that knows about chunks, caches, sessions or the model (callers build the key blocks).  Hot path: no host syncs.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "sdpa", "math", "flash")

try:  # pragma: no cover - only on CUDA machines with flash-attn installed
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # ImportError, or a CUDA/ABI mismatch raised at import
    _flash_attn_func = None

_backend = os.environ.get("FACECAST_ATTENTION", "auto")


def set_attention_backend(name: str) -> None:
    """Select the attention kernel for every model in this process."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; allowed: {', '.join(BACKENDS)}")
    if name == "flash" and _flash_attn_func is None:
        raise ValueError("attention backend 'flash' needs the flash-attn package on a CUDA machine; "
                         "it did not import here (use 'auto' or 'sdpa')")
    _backend = name


def get_attention_backend() -> str:
    return _backend


def flash_available() -> bool:
    return _flash_attn_func is not None and torch.cuda.is_available()


def resolved_backend(query: torch.Tensor) -> str:
    """The kernel that will actually run for this tensor: 'flash', 'sdpa' or 'math'."""
    if _backend == "auto":
        if _flash_attn_func is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
            return "flash"
        return "sdpa"
    return _backend


def _sdpa(query, key, value, mask, math_only: bool):
    """query [B, Lq, H, D], key/value [B, Lk, H, D], mask broadcastable to [B, H, Lq, Lk] -> [B, Lq, H, D]."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if math_only:
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense attention.

    query: [B, Lq, H, D]; key, value: [B, Lk, H, D];
    mask: bool, broadcastable to [B, H, Lq, Lk], True where a query may attend (None: all).
    Returns [B, Lq, H, D].
    """
    backend = resolved_backend(query)
    if backend == "flash" and mask is None:
        return _flash_attn_func(query, key, value)
    return _sdpa(query, key, value, mask, math_only=(backend == "math"))


def attention_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention plus its log-sum-exp. Returns (out [B, Lq, H, D], lse [B, H, Lq] float32)."""
    if resolved_backend(query) == "flash":
        out, lse, _ = _flash_attn_func(query, key, value, return_attn_probs=True)
        return out, lse
    scale = query.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", query.float(), key.float()) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), value.float()).to(query.dtype)
    return out, lse


def merge_partial_attention(out_a, lse_a, out_b, lse_b, b_valid: torch.Tensor) -> torch.Tensor:
    """Exact softmax over the union of two key blocks from their partial results.

    out_*: [B, Lq, H, D]; lse_*: [B, H, Lq]; b_valid: bool [B] (False: block b is ignored for that row).
    """
    lse_b = torch.where(b_valid[:, None, None], lse_b, torch.full_like(lse_b, float("-inf")))
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).transpose(1, 2).unsqueeze(-1)  # [B, Lq, H, 1]
    w_b = torch.exp(lse_b - lse).transpose(1, 2).unsqueeze(-1)
    return (out_a.float() * w_a + out_b.float() * w_b).to(out_a.dtype)


def attention_with_optional_keys(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 opt_key: torch.Tensor, opt_value: torch.Tensor,
                                 opt_valid: torch.Tensor) -> torch.Tensor:
    """Attention over `key ++ opt_key`, dropping the optional block for rows where `opt_valid` is False.

    query: [B, Lq, H, D]; key, value: [B, Lk, H, D]; opt_key, opt_value: [B, Lo, H, D]; opt_valid: bool [B].
    Returns [B, Lq, H, D].
    """
    backend = resolved_backend(query)
    if backend == "flash":
        out_a, lse_a = attention_lse(query, key, value)
        out_b, lse_b = attention_lse(query, opt_key, opt_value)
        return merge_partial_attention(out_a, lse_a, out_b, lse_b, opt_valid)
    batch, main_len, opt_len = query.shape[0], key.shape[1], opt_key.shape[1]
    mask = torch.cat([
        torch.ones(batch, main_len, dtype=torch.bool, device=query.device),
        opt_valid[:, None].expand(batch, opt_len),
    ], dim=1)[:, None, None, :]
    return _sdpa(query, torch.cat([key, opt_key], 1), torch.cat([value, opt_value], 1), mask,
                 math_only=(backend == "math"))
