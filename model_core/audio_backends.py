"""The audio feature backends: the 16 kHz stream of an ``AudioStreamState`` -> one feature row per video frame.

What lives here
---------------
* One class per feature extractor, each behind the ``AudioBackend`` protocol of :mod:`model_core.audio`
  (which registers them in ``AUDIO_BACKENDS``):

  - :class:`LogMelBackend` (``"logmel"``, no weights): ``subframes`` log-mel vectors per video frame,
    concatenated -> ``feature_dim = n_mels * subframes``.
  - :class:`Wav2Vec2Backend` (``"wav2vec2"``): last hidden state of a local transformers ``Wav2Vec2Model``,
    linearly interpolated at the video-frame centres -> ``feature_dim = hidden_size``.
  - :class:`WhisperBackend` (``"whisper"``): last hidden state of a local ``WhisperModel`` encoder (fed with
    Whisper-style log-mel computed here), interpolated the same way -> ``feature_dim = d_model``.

* Their shared spectral helpers (:func:`mel_filterbank`, periodic-Hann power mel) and the local-only model
  loaders (:func:`load_wav2vec2`, :func:`load_whisper_encoder`; ``local_files_only=True``, nothing downloaded).

A backend holds only configuration and weights; the per-session ``AudioStreamState`` is passed to ``emit`` and a
new one returned. Each output row depends only on the 16 kHz stream and its own frame index, never on how the
input was chunked.

What this file does not know
----------------------------
Input sample rates and resampling (:mod:`model_core.audio_resample`), how a backend is chosen by name or how the
stream is fed (:mod:`model_core.audio`), and anything about video models, Ray, gRPC or sessions.
"""

from __future__ import annotations

import json
import math
import os
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from .audio_resample import RESAMPLER_LOOKAHEAD_S

if TYPE_CHECKING:
    from .audio import AudioConfig, AudioStreamState

__all__ = [
    "ENCODER_BLOCK_S",
    "ENCODER_RIGHT_CONTEXT_S",
    "INTERNAL_SAMPLE_RATE_HZ",
    "LOGMEL_FLOOR",
    "N_FFT",
    "LogMelBackend",
    "Wav2Vec2Backend",
    "WhisperBackend",
    "load_wav2vec2",
    "load_whisper_encoder",
    "mel_filterbank",
    "whisper_log_mel",
]

#: The only internal rate supported: every backend (n_fft=400 log-mel, wav2vec2,
#: Whisper) is defined at 16 kHz.
INTERNAL_SAMPLE_RATE_HZ = 16000

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


def whisper_log_mel(st: AudioStreamState, w0: int, lo: int, n_frames: int, filterbank: torch.Tensor) -> torch.Tensor:
    """Whisper log-mel ``[n_mel_bins, n_frames]`` with frame ``i`` centred at 16 kHz sample ``w0 + 160 i``; samples
    before ``lo`` read as silence. Normalised as Whisper does: floor at the window's max - 8, then (x + 4) / 4."""
    half = N_FFT // 2
    centres = w0 + WHISPER_HOP * np.arange(n_frames, dtype=np.int64)
    idx = centres[:, None] + np.arange(-half, half, dtype=np.int64)[None, :]
    frames = _gather(st.buf16, st.buf16_start, idx, lo, st.n16)
    log_spec = torch.log10(torch.clamp(_power_mel(frames, filterbank), min=1e-10))
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).T


# ----------------------------------------------------------------------------------
# Backends: one class per feature extractor (registered in model_core.audio.AUDIO_BACKENDS)
# ----------------------------------------------------------------------------------


def _trim(st: AudioStreamState, keep_from: int) -> AudioStreamState:
    """Drop buffered 16 kHz samples before absolute index ``keep_from``."""
    cut = keep_from - st.buf16_start
    if cut <= 0:
        return st
    cut = min(cut, st.buf16.size)
    return replace(st, buf16=st.buf16[cut:].copy(), buf16_start=st.buf16_start + cut)


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
        return whisper_log_mel(st, w0, lo, self.n_mel_frames, self.filterbank)

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
