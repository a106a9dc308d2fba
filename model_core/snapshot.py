"""Per-session state as bytes and back: what a fresh worker needs to continue a session exactly where another left it.

    pack(value) -> bytes / unpack(bytes) -> value     the stages' state objects (dataclasses, tensors, arrays)
    snapshot_score(session) -> bytes / restore_score(stage, session, bytes, sink)   one `ScoreSession`'s caches
                                                                                    and noise generator

What a session's stages hold after chunk n, and what its snapshot keeps:
* audio (`AudioSession`): the front end's pending samples and resampler carry-over, features and speaking flags not
  yet consumed, the chunk counter, the speaking modes: the whole object (it is small and bounded).
* score (`ScoreSession`, per denoising step): the previous chunk's keys/values of that step's cache, and the noise
  generator's state.  The keys/values themselves, not the inputs that produced them: chunk n's keys at every block
  after the first depend on chunk n-1's cache (its tokens attend to it), which depends on chunk n-2's, and so on
  back to chunk 0, so no bounded window of inputs rebuilds them exactly.  The sink's keys/values are recomputed
  from the sink latent (`ScoreStage.set_sink`), which is kept once per session, not per chunk.
* decode (`DecodeCache` / `FastDecodeCache`): the causal convolutions' cached frames, as they are.
Everything else (weights, RoPE tables, conditioning) is rebuilt from the session's open arguments.

The bytes are `torch.save` of plain containers and tensors, read back with `weights_only=True`: a snapshot cannot
run code when it is loaded, whoever wrote the store.  Dataclasses travel as their field values under a type name
from an allow-list (`SNAPSHOT_TYPES`).  Nothing here knows about Ray, Redis or sessions' ids.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import torch

from .audio import AudioStreamState
from .audio_resample import ResamplerState
from .audio_stage import AudioSession, CharacterAudio
from .config import StreamConfig
from .fastdecode import FastDecodeCache
from .stages import ScoreSession, ScoreStage
from .vae import DecodeCache

SNAPSHOT_TYPES = {cls.__name__: cls for cls in (AudioSession, CharacterAudio, AudioStreamState, ResamplerState,
                                                StreamConfig, DecodeCache, FastDecodeCache)}
"""The dataclasses a snapshot may hold, by name (anything else is refused when packing and when unpacking)."""

_CLASS, _ARRAY, _TUPLE, _MAP = "__class__", "__ndarray__", "__tuple__", "__map__"


class SnapshotError(ValueError):
    """A snapshot that cannot be written or read back (a type outside the allow-list, a corrupt payload)."""


def _encode(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = type(value).__name__
        if SNAPSHOT_TYPES.get(name) is not type(value):
            raise SnapshotError(f"{name} is not a snapshot type; allowed: {', '.join(sorted(SNAPSHOT_TYPES))}")
        return {_CLASS: name, "fields": {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)    # a copy: a view would save its whole storage, and may change
    if isinstance(value, np.ndarray):
        return {_ARRAY: torch.from_numpy(np.array(value, copy=True))}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(item) for item in value]}
    if isinstance(value, list):
        return [_encode(item) for item in value]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise SnapshotError("snapshot dictionaries need string keys")
        return {_MAP: {key: _encode(item) for key, item in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    raise SnapshotError(f"cannot snapshot a {type(value).__name__}")


def _decode(value):
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if not isinstance(value, dict):
        return value
    if _CLASS in value:
        cls = SNAPSHOT_TYPES.get(value[_CLASS])
        if cls is None:
            raise SnapshotError(f"snapshot holds an unknown type {value[_CLASS]!r}")
        return cls(**{name: _decode(item) for name, item in value["fields"].items()})
    if _ARRAY in value:
        return value[_ARRAY].numpy()
    if _TUPLE in value:
        return tuple(_decode(item) for item in value[_TUPLE])
    if _MAP in value:
        return {key: _decode(item) for key, item in value[_MAP].items()}
    raise SnapshotError(f"snapshot holds an unmarked dictionary with keys {sorted(value)}")


def pack(value) -> bytes:
    """A state object (see `SNAPSHOT_TYPES`; tensors, numpy arrays, containers, scalars) -> bytes. Tensors are
    copied to the CPU first, so the caller may go on changing its own in place."""
    buffer = io.BytesIO()
    torch.save(_encode(value), buffer)
    return buffer.getvalue()


def unpack(data: bytes):
    """`pack`'s bytes -> an equal state object (tensors on the CPU)."""
    try:
        return _decode(torch.load(io.BytesIO(data), weights_only=True))
    except SnapshotError:
        raise
    except Exception as error:
        raise SnapshotError(f"unreadable snapshot ({type(error).__name__}: {error})") from None


def to_device(value, device, dtype: torch.dtype | None = None):
    """Every floating tensor in a decode cache (or any state object) moved to `device` (and `dtype`), in place for
    dataclasses and lists; returns the value."""
    if torch.is_tensor(value):
        return value.to(device, dtype if (dtype is not None and value.is_floating_point()) else value.dtype)
    if isinstance(value, list):
        value[:] = [to_device(item, device, dtype) for item in value]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            setattr(value, f.name, to_device(getattr(value, f.name), device, dtype))
    return value


def snapshot_score(session: ScoreSession) -> bytes:
    """What `restore_score` needs to continue `session` at its next chunk on another stage: per owned step the
    previous chunk's keys/values, the noise generator, and (on the last step's stage) the last latent frame shown.
    Take it where the session's chunks run (its caches change in place with the next chunk)."""
    return pack({"chunk_index": session.chunk_index, "generator": session.generator.get_state(),
            "caches": {str(step): {"prev_key": cache.prev_key, "prev_value": cache.prev_value,
                                   "prev_valid": cache.prev_valid}
                       for step, cache in session.caches.items()},
            "shown": {"latent": session.shown, "listening": session.shown_listening}
            if session.shown is not None else {}})


@torch.no_grad()
def restore_score(stage: ScoreStage, session: ScoreSession, snapshot: bytes,
                  sink_latent: torch.Tensor | None) -> None:
    """Continue `session` (just opened on `stage`, with the same steps) from `snapshot_score`'s bytes: its caches,
    generator and chunk counter; `sink_latent` [1, 16, 1, h, w]: the session's current sink (None: the reference,
    which `open` already set)."""
    state = unpack(snapshot)
    caches = state["caches"]
    missing = [step for step in session.caches if str(step) not in caches]
    if missing:
        raise SnapshotError(f"the score snapshot has no cache for steps {missing} (it holds {sorted(caches)})")
    for step, cache in session.caches.items():
        for name, saved in caches[str(step)].items():
            getattr(cache, name).copy_(saved)
    session.generator.set_state(state["generator"])
    session.chunk_index = int(state["chunk_index"])
    shown = state.get("shown") or {}     # the last frame shown, for `stages.hold_listening` (last step's stage only)
    session.shown = shown["latent"].to(stage.device, stage.dtype) if shown else None
    session.shown_listening = shown.get("listening", False)
    if sink_latent is not None:
        stage.set_sink(session, sink_latent)
