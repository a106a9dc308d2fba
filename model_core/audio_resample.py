"""Streaming-exact resampling of mono PCM: any integer rate in [8000, 96000] Hz -> any other.

What lives here
---------------
* :func:`as_float_pcm`: PCM input validation (1-D; int16 s16le values scaled by 1/32768, or float taken as is).
* :class:`StreamingResampler` with its per-stream :class:`ResamplerState` (passed in and returned, never kept on
  the resampler), and :func:`resample` for a whole signal. A Kaiser-windowed sinc of fixed half-width
  ``RESAMPLER_HALF_WIDTH_S``: every output sample depends only on its index and the input samples near it, so
  pushing the input in any pieces and flushing equals resampling it whole.

What this file does not know
----------------------------
Features, video frames, backends or models: it maps sample arrays to sample arrays. The front end that uses it
is :mod:`model_core.audio`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch

__all__ = [
    "MAX_SAMPLE_RATE_HZ",
    "MIN_SAMPLE_RATE_HZ",
    "RESAMPLER_HALF_WIDTH_S",
    "RESAMPLER_LOOKAHEAD_S",
    "ResamplerState",
    "StreamingResampler",
    "as_float_pcm",
    "resample",
]

#: Accepted input rates (inclusive), integer Hz.
MIN_SAMPLE_RATE_HZ = 8000
MAX_SAMPLE_RATE_HZ = 96000

#: Half-width of the resampler's windowed-sinc kernel, in seconds (rate independent).
RESAMPLER_HALF_WIDTH_S = 0.002
#: Worst-case (over input rates >= 8 kHz) lookahead added by the resampler: an
#: output sample at time ``u`` is final once input up to ``u + RESAMPLER_LOOKAHEAD_S``
#: has arrived (half-width + one input sample period at 8 kHz). 0 for same-rate input.
RESAMPLER_LOOKAHEAD_S = RESAMPLER_HALF_WIDTH_S + 1.0 / MIN_SAMPLE_RATE_HZ
_RESAMPLER_ROLLOFF = 0.9  # low-pass cutoff as a fraction of min(src, dst) Nyquist
_RESAMPLER_KAISER_BETA = 8.0

_ALLOWED_PCM_DTYPES = ("int16", "float16", "bfloat16", "float32", "float64")


# ----------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_rate(value: Any, name: str) -> int:
    """Validate an integer sample rate in [MIN_SAMPLE_RATE_HZ, MAX_SAMPLE_RATE_HZ]."""
    if not _is_int(value) or not MIN_SAMPLE_RATE_HZ <= int(value) <= MAX_SAMPLE_RATE_HZ:
        raise ValueError(
            f"{name}={value!r} is not supported; allowed values: integer Hz in "
            f"[{MIN_SAMPLE_RATE_HZ}, {MAX_SAMPLE_RATE_HZ}]"
        )
    return int(value)


def as_float_pcm(pcm: Any, name: str = "pcm") -> np.ndarray:
    """Convert PCM to a contiguous float32 numpy array ``[S]`` in [-1, 1] scale.

    Accepts numpy arrays or torch tensors (any device), 1-D, dtype int16 (PCM s16le
    values, scaled by 1/32768) or float16/bfloat16/float32/float64 (taken as is).
    """
    if isinstance(pcm, torch.Tensor):
        if pcm.dim() != 1:
            raise ValueError(
                f"{name} must be 1-D mono [S]; got shape {tuple(pcm.shape)}; allowed: 1-D arrays"
            )
        tdt = str(pcm.dtype).replace("torch.", "")
        if tdt not in _ALLOWED_PCM_DTYPES:
            raise ValueError(
                f"{name} dtype {tdt!r} is not supported; allowed dtypes: {_ALLOWED_PCM_DTYPES}"
            )
        t = pcm.detach().cpu()
        if tdt == "int16":
            return t.numpy().astype(np.float32) / np.float32(32768.0)
        return np.ascontiguousarray(t.to(torch.float32).numpy())
    arr = np.asarray(pcm)
    if arr.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D mono [S]; got shape {arr.shape}; allowed: 1-D arrays"
        )
    if arr.dtype == np.int16:
        return arr.astype(np.float32) / np.float32(32768.0)
    if arr.dtype in (np.float16, np.float32, np.float64):
        return np.ascontiguousarray(arr, dtype=np.float32)
    raise ValueError(
        f"{name} dtype {str(arr.dtype)!r} is not supported; allowed dtypes: {_ALLOWED_PCM_DTYPES}"
    )


# ----------------------------------------------------------------------------------
# Streaming-exact resampler
# ----------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _polyphase_table(src_rate_hz: int, dst_rate_hz: int) -> tuple[int, int, int, np.ndarray]:
    """Kaiser-windowed-sinc polyphase table for ``src -> dst``.

    Output sample ``k`` sits at input position ``p = k * down / up`` (input samples);
    with ``base = floor(p)`` and phase ``r = (k * down) mod up`` it is
    ``sum_j x[base + j] * table[r, j + J - 1]`` for ``j`` in ``[-J + 1, J]``.

    Returns ``(up, down, J, table [up, 2J] float32)``.
    """
    g = math.gcd(src_rate_hz, dst_rate_hz)
    up, down = dst_rate_hz // g, src_rate_hz // g
    half_width = RESAMPLER_HALF_WIDTH_S * src_rate_hz  # in input samples
    J = math.ceil(half_width)
    offsets = np.arange(-J + 1, J + 1, dtype=np.float64)
    # cutoff in cycles per input sample
    f_c = _RESAMPLER_ROLLOFF * min(src_rate_hz, dst_rate_hz) / 2.0 / src_rate_hz
    beta = _RESAMPLER_KAISER_BETA
    table = np.empty((up, 2 * J), dtype=np.float32)
    for r0 in range(0, up, 1024):  # bounded temporaries for odd rate pairs
        frac = np.arange(r0, min(up, r0 + 1024), dtype=np.float64) / up
        d = offsets[None, :] - frac[:, None]  # distance in input samples
        x = d / half_width
        inside = np.abs(x) < 1.0
        win = np.where(inside, np.i0(beta * np.sqrt(np.clip(1.0 - x * x, 0.0, None))), 0.0)
        w = 2.0 * f_c * np.sinc(2.0 * f_c * d) * win
        w /= w.sum(axis=1, keepdims=True)  # exact unit DC gain for every phase
        table[r0 : r0 + len(frac)] = w
    return up, down, J, table


@dataclass
class ResamplerState:
    """Per-stream state of :class:`StreamingResampler`.

    Fields:
        buf: ``[B]`` float32 input samples still needed (history + not yet consumed).
        buf_start: absolute input index of ``buf[0]`` (negative = zero pre-roll).
        n_in: input samples received so far.
        n_out: output samples emitted so far.
    """

    buf: np.ndarray
    buf_start: int
    n_in: int = 0
    n_out: int = 0


class StreamingResampler:
    """Streaming-exact rational resampler (Kaiser-windowed sinc, fixed finite kernel).

    Output sample ``k`` is the band-limited interpolation of the input at time
    ``k / dst_rate_hz`` using input samples within ``RESAMPLER_HALF_WIDTH_S`` of it
    (input before time 0 and after the end is zero). It depends only on ``k`` and
    those samples, so chunked resampling equals whole-signal resampling for any
    split. A whole input of ``S`` samples gives ``ceil(S * dst / src)`` outputs.

    ``lookahead_s``: output sample at time ``u`` is emitted once input up to
    ``u + lookahead_s`` has arrived (``RESAMPLER_HALF_WIDTH_S + 1/src_rate_hz``;
    0 when the rates are equal, in which case samples pass straight through).
    """

    def __init__(self, src_rate_hz: int, dst_rate_hz: int):
        self.src_rate_hz = _check_rate(src_rate_hz, "src_rate_hz")
        self.dst_rate_hz = _check_rate(dst_rate_hz, "dst_rate_hz")
        self.passthrough = self.src_rate_hz == self.dst_rate_hz
        if self.passthrough:
            self.up = self.down = 1
            self.J = 0
            self.table = np.ones((1, 1), np.float32)
            self.lookahead_s = 0.0
        else:
            self.up, self.down, self.J, self.table = _polyphase_table(
                self.src_rate_hz, self.dst_rate_hz
            )
            self.lookahead_s = RESAMPLER_HALF_WIDTH_S + 1.0 / self.src_rate_hz
        self._offsets = np.arange(-self.J + 1, self.J + 1, dtype=np.int64)

    def new_state(self) -> ResamplerState:
        # J zeros before time 0 so the first outputs find their left taps.
        return ResamplerState(buf=np.zeros(self.J, np.float32), buf_start=-self.J)

    def _compute(self, buf: np.ndarray, buf_start: int, k0: int, k1: int) -> np.ndarray:
        """Output samples ``[k0, k1)`` from ``buf`` (which must cover all taps). -> ``[k1-k0]``."""
        out = np.empty(max(0, k1 - k0), np.float32)
        step = max(1, (1 << 21) // max(1, 2 * self.J))  # ~8 MB of gathered taps per block
        for a in range(k0, k1, step):
            b = min(k1, a + step)
            k = np.arange(a, b, dtype=np.int64)
            base = (k * self.down) // self.up
            phase = (k * self.down) % self.up
            idx = base[:, None] + self._offsets[None, :] - buf_start
            out[a - k0 : b - k0] = (buf[idx] * self.table[phase]).sum(axis=1, dtype=np.float32)
        return out

    def _advance(
        self, state: ResamplerState, x: np.ndarray, k_end: int | None
    ) -> tuple[ResamplerState, np.ndarray]:
        buf = np.concatenate([state.buf, x]) if x.size else state.buf
        n_in = state.n_in + int(x.size)
        if k_end is None:  # streaming: everything whose taps are all available
            # emit k iff floor(k*down/up) + J <= n_in - 1
            lim = n_in - self.J  # floor(k*down/up) < lim
            k_end = max(state.n_out, -((-lim * self.up) // self.down)) if lim > 0 else state.n_out
        else:  # flush: the taps beyond the end are zeros
            buf = np.concatenate([buf, np.zeros(self.J + 1, np.float32)])
        y = self._compute(buf, state.buf_start, state.n_out, k_end)
        keep_from = (k_end * self.down) // self.up - self.J + 1
        cut = max(0, keep_from - state.buf_start)
        new = ResamplerState(
            buf=buf[cut:].copy(), buf_start=state.buf_start + cut, n_in=n_in, n_out=k_end
        )
        return new, y

    def push(self, state: ResamplerState, x: np.ndarray) -> tuple[ResamplerState, np.ndarray]:
        """Feed input ``x: [S]`` float32; returns ``(state, y: [M])`` of newly final outputs."""
        if self.passthrough:
            n = int(x.size)
            return replace(state, n_in=state.n_in + n, n_out=state.n_out + n), x.astype(
                np.float32, copy=True
            )
        return self._advance(state, np.asarray(x, np.float32), None)

    def flush(self, state: ResamplerState) -> tuple[ResamplerState, np.ndarray]:
        """End of input: emit the rest so the total is ``ceil(n_in * dst / src)``."""
        if self.passthrough:
            return state, np.zeros(0, np.float32)
        total = -((-state.n_in * self.up) // self.down)
        return self._advance(state, np.zeros(0, np.float32), max(total, state.n_out))


def resample(pcm: np.ndarray, src_rate_hz: int, dst_rate_hz: int) -> np.ndarray:
    """Resample a whole signal. ``pcm: [S]`` (int16 or float) -> float32 ``[ceil(S*dst/src)]``.

    Identical (same code path) to pushing the signal through :class:`StreamingResampler`
    in any number of pieces and flushing. Same rate -> float32 copy.
    """
    x = as_float_pcm(pcm, "pcm")
    rs = StreamingResampler(src_rate_hz, dst_rate_hz)
    st, y0 = rs.push(rs.new_state(), x)
    _, y1 = rs.flush(st)
    return np.concatenate([y0, y1])

