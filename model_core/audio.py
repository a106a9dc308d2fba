"""Streaming audio front end: PCM in, per-video-frame audio features out.

What this file does
-------------------
* Converts mono PCM (int16 PCM s16le values, or float in [-1, 1]) at any integer
  rate in [8000, 96000] Hz to float32 at 16 kHz with a streaming-exact
  windowed-sinc (Kaiser) resampler (:class:`StreamingResampler`, :func:`resample`).
* Turns the 16 kHz signal into one feature vector per *video* frame at
  ``AudioConfig.fps`` with one of the backends registered in ``AUDIO_BACKENDS``
  (each a small class behind the :class:`AudioBackend` protocol; ``backend_class`` is
  the one place a backend name is resolved, and an unknown name is a ``ConfigError``):

  - ``"logmel"``  (default, no weights): ``subframes`` log-mel vectors per video
    frame, concatenated -> ``feature_dim = n_mels * subframes``.
  - ``"wav2vec2"``: last hidden state of a local transformers ``Wav2Vec2Model``,
    linearly interpolated at the video-frame centres -> ``feature_dim = hidden_size``.
  - ``"whisper"``: last hidden state of a local ``WhisperModel`` encoder (fed with
    Whisper-style log-mel computed here), interpolated the same way ->
    ``feature_dim = d_model``.

* Works incrementally: :meth:`AudioFrontend.push` accepts audio in pieces of any
  size and returns features for every video frame whose audio (plus a bounded,
  explicit lookahead :attr:`AudioFrontend.lookahead_s`) has arrived;
  :meth:`AudioFrontend.flush` finishes the stream. The key property is that
  ``cat(push(p1), push(p2), ..., flush()) == encode(p1 + p2 + ...)`` for *any* split
  of the input (float32, atol 1e-5): every output value is a deterministic function
  of the 16 kHz sample stream and of its own frame index only, never of how the
  input was chunked.

Streaming model and time conventions
------------------------------------
* Input sample ``n`` at rate ``r`` sits at time ``n / r`` seconds. Audio before
  time 0 and after the end of the input (at :meth:`flush`) is silence (zeros).
* Video frame ``t`` spans ``[t / fps, (t + 1) / fps)``; its centre is ``(t + 0.5) / fps``.
  A clip of ``duration_s`` seconds yields exactly ``ceil(duration_s * fps)`` frames.
* The per-session :class:`AudioStreamState` is passed in and returned; the
  frontend itself holds only immutable configuration and model weights, so one
  frontend can serve many sessions. ``push``/``flush`` never mutate the state
  they receive (they return a new one).
* Encoder backends (wav2vec2/whisper) run the encoder on fixed blocks of
  ``block_frames`` video frames (about ``ENCODER_BLOCK_S`` seconds). Block ``b``
  uses the audio window ``[block_start - context_s, block_end + ENCODER_RIGHT_CONTEXT_S)``
  and only the block's own frames are kept. Because windows are bounded, the
  result is *not* identical to one encoder pass over the whole clip; instead
  :meth:`AudioFrontend.encode` is defined as this same windowed computation, so
  push/flush == encode holds exactly.

What this file does not know
----------------------------
Nothing about video/avatar models, Ray, gRPC, sockets, sessions or the network:
it maps PCM arrays to feature tensors and nothing else. Model weights are only
ever read from a local directory (``local_files_only=True``); nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from .config import ConfigError

__all__ = [
    "AUDIO_BACKENDS",
    "SUPPORTED_BACKENDS",
    "AudioBackend",
    "AudioConfig",
    "AudioStreamState",
    "AudioFrontend",
    "ResamplerState",
    "StreamingResampler",
    "resample",
    "mel_filterbank",
    "load_wav2vec2",
    "load_whisper_encoder",
    "backend_class",
    "as_float_pcm",
    "LogMelBackend",
    "Wav2Vec2Backend",
    "WhisperBackend",
]

#: The only internal rate supported: every backend (n_fft=400 log-mel, wav2vec2,
#: Whisper) is defined at 16 kHz.
INTERNAL_SAMPLE_RATE_HZ = 16000
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

#: STFT window for the log-mel paths: 400 samples = 25 ms periodic Hann at 16 kHz.
N_FFT = 400
#: log(mel + LOGMEL_FLOOR) for the logmel backend.
LOGMEL_FLOOR = 1e-5
#: Whisper log-mel hop (10 ms) and encoder frame hop (2 mel frames = 20 ms) in 16 kHz samples.
WHISPER_HOP = 160
WHISPER_ENCODER_HOP = 2 * WHISPER_HOP

#: Encoder backends: target duration of one encoder block (rounded to whole video frames).
ENCODER_BLOCK_S = 0.2
#: Encoder backends: audio after the end of a block that is fed to the encoder (right context).
ENCODER_RIGHT_CONTEXT_S = 0.1

_ALLOWED_PCM_DTYPES = ("int16", "float16", "bfloat16", "float32", "float64")


# ----------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


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
# Configuration
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioConfig:
    """Audio front-end configuration (immutable; validated on construction, errors are `ConfigError`).

    Fields:
        backend: Feature extractor, one of ``SUPPORTED_BACKENDS`` (the keys of ``AUDIO_BACKENDS``):
            ``"logmel"`` (no weights), ``"wav2vec2"`` or ``"whisper"``.
        model_path: Local directory in transformers ``save_pretrained`` layout
            (``config.json`` + weights). Required by backends whose ``needs_model_path`` is True
            (``"wav2vec2"``/``"whisper"``), ignored by ``"logmel"``. Never downloaded.
        fps: Video frames per second the features are aligned to (any positive
            real, e.g. 25, 30, 29.97). One feature row per video frame.
        sample_rate_hz: Internal rate; all input is resampled to it. Must be 16000
            (all backends are defined at 16 kHz).
        n_mels: logmel backend: number of mel bins (Slaney scale and norm, 0-8 kHz).
        subframes: logmel backend: mel frames per video frame, centred at
            ``(t + (j + 0.5) / subframes) / fps`` s; ``feature_dim = n_mels * subframes``.
        context_s: wav2vec2/whisper: seconds of left audio context fed to the
            encoder before each new block (for Whisper also capped by its fixed
            ``2 * max_source_positions`` mel-frame window).
    """

    backend: str = "logmel"
    model_path: str | None = None
    fps: float = 25.0
    sample_rate_hz: int = 16000
    n_mels: int = 80
    subframes: int = 4
    context_s: float = 2.0

    def __post_init__(self) -> None:
        backend = backend_class(self.backend)
        if self.model_path is not None:
            if not isinstance(self.model_path, (str, os.PathLike)) or str(self.model_path) == "":
                raise ConfigError(
                    f"AudioConfig.model_path={self.model_path!r} is invalid; "
                    "allowed values: None or a non-empty local directory path"
                )
            object.__setattr__(self, "model_path", os.fspath(self.model_path))
        if backend.needs_model_path and self.model_path is None:
            raise ConfigError(
                f"AudioConfig.model_path=None is not allowed for backend={self.backend!r}; "
                "allowed values: a local directory saved with transformers save_pretrained()"
            )
        if not _is_real(self.fps) or not math.isfinite(float(self.fps)) or not 0 < self.fps <= 1000:
            raise ConfigError(
                f"AudioConfig.fps={self.fps!r} is invalid; allowed values: a finite real in (0, 1000]"
            )
        if not _is_int(self.sample_rate_hz) or int(self.sample_rate_hz) != INTERNAL_SAMPLE_RATE_HZ:
            raise ConfigError(
                f"AudioConfig.sample_rate_hz={self.sample_rate_hz!r} is not supported; "
                f"allowed values: ({INTERNAL_SAMPLE_RATE_HZ},)"
            )
        if not _is_int(self.n_mels) or not 1 <= self.n_mels <= 128:
            raise ConfigError(
                f"AudioConfig.n_mels={self.n_mels!r} is invalid; allowed values: integer in [1, 128]"
            )
        if not _is_int(self.subframes) or not 1 <= self.subframes <= 32:
            raise ConfigError(
                f"AudioConfig.subframes={self.subframes!r} is invalid; allowed values: integer in [1, 32]"
            )
        if (
            not _is_real(self.context_s)
            or not math.isfinite(float(self.context_s))
            or not 0 <= self.context_s <= 30
        ):
            raise ConfigError(
                f"AudioConfig.context_s={self.context_s!r} is invalid; "
                "allowed values: a finite real in [0, 30] seconds"
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


# ----------------------------------------------------------------------------------
# Mel filterbank / spectral helpers
# ----------------------------------------------------------------------------------


def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    mel = f / f_sp
    log_part = min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log_part, mel)


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(
    n_mels: int, n_fft: int = N_FFT, sample_rate_hz: int = INTERNAL_SAMPLE_RATE_HZ
) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular mel filterbank, 0 Hz .. Nyquist.

    Same definition as librosa's default / transformers ``mel_filter_bank(norm="slaney",
    mel_scale="slaney")`` used by Whisper. Returns float32 ``[n_fft // 2 + 1, n_mels]``.
    """
    n_freqs = n_fft // 2 + 1
    fft_freqs = np.linspace(0.0, sample_rate_hz / 2.0, n_freqs)
    mel_pts = np.linspace(
        _hz_to_mel_slaney(0.0), _hz_to_mel_slaney(sample_rate_hz / 2.0), n_mels + 2
    )
    hz_pts = _mel_to_hz_slaney(mel_pts)  # [n_mels + 2]
    diff = np.diff(hz_pts)
    slopes = hz_pts[None, :] - fft_freqs[:, None]  # [n_freqs, n_mels + 2]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))  # [n_freqs, n_mels]
    fb *= 2.0 / (hz_pts[2 : n_mels + 2] - hz_pts[:n_mels])
    return fb.astype(np.float32)


