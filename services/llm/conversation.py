"""What a conversation engine (`services.llm.realtime`, the offline cascade) says to the avatar's driver.

    caller's speech ─► Conversation.push_user_audio ─► the LLM ─► events():
        UserSpeech(started=True)   the caller began to speak: the avatar listens (and a reply in progress stops)
        ClearReply                 barge-in: drop the reply audio not yet played
        ReplyAudio(pcm, rate, ...) the next piece of the reply, to speak as it arrives
        ReplyDone(response_id)     the reply is complete (or was cut)
        UserSpeech(started=False)  the caller stopped
        Transcript(role, text)     what was heard / said, for captions and logs
    the driver ─► Conversation.played(item_id, ms): how much of a reply item the avatar has played, so a barge-in
                  truncates the LLM's memory of it at what the caller actually heard
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UserSpeech:
    started: bool
    at_s: float = 0.0       # monotonic time the engine learnt it


@dataclass(frozen=True)
class ReplyAudio:
    pcm: np.ndarray         # int16 mono
    sample_rate_hz: int
    response_id: str
    item_id: str


@dataclass(frozen=True)
class ReplyDone:
    response_id: str
    cancelled: bool = False


@dataclass(frozen=True)
class ClearReply:
    response_id: str | None = None


@dataclass(frozen=True)
class Transcript:
    role: str               # "user" or "assistant"
    text: str
    final: bool = True


class PcmResampler:
    """int16 mono PCM at any rate -> `rate_hz` (livekit's resampler; one per stream, as it keeps state)."""

    def __init__(self, rate_hz: int):
        self.rate_hz = rate_hz
        self.resamplers: dict[int, object] = {}

    def push(self, pcm: np.ndarray, rate_hz: int) -> np.ndarray:
        """The next piece of a stream (the resampler holds back a few samples until more arrive)."""
        if rate_hz == self.rate_hz:
            return np.asarray(pcm, dtype=np.int16)
        from livekit import rtc

        resampler = self.resamplers.setdefault(rate_hz, rtc.AudioResampler(rate_hz, self.rate_hz, num_channels=1))
        pcm = np.ascontiguousarray(pcm, dtype=np.int16)
        return _joined(resampler.push(rtc.AudioFrame(pcm.tobytes(), rate_hz, 1, len(pcm))))

    def convert(self, pcm: np.ndarray, rate_hz: int) -> np.ndarray:
        """A whole clip (flushed: nothing held back)."""
        if rate_hz == self.rate_hz:
            return np.asarray(pcm, dtype=np.int16)
        from livekit import rtc

        resampler = rtc.AudioResampler(rate_hz, self.rate_hz, num_channels=1)
        pcm = np.ascontiguousarray(pcm, dtype=np.int16)
        return _joined(resampler.push(rtc.AudioFrame(pcm.tobytes(), rate_hz, 1, len(pcm))) + resampler.flush())


def _joined(frames) -> np.ndarray:
    return (np.concatenate([np.frombuffer(bytes(frame.data), dtype=np.int16) for frame in frames]) if frames
            else np.zeros(0, np.int16))


class ConversationError(RuntimeError):
    """The LLM side failed (cannot connect, rejected the session, sent an invalid event); the message says which."""


class Conversation(ABC):
    @abstractmethod
    async def start(self) -> None:
        ...

    @abstractmethod
    async def push_user_audio(self, pcm: np.ndarray, sample_rate_hz: int) -> None:
        """The caller's speech (int16 mono), as it arrives."""

    queue: "asyncio.Queue"     # the engine puts events here; None ends the stream, an exception is raised

    async def events(self):
        """Async iterator of the events above, until the conversation closes (an engine's failure is raised)."""
        while True:
            item = await self.queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def played(self, item_id: str, ms: int) -> None:
        """The avatar has played `ms` of reply item `item_id` (engines that can truncate their memory use it)."""

    @abstractmethod
    async def aclose(self) -> None:
        ...
