"""Realtime mode: a conversation with a realtime speech LLM over the OpenAI Realtime event protocol.

    caller's speech ─(resampled to 24 kHz PCM16, base64)─► input_audio_buffer.append ──┐
                                                                                       ▼  the server's VAD decides
    ◄─ UserSpeech / ReplyAudio / ReplyDone / Transcript ◄── input_audio_buffer.speech_started|stopped,
                                                            response.output_audio.delta, response.done, ...
    barge-in: speech_started while a reply is generated ─► response.cancel
              or still playing on the avatar           ─► conversation.item.truncate {item_id, audio_end_ms = played}
                                                       ─► ClearReply (the avatar drops the reply it has not played)
    history (a conversation reopened for the same session) ─► conversation.item.create, one text item per message
    the caller's words (`transcription`) ◄─ conversation.item.input_audio_transcription.completed ─► Transcript

The connection is the `openai` package's own (`AsyncOpenAI(websocket_base_url=...).realtime.connect`), and every
event is validated against its typed models (`RealtimeClientEvent` before it is sent, `RealtimeServerEvent` when it
arrives; the beta / Azure event names are mapped to the GA ones first).  An event that does not validate, or an
`error` event, ends the conversation with `ConversationError` naming it.  Endpoint, key and model come from
configuration (`RealtimeConfig`: the Serve config's args or the environment), never from a caller.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from services.llm.conversation import (ClearReply, Conversation, ConversationError, PcmResampler, ReplyAudio,
                                       ReplyDone, Transcript, UserSpeech, checked_history)

logger = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 24000
BETA_NAMES = {
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
    "response.text.delta": "response.output_text.delta",
    "response.text.done": "response.output_text.done",
    "conversation.item.created": "conversation.item.added",
}
"""Beta and Azure names of server events -> the GA names the typed models know."""


@dataclass(frozen=True)
class RealtimeConfig:
    """Where the realtime LLM is: `url` the WebSocket base (e.g. wss://api.openai.com/v1), the key, the model."""

    url: str
    api_key: str
    model: str = "gpt-realtime"
    voice: str = "alloy"
    instructions: str = "You are a friendly face on a video call. Answer briefly, in one or two sentences."
    transcription: str = "gpt-4o-mini-transcribe"
    """The model that transcribes the caller's speech (the session's history keeps what was said; the LLM hears the
    audio itself either way); "" asks for no transcripts. $FACECAST_REALTIME_TRANSCRIPTION sets it."""

    @classmethod
    def from_settings(cls, url: str | None = None, api_key: str | None = None, model: str | None = None,
                      env=os.environ) -> "RealtimeConfig | None":
        """From the Serve config's args, else $FACECAST_REALTIME_URL / $OPENAI_API_KEY / $FACECAST_REALTIME_MODEL;
        None when no URL is configured."""
        url = url or env.get("FACECAST_REALTIME_URL")
        if not url:
            return None
        if not url.startswith(("ws://", "wss://")):
            raise ConversationError(f"realtime_url={url!r} is invalid: a ws:// or wss:// URL")
        api_key = api_key or env.get("OPENAI_API_KEY")
        if not api_key:
            raise ConversationError(f"the realtime LLM at {url} is configured without a key: set $OPENAI_API_KEY "
                                    "(or realtime_api_key in the Serve config's args)")
        return cls(url, api_key, model or env.get("FACECAST_REALTIME_MODEL") or cls.model,
                   transcription=env.get("FACECAST_REALTIME_TRANSCRIPTION", cls.transcription))


def _adapters():
    from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent
    from pydantic import TypeAdapter

    return TypeAdapter(RealtimeClientEvent), TypeAdapter(RealtimeServerEvent)


class RealtimeConversation(Conversation):
    """One caller's conversation with a realtime LLM (see the module docstring)."""

    def __init__(self, config: RealtimeConfig, instructions: str | None = None, connect_timeout_s: float = 10.0,
                 history: list[dict] | None = None):
        """`history`: what was said before (`conversation.checked_history`), given to the LLM as conversation items
        when the session starts."""
        self.config, self.instructions, self.connect_timeout_s = config, instructions, connect_timeout_s
        self.history = checked_history(history or [])
        self.client_events, self.server_events = _adapters()
        self.manager = self.connection = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reader: asyncio.Task | None = None
        self.replying: dict | None = None        # {"response_id", "item_id"} of the reply being spoken
        self.played_ms: dict[str, int] = {}      # per reply item: what the avatar has played
        self.audio_ms: dict[str, int] = {}       # per reply item: what the LLM sent
        self.last_item: str | None = None        # the reply item the avatar may still be speaking
        self.inbound = PcmResampler(SAMPLE_RATE_HZ)
        self.sent_events: list[str] = []

    async def start(self) -> None:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(api_key=self.config.api_key, websocket_base_url=self.config.url)
        self.manager = client.realtime.connect(model=self.config.model, max_retries=0)
        try:
            self.connection = await asyncio.wait_for(self.manager.__aenter__(), self.connect_timeout_s)
        except Exception as error:   # refused, timed out, rejected handshake
            raise ConversationError(f"the realtime LLM at {self.config.url} did not answer: "
                                    f"{type(error).__name__}: {error}") from None
        audio_format = {"type": "audio/pcm", "rate": SAMPLE_RATE_HZ}
        heard = {"format": audio_format, "turn_detection": {"type": "server_vad"}}
        if self.config.transcription:
            heard["transcription"] = {"model": self.config.transcription}
        await self._send({"type": "session.update", "session": {
            "type": "realtime", "instructions": self.instructions or self.config.instructions,
            "output_modalities": ["audio"],
            "audio": {"input": heard, "output": {"format": audio_format, "voice": self.config.voice}}}})
        for entry in self.history:   # what was said before this connection, as text items
            kind = "input_text" if entry["role"] == "user" else "output_text"
            await self._send({"type": "conversation.item.create", "item": {
                "type": "message", "role": entry["role"], "content": [{"type": kind, "text": entry["text"]}]}})
        self.reader = asyncio.ensure_future(self._read())

    async def push_user_audio(self, pcm: np.ndarray, sample_rate_hz: int) -> None:
        samples = self.inbound.push(np.asarray(pcm, dtype=np.int16), sample_rate_hz)
        if len(samples):
            await self._send({"type": "input_audio_buffer.append",
                              "audio": base64.b64encode(samples.astype("<i2").tobytes()).decode()})

    def played(self, item_id: str, ms: int) -> None:
        self.played_ms[item_id] = max(self.played_ms.get(item_id, 0), int(ms))

    async def aclose(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        if self.manager is not None and self.connection is not None:
            await self.manager.__aexit__(None, None, None)
            self.connection = None
        self.queue.put_nowait(None)

    # ------------------------------------------------------------------------------------------------------------
    async def _send(self, event: dict) -> None:
        from pydantic import ValidationError

        try:
            model = self.client_events.validate_python(event)
        except ValidationError as error:
            raise ConversationError(f"refusing to send an invalid {event.get('type')!r} event: {error}") from None
        self.sent_events.append(event["type"])
        await self.connection.send(model)

    async def _read(self) -> None:
        from pydantic import ValidationError

        try:
            while True:
                raw = json.loads(await self.connection.recv_bytes())
                raw["type"] = BETA_NAMES.get(raw.get("type"), raw.get("type"))
                try:
                    event = self.server_events.validate_python(raw)
                except ValidationError as error:
                    raise ConversationError(f"the realtime LLM sent an invalid {raw.get('type')!r} event: "
                                            f"{error.errors()[0]['msg']} at {error.errors()[0]['loc']}") from None
                await self._on(event)
        except asyncio.CancelledError:
            raise
        except ConversationError as error:
            self.queue.put_nowait(error)
        except Exception as error:       # the socket went away
            self.queue.put_nowait(ConversationError(f"the realtime LLM at {self.config.url} closed the "
                                                    f"conversation: {type(error).__name__}: {error}"))

    async def _on(self, event) -> None:
        kind = event.type
        if kind == "error":
            raise ConversationError(f"the realtime LLM reported an error: {event.error.type}: {event.error.message}")
        if kind == "input_audio_buffer.speech_started":
            await self._interrupt()              # barge-in, when a reply is being generated or still playing
            self.queue.put_nowait(UserSpeech(True, time.monotonic()))
        elif kind == "input_audio_buffer.speech_stopped":
            self.queue.put_nowait(UserSpeech(False, time.monotonic()))
        elif kind == "response.created":
            self.replying = {"response_id": event.response.id, "item_id": None}
        elif kind == "response.output_audio.delta":
            if self.replying is None or self.replying["response_id"] != event.response_id:
                return                           # a cancelled reply's late audio
            self.replying["item_id"] = self.last_item = event.item_id
            pcm = np.frombuffer(base64.b64decode(event.delta), dtype="<i2").astype(np.int16)
            self.audio_ms[event.item_id] = self.audio_ms.get(event.item_id, 0) + len(pcm) * 1000 // SAMPLE_RATE_HZ
            self.queue.put_nowait(ReplyAudio(pcm, SAMPLE_RATE_HZ, event.response_id, event.item_id))
        elif kind == "response.done":
            status = getattr(event.response, "status", None)
            if self.replying is not None and self.replying["response_id"] == event.response.id:
                self.replying = None
            self.queue.put_nowait(ReplyDone(event.response.id or "", cancelled=status == "cancelled"))
        elif kind == "conversation.item.input_audio_transcription.completed":
            self.queue.put_nowait(Transcript("user", event.transcript))
        elif kind == "response.output_audio_transcript.done":
            self.queue.put_nowait(Transcript("assistant", event.transcript))

    async def _interrupt(self) -> None:
        """The caller spoke: stop a reply still being generated, make the LLM remember only what was heard of the
        last one (when the avatar had not finished it), and clear what the avatar has not played."""
        reply, self.replying = self.replying, None
        if reply is not None:
            await self._send({"type": "response.cancel", "response_id": reply["response_id"]})
        item = self.last_item
        if item is None:
            return
        played = self.played_ms.get(item, 0)
        if reply is not None or played < self.audio_ms.get(item, 0) - 20:
            await self._send({"type": "conversation.item.truncate", "item_id": item, "content_index": 0,
                              "audio_end_ms": min(played, self.audio_ms.get(item, 0))})
            self.queue.put_nowait(ClearReply(reply["response_id"] if reply else None))
        self.last_item = None

