"""One attached StreamSession (`SessionStream`): reads the client's input, keeps at most `max_chunks_in_flight`
chunks of the session generating, and yields the output in chunk order — the ingress's per-stream loop (see
`services.serving.ingress` for the session lifecycle it sits in).

    client input ─► _read: audio -> AudioEncoder.push -> ChunkTicket -> _submit: ScoreWorkerGroup.generate
                                                        ─(unresolved)─► decoder.decode ─► (ticket, DecodedFrames)
    run: chunks back in order ─► video_chunk (gRPC) + the session's other sinks (egress) ─► events

A worker that fails mid-stream (its replica died, or a replacement that does not hold the session yet) does not end
the stream: `_recover` lets the chunks in flight settle, asks every deployment to restore the session from its
snapshots (`services.serving.resume`) at the first chunk that did not arrive, resubmits from there, and tells the
client with a RESUMED event; a push that failed is retried without applying its samples twice.

Like the ingress, this module imports neither torch nor Ray's data plane.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from ray import exceptions as ray_errors
from ray.serve import exceptions as serve_errors

from services.api import pb
from services.api.servicer import require_decodable
from services.api.validation import ApiError, InputBudget, validate_audio, validate_control
from services.delivery.avatar import SessionLink
from services.delivery.egress import Egress, MediaChunk
from services.delivery.livekit_room import DeliveryError, LiveKitSink
from services.serving.messages import ChunkTicket, DecodedFrames
from services.serving.resume import ResumeUnavailable, SessionNotHere
from services.store.sessions import SessionRecord, SessionState
from services.telemetry import CHUNK_SPAN, EGRESS_SPAN, span

logger = logging.getLogger("facecast.ingress")

_END = object()
_DRAIN = object()
BACKPRESSURE_EVENT_INTERVAL_S = 2.0
"""At most one BACKPRESSURE event per stream in this many seconds."""
RECOVERY_RETRY_S = 0.5
"""Pause between restore attempts while a failed worker's replacement is starting."""

WORKER_FAULTS = (ray_errors.RayActorError, ray_errors.ActorUnavailableError, ray_errors.ObjectLostError,
                 ray_errors.WorkerCrashedError, ray_errors.NodeDiedError, serve_errors.ReplicaUnavailableError,
                 serve_errors.DeploymentUnavailableError, SessionNotHere)
"""Errors of a worker call that mean "the worker holding this session is gone" (or a replacement does not hold it
yet): the stream restores the session instead of failing (`SessionStream._recover`)."""


def _chain(error: BaseException | None) -> list[BaseException]:
    """The error and what caused it, outermost first (Ray's `cause`, else `__cause__`; at most 8 deep)."""
    chain = []
    while error is not None and len(chain) < 8:
        chain.append(error)
        error = getattr(error, "cause", None) or error.__cause__
    return chain


def is_worker_fault(error: BaseException) -> bool:
    """A worker fault, also when it reached us wrapped (a downstream call whose argument's upstream call died)."""
    return any(isinstance(link, WORKER_FAULTS) for link in _chain(error))


def _fault_name(error: BaseException | None) -> str:
    """The innermost error's class name (no Ray text, addresses or pids reach the client)."""
    chain = _chain(error)
    return type(chain[-1]).__name__.removeprefix("RayTaskError(").removesuffix(")") if chain else "unknown"


def _is_resume_unavailable(error: BaseException) -> bool:
    return any(isinstance(link, ResumeUnavailable) for link in _chain(error))


