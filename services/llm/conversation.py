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

A conversation's memory is its history: the final transcripts, `[{"role": "user" | "assistant", "text": ...}]`.
The driver keeps it with the session (`remember`, bounded) and gives it to the next engine it opens for the same
session (`history=` of each engine), so a conversation that moves (its LLM connection or its worker failed, the
caller re-attached through another ingress) goes on knowing what was said.
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


HISTORY_MESSAGES = 16
"""Messages of history kept with a session (the newest; each engine may use fewer)."""
HISTORY_CHARS = 1000
"""Characters kept of one message."""


def remember(history: list[dict], transcript: "Transcript") -> list[dict]:
    """`history` with a final transcript added, bounded (HISTORY_MESSAGES newest, HISTORY_CHARS each); an empty or
    non-final transcript leaves it as it is."""
    text = " ".join(transcript.text.split())[:HISTORY_CHARS]
    if not transcript.final or not text or transcript.role not in ("user", "assistant"):
        return history
    return [*history, {"role": transcript.role, "text": text}][-HISTORY_MESSAGES:]


def checked_history(history) -> list[dict]:
    """A history as stored (from the session record): each entry's role and text checked, bounded as `remember`."""
    if not isinstance(history, list):
        raise ValueError(f"history must be a list of {{role, text}}, got {type(history).__name__}")
    kept = []
    for entry in history:
        if not (isinstance(entry, dict) and entry.get("role") in ("user", "assistant")
                and isinstance(entry.get("text"), str)):
            raise ValueError(f"history entry {str(entry)[:80]!r} is invalid: {{role: user|assistant, text: str}}")
        kept.append({"role": entry["role"], "text": entry["text"][:HISTORY_CHARS]})
    return kept[-HISTORY_MESSAGES:]


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
