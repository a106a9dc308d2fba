"""`SessionIngress`: the gRPC `facecast.v1.AvatarService` as a Ray Serve deployment.

A session's lifecycle through the ingress:

    1. CreateSession   validate (INVALID_ARGUMENT names the field) -> admission (RESOURCE_EXHAUSTED) -> Redis record
                       (token stored as its SHA-256) -> decoder.encode_reference (its response goes to the score
                       group unresolved) -> open on ScoreWorkerGroup, AudioEncoder, decoder -> Session{id, token}
    2. StreamSession   attach (NOT_FOUND / PERMISSION_DENIED / FAILED_PRECONDITION) -> ATTACHED event ->
                       [re-attach: resend buffered chunks from resume_from_chunk (WARNING for any already dropped),
                       resubmit chunks a dead ingress cut but never submitted] -> per audio message:
                         AudioEncoder.push ─► ChunkTicket per ready chunk (frame span, its audio, a reference to
                         its features) ─ticket.features (unresolved)─► ScoreWorkerGroup.generate
                                                         ─(unresolved)─► decoder.decode ─► DecodedFrames
                         egress: frames + the ticket's audio -> video_chunk
                       at most `max_chunks_in_flight` chunks per session at once (BACKPRESSURE event when input
                       reading pauses) -> end_of_input flushes -> last chunk -> SESSION_ENDED, worker state freed
    3. Update/Get/CloseSession; a sweep frees worker state of sessions whose record expired, ended or failed.

Session records live in Redis, model state on the worker deployments, so an ingress replica can die and a client
re-attach to another replica and continue.  Every failure a caller can cause has its gRPC status; nothing a caller
sends can break another session; failures a caller cannot cause end that session's stream with INTERNAL, a short
message and a correlation id that the server logs next to the full error (no Ray internals reach the client).

This module imports neither torch nor Ray's data plane: it never resolves a response that carries tensors (a test
imports it in a fresh interpreter and checks that torch and diffusers stay unloaded).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from ray import serve

from services.api import SERVICE_NAME, pb
from services.api.validation import (ApiError, ApiLimits, check_api_key, check_token, new_token, require_session_id,
                                     session_to_proto, validate_audio, validate_control, validate_create,
                                     validate_update)
from services.serving.messages import ChunkTicket, DecodedFrames
from services.serving.settings import AppSettings
from services.store.sessions import SessionNotFound, SessionRecord, SessionState, connect_store
from services.telemetry import (CHUNK_SPAN, EGRESS_SPAN, SESSION_SPAN, context_from_grpc_metadata, inject_context,
                                setup_telemetry, span)
from services.telemetry.ray_metrics import RayMetrics

logger = logging.getLogger("facecast.ingress")

_END = object()
BACKPRESSURE_EVENT_INTERVAL_S = 2.0
"""At most one BACKPRESSURE event per stream in this many seconds."""


def internal_error(session_id: str | None, what: str, error: BaseException) -> ApiError:
    """INTERNAL for a failure the caller cannot cause: a short message and a correlation id; the full error (Ray's
    text, tracebacks, pids, addresses) goes only to the server log under that id."""
    correlation_id = uuid.uuid4().hex[:16]
    logger.error("%s failed (session %s, correlation id %s)", what, session_id, correlation_id,
                 exc_info=(type(error), error, error.__traceback__))
    where = f" for session {session_id}" if session_id else ""
    return ApiError(grpc.StatusCode.INTERNAL, f"{what} failed{where}; correlation id {correlation_id} (the server "
                                              "log has the details)")


def _metadata(grpc_context) -> list[tuple[str, str]]:
    return list(grpc_context.invocation_metadata() or []) if grpc_context is not None else []


def _fail(grpc_context, error: ApiError) -> None:
    grpc_context.set_code(error.code)
    grpc_context.set_details(error.message)


class StreamAborted(Exception):
    """Raised after setting the gRPC status on a streaming call: Serve sends the status that was set (a status set
    without raising is dropped once a stream has started)."""


@serve.deployment(name="SessionIngress", max_ongoing_requests=1000)
class SessionIngress:
    """The gRPC servicer. `audio`, `score`, `decoder`, `llm` are deployment handles (or, in unit tests, objects with
    the same `.method.remote(...)` surface); `store` overrides the Redis session store (tests)."""

    def __init__(self, settings: AppSettings, audio, score, decoder, llm, *, store=None, ray_metrics: bool = True):
        self.settings = settings
        self.audio, self.score, self.decoder, self.llm = audio, score, decoder, llm
        self.stream_defaults = settings.stream_defaults()
        self.decoders = settings.decoders()
        self.limits = ApiLimits()
        self.api_keys = settings.effective_api_keys()
        if store is None:
            store, self._local_redis = connect_store(settings.effective_redis_url(), ttl_s=settings.session_ttl_s)
        else:
            self._local_redis = None
        self.store = store
        self.telemetry = setup_telemetry("facecast-ingress")
        self.ray_metrics = RayMetrics() if ray_metrics else None
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (unit tests)
            self.replica_id = uuid.uuid4().hex[:8]
        self.streams: dict[str, "_SessionStream"] = {}   # session id -> the stream attached here
        self._sweeper: asyncio.Task | None = None

    # ------------------------------------------------------------------ helpers

    def _record(self, session_id: str, token: str) -> SessionRecord:
        require_session_id(session_id)
        try:
            record = self.store.get(session_id)
        except SessionNotFound:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"session {session_id!r} does not exist or has expired")
        check_token(record.token_sha256, token)
        if record.state == SessionState.CLOSED:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"session {session_id!r} is closed")
        return record

    def _session_proto(self, record: SessionRecord, token: str = ""):
        stream = self.stream_defaults.replace(**record.options)
        return session_to_proto(record.session_id, record.state.value, stream, record.characters, record.created_at,
                                record.chunks_emitted, record.frames_emitted, session_token=token,
                                prompt=record.prompt, owner=record.owner)

    def _start_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep_forever())

    # ------------------------------------------------------------------ grpc.health.v1.Health

    async def Check(self, request, grpc_context=None):
        """Standard gRPC health: SERVING when the session store answers and every worker deployment responds.
        `service` may be "" (the whole server) or "facecast.v1.AvatarService"."""
        from grpc_health.v1 import health_pb2

        if request.service not in ("", SERVICE_NAME):
            _fail(grpc_context, ApiError(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}"))
            return health_pb2.HealthCheckResponse()
        healthy = self.store.ping()
        if healthy:
            try:
                await asyncio.wait_for(asyncio.gather(self.decoder.decode_stats.remote(),
                                                      self.score.batch_stats.remote(),
                                                      self.audio.session_ids.remote(),
                                                      self.llm.status.remote()), 10)
            except Exception:
                healthy = False
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    # ------------------------------------------------------------------ unary RPCs

    async def CreateSession(self, request, grpc_context=None):
        self._start_sweeper()
        session_id = None
        try:
            check_api_key(_metadata(grpc_context), self.api_keys)
            spec = validate_create(request, self.stream_defaults, self.limits, preset=self.settings.preset_config,
                                   decoders=self.decoders)
            if spec.stream.steps != self.settings.steps:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"options.steps={spec.stream.steps} is not served here: this cluster's score group "
                               f"runs {self.settings.steps} steps (send 0 for the default)")
            session_id, (token, token_hash) = uuid.uuid4().hex, new_token()
            if not self.store.try_admit(session_id, self.settings.max_sessions):
                self.telemetry.sessions_rejected.add(1, {"reason": "admission_limit"})
                if self.ray_metrics:
                    self.ray_metrics.sessions_rejected.inc()
                raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the cluster is at its limit of {self.settings.max_sessions} active sessions; "
                               "retry later")
            now = time.time()
            record = SessionRecord(
                session_id=session_id, token_sha256=token_hash, owner=spec.owner,
                options={name: getattr(spec.stream, name) for name in
                         ("fps", "width", "height", "steps", "chunk_latent_frames", "seed", "decoder")},
                characters=[list(region) for region in spec.characters], prompt=spec.prompt,
                state=SessionState.CREATED, created_at=now, updated_at=now, heartbeat_at=now)
            self.store.create(record)   # before the workers open, so a sweep never frees a session being opened
            try:
                await self._open_workers(session_id, spec, request.reference_image)
            except BaseException:
                self.store.close(session_id)
                self.store.release(session_id)
                await self._release_workers(session_id)
                raise
            self.telemetry.sessions_active.add(1)
            if self.ray_metrics:
                self.ray_metrics.session_delta(1)
            return self._session_proto(record, token)
        except ApiError as error:
            _fail(grpc_context, error)
            return pb.Session()
        except Exception as error:
            _fail(grpc_context, internal_error(session_id, "opening the session", error))
            return pb.Session()

    async def _open_workers(self, session_id: str, spec, image_bytes: bytes) -> None:
        stream = spec.stream
        latent = self.decoder.encode_reference.remote(image_bytes, stream.width, stream.height)  # resolved in score
        regions = [tuple(region) for region in spec.characters]
        await asyncio.gather(self.score.open.remote(session_id, stream, latent, spec.prompt, regions),
                             self.audio.open.remote(session_id, stream, max(1, len(regions))),
                             self.decoder.open_decode.remote(session_id, stream.decoder))

    async def _release_workers(self, session_id: str) -> None:
        """Free the session's state on every worker (KV caches, decode cache, replay buffer, audio state)."""
        await asyncio.gather(self.audio.close.remote(session_id), self.score.close.remote(session_id),
                             self.decoder.close_decode.remote(session_id), return_exceptions=True)

    async def GetSession(self, request, grpc_context=None):
        try:
            check_api_key(_metadata(grpc_context), self.api_keys)
            return self._session_proto(self._record(request.session_id, request.session_token))
        except ApiError as error:
            _fail(grpc_context, error)
            return pb.Session()

    async def UpdateSession(self, request, grpc_context=None):
        try:
            check_api_key(_metadata(grpc_context), self.api_keys)
            record = self._record(request.session_id, request.session_token)
            spec = validate_update(request, max(1, len(record.characters)), self.limits)
            if record.state in (SessionState.ENDED, SessionState.FAILED):
                raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"session {record.session_id!r} is {record.state.value}: updates apply only to "
                               "sessions that are CREATED or STREAMING")
            changes = {}
            try:
                if spec.prompt is not None and spec.prompt != record.prompt:
                    await self.score.set_prompt.remote(record.session_id, spec.prompt)
                    changes["prompt"] = spec.prompt
                for character, speaking in spec.speaking:
                    await self.audio.set_speaking.remote(record.session_id, character, speaking)
            except Exception as error:
                raise internal_error(record.session_id, "updating the session", error) from None
            return self._session_proto(self.store.update(record.session_id, **changes))
        except ApiError as error:
            _fail(grpc_context, error)
            return pb.Session()

    async def CloseSession(self, request, grpc_context=None):
        try:
            check_api_key(_metadata(grpc_context), self.api_keys)
            record = self._record(request.session_id, request.session_token)
            await self._close(record.session_id)
            return self._session_proto(self.store.get(record.session_id))
        except ApiError as error:
            _fail(grpc_context, error)
            return pb.Session()

    async def _close(self, session_id: str) -> None:
        stream = self.streams.pop(session_id, None)
        if stream is not None:
            stream.end("closed")
        self.store.close(session_id)
        self.store.release(session_id)
        self.telemetry.sessions_active.add(-1)
        if self.ray_metrics:
            self.ray_metrics.session_delta(-1)
        await self._release_workers(session_id)

    # ------------------------------------------------------------------ freeing what no session owns any more

    async def sweep(self) -> list[str]:
        """Free worker state of every session whose record has expired, or that ended, failed or was closed, and
        that no stream on this replica is delivering. Returns the freed ids."""
        held = await asyncio.gather(self.audio.session_ids.remote(), self.score.session_ids.remote(),
                                    self.decoder.session_ids.remote(), return_exceptions=True)
        ids = set()
        for result in held:
            if not isinstance(result, BaseException):
                ids.update(result)
        freed = []
        for session_id in sorted(ids):
            if session_id in self.streams:
                continue
            try:
                state = self.store.get(session_id).state
            except SessionNotFound:
                state = None
            if state is None or state in (SessionState.ENDED, SessionState.FAILED, SessionState.CLOSED):
                await self._release_workers(session_id)
                freed.append(session_id)
        return freed

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.session_sweep_s)
            try:
                freed = await self.sweep()
                if freed:
                    logger.info("freed worker state of %d sessions no longer open: %s", len(freed), freed)
            except Exception:
                logger.exception("session sweep failed; retrying in %.0f s", self.settings.session_sweep_s)

    # ------------------------------------------------------------------ StreamSession

    async def StreamSession(self, request_stream, grpc_context=None):
        self._start_sweeper()
        try:
            check_api_key(_metadata(grpc_context), self.api_keys)
            try:
                first = await request_stream.__anext__()
            except StopAsyncIteration:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "the stream ended before attach{session_id, "
                                                                 "session_token}")
            if first.WhichOneof("input") != "attach":
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                               "the first StreamSession message must be attach{session_id, session_token}")
            record = self._record(first.attach.session_id, first.attach.session_token)
            if record.state == SessionState.ENDED:
                raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"session {record.session_id!r} already delivered all its video")
            if record.state == SessionState.FAILED:
                raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"session {record.session_id!r} failed; close it and create a new one")
        except ApiError as error:
            _fail(grpc_context, error)
            raise StreamAborted(error.message) from None
        parent = context_from_grpc_metadata(_metadata(grpc_context))
        session_id = record.session_id
        with span(SESSION_SPAN, inject_context(parent), **{"session.id": session_id,
                                                           "preset": self.settings.preset}) as session_span:
            session_carrier = inject_context()
            stream = _SessionStream(self, record, session_carrier, request_stream)
            try:
                async for message in stream.run(first.attach.resume_from_chunk):
                    yield message
            except Exception as error:   # a worker call failed while attaching: no Ray internals to the client
                stream._failed(internal_error(session_id, "attaching", error))
            session_span.set_attribute("chunks", stream.chunks_sent)
        if stream.error is not None:
            _fail(grpc_context, stream.error)
            raise StreamAborted(stream.error.message)