def _short(error: BaseException) -> str:
    """The last line of an error's text (a worker's exception arrives with its traceback)."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def internal_error(session_id: str | None, what: str, error: BaseException) -> ApiError:
    """INTERNAL for a failure the caller cannot cause: a short message and a correlation id; the full error (Ray's
    text, tracebacks, pids, addresses) goes only to the server log under that id."""
    correlation_id = uuid.uuid4().hex[:16]
    logger.error("%s failed (session %s, correlation id %s)", what, session_id, correlation_id,
                 exc_info=(type(error), error, error.__traceback__))
    where = f" for session {session_id}" if session_id else ""
    return ApiError(grpc.StatusCode.INTERNAL, f"{what} failed{where}; correlation id {correlation_id} (the server "
                                              "log has the details)")



class SessionStream:
    """One attached StreamSession: reads input, keeps <= max_chunks_in_flight chunks generating, yields output."""

    def __init__(self, ingress, record: SessionRecord, carrier: dict, request_stream):
        self.ingress, self.carrier = ingress, carrier
        self.session_id = record.session_id
        self.audio, self.score, self.decoder = ingress.workers(record.session_id)   # routed to its replicas
        self.request_stream = request_stream
        self.num_characters = max(1, len(record.characters))
        self.in_flight = asyncio.Semaphore(ingress.settings.max_chunks_in_flight)
        self.outputs: asyncio.Queue = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()
        self.error: ApiError | None = None
        self.chunks_sent = 0
        self.sample_rate_hz: int | None = None
        self.input_ended = False
        self.stop = asyncio.Event()
        self.stop_reason = ""
        self.attached_at = time.perf_counter()
        self.last_sent_at: float | None = None
        self.first_audio_at: float | None = None
        self.last_backpressure_at = -BACKPRESSURE_EVENT_INTERVAL_S
        self.frames_sent = record.frames_emitted
        self.delivery = record.delivery
        self.video_on_stream = (record.delivery.get("kind", "grpc") == "grpc" or record.delivery.get("also_stream")
                                or record.delivery.get("agent_identity"))   # an avatar's stream feeds its worker
        self.egress: Egress | None = None
        self.reader: asyncio.Task | None = None
        self.pushed: list[int] = [0] * self.num_characters   # samples per character the AudioEncoder has
        self.next_ticket = 0                     # the next chunk index the AudioEncoder will cut
        self.submit_lock = asyncio.Lock()        # a push and the submission of its tickets; or a recovery
        self.failed: set[int] = set()            # chunks whose worker failed, not yet resubmitted
        self.recovery: asyncio.Task | None = None
        self.last_fault: BaseException | None = None
        self.fault_since: float | None = None    # when the current recovery episode began (None: healthy)
        self.next_chunk = 0                      # the next chunk index `run` delivers

    async def run(self, resume_from_chunk: int):
        ingress, session_id = self.ingress, self.session_id
        previous = ingress.streams.get(session_id)
        if previous is not None:
            previous.end("taken_over")   # a newer attach takes the session over
        ingress.streams[session_id] = self
        try:   # the session's replicas hold it (one that lost it, or a new home, restores it from its snapshot)
            audio_state = await self.audio.restore.remote(session_id)
        except Exception as error:
            if not _is_resume_unavailable(error):
                raise
            self.error = ApiError(grpc.StatusCode.DATA_LOSS, f"the audio worker lost the session: {_short(error)}")
            if ingress.streams.get(session_id) is self:
                ingress.streams.pop(session_id, None)
            return
        self.sample_rate_hz = audio_state["sample_rate_hz"]   # fixed by the first audio, whoever received it
        self.pushed = list(audio_state["samples_by_character"])
        self.next_ticket = audio_state["chunk_index"]
        self.input_ended = audio_state["input_ended"]
        try:
            await self._open_egress()
        except DeliveryError as error:   # the session's room is out of reach: say where, end this stream only
            self.error = ApiError(grpc.StatusCode.UNAVAILABLE, str(error))
            if ingress.streams.get(session_id) is self:
                ingress.streams.pop(session_id, None)
            return
        next_chunk, warnings = await self._resume(resume_from_chunk, audio_state)
        self.next_chunk = next_chunk
        ingress.store_quietly("update", session_id, state=SessionState.STREAMING, attached_by=ingress.replica_id)
        yield pb.SessionOutput(event=pb.Event(type=pb.Event.ATTACHED, session_id=session_id,
                                              audio_samples_received=audio_state["samples_received"],
                                              next_chunk_index=next_chunk))
        for warning in warnings:
            yield warning
        reader = self.reader = asyncio.ensure_future(self._read())
        pending: dict[int, tuple[ChunkTicket, DecodedFrames]] = {}
        try:
            while True:
                item = await self._next_output()
                if item is _END:
                    if self.stop_reason == "closed":
                        yield pb.SessionOutput(event=pb.Event(type=pb.Event.SESSION_ENDED, session_id=session_id,
                                                              message="the session was closed"))
                    elif self.stop_reason == "taken_over":
                        self.error = ApiError(grpc.StatusCode.ABORTED, "another stream attached to this session")
                    break
                if item is _DRAIN:
                    drained = self._event(pb.Event.DRAINING, "the server is shutting down; re-attach with "
                                          f"resume_from_chunk={next_chunk} to go on")
                    drained.event.next_chunk_index = next_chunk
                    yield drained
                    self.error = ApiError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down (draining); "
                                          f"re-attach with resume_from_chunk={next_chunk} to go on")
                    break
                if isinstance(item, pb.SessionOutput):
                    yield item
                    continue
                ticket, frames = item
                if ticket.chunk_index < next_chunk:
                    continue        # delivered already (a chunk resubmitted by a recovery arrived twice)
                pending[ticket.chunk_index] = item
                while next_chunk in pending:
                    ticket, frames = pending.pop(next_chunk)
                    next_chunk += 1
                    self.next_chunk = next_chunk
                    message = self._video_chunk(ticket, frames)
                    if self.egress is not None:
                        self.egress.offer(MediaChunk.from_video_chunk(session_id, message.video_chunk))
                    if self.video_on_stream:
                        yield message
                    if ticket.final:
                        ingress.store_quietly("update", session_id, state=SessionState.ENDED)
                        await ingress._release_workers(session_id)   # nothing can re-attach to an ENDED session
                        yield pb.SessionOutput(event=pb.Event(type=pb.Event.SESSION_ENDED, session_id=session_id,
                                                              message="all video delivered"))
                        return
        finally:
            reader.cancel()
            if ingress.streams.get(session_id) is self:
                ingress.streams.pop(session_id, None)
            if self.egress is not None:    # the sinks finish what they have without holding this stream up
                asyncio.ensure_future(self.egress.close())

    async def _open_egress(self) -> None:
        """The session's sinks besides this gRPC stream (LiveKit delivery joins its room here, before ATTACHED,
        so a server that does not answer fails the attach with UNAVAILABLE naming its URL)."""
        if self.delivery.get("kind") != "livekit" or self.delivery.get("agent_identity"):
            return   # gRPC only; or a voice agent's avatar, whose worker publishes to the room itself
        if self.ingress.livekit is None:
            raise DeliveryError("this session delivers to LiveKit, and this server has no LiveKit configured "
                                "(livekit_url, LIVEKIT_API_KEY / LIVEKIT_API_SECRET)")
        identity = self.delivery.get("identity") or f"facecast-avatar-{self.session_id[:8]}"
        sink = LiveKitSink(self.ingress.livekit, self.delivery["room"], identity, self.ingress.room_connector)
        try:
            await sink.open()
        except BaseException:
            await sink.close()
            raise
        self.egress = Egress([sink], on_error=self._sink_failed)
        await self.egress.start()

    def _sink_failed(self, name: str, message: str) -> None:
        self.outputs.put_nowait(self._event(pb.Event.WARNING, f"delivery to {name} stopped: {message}"))

    def end(self, reason: str) -> None:
        """Stop this stream from outside: "closed" (CloseSession) or "taken_over" (a newer attach)."""
        self.stop_reason = reason
        self.stop.set()

    async def drain(self, grace_s: float) -> None:
        """The replica is shutting down: stop reading input, let the chunks in flight arrive (for up to `grace_s`),
        then send DRAINING with the next chunk's index and end with UNAVAILABLE. The session stays STREAMING in the
        store with its worker state, so a re-attach (here or on another replica) continues it."""
        if self.reader is not None:
            self.reader.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace_s)
        await self.outputs.put(_DRAIN)

    def _event(self, kind, message: str) -> pb.SessionOutput:
        return pb.SessionOutput(event=pb.Event(type=kind, session_id=self.session_id, message=message))

    async def _resume(self, resume_from_chunk: int, audio_state: dict) -> tuple[int, list[pb.SessionOutput]]:
        """Re-attach: resend what is buffered from `resume_from_chunk`, resubmit chunks cut but never submitted.
        Returns the first chunk index this stream will send, and WARNING events to send after ATTACHED."""
        session_id = self.session_id
        score = await self.score.restore.remote(session_id, None)
        started = score["progress"]
        decode = await self.decoder.restore_decode.remote(session_id, started)
        first = min(resume_from_chunk, started)
        warnings = []
        if (score["restored"] or decode["restored"]) and first < started:   # what it buffered left with its replica
            warnings.append(self._event(pb.Event.WARNING, f"chunks {first} to {started - 1} were held by a worker "
                                                          f"that is gone and cannot be resent; resuming at chunk "
                                                          f"{started}"))
            first = started
        tickets = {ticket.chunk_index: ticket for ticket in await self.audio.recent.remote(session_id, first)}
        if first < started:
            oldest = await self.decoder.oldest_buffered.remote(session_id)
            available = max(oldest if oldest is not None else first, min(tickets, default=started))
            if available > first:
                warnings.append(self._event(pb.Event.WARNING, f"chunks {first} to {available - 1} are no longer "
                                                              f"buffered and cannot be resent; resuming at chunk "
                                                              f"{available}"))
                first = available
        # Chunks the score group started but the decoder never received: the previous ingress died between
        # `generate` and `decode`. Hand the kept result over again (the decoder ignores a chunk it already has).
        lost = set(await self.decoder.never_received.remote(session_id, started)) if first < started else set()
        self._redeliver(range(first, started), tickets, lost)
        cut = audio_state["chunk_index"]
        unsubmitted = [ticket for index, ticket in sorted(tickets.items()) if index >= started]
        if cut > started and not unsubmitted:
            self.error = ApiError(grpc.StatusCode.DATA_LOSS, "chunks were lost across the re-attach")
        for ticket in unsubmitted:
            await self._submit(ticket)
        return first, warnings

    async def _next_output(self):
        while True:
            if self.stop.is_set():
                return _END
            getter = asyncio.ensure_future(self.outputs.get())
            stopper = asyncio.ensure_future(self.stop.wait())
            done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if getter in done:
                return getter.result()
            getter.cancel()

    async def _read(self) -> None:
        """Consume client messages; an error ends the stream with its status, other sessions are unaffected."""
        ingress, session_id = self.ingress, self.session_id
        budget = InputBudget(ingress.limits)
        try:
            async for message in self.request_stream:
                require_decodable(message, "facecast.v1.SessionInput")
                kind = message.WhichOneof("input")
                if kind != "audio":
                    budget.take()
                if kind == "audio":
                    if self.input_ended:
                        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                                       "audio after control.end_of_input: this session's input has ended; create a "
                                       "new session to continue speaking")
                    pcm, rate = validate_audio(message.audio, self.num_characters, self.sample_rate_hz,
                                               ingress.limits)
                    budget.take(pcm.shape[0] / rate)
                    self.sample_rate_hz = rate
                    if self.first_audio_at is None:
                        self.first_audio_at = time.perf_counter()
                    character = int(message.audio.character)
                    offset = self.pushed[character]
                    await self._audio_call(lambda: self.audio.push.remote(
                        session_id, pcm, rate, character, self.carrier, offset, self.next_ticket))
                    self.pushed[character] += int(pcm.shape[0])
                elif kind == "control":
                    speaking, end_of_input = validate_control(message.control, self.num_characters)
                    for character, value in speaking:
                        await self._audio_call(lambda: self.audio.set_speaking.remote(session_id, character, value))
                    if end_of_input and not self.input_ended:
                        self.input_ended = True
                        await self._audio_call(lambda: self.audio.end.remote(session_id, self.carrier,
                                                                             self.next_ticket))
                        await self.outputs.put(self._event(pb.Event.INPUT_ENDED, "flushing remaining video"))
                else:
                    raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "attach may only be the first message")
            await self._finish(wait=True)    # the client closed its side: deliver what is in flight, then end
        except ApiError as error:
            self.error = error
            await self._finish(wait=False)
        except asyncio.CancelledError:
            raise
        except Exception as error:          # a worker failed: end this stream loudly, other sessions go on
            self._failed(internal_error(session_id, "streaming", error))
            await self._finish(wait=False)

    def _failed(self, error: ApiError) -> None:
        if self.stop_reason == "closed":    # what fails after a close is the close's doing: the session stays CLOSED
            return
        if self.error is None:
            self.error = error
        try:
            self.ingress.store.update(self.session_id, state=SessionState.FAILED)
        except Exception:
            logger.exception("could not mark session %s FAILED", self.session_id)

    async def _finish(self, wait: bool) -> None:
        while wait and (self.tasks or (self.recovery is not None and not self.recovery.done())):
            # the chunks in flight, and a recovery with the chunks it resubmits (which may start another)
            await asyncio.gather(*list(self.tasks), *([self.recovery] if self.recovery else []),
                                 return_exceptions=True)
        await self.outputs.put(_END)

    async def _submit(self, ticket: ChunkTicket) -> None:
        """Send one chunk down the one-way path; waits (backpressure) while the session's pipeline is full."""
        ingress = self.ingress
        if self.in_flight.locked():
            now = time.monotonic()
            if now - self.last_backpressure_at >= BACKPRESSURE_EVENT_INTERVAL_S:
                self.last_backpressure_at = now
                await self.outputs.put(self._event(
                    pb.Event.BACKPRESSURE, f"generation is behind real time: {len(self.tasks)} chunks in flight "
                                           f"(limit {ingress.settings.max_chunks_in_flight}); input reading paused at "
                                           f"chunk {ticket.chunk_index}"))
        await self.in_flight.acquire()
        ingress.telemetry.chunks_in_flight.add(1)
        scored = self.score.generate.remote(ticket.features, self.carrier)   # features resolved in the score group
        frames = self.decoder.decode.remote(ticket.decode_request(), scored, self.carrier)
        self._spawn(ticket.chunk_index, ticket, frames, counted=True)

    def _spawn(self, index: int, ticket: ChunkTicket, response, counted: bool) -> None:
        async def wait() -> None:
            try:
                await self.outputs.put((ticket, await response))
            except asyncio.CancelledError:
                self.failed.add(index)      # a recovery gave up waiting for it: resubmitted with the others
                raise
            except Exception as error:      # generation failed: the stream ends with INTERNAL and a correlation id
                if self.stop_reason == "closed":
                    return                  # CloseSession freed the workers under this chunk: not a failure
                if is_worker_fault(error):
                    self._on_fault(index, error)
                    return
                self._failed(internal_error(self.session_id, f"generating chunk {index}", error))
                await self.outputs.put(_END)
            finally:
                if counted:
                    self.in_flight.release()
                    self.ingress.telemetry.chunks_in_flight.add(-1)

        task = asyncio.ensure_future(wait())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ------------------------------------------------------------------ worker faults

    async def _audio_call(self, make_call) -> None:
        """A reader's AudioEncoder call and the submission of the tickets it returns, as one step under the submit
        lock. A worker fault restores the session first (`_recover_locked`) and retries the call: the calls are
        idempotent (a push says where its samples start, and which tickets the ingress still lacks)."""
        async with self.submit_lock:
            while True:
                try:
                    tickets = await make_call()
                    break
                except Exception as error:
                    if not is_worker_fault(error) or self.stop_reason == "closed":
                        raise
                    await self._recover_locked(error)
            for ticket in tickets or ():
                if ticket.chunk_index >= self.next_ticket:
                    self.next_ticket = ticket.chunk_index + 1
                    await self._submit(ticket)

    def _on_fault(self, index: int, error: BaseException) -> None:
        """A chunk's worker failed: remember the chunk and start a recovery unless one is running (it re-checks the
        failed chunks before it ends)."""
        self.failed.add(index)
        self.last_fault = error
        if self.recovery is None or self.recovery.done():
            self.recovery = asyncio.ensure_future(self._recovery_task())

    async def _recovery_task(self) -> None:
        try:
            async with self.submit_lock:
                while self.failed and self.stop_reason != "closed":
                    await self._recover_locked(self.last_fault)
        except ApiError as error:
            self._failed(error)
            await self.outputs.put(_END)
        except Exception as error:
            self._failed(internal_error(self.session_id, "resuming after a worker failure", error))
            await self.outputs.put(_END)

    async def _recover_locked(self, error: BaseException | None) -> None:
        """(Holding the submit lock.) Let the chunks in flight settle; then have every deployment hold the session
        (a replacement replica restores it from its snapshots at the first chunk that did not arrive), resubmit
        from that chunk, and send RESUMED. Retries while the replacement starts, for up to `fault_recovery_s`."""
        settings = self.ingress.settings
        if self.fault_since is None:
            self.fault_since = time.monotonic()
        since = self.fault_since     # (a chunk delivered while the others settle ends the episode's clock)
        logger.warning("session %s: a worker failed (%s); restoring it", self.session_id, _fault_name(error))
        while True:
            await self._settle()
            try:
                restored, first = await self._restore_and_resubmit()
                break
            except Exception as retry_error:
                waited = time.monotonic() - since
                if _is_resume_unavailable(retry_error):
                    raise ApiError(grpc.StatusCode.DATA_LOSS, f"a worker failed and the session cannot be resumed: "
                                                              f"{_short(retry_error)}") from None
                if not is_worker_fault(retry_error):
                    raise
                if waited > settings.fault_recovery_s:
                    raise ApiError(grpc.StatusCode.UNAVAILABLE, f"a worker failed and no replacement took the "
                                                                f"session over within {waited:.0f} s") from None
                await asyncio.sleep(RECOVERY_RETRY_S)
        what = ", ".join(restored) or "a worker call"
        message = (f"{what} failed ({_fault_name(error)}); the session was restored from its snapshot and resumed at "
                   f"chunk {first}" if restored else f"{what} failed ({_fault_name(error)}); resumed at chunk {first}")
        logger.warning("session %s: %s", self.session_id, message)
        resumed = self._event(pb.Event.RESUMED, message)
        resumed.event.next_chunk_index = first
        await self.outputs.put(resumed)

    async def _settle(self, timeout_s: float = 20.0) -> None:
        """Wait for the chunks in flight (those of live workers finish; those of dead ones fail); a chunk still
        waiting after `timeout_s` (queued behind one that failed) is cancelled and resubmitted with the others."""
        if not self.tasks:
            return
        _, stuck = await asyncio.wait(list(self.tasks), timeout=timeout_s)
        for task in stuck:
            task.cancel()
        if stuck:
            await asyncio.wait(stuck)

    async def _restore_and_resubmit(self) -> tuple[list[str], int]:
        """Every deployment holds the session (restored where it was lost); the failed chunks are resubmitted.
        Returns the deployments that restored it and the first chunk resubmitted (or the next one due)."""
        session_id = self.session_id
        audio_state = await self.audio.restore.remote(session_id)
        restored = ["AudioEncoder"] if audio_state["restored"] else []
        if not self.failed:
            return restored, self.next_chunk
        first = min(self.failed)
        score = await self.score.restore.remote(session_id, first)
        decode = await self.decoder.restore_decode.remote(session_id, first)
        restored += ["ScoreWorkerGroup"] * score["restored"] + ["VAEDecoder"] * decode["restored"]
        started, cut = max(score["progress"], first), audio_state["chunk_index"]
        tickets = {ticket.chunk_index: ticket for ticket in await self.audio.recent.remote(session_id, first)}
        missing = [index for index in range(first, cut) if index not in tickets]
        if missing:
            raise ApiError(grpc.StatusCode.DATA_LOSS, f"chunks {missing} were lost with a failed worker")
        lost = set(await self.decoder.never_received.remote(session_id, started)) if first < started else set()
        self.failed.clear()      # from here on a new failure is a new round
        self._redeliver(range(first, started), tickets, lost)   # scored by a live score group
        for index in range(started, cut):
            await self._submit(tickets[index])
        return restored, first

    def _redeliver(self, indices: range, tickets: dict[int, ChunkTicket], lost: set[int]) -> None:
        """Deliver again chunks the score group already scored: fetched from the decoder, or for those it never
        received (`lost`) decoded again from the score group's kept result."""
        for index in indices:
            response = (self.decoder.decode.remote(tickets[index].decode_request(),
                                                   self.score.scored.remote(self.session_id, index), self.carrier)
                        if index in lost else self.decoder.fetch.remote(self.session_id, index))
            self._spawn(index, tickets[index], response, counted=False)

    def _video_chunk(self, ticket: ChunkTicket, frames: DecodedFrames) -> pb.SessionOutput:
        ingress, telemetry = self.ingress, self.ingress.telemetry
        now = time.perf_counter()
        ttbc_s = now - (self.last_sent_at or self.attached_at)
        stage_ms = {"audio": ticket.audio_ms, **frames.stage_ms}
        with span(CHUNK_SPAN, self.carrier, **{"session.id": self.session_id, "chunk.index": ticket.chunk_index}):
            with span(EGRESS_SPAN, None, **{"session.id": self.session_id, "chunk.index": ticket.chunk_index,
                                            "frames": len(frames.frames_jpeg),
                                            "decoded_by.deployment": frames.decoded_by.get("deployment", ""),
                                            "decoded_by.replica": frames.decoded_by.get("replica", ""),
                                            "decoded_by.gpu_ids": ",".join(frames.decoded_by.get("gpu_ids", []))}):
                message = pb.SessionOutput(video_chunk=pb.VideoChunk(
                    chunk_index=ticket.chunk_index, pts_ms=round(ticket.first_frame * 1000 / ticket.fps),
                    width=frames.width, height=frames.height, frames=frames.frames_jpeg,
                    audio_pcm_s16le=ticket.audio_pcm_s16le, sample_rate_hz=ticket.sample_rate_hz,
                    fps=ticket.fps, final=ticket.final, first_frame=ticket.first_frame,
                    stats=pb.ChunkStats(ttbc_ms=ttbc_s * 1000, stage_ms=stage_ms,
                                        chunks_in_flight=len(self.tasks))))
        if self.chunks_sent == 0 and self.first_audio_at is not None:
            telemetry.ttff.record(now - self.first_audio_at)
            if ingress.ray_metrics:
                ingress.ray_metrics.ttff.observe(now - self.first_audio_at)
        elif self.chunks_sent:
            telemetry.chunk_interval.record(ttbc_s)
            if ingress.ray_metrics:
                ingress.ray_metrics.chunk_interval.observe(ttbc_s)
        for stage, value_ms in stage_ms.items():
            telemetry.stage_duration.record(value_ms / 1000, {"stage": stage})
        chunk_s = len(frames.frames_jpeg) / ticket.fps if frames.frames_jpeg else 0.0
        if chunk_s:
            telemetry.realtime_factor.record(stage_ms.get("score", 0) / 1000 / chunk_s)
            telemetry.fps.record(len(frames.frames_jpeg) / max(ttbc_s, 1e-6))
        self.last_sent_at = now
        self.fault_since = None      # a chunk got out: any recovery episode is over
        self.chunks_sent += 1
        self.frames_sent = ticket.first_frame + len(frames.frames_jpeg)
        ingress.store_quietly("record_progress", self.session_id, ticket.chunk_index + 1, self.frames_sent,
                              self.pushed[0])
        ingress.store_quietly("heartbeat", self.session_id, ingress.replica_id)
        return message


class LocalSessionLink(SessionLink):
    """A session driven from inside the ingress (a voice agent's avatar): a `SessionStream` whose input is a queue."""

    def __init__(self, ingress, record: SessionRecord, carrier: dict):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stream = SessionStream(ingress, record, carrier, self._requests())
        self.closed = False

    async def _requests(self):
        while True:
            message = await self.queue.get()
            if message is None:
                return
            yield message

    async def send(self, message: pb.SessionInput) -> None:
        if not self.closed:
            self.queue.put_nowait(message)

    def outputs(self):
        return self.stream.run(0)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.stream.end("closed")
            self.queue.put_nowait(None)
