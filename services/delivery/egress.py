"""Egress: one session's video and voice, delivered to several sinks at once.

    ingress (a chunk leaves the pipeline) ── Egress.offer(MediaChunk) ──┬─► queue ─► gRPC stream sink (StreamSession)
                                              never waits               ├─► queue ─► LiveKit room sink
                                                                        ├─► queue ─► local WebRTC page sink
                                                                        └─► queue ─► MP4 file sink

Every sink has its own queue and its own task, so a slow sink never stalls generation or the other sinks: `offer`
returns at once.  What a sink does when it falls behind is its own policy: a live sink (a room, a page) drops its
oldest pending chunks — a viewer wants now, not a growing delay — and counts them; a recording sink (a file) keeps
every chunk up to a generous bound and only then drops, loudly.  A sink that fails is detached and its error kept in
`stats()`; the others go on.

What may live here: the `MediaChunk` a sink receives, the `Sink` interface, the fan-out.  Nothing about Ray or
torch: this runs in the ingress, which imports neither.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MediaChunk:
    """One chunk of a session's output as every sink sees it.

    frames_jpeg: the chunk's video frames (baseline JPEG, display order) starting at video frame `first_frame`;
    audio_pcm_s16le: the voice these frames show (mono int16 little-endian at `sample_rate_hz`), the same span.
    """

    session_id: str
    chunk_index: int
    first_frame: int
    fps: float
    width: int
    height: int
    frames_jpeg: tuple[bytes, ...]
    audio_pcm_s16le: bytes
    sample_rate_hz: int
    final: bool = False

    @property
    def start_s(self) -> float:
        return self.first_frame / self.fps

    @property
    def duration_s(self) -> float:
        return len(self.frames_jpeg) / self.fps

    @classmethod
    def from_video_chunk(cls, session_id: str, chunk) -> "MediaChunk":
        """From the gRPC `VideoChunk` (services.api pb) the ingress builds for StreamSession."""
        return cls(session_id, int(chunk.chunk_index), int(chunk.first_frame), float(chunk.fps), int(chunk.width),
                   int(chunk.height), tuple(chunk.frames), bytes(chunk.audio_pcm_s16le), int(chunk.sample_rate_hz),
                   bool(chunk.final))


class Sink(ABC):
    """Where a session's chunks go. Subclasses set `name`, and `lossy` / `max_pending` for their backlog policy."""

    name: str = "sink"
    lossy: bool = True
    """True: when `max_pending` chunks wait, the oldest is dropped for the new one (live viewers). False: chunks are
    kept up to `max_pending` and only beyond it dropped, with an error logged (recordings)."""
    max_pending: int = 2

    async def open(self) -> None:
        """Connect / prepare; called once before the first chunk. An exception here detaches the sink."""

    @abstractmethod
    async def write(self, chunk: MediaChunk) -> None:
        """Deliver one chunk (may take as long as the chunk plays: a live sink paces itself)."""

    async def close(self) -> None:
        """Flush and release; called once at the end whether or not `open` succeeded."""


@dataclass
class SinkState:
    sink: Sink
    queue: asyncio.Queue
    task: asyncio.Task | None = None
    delivered: int = 0
    dropped: int = 0
    error: str | None = None


class Egress:
    """The fan-out of one session's chunks to its sinks (see the module docstring)."""

    def __init__(self, sinks: list[Sink], on_error=None):
        """`on_error(sink name, message)`: called (on the loop) when a sink fails and is detached."""
        names = [sink.name for sink in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be unique per session, got {names}")
        self.states = {sink.name: SinkState(sink, asyncio.Queue()) for sink in sinks}
        self.closed = False
        self.on_error = on_error

    async def start(self) -> None:
        for state in self.states.values():
            state.task = asyncio.ensure_future(self._run(state))

    def offer(self, chunk: MediaChunk) -> None:
        """Hand a chunk to every live sink; never waits."""
        if self.closed:
            raise RuntimeError("egress is closed")
        for state in self.states.values():
            if state.error is not None:
                continue
            if state.queue.qsize() >= state.sink.max_pending:
                state.queue.get_nowait()
                state.dropped += 1
                if not state.sink.lossy:
                    logger.error("egress sink %s of session %s is %d chunks behind: dropped one", state.sink.name,
                                 chunk.session_id, state.sink.max_pending)
            state.queue.put_nowait(chunk)

    async def close(self, timeout_s: float = 10.0) -> dict:
        """No more chunks: let every sink finish what it has (up to `timeout_s`), close them; returns `stats()`."""
        self.closed = True
        for state in self.states.values():
            state.queue.put_nowait(None)
        tasks = [state.task for state in self.states.values() if state.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return self.stats()

    def stats(self) -> dict:
        """Per sink: chunks delivered, dropped, still pending, and the error that detached it (None: healthy)."""
        return {name: {"delivered": state.delivered, "dropped": state.dropped, "pending": state.queue.qsize(),
                       "error": state.error} for name, state in self.states.items()}

    async def _run(self, state: SinkState) -> None:
        sink = state.sink
        try:
            await sink.open()
            while True:
                chunk = await state.queue.get()
                if chunk is None:
                    break
                await sink.write(chunk)
                state.delivered += 1
        except asyncio.CancelledError:
            state.error = state.error or "cancelled at close (it had not finished within the timeout)"
            raise
        except Exception as error:   # this sink is out; the session and the other sinks go on
            state.error = f"{type(error).__name__}: {error}"
            logger.warning("egress sink %s failed and was detached: %s", sink.name, state.error)
            if self.on_error is not None:
                self.on_error(sink.name, state.error)
            while not state.queue.empty():
                state.queue.get_nowait()
        finally:
            try:
                await sink.close()
            except Exception as error:
                logger.warning("egress sink %s failed to close: %s", sink.name, error)