class _SessionStream:
    """One attached StreamSession: reads input, keeps <= max_chunks_in_flight chunks generating, yields output."""

    def __init__(self, ingress: SessionIngress, record: SessionRecord, carrier: dict, request_stream):
        self.ingress, self.carrier = ingress, carrier
        self.session_id = record.session_id
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
        self.samples_received = 0

    async def run(self, resume_from_chunk: int):
        ingress, session_id = self.ingress, self.session_id
        previous = ingress.streams.get(session_id)
        if previous is not None:
            previous.end("taken_over")   # a newer attach takes the session over
        ingress.streams[session_id] = self
        audio_state = await ingress.audio.state.remote(session_id)
        self.sample_rate_hz = audio_state["sample_rate_hz"]   # fixed by the first audio, whoever received it
        self.samples_received = audio_state["samples_received"]
        self.input_ended = audio_state["input_ended"]
        next_chunk, warnings = await self._resume(resume_from_chunk, audio_state)
        ingress.store.update(session_id, state=SessionState.STREAMING, attached_by=ingress.replica_id)
        yield pb.SessionOutput(event=pb.Event(type=pb.Event.ATTACHED, session_id=session_id,
                                              audio_samples_received=audio_state["samples_received"],
                                              next_chunk_index=next_chunk))
        for warning in warnings:
            yield warning
        reader = asyncio.ensure_future(self._read())
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
                if isinstance(item, pb.SessionOutput):
                    yield item
                    continue
                ticket, frames = item
                pending[ticket.chunk_index] = item
                while next_chunk in pending:
                    ticket, frames = pending.pop(next_chunk)
                    next_chunk += 1
                    yield self._video_chunk(ticket, frames)
                    if ticket.final:
                        ingress.store.update(session_id, state=SessionState.ENDED)
                        await ingress._release_workers(session_id)   # nothing can re-attach to an ENDED session
                        yield pb.SessionOutput(event=pb.Event(type=pb.Event.SESSION_ENDED, session_id=session_id,
                                                              message="all video delivered"))
                        return
        finally:
            reader.cancel()
            if ingress.streams.get(session_id) is self:
                ingress.streams.pop(session_id, None)

    def end(self, reason: str) -> None:
        """Stop this stream from outside: "closed" (CloseSession) or "taken_over" (a newer attach)."""
        self.stop_reason = reason
        self.stop.set()

    def _event(self, kind, message: str) -> pb.SessionOutput:
        return pb.SessionOutput(event=pb.Event(type=kind, session_id=self.session_id, message=message))

    async def _resume(self, resume_from_chunk: int, audio_state: dict) -> tuple[int, list[pb.SessionOutput]]:
        """Re-attach: resend what is buffered from `resume_from_chunk`, resubmit chunks cut but never submitted.
        Returns the first chunk index this stream will send, and WARNING events to send after ATTACHED."""
        ingress, session_id = self.ingress, self.session_id
        started = await ingress.score.progress.remote(session_id)
        first = min(resume_from_chunk, started)
        tickets = {ticket.chunk_index: ticket for ticket in await ingress.audio.recent.remote(session_id, first)}
        warnings = []
        if first < started:
            oldest = await ingress.decoder.oldest_buffered.remote(session_id)
            available = max(oldest if oldest is not None else first, min(tickets, default=started))
            if available > first:
                warnings.append(self._event(pb.Event.WARNING, f"chunks {first} to {available - 1} are no longer "
                                                              f"buffered and cannot be resent; resuming at chunk "
                                                              f"{available}"))
                first = available
        # Chunks the score group started but the decoder never received: the previous ingress died between
        # `generate` and `decode`. Hand the kept result over again (the decoder ignores a chunk it already has).
        lost = set(await ingress.decoder.never_received.remote(session_id, started)) if first < started else set()
        for index in range(first, started):
            response = (ingress.decoder.decode.remote(tickets[index].decode_request(),
                                                      ingress.score.scored.remote(session_id, index), self.carrier)
                        if index in lost else ingress.decoder.fetch.remote(session_id, index))
            self._spawn(index, tickets[index], response, counted=False)
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
        try:
            async for message in self.request_stream:
                kind = message.WhichOneof("input")
                if kind == "audio":
                    if self.input_ended:
                        raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                                       "audio after control.end_of_input: this session's input has ended; create a "
                                       "new session to continue speaking")
                    pcm, rate = validate_audio(message.audio, self.num_characters, self.sample_rate_hz,
                                               ingress.limits)
                    self.sample_rate_hz = rate
                    if self.first_audio_at is None:
                        self.first_audio_at = time.perf_counter()
                    character = int(message.audio.character)
                    tickets = await ingress.audio.push.remote(session_id, pcm, rate, character, self.carrier)
                    if character == 0:
                        self.samples_received += int(pcm.shape[0])
                    for ticket in tickets:
                        await self._submit(ticket)
                elif kind == "control":
                    speaking, end_of_input = validate_control(message.control, self.num_characters)
                    for character, value in speaking:
                        await ingress.audio.set_speaking.remote(session_id, character, value)
                    if end_of_input and not self.input_ended:
                        self.input_ended = True
                        for ticket in await ingress.audio.end.remote(session_id, self.carrier):
                            await self._submit(ticket)
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
        if self.error is None:
            self.error = error
        try:
            self.ingress.store.update(self.session_id, state=SessionState.FAILED)
        except Exception:
            logger.exception("could not mark session %s FAILED", self.session_id)

    async def _finish(self, wait: bool) -> None:
        if wait and self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
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
        scored = ingress.score.generate.remote(ticket.features, self.carrier)   # features resolved in the score group
        frames = ingress.decoder.decode.remote(ticket.decode_request(), scored, self.carrier)
        self._spawn(ticket.chunk_index, ticket, frames, counted=True)

    def _spawn(self, index: int, ticket: ChunkTicket, response, counted: bool) -> None:
        async def wait() -> None:
            try:
                await self.outputs.put((ticket, await response))
            except asyncio.CancelledError:
                raise
            except Exception as error:      # generation failed: the stream ends with INTERNAL and a correlation id
                self._failed(internal_error(self.session_id, f"generating chunk {index}", error))
                await self.outputs.put(_END)
            finally:
                if counted:
                    self.in_flight.release()
                    self.ingress.telemetry.chunks_in_flight.add(-1)

        task = asyncio.ensure_future(wait())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

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
        self.chunks_sent += 1
        self.frames_sent = ticket.first_frame + len(frames.frames_jpeg)
        ingress.store.record_progress(self.session_id, ticket.chunk_index + 1, self.frames_sent,
                                      self.samples_received)
        ingress.store.heartbeat(self.session_id, ingress.replica_id)
        return message