_HANN_400 = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32)


def _power_mel(frames: np.ndarray, fb: torch.Tensor) -> torch.Tensor:
    """``frames: [F, N_FFT]`` float32 -> mel power ``[F, n_mels]`` (periodic Hann, |rfft|^2)."""
    x = torch.from_numpy(frames) * _HANN_400
    spec = torch.fft.rfft(x, n=N_FFT, dim=-1)
    power = spec.real.square() + spec.imag.square()  # [F, 201]
    return power @ fb


def _gather(buf: np.ndarray, buf_start: int, idx: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Stream samples at absolute 16 kHz indices ``idx`` (any shape) -> float32, same shape.

    Indices outside ``[lo, hi)`` read as zero (silence before time 0 / outside the
    context window / after the end of the stream). All others must lie in ``buf``.
    """
    valid = (idx >= lo) & (idx < hi)
    rel = idx - buf_start
    if buf.size == 0:
        if valid.any():
            raise AssertionError("internal error: audio buffer is empty but samples are needed")
        return np.zeros(idx.shape, np.float32)
    if valid.any():
        r = rel[valid]
        if r.min() < 0 or r.max() >= buf.size:
            raise AssertionError("internal error: needed audio samples were already dropped")
    out = buf[np.clip(rel, 0, buf.size - 1)]
    out[~valid] = 0.0
    return out


def _interp_rows(h: torch.Tensor, u: np.ndarray) -> torch.Tensor:
    """Linear interpolation of ``h: [K, D]`` at fractional row positions ``u: [N]`` (clamped)."""
    K = h.shape[0]
    u = np.clip(u, 0.0, K - 1)
    i0 = np.floor(u).astype(np.int64)
    i1 = np.minimum(i0 + 1, K - 1)
    w = torch.from_numpy((u - i0).astype(np.float32)).to(h.device)[:, None]
    i0t = torch.from_numpy(i0).to(h.device)
    i1t = torch.from_numpy(i1).to(h.device)
    return h[i0t] * (1.0 - w) + h[i1t] * w


# ----------------------------------------------------------------------------------
# Model loading (local only)
# ----------------------------------------------------------------------------------


def _check_model_dir(path: Any, expected_type: str, fn_name: str) -> Path:
    if path is None or str(path) == "":
        raise ValueError(f"{fn_name}: path={path!r} is invalid; allowed values: a local directory")
    p = Path(os.fspath(path)).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"{fn_name}: model directory {str(p)!r} does not exist or is not a directory "
            "(expected a transformers save_pretrained() directory with config.json)"
        )
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{fn_name}: {str(cfg_file)!r} not found; {str(p)!r} is not a transformers "
            "save_pretrained() directory"
        )
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{fn_name}: cannot read {str(cfg_file)!r}: {e}") from e
    if model_type != expected_type:
        raise ValueError(
            f"{fn_name}: model directory {str(p)!r} has model_type={model_type!r}; "
            f"allowed values: ({expected_type!r},)"
        )
    return p


def load_wav2vec2(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """Load a transformers ``Wav2Vec2Model`` (eval mode) from a LOCAL directory only.

    Raises FileNotFoundError (missing directory/config/weights) or ValueError (not a
    wav2vec2 checkpoint), naming the path.
    """
    p = _check_model_dir(path, "wav2vec2", "load_wav2vec2")
    from transformers import Wav2Vec2Model

    try:
        model = Wav2Vec2Model.from_pretrained(str(p), local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"load_wav2vec2: cannot load weights from {str(p)!r}: {e}") from e
    return model.to(device=device, dtype=dtype).eval()


def load_whisper_encoder(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """Load ``WhisperModel.get_encoder()`` (eval mode) from a LOCAL directory only.

    Raises FileNotFoundError (missing directory/config/weights) or ValueError (not a
    whisper checkpoint), naming the path. The decoder is discarded.
    """
    p = _check_model_dir(path, "whisper", "load_whisper_encoder")
    from transformers import WhisperModel

    try:
        model = WhisperModel.from_pretrained(str(p), local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(
            f"load_whisper_encoder: cannot load weights from {str(p)!r}: {e}"
        ) from e
    encoder = model.get_encoder()
    del model
    return encoder.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------
# Per-session streaming state
# ----------------------------------------------------------------------------------


@dataclass
class AudioStreamState:
    """Per-session streaming state. Passed in and returned by :class:`AudioFrontend`;
    never stored on the frontend and never mutated by it (a new state is returned).

    Fields:
        input_rate_hz: rate of the input stream (fixed by the first push; None before).
        n_input_samples: input samples received so far (at ``input_rate_hz``).
        resampler: resampler carry-over (history/lookahead samples), None before the first push.
        buf16: ``[B]`` float32 16 kHz samples still needed for future frames.
        buf16_start: absolute 16 kHz sample index of ``buf16[0]``.
        n16: 16 kHz samples produced so far (the stream is final up to here).
        frames_emitted: video frames already emitted.
        finished: True after :meth:`AudioFrontend.flush`.
    """

    input_rate_hz: int | None = None
    n_input_samples: int = 0
    resampler: ResamplerState | None = None
    buf16: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    buf16_start: int = 0
    n16: int = 0
    frames_emitted: int = 0
    finished: bool = False


def _trim(st: AudioStreamState, keep_from: int) -> AudioStreamState:
    """Drop buffered 16 kHz samples before absolute index ``keep_from``."""
    cut = keep_from - st.buf16_start
    if cut <= 0:
        return st
    cut = min(cut, st.buf16.size)
    return replace(st, buf16=st.buf16[cut:].copy(), buf16_start=st.buf16_start + cut)


# ----------------------------------------------------------------------------------
# Backends: one class per feature extractor, registered in AUDIO_BACKENDS
# ----------------------------------------------------------------------------------


class AudioBackend(Protocol):
    """One feature extractor: the 16 kHz stream in an :class:`AudioStreamState` -> one row per video frame.

    A backend holds only configuration and weights (never per-session state) and is built as
    ``Backend(config, device, dtype)`` by :class:`AudioFrontend`, the only place that builds one.

    Attributes:
        needs_model_path: (class) True if ``AudioConfig.model_path`` is required.
        feature_dim: D, feature size per video frame.
        block_frames: video frames computed per call of the underlying model (1 for logmel).
        lookahead_s: how much audio after the END of video frame ``t`` must have arrived
            (at any input rate) before frame ``t`` is emitted (see :attr:`AudioFrontend.lookahead_s`).
    """

    needs_model_path: ClassVar[bool]
    feature_dim: int
    block_frames: int
    lookahead_s: float

    def emit(self, st: AudioStreamState, total_frames: int | None) -> tuple[AudioStreamState, torch.Tensor]:
        """Features ``[N, feature_dim]`` for video frames ``[st.frames_emitted, ...)``.

        ``total_frames`` None (streaming): every frame whose audio is final in ``st`` (up to ``st.n16``).
        ``total_frames`` given (flush): exactly the frames up to ``total_frames``; audio after ``st.n16`` is
        silence. Returns the state with ``frames_emitted`` advanced and samples no longer needed trimmed.
        """
        ...


class LogMelBackend:
    """``subframes`` log-mel vectors per video frame, concatenated: ``feature_dim = n_mels * subframes``.

    Mel frame ``q = t * subframes + j`` is centred at 16 kHz sample ``round((q + 0.5) * 16000 / (subframes *
    fps))`` with a 400-sample periodic Hann window; values are ``(log10(mel + 1e-5) + 4) / 4``. No weights.
    ``lookahead_s = max(0, 199.5/16000 - 0.5/(subframes*fps)) + RESAMPLER_LOOKAHEAD_S`` (~9.6 ms at 25 fps,
    4 subframes).
    """

    needs_model_path: ClassVar[bool] = False

    def __init__(self, config: AudioConfig, device: torch.device, dtype: torch.dtype):
        self.sample_rate_hz, self.fps = int(config.sample_rate_hz), float(config.fps)
        self.n_mels, self.subframes = int(config.n_mels), int(config.subframes)
        self.filterbank = torch.from_numpy(mel_filterbank(self.n_mels, N_FFT, self.sample_rate_hz))
        self.feature_dim = self.n_mels * self.subframes
        self.block_frames = 1
        self.lookahead_s = (
            max(0.0, (N_FFT / 2 - 0.5) / self.sample_rate_hz - 0.5 / (self.subframes * self.fps))
            + RESAMPLER_LOOKAHEAD_S
        )

    def _mel_centres(self, q: np.ndarray) -> np.ndarray:
        """16 kHz sample index of the centre of mel frame ``q = t * subframes + j``."""
        return np.floor((q + 0.5) * self.sample_rate_hz / (self.subframes * self.fps) + 0.5).astype(np.int64)

    def emit(self, st: AudioStreamState, total_frames: int | None) -> tuple[AudioStreamState, torch.Tensor]:
        S = self.subframes
        half = N_FFT // 2
        t0 = st.frames_emitted
        if total_frames is None:
            t_hi = max(t0, int(math.floor(st.n16 * self.fps / self.sample_rate_hz)) + 2)
            ts = np.arange(t0, t_hi, dtype=np.int64)
            right_edge = self._mel_centres(ts * S + (S - 1)) + half  # exclusive end
            t1 = t0 + int(np.searchsorted(right_edge, st.n16, side="right"))
        else:
            t1 = max(t0, total_frames)
        if t1 == t0:
            return st, torch.zeros((0, self.feature_dim))
        chunks = []
        step = 2048
        for a in range(t0, t1, step):
            b = min(t1, a + step)
            q = np.arange(a * S, b * S, dtype=np.int64)
            idx = self._mel_centres(q)[:, None] + np.arange(-half, half, dtype=np.int64)[None, :]
            frames = _gather(st.buf16, st.buf16_start, idx, 0, st.n16)
            mel = _power_mel(frames, self.filterbank)  # [(b-a)*S, n_mels]
            feats = (torch.log10(mel + LOGMEL_FLOOR) + 4.0) / 4.0
            chunks.append(feats.reshape(b - a, S * self.n_mels))
        st = replace(st, frames_emitted=t1)
        st = _trim(st, int(self._mel_centres(np.array([t1 * S]))[0]) - half)
        return st, torch.cat(chunks, 0)


class _EncoderBackend(ABC):
    """Shared block loop of the encoder backends.

    The encoder runs on fixed blocks of ``block_frames`` video frames (about ``ENCODER_BLOCK_S``). Block ``b``
    reads the audio window ``[block_start - context_s, block_end + ENCODER_RIGHT_CONTEXT_S)`` and only the block's
    own frames are kept, so ``lookahead_s = (block_frames - 1)/fps + ENCODER_RIGHT_CONTEXT_S +
    RESAMPLER_LOOKAHEAD_S`` (~0.262 s at 25 fps). Subclasses define ``_encode_block``.
    """

    needs_model_path: ClassVar[bool] = True
    feature_dim: int

    def __init__(self, config: AudioConfig, device: torch.device, dtype: torch.dtype):
        self.model_path = config.model_path
        self.device, self.dtype = device, dtype
        self.sample_rate_hz, self.fps = int(config.sample_rate_hz), float(config.fps)
        self.block_frames = max(1, int(round(ENCODER_BLOCK_S * self.fps)))
        self.lookahead_s = (self.block_frames - 1) / self.fps + ENCODER_RIGHT_CONTEXT_S + RESAMPLER_LOOKAHEAD_S
        self.context_samples = int(round(config.context_s * self.sample_rate_hz))

    def _block_bounds(self, b: int) -> tuple[int, int]:
        """Block ``b`` -> ``(context_start, end)`` in 16 kHz samples (end exclusive)."""
        B, sr = self.block_frames, self.sample_rate_hz
        end = int(math.ceil(((b + 1) * B / self.fps + ENCODER_RIGHT_CONTEXT_S) * sr))
        block_start = int(math.floor(b * B * sr / self.fps))
        return max(0, block_start - self.context_samples), end

    def _frame_centres(self, t0: int, t1: int) -> np.ndarray:
        """Centres of video frames ``[t0, t1)`` in (fractional) 16 kHz samples."""
        return (np.arange(t0, t1, dtype=np.float64) + 0.5) * self.sample_rate_hz / self.fps

    @abstractmethod
    def _encode_block(self, st: AudioStreamState, c0: int, end: int, t0: int, t1: int) -> torch.Tensor:
        """Features ``[t1 - t0, feature_dim]`` for frames ``[t0, t1)`` from the window ``[c0, end)``."""

    def emit(self, st: AudioStreamState, total_frames: int | None) -> tuple[AudioStreamState, torch.Tensor]:
        B = self.block_frames
        out = []
        t = st.frames_emitted
        while total_frames is None or t < total_frames:
            b = t // B
            c0, end = self._block_bounds(b)
            if total_frames is None and end > st.n16:
                break
            t_end = (b + 1) * B if total_frames is None else min((b + 1) * B, total_frames)
            out.append(self._encode_block(st, c0, end, t, t_end))
            t = t_end
        if not out:
            return st, torch.zeros((0, self.feature_dim))
        st = replace(st, frames_emitted=t)
        st = _trim(st, self._block_bounds(t // B)[0])
        return st, torch.cat(out, 0)


class Wav2Vec2Backend(_EncoderBackend):
    """Last hidden state of a local transformers ``Wav2Vec2Model``, linearly interpolated at the video-frame
    centres: ``feature_dim = hidden_size``. Each window is normalised like ``Wav2Vec2FeatureExtractor``."""

    def __init__(self, config: AudioConfig, device: torch.device, dtype: torch.dtype):
        super().__init__(config, device, dtype)
        self.model = load_wav2vec2(config.model_path, device, dtype)
        cfg = self.model.config
        self.feature_dim = int(cfg.hidden_size)
        # receptive field / hop of the conv feature encoder, in 16 kHz samples
        hop, rf = 1, 1
        for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
            rf += (k - 1) * hop
            hop *= s
        self.hop, self.receptive_field = hop, rf
        min_len = int(math.ceil((self.block_frames / self.fps + ENCODER_RIGHT_CONTEXT_S) * self.sample_rate_hz))
        if min_len < rf:
            raise ValueError(
                f"wav2vec2 model at {config.model_path!r}: receptive field {rf} samples "
                f"exceeds the shortest encoder window ({min_len} samples)"
            )

    @torch.inference_mode()
    def _encode_block(self, st: AudioStreamState, c0: int, end: int, t0: int, t1: int) -> torch.Tensor:
        x = _gather(st.buf16, st.buf16_start, np.arange(c0, end, dtype=np.int64), 0, st.n16)
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        inp = torch.from_numpy(x.astype(np.float32))[None].to(device=self.device, dtype=self.dtype)
        h = self.model(inp).last_hidden_state[0].float()  # [K, H]
        # hidden state k covers samples [c0 + k*hop, c0 + k*hop + rf)
        u = (self._frame_centres(t0, t1) - c0 - (self.receptive_field - 1) / 2.0) / self.hop
        return _interp_rows(h, u)


class WhisperBackend(_EncoderBackend):
    """Last hidden state of a local ``WhisperModel`` encoder, fed with Whisper-style log-mel computed here and
    interpolated at the video-frame centres: ``feature_dim = d_model``. Its fixed ``2 * max_source_positions``
    mel-frame window must be longer than a block plus the right context."""

    def __init__(self, config: AudioConfig, device: torch.device, dtype: torch.dtype):
        super().__init__(config, device, dtype)
        self.model = load_whisper_encoder(config.model_path, device, dtype)
        cfg = self.model.config
        self.feature_dim = int(cfg.d_model)
        self.positions = int(cfg.max_source_positions)
        self.n_mel_frames = 2 * self.positions
        self.filterbank = torch.from_numpy(mel_filterbank(int(cfg.num_mel_bins), N_FFT, self.sample_rate_hz))
        window_s = self.n_mel_frames * WHISPER_HOP / self.sample_rate_hz
        need_s = self.block_frames / self.fps + ENCODER_RIGHT_CONTEXT_S
        if window_s <= need_s:
            raise ValueError(
                f"whisper model at {config.model_path!r}: max_source_positions="
                f"{self.positions} gives a {window_s:.3f} s window; allowed values: "
                f"windows longer than block + right context ({need_s:.3f} s)"
            )

    def log_mel(self, st: AudioStreamState, w0: int, lo: int) -> torch.Tensor:
        """Whisper log-mel ``[n_mel_bins, n_mel_frames]`` with frame ``i`` centred at
        16 kHz sample ``w0 + 160 i``; samples before ``lo`` read as silence."""
        half = N_FFT // 2
        centres = w0 + WHISPER_HOP * np.arange(self.n_mel_frames, dtype=np.int64)
        idx = centres[:, None] + np.arange(-half, half, dtype=np.int64)[None, :]
        frames = _gather(st.buf16, st.buf16_start, idx, lo, st.n16)
        log_spec = torch.log10(torch.clamp(_power_mel(frames, self.filterbank), min=1e-10))
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return ((log_spec + 4.0) / 4.0).T

    @torch.inference_mode()
    def _encode_block(self, st: AudioStreamState, c0: int, end: int, t0: int, t1: int) -> torch.Tensor:
        """Audio before ``c0`` is silence; the last mel frame's window ends exactly at ``end``."""
        w0 = end - N_FFT // 2 - WHISPER_HOP * (self.n_mel_frames - 1)
        mel = self.log_mel(st, w0, c0)
        inp = mel[None].to(device=self.device, dtype=self.dtype)  # [1, n_mels, 2*P]
        h = self.model(inp).last_hidden_state[0].float()  # [P, d_model]
        # encoder frame k is centred on mel frame 2k, i.e. sample w0 + 320 k
        u = (self._frame_centres(t0, t1) - w0) / WHISPER_ENCODER_HOP
        return _interp_rows(h, u)


#: The registry: backend name -> class. The only place a backend name is resolved is :func:`backend_class`.
AUDIO_BACKENDS: dict[str, type[AudioBackend]] = {
    "logmel": LogMelBackend,
    "wav2vec2": Wav2Vec2Backend,
    "whisper": WhisperBackend,
}
#: Allowed values of ``AudioConfig.backend`` (for CLI choices and error messages).
SUPPORTED_BACKENDS = tuple(AUDIO_BACKENDS)


def backend_class(name: str) -> type[AudioBackend]:
    """The backend class registered as ``name``; ConfigError naming ``backend`` and the allowed names otherwise."""
    backend = AUDIO_BACKENDS.get(name) if isinstance(name, str) else None
    if backend is None:
        raise ConfigError(
            f"AudioConfig.backend={name!r} is not supported; allowed values: {SUPPORTED_BACKENDS}"
        )
    return backend


# ----------------------------------------------------------------------------------
# Front end
# ----------------------------------------------------------------------------------


class AudioFrontend:
    """PCM -> per-video-frame features, incrementally (see module docstring).

    Attributes:
        config: the :class:`AudioConfig`.
        device, dtype: where/how features are returned (and encoders run).
        backend: the :class:`AudioBackend` chosen by ``config.backend``.
        feature_dim: per-video-frame feature size D (the backend's).
        lookahead_s: bound on how much audio after the END of video frame ``t``
            must have arrived (at any input rate) before frame ``t`` is emitted (the backend's; see
            :class:`LogMelBackend` and :class:`_EncoderBackend` for the values).
        block_frames: video frames per encoder call (1 for logmel).
    """

    def __init__(
        self,
        config: AudioConfig,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if not isinstance(config, AudioConfig):
            raise TypeError(f"config must be an AudioConfig, got {type(config).__name__}")
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self._sr = int(config.sample_rate_hz)
        # exact decimal value of fps for the frame count (29.97 -> 2997/100)
        self._fps_exact = Fraction(repr(float(config.fps)))
        self._resamplers: dict[int, StreamingResampler] = {}
        self.backend: AudioBackend = backend_class(config.backend)(config, self.device, dtype)
        self.feature_dim = self.backend.feature_dim
        self.lookahead_s = self.backend.lookahead_s
        self.block_frames = self.backend.block_frames

    # -- public API -------------------------------------------------------------------

    def new_state(self) -> AudioStreamState:
        """Fresh per-session state."""
        return AudioStreamState()

    def push(
        self, state: AudioStreamState, pcm: Any, sample_rate_hz: int
    ) -> tuple[AudioStreamState, torch.Tensor]:
        """Feed more audio.

        Args:
            state: the session's state (not modified).
            pcm: ``[S]`` mono, numpy array or torch tensor, int16 (PCM s16le values) or
                float in [-1, 1]; ``S`` may be 0.
            sample_rate_hz: integer rate in [8000, 96000]; must stay constant per stream.

        Returns:
            ``(new_state, features [N, feature_dim])`` for every video frame whose audio
            (plus ``lookahead_s``) is now complete; ``N`` may be 0.
        """
        x = as_float_pcm(pcm, "pcm")
        rate = _check_rate(sample_rate_hz, "sample_rate_hz")
        if state.finished:
            raise ValueError(
                "state is finished (flush() was called); allowed: push on a new_state()"
            )
        if state.input_rate_hz is not None and rate != state.input_rate_hz:
            raise ValueError(
                f"sample_rate_hz={rate} differs from this stream's rate; allowed values: "
                f"({state.input_rate_hz},) (start a new_state() to change rate)"
            )
        rs = self._resampler(rate)
        rstate = state.resampler if state.resampler is not None else rs.new_state()
        rstate, y16 = rs.push(rstate, x)
        st = replace(
            state,
            input_rate_hz=rate,
            n_input_samples=state.n_input_samples + int(x.size),
            resampler=rstate,
            buf16=np.concatenate([state.buf16, y16]) if y16.size else state.buf16,
            n16=state.n16 + int(y16.size),
        )
        return self._emit(st, total_frames=None)

    def flush(self, state: AudioStreamState) -> tuple[AudioStreamState, torch.Tensor]:
        """End of input: emit the remaining frames, right-padding with silence, so that
        the stream's total is ``ceil(duration_s * fps)`` frames. Returns
        ``(finished_state, features [N, feature_dim])``. Flushing twice returns N = 0."""
        if state.finished or state.input_rate_hz is None:
            return replace(state, finished=True), self._empty()
        rs = self._resampler(state.input_rate_hz)
        rstate, y16 = rs.flush(state.resampler)
        st = replace(
            state,
            resampler=rstate,
            buf16=np.concatenate([state.buf16, y16]) if y16.size else state.buf16,
            n16=state.n16 + int(y16.size),
        )
        total = math.ceil(Fraction(st.n_input_samples) * self._fps_exact / st.input_rate_hz)
        st, feats = self._emit(st, total_frames=total)
        return replace(st, finished=True), feats

    def encode(self, pcm: Any, sample_rate_hz: int) -> torch.Tensor:
        """Whole clip at once: ``pcm: [S]`` -> features ``[ceil(S / sample_rate_hz * fps), D]``.

        Defined as ``push(all) + flush()``, hence equal to the concatenation of the
        outputs of pushes of any split of ``pcm`` followed by flush.
        """
        st, a = self.push(self.new_state(), pcm, sample_rate_hz)
        _, b = self.flush(st)
        return torch.cat([a, b], dim=0)

    # -- internals --------------------------------------------------------------------

    def _resampler(self, rate: int) -> StreamingResampler:
        rs = self._resamplers.get(rate)
        if rs is None:
            rs = self._resamplers[rate] = StreamingResampler(rate, self._sr)
        return rs

    def _empty(self) -> torch.Tensor:
        return torch.zeros((0, self.feature_dim), device=self.device, dtype=self.dtype)

    def _emit(
        self, st: AudioStreamState, total_frames: int | None
    ) -> tuple[AudioStreamState, torch.Tensor]:
        st, features = self.backend.emit(st, total_frames)
        return st, features.to(device=self.device, dtype=self.dtype)
