"""A local WebSocket peer that speaks the OpenAI Realtime event protocol (GA names), for the tests and for
`facecast bench call --mode realtime`: no cloud LLM here, and no model — it is a protocol peer, never a product path.

It validates every client event against the `openai` package's typed models, runs a crude server VAD on the
appended audio (speech = RMS above a threshold; 300 ms of quiet ends it), answers each user turn with a reply of
`reply_s` seconds of a tone streamed as `response.output_audio.delta` in real time (`first_audio_at`: when each
reply's first delta went out, `time.perf_counter()`), and honours `response.cancel`
(the reply stops, `response.done` says cancelled) and `conversation.item.truncate`. When the session asks for
transcription, each user turn is transcribed as "question N" and each reply's transcript is "answer N" (N counts the
peer's turns, over all its connections); `conversation.item.create` items are kept per connection (`items`).
`beta_names` sends the beta / Azure event names instead (`response.audio.delta`, ...).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time

import numpy as np
import websockets
from openai.types.realtime import RealtimeClientEvent
from pydantic import TypeAdapter

RATE = 24000


class RealtimePeer:
    def __init__(self, reply_s: float = 1.0, delta_s: float = 0.1, beta_names: bool = False, speedup: float = 1.0):
        """`speedup`: how much faster than real time the reply is generated (real LLMs are several times)."""
        self.reply_s, self.delta_s, self.beta_names, self.speedup = reply_s, delta_s, beta_names, speedup
        self.adapter = TypeAdapter(RealtimeClientEvent)
        self.received: list = []
        self.invalid: list = []
        self.truncations: list = []
        self.ids = itertools.count()
        self.server = None
        self.port = None
        self.first_audio_at: list[float] = []
        self.inject: list[dict] = []     # raw events to send after the next session.updated (tests of bad input)
        self.turns = 0                   # user turns heard, over all connections
        self.items: list[list] = []      # per connection, in order: the (role, text) of each conversation.item.create

    async def __aenter__(self):
        self.server = await websockets.serve(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    def types(self) -> list[str]:
        return [event.type for event in self.received]

    async def _handle(self, ws):
        state = {"speaking": False, "quiet_ms": 0.0, "reply": None, "heard_ms": 0.0, "transcribe": False}
        items: list = []
        self.items.append(items)

        async def send(event: dict) -> None:
            event = {"event_id": f"ev_{next(self.ids)}", **event}
            if self.beta_names:
                event["type"] = {"response.output_audio.delta": "response.audio.delta",
                                 "response.output_audio.done": "response.audio.done"}.get(event["type"],
                                                                                          event["type"])
            await ws.send(json.dumps(event))

        async def reply(response_id: str, item_id: str, number: int) -> None:
            await send({"type": "response.created", "response": {"id": response_id, "object": "realtime.response",
                                                                 "status": "in_progress"}})
            t = np.arange(int(self.reply_s * RATE)) / RATE
            tone = (0.3 * np.sin(2 * np.pi * 330 * t) * 32767).astype("<i2")
            step = int(self.delta_s * RATE)
            try:
                for start in range(0, len(tone), step):
                    if start == 0:
                        self.first_audio_at.append(time.perf_counter())
                    await send({"type": "response.output_audio.delta", "response_id": response_id,
                                "item_id": item_id, "output_index": 0, "content_index": 0,
                                "delta": base64.b64encode(tone[start:start + step].tobytes()).decode()})
                    await asyncio.sleep(self.delta_s / self.speedup)
                await send({"type": "response.output_audio.done", "response_id": response_id, "item_id": item_id,
                            "output_index": 0, "content_index": 0})
                await send({"type": "response.output_audio_transcript.done", "response_id": response_id,
                            "item_id": item_id, "output_index": 0, "content_index": 0,
                            "transcript": f"answer {number}"})
                status = "completed"
            except asyncio.CancelledError:
                status = "cancelled"
            await send({"type": "response.done", "response": {"id": response_id, "object": "realtime.response",
                                                              "status": status}})
            state["reply"] = None

        async for message in ws:
            try:
                event = self.adapter.validate_json(message)
            except Exception as error:          # a client event the protocol does not know
                self.invalid.append((message[:200], str(error)[:200]))
                continue
            self.received.append(event)
            if event.type == "session.update":
                heard = event.session.audio.input if event.session.audio else None
                state["transcribe"] = bool(heard and heard.transcription and heard.transcription.model)
                await send({"type": "session.updated", "session": {"type": "realtime"}})
                for raw in self.inject:
                    await ws.send(json.dumps(raw))
            elif event.type == "input_audio_buffer.append":
                pcm = np.frombuffer(base64.b64decode(event.audio), dtype="<i2").astype(np.float64)
                loud = len(pcm) and np.sqrt(np.mean(pcm ** 2)) > 500
                ms = 1000 * len(pcm) / RATE
                if loud and not state["speaking"]:
                    state["speaking"], state["quiet_ms"] = True, 0.0
                    await send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0, "item_id": "u"})
                elif state["speaking"] and not loud:
                    state["quiet_ms"] += ms
                    if state["quiet_ms"] >= 300:
                        state["speaking"] = False
                        await send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 0, "item_id": "u"})
                        turn = next(self.ids)
                        self.turns += 1
                        if state["transcribe"]:
                            await send({"type": "conversation.item.input_audio_transcription.completed",
                                        "item_id": f"user_{turn}", "content_index": 0,
                                        "transcript": f"question {self.turns}",
                                        "usage": {"type": "duration", "seconds": 1.0}})
                        state["reply"] = asyncio.ensure_future(reply(f"resp_{turn}", f"item_{turn}", self.turns))
                elif loud:
                    state["quiet_ms"] = 0.0
            elif event.type == "conversation.item.create":
                items.append((event.item.role, event.item.content[0].text))
                await send({"type": "conversation.item.added", "item": event.item.model_dump(exclude_none=True)})
            elif event.type == "response.cancel" and state["reply"] is not None:
                state["reply"].cancel()
            elif event.type == "conversation.item.truncate":
                self.truncations.append((event.item_id, event.audio_end_ms))
                await send({"type": "conversation.item.truncated", "item_id": event.item_id, "content_index": 0,
                            "audio_end_ms": event.audio_end_ms})
