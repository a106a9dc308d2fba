"""`LLMBridge`: the audio LLM of every conversation session (`services.llm`), one conversation per session.

    ingress ── push(caller's speech) ──► LLMBridge ─┬ RealtimeConversation ──► the realtime LLM (OpenAI protocol)
                                                    └ OfflineConversation  ──► the cascade, in this process
    ingress ◄─ next_events (long poll: UserSpeech, ReplyAudio, ReplyDone, ClearReply, Transcript) ◄──┘
    ingress ── played(item, ms) ──► (a barge-in truncates the reply at what the caller heard)

The ingress feeds the reply into the avatar's session itself (`services.serving.conversation`); this deployment
only holds the LLM connections.  Events are fetched by long poll, so no streaming handle is needed and a re-attaching
ingress replica picks up where the previous one stopped.  What may live here: conversations keyed by session id;
what they must remember lives with the session (its history, in the session record), so a replacement replica
reopens a conversation that knows what was said.
"""

from __future__ import annotations

import asyncio

from ray import serve

from services.llm.conversation import ConversationError
from services.serving.settings import AppSettings


@serve.deployment(name="LLMBridge", max_ongoing_requests=256)
class LLMBridge:
    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.realtime = settings.realtime_config()
        self.modes = settings.conversation_modes()
        self.offline = None                 # the cascade's config, once an offline conversation was opened
        self.conversations: dict = {}
        self.queues: dict[str, asyncio.Queue] = {}
        self.pumps: dict[str, asyncio.Task] = {}

    def status(self) -> dict:
        """Which conversation modes this server offers."""
        if not self.modes:
            return {"available": False, "modes": [],
                    "message": "no audio LLM is configured (realtime_url, or the cascade: `make cascade`); drive "
                               "sessions with raw audio"}
        where = {"realtime": f"realtime LLM at {self.realtime.url} ({self.realtime.model})" if self.realtime else "",
                 "offline": "the on-server cascade (Whisper base, SmolLM2-135M, Piper)"}
        return {"available": True, "modes": list(self.modes), "message": "; ".join(where[m] for m in self.modes)}

    async def open(self, session_id: str, mode: str, instructions: str = "", history: list | None = None) -> None:
        """Connect the session's conversation, knowing `history` (what was said before: `conversation.remember`'s
        entries, kept with the session by the ingress); ConversationError (the LLM's URL named) when it cannot. The
        cascade's models load on the first offline conversation (in a thread; later ones share them)."""
        if mode not in self.modes:
            raise ConversationError(f"conversation mode {mode!r} is not available here")
        await self.close(session_id)
        if mode == "realtime":
            from services.llm.realtime import RealtimeConversation

            conversation = RealtimeConversation(self.realtime, instructions or None, history=history)
        else:
            from services.llm.offline import OfflineConfig, OfflineConversation

            self.offline = self.offline or OfflineConfig.from_settings(self.settings.cascade_cache_dir)
            conversation = OfflineConversation(self.offline, instructions or None, history=history)
        await conversation.start()
        self.conversations[session_id] = conversation
        self.queues[session_id] = queue = asyncio.Queue()

        async def pump() -> None:
            try:
                async for event in conversation.events():
                    queue.put_nowait(event)
            except ConversationError as error:
                queue.put_nowait(error)

        self.pumps[session_id] = asyncio.ensure_future(pump())

    async def push(self, session_id: str, pcm, sample_rate_hz: int) -> None:
        await self._conversation(session_id).push_user_audio(pcm, sample_rate_hz)

    async def next_events(self, session_id: str, timeout_s: float = 1.0) -> list:
        """The events since the last call (waits up to `timeout_s` for the first). A failed conversation's error is
        raised here, once."""
        self._conversation(session_id)
        queue = self.queues[session_id]
        events = []
        try:
            events.append(await asyncio.wait_for(queue.get(), timeout_s))
        except TimeoutError:
            return []
        while not queue.empty():
            events.append(queue.get_nowait())
        for event in events:
            if isinstance(event, BaseException):
                raise event
        return events

    def played(self, session_id: str, item_id: str, ms: int) -> None:
        conversation = self.conversations.get(session_id)
        if conversation is not None:
            conversation.played(item_id, ms)

    async def close(self, session_id: str) -> None:
        conversation = self.conversations.pop(session_id, None)
        pump = self.pumps.pop(session_id, None)
        self.queues.pop(session_id, None)
        if conversation is not None:
            await conversation.aclose()
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    def session_ids(self) -> list[str]:
        return list(self.conversations)

    def _conversation(self, session_id: str):
        try:
            return self.conversations[session_id]
        except KeyError:
            raise KeyError(f"LLMBridge has no conversation for session {session_id!r}") from None
