"""A conversation session's StreamSession (`ConversationCall`): the caller talks to an audio LLM, the avatar answers.

    caller's mic (StreamSession audio) ──► LLMBridge.push ──► the LLM
    LLMBridge.next_events ──► UserSpeech ─► USER_SPEECH_STARTED / _ENDED events (the turn's clock starts at the end)
                          ──► ReplyAudio ─► SpeechTrack.say ─┐ paced at real time, silence between turns
                          ──► ClearReply ─► SpeechTrack.clear│ (barge-in: the unplayed reply is dropped)
                                                             ▼
                      the avatar's own session (a `SessionStream` fed from a queue, `LocalSessionLink`)
                          ──► video chunks (frames + the avatar's voice) ──► the caller; REPLY_STARTED with the
                              turn latency when the first frame of a reply goes out; `played` back to the bridge

What was said (the final transcripts) is kept with the session (`conversation.history` in its record, bounded) and
given to every conversation opened for it: when the LLMBridge replica or the LLM connection fails, the call reopens
the conversation with that history and tells the caller (RESUMED, naming LLMBridge; the avatar keeps streaming its
listening face meanwhile, and a reply being made is lost); a re-attach through another ingress reopens it the same
way.

The avatar's session runs at the LLM's rate (24 kHz).  With several characters, the replies take turns
(`conversation.reply_characters`): the pacer feeds each reply to its character's track and sets that character
speaking and the one before it not speaking, so one mouth moves at a time.  Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import numpy as np

from services.api import pb
from services.api.servicer import require_decodable
from services.api.validation import ApiError, InputBudget, validate_audio, validate_control
from services.delivery.avatar import LEAD_S, pace
from services.delivery.pacing import SpeechTrack
from services.llm.conversation import (ClearReply, ReplyAudio, ReplyDone, Transcript, UserSpeech, checked_history,
                                       remember)
from services.serving.session_stream import LocalSessionLink, internal_error
from services.store.sessions import SessionRecord
from services.telemetry import span

logger = logging.getLogger("facecast.ingress")

REPLY_RATE_HZ = 24000
TURN_SPAN = "facecast.turn"
REOPEN_S = 60.0
"""How long a failed conversation is retried (the bridge's replacement starting, the LLM reconnecting) before the
stream ends."""


class ConversationCall:
    """One attached StreamSession of a conversation session (the interface of `SessionStream`: run, error)."""

    def __init__(self, ingress, record: SessionRecord, carrier: dict, request_stream):
        self.ingress, self.record, self.carrier = ingress, record, carrier
        self.session_id = record.session_id
        self.request_stream = request_stream
        self.link = LocalSessionLink(ingress, record, carrier)
        self.video_to_caller = self.link.stream.video_on_stream   # False: the room has the video (LiveKit delivery)
        self.link.stream.video_on_stream = True                   # the turns are read off the chunks either way
        self.voices = list(record.conversation.get("reply_characters") or [0])   # who answers, turn by turn
        self.turns = 0                                   # replies begun; the next one's voice is voices[turns % n]
        self.new_turn = False                            # the caller spoke since the last reply began
        self.track = SpeechTrack(REPLY_RATE_HZ, voice=self.voices[0])
        self.error: ApiError | None = None
        self.chunks_sent = 0
        self.events: asyncio.Queue = asyncio.Queue()
        self.speech_ended_at: float | None = None       # the turn's clock (ingress monotonic)
        self.reply_pending = False                       # a reply's audio arrived and its first frame is not out yet
        self.reply_audio_at = 0.0                        # when that audio arrived (ingress monotonic)
        self.turn_latencies_ms: list[float] = []
        self.sample_rate_hz: int | None = None
        self.pacer: asyncio.Task | None = None
        try:
            self.history = checked_history(record.conversation.get("history") or [])
        except ValueError as error:      # not written by this code: start afresh rather than refuse the call
            logger.warning("session %s: its conversation history is unreadable (%s); starting without it",
                           self.session_id, error)
            self.history = []
        self.push_failed = False

    def _failed(self, error: ApiError) -> None:
        if self.error is None:
            self.error = error

    def _event(self, kind, message: str = "", **fields) -> pb.SessionOutput:
        return pb.SessionOutput(event=pb.Event(type=kind, session_id=self.session_id, message=message, **fields))

    async def run(self, resume_from_chunk: int):
        ingress = self.ingress
        try:
            await self._open()
        except Exception as error:   # the LLM did not answer: say where, end this stream only
            self.error = ApiError(grpc.StatusCode.UNAVAILABLE, str(error).strip().splitlines()[-1][:500])
            return
        ready = await ingress.chunk_ready_points(self.record, REPLY_RATE_HZ)
        listeners = [character for character in range(len(self.record.characters)) if character != self.voices[0]]
        if listeners:     # one character speaks at a time: the first to answer; the pacer moves the voice per turn
            await self.link.send(pb.SessionInput(control=pb.Control(speaking=[
                pb.SpeakingState(character=character, speaking=False) for character in listeners])))
        self.pacer = asyncio.ensure_future(pace(self.track, self.link, time.monotonic(), LEAD_S, ready))
        tasks = [self.pacer, asyncio.ensure_future(self._listen()), asyncio.ensure_future(self._read())]
        try:
            async for output in self._merged():
                yield output
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.link.close()
            await asyncio.gather(ingress.llm.close.remote(self.session_id), return_exceptions=True)

    async def _merged(self):
        """The avatar's outputs and the turn events, as they come."""
        outputs = self.link.outputs().__aiter__()
        next_output = asyncio.ensure_future(outputs.__anext__())
        next_event = asyncio.ensure_future(self.events.get())
        try:
            while True:
                done, _ = await asyncio.wait({next_output, next_event}, return_when=asyncio.FIRST_COMPLETED)
                if next_event in done:
                    event = next_event.result()
                    if event is None:
                        return
                    yield event
                    next_event = asyncio.ensure_future(self.events.get())
                if next_output in done:
                    try:
                        output = next_output.result()
                    except StopAsyncIteration:
                        if self.link.stream.error is not None:
                            self._failed(self.link.stream.error)
                        return
                    for message in self._on_output(output):
                        yield message
                    next_output = asyncio.ensure_future(outputs.__anext__())
        finally:
            next_output.cancel()
            next_event.cancel()

    def _on_output(self, output: pb.SessionOutput) -> list[pb.SessionOutput]:
        if output.WhichOneof("output") != "video_chunk":
            return [output]
        chunk = output.video_chunk
        per_frame = REPLY_RATE_HZ / chunk.fps
        start = round(chunk.first_frame * per_frame)
        end = round((chunk.first_frame + len(chunk.frames)) * per_frame)
        messages = []
        speech = self.track.speech_in(start, end)
        if speech and self.reply_pending:
            character = speech[0][2].voice
            self.reply_pending = False
            if self.speech_ended_at is not None:
                latency_ms = (time.monotonic() - self.speech_ended_at) * 1000
                avatar_ms = (time.monotonic() - self.reply_audio_at) * 1000
                self.turn_latencies_ms.append(latency_ms)
                self.ingress.telemetry.stage_duration.record(latency_ms / 1000, {"stage": "turn"})
                self.ingress.telemetry.stage_duration.record(avatar_ms / 1000, {"stage": "turn_avatar"})
                with span(TURN_SPAN, self.carrier, **{"session.id": self.session_id, "turn.latency_ms": latency_ms,
                                                      "turn.avatar_ms": avatar_ms}):
                    pass
                who = f"character {character} is" if len(self.record.characters) > 1 else "the avatar is"
                messages.append(self._event(pb.Event.REPLY_STARTED, f"{who} answering ({avatar_ms:.0f} ms after "
                                            "the reply's first audio)", turn_latency_ms=latency_ms,
                                            character=character))
                self.speech_ended_at = None
        played: dict[str, int] = {}
        for lo, hi, segment in self.track.speech_in(0, end):
            played[segment.tag] = played.get(segment.tag, 0) + hi - lo
        for item_id, samples in played.items():
            asyncio.ensure_future(self.ingress.llm.played.remote(self.session_id, item_id,
                                                                 samples * 1000 // REPLY_RATE_HZ))
        self.track.ended_by(end)
        self.track.forget_before(end)
        self.chunks_sent += 1
        return [output, *messages] if self.video_to_caller else messages

    async def _open(self) -> None:
        conversation = self.record.conversation
        await self.ingress.llm.open.remote(self.session_id, conversation["mode"], conversation.get("instructions", ""),
                                           self.history)

    async def _reopen(self, error: BaseException) -> bool:
        """The conversation failed (its bridge replica died, the LLM went away): open it again with its history,
        retrying for REOPEN_S; True once it is back (RESUMED sent), False when it is not (the stream's error set)."""
        reason = str(error).strip().splitlines()[-1][:200] if str(error).strip() else type(error).__name__
        logger.warning("session %s: the conversation failed (%s: %s); reopening it with %d messages of history",
                       self.session_id, type(error).__name__, reason, len(self.history))
        deadline = time.monotonic() + REOPEN_S
        while True:
            try:
                await asyncio.wait_for(self._open(), max(1.0, deadline - time.monotonic()))
                break
            except asyncio.CancelledError:
                raise
            except Exception as failure:
                error = failure
                if time.monotonic() >= deadline:
                    self._failed(internal_error(self.session_id, "the conversation", error))
                    return False
                await asyncio.sleep(0.5)
        self.push_failed = False
        if self.track.segment is not None:      # the reply being made ended with the old conversation
            self.track.end_segment()
        self.events.put_nowait(self._event(
            pb.Event.RESUMED, f"LLMBridge: the conversation was reopened with its history ({len(self.history)} "
            f"messages) after it failed ({type(error).__name__}); a reply being made was lost",
            next_chunk_index=self.chunks_sent))
        return True

    def _remember(self, transcript: Transcript) -> None:
        history = remember(self.history, transcript)
        if history is self.history:
            return
        self.history = history
        self.record.conversation = {**self.record.conversation, "history": history}
        self.ingress.store_quietly("update", self.session_id, conversation=self.record.conversation)

    async def _listen(self) -> None:
        """The LLM's events, by long poll; a failure reopens the conversation (`_reopen`)."""
        while True:
            try:
                events = await self.ingress.llm.next_events.remote(self.session_id, 1.0)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not await self._reopen(error):
                    self.events.put_nowait(None)
                    return
                continue
            for event in events:
                if isinstance(event, UserSpeech):
                    if event.started:
                        self.events.put_nowait(self._event(pb.Event.USER_SPEECH_STARTED, "the caller is speaking"))
                    else:
                        self.speech_ended_at = time.monotonic()
                        self.new_turn = self.turns > 0
                        self.events.put_nowait(self._event(pb.Event.USER_SPEECH_ENDED, "the caller stopped"))
                elif isinstance(event, ReplyAudio):
                    if not self.track.pending_samples and self.track.segment is None:
                        self.reply_pending = True
                        self.reply_audio_at = time.monotonic()
                    if self.new_turn or not self.turns:
                        self.turns, self.new_turn = self.turns + 1, False
                    voice = self.voices[(self.turns - 1) % len(self.voices)]
                    self.track.say(event.pcm, tag=event.item_id, voice=voice)
                elif isinstance(event, ReplyDone):
                    self.track.end_segment()
                elif isinstance(event, ClearReply):
                    self.track.clear()
                    self.reply_pending = False
                elif isinstance(event, Transcript):
                    self._remember(event)

    async def _push(self, pcm: np.ndarray, rate: int) -> None:
        """The caller's audio to the LLM. While the conversation is failing (`_listen` reopens it) the audio is lost,
        not the call."""
        try:
            await self.ingress.llm.push.remote(self.session_id, pcm, rate)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if not self.push_failed:
                logger.warning("session %s: the caller's audio could not reach the conversation (%s); dropped until "
                               "it is reopened", self.session_id, type(error).__name__)
            self.push_failed = True

    async def _read(self) -> None:
        """The caller's messages: audio to the LLM; end_of_input ends the call (the avatar finishes its sentence)."""
        budget = InputBudget(self.ingress.limits)
        try:
            async for message in self.request_stream:
                require_decodable(message, "facecast.v1.SessionInput")
                kind = message.WhichOneof("input")
                if kind != "audio":
                    budget.take()
                if kind == "audio":
                    pcm, rate = validate_audio(message.audio, 1, self.sample_rate_hz, self.ingress.limits)
                    budget.take(pcm.shape[0] / rate)
                    self.sample_rate_hz = rate
                    if len(pcm):
                        await self._push(np.asarray(pcm), rate)
                elif kind == "control":
                    speaking, end_of_input = validate_control(message.control, len(self.record.characters))
                    if speaking:
                        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "control.speaking is not accepted in a "
                                       "conversation session: the turns decide who speaks (conversation."
                                       "reply_characters)")
                    if end_of_input:
                        break
                else:
                    raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "attach may only be the first message")
            while self.track.pending_samples or self.track.segment is not None:
                await asyncio.sleep(0.1)        # let the avatar finish what it is saying
            self.pacer.cancel()
            await asyncio.gather(self.pacer, return_exceptions=True)
            await self.link.send(pb.SessionInput(control=pb.Control(end_of_input=True)))
        except ApiError as error:
            self._failed(error)
            self.events.put_nowait(None)
