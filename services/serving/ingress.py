"""`SessionIngress`: the gRPC `facecast.v1.AvatarService` as a Ray Serve deployment.

A session's lifecycle through the ingress:

    1. CreateSession   validate (INVALID_ARGUMENT names the field) -> admission (RESOURCE_EXHAUSTED) ->
                       VAEDecoder.encode_reference -> open on ScoreWorkerGroup, AudioEncoder, VAEDecoder ->
                       Redis record (token stored as its SHA-256) -> Session{session_id, session_token}
    2. StreamSession   attach {session_id, session_token} (NOT_FOUND / PERMISSION_DENIED) -> ATTACHED event ->
                       [re-attach: resend buffered chunks from resume_from_chunk, resubmit chunks a dead ingress
                       cut but never submitted] -> for every audio message: AudioEncoder.push -> every ready chunk
                       -> ScoreWorkerGroup.generate (which hands latents to the VAEDecoder itself) -> video_chunk,
                       at most `max_chunks_in_flight` chunks per session at once (backpressure: input is not read
                       while the pipeline is full) -> end_of_input flushes -> SESSION_ENDED
    3. Update/Get/CloseSession

Session records live in Redis, model state on the worker deployments, so an ingress replica can die and a client
re-attach to another replica and continue.  Every failure a caller can cause has its gRPC status; nothing a caller
sends can break another session.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
from ray import serve

from model_core.config import get_preset
from model_core.engine import Character
from services.api import SERVICE_NAME, pb
from services.api.validation import (ApiError, ApiLimits, check_api_key, check_token, new_token, require_session_id,
                                     session_to_proto, validate_audio, validate_control, validate_create,
                                     validate_update)
from services.media import image_to_tensor
from services.store.sessions import SessionNotFound, SessionRecord, SessionState, connect_store
from services.serving.settings import AppSettings
from services.telemetry import (CHUNK_SPAN, EGRESS_SPAN, SESSION_SPAN, context_from_grpc_metadata, inject_context,
                                setup_telemetry, span)
from services.serving.workers import DecodedChunk

_END = object()


class RayMetrics:
    """The SRE-facing metrics mirrored into Ray's metrics (Prometheus on every node's metrics agent), next to Serve's
    own `serve_*` series; the OpenTelemetry instruments carry the same values to the OTLP collector."""

    def __init__(self) -> None:
        from ray.util import metrics

        bounds = [0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4]
        self.ttff = metrics.Histogram("facecast_session_ttff_seconds", "first audio in to first video chunk out",
                                      boundaries=bounds)
        self.chunk_interval = metrics.Histogram("facecast_chunk_interval_seconds", "time between chunks",
                                                boundaries=bounds)
        self.sessions_active = metrics.Gauge("facecast_sessions_active", "sessions open on this ingress replica")
        self.sessions_rejected = metrics.Counter("facecast_sessions_rejected_total", "sessions refused by admission")
        self.active = 0

    def session_delta(self, delta: int) -> None:
        self.active += delta
        self.sessions_active.set(self.active)


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
    def __init__(self, settings: AppSettings, audio, score, vae, llm):
        self.settings = settings
        self.audio, self.score, self.vae, self.llm = audio, score, vae, llm
        # Who keeps the decoded chunks for re-attach: the VAEDecoder, or the score worker when it decodes itself.
        self.decoded = score if settings.vae_placement == "colocated" else vae
        self.preset = get_preset(settings.preset)
        self.stream_defaults = settings.stream_defaults()
        self.limits = ApiLimits()
        self.api_keys = settings.effective_api_keys()
        self.store, self._local_redis = connect_store(settings.effective_redis_url())
        self.telemetry = setup_telemetry("facecast-ingress")
        self.ray_metrics = RayMetrics()
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (unit tests)
            self.replica_id = uuid.uuid4().hex[:8]
        self.streams: dict[str, "_SessionStream"] = {}   # session id -> the stream attached here

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
                await asyncio.wait_for(asyncio.gather(self.vae.placement.remote(), self.llm.status.remote()), 10)
            except Exception:
                healthy = False
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    # ------------------------------------------------------------------ unary RPCs

    async def CreateSession(self, request, grpc_context=None):
        try:
            check_api_key(_metadata(grpc_context), self.api_keys)
            spec = validate_create(request, self.stream_defaults, self.limits, preset=self.preset)
            if spec.stream.steps != self.settings.steps:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"options.steps={spec.stream.steps} is not served here: this cluster's score group "
                               f"runs {self.settings.steps} steps (send 0 for the default)")
            session_id, (token, token_hash) = uuid.uuid4().hex, new_token()
            if not self.store.try_admit(session_id, self.settings.max_sessions):
                self.telemetry.sessions_rejected.add(1, {"reason": "admission_limit"})
                self.ray_metrics.sessions_rejected.inc()
                raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the cluster is at its limit of {self.settings.max_sessions} active sessions; "
                               "retry later")
            try:
                await self._open_workers(session_id, spec)
                now = time.time()
                record = SessionRecord(
                    session_id=session_id, token_sha256=token_hash, owner=spec.owner,
                    options={name: getattr(spec.stream, name) for name in
                             ("fps", "width", "height", "steps", "chunk_latent_frames", "seed")},
                    characters=[list(region) for region in spec.characters], prompt=spec.prompt,
                    state=SessionState.CREATED, created_at=now, updated_at=now, heartbeat_at=now)
                self.store.create(record)
            except BaseException:
                self.store.release(session_id)
                raise
            self.telemetry.sessions_active.add(1)
            self.ray_metrics.session_delta(1)
            return self._session_proto(record, token)
        except ApiError as error:
            _fail(grpc_context, error)
            return pb.Session()

    async def _open_workers(self, session_id: str, spec) -> None:
        stream = spec.stream
        image = image_to_tensor(spec.image, stream.width, stream.height)
        latent = await self.vae.encode_reference.remote(image)
        characters = [Character(tuple(region)) for region in spec.characters] or [Character()]
        await asyncio.gather(self.score.open.remote(session_id, stream, latent, spec.prompt, characters),
                             self.audio.open.remote(session_id, stream, len(characters)),
                             self.vae.open.remote(session_id))

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
            changes = {}
            if spec.prompt is not None and spec.prompt != record.prompt:
                await self.score.set_prompt.remote(record.session_id, spec.prompt)
                changes["prompt"] = spec.prompt
            for character, speaking in spec.speaking:
                await self.audio.set_speaking.remote(record.session_id, character, speaking)
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
        self.ray_metrics.session_delta(-1)
        await asyncio.gather(self.audio.close.remote(session_id), self.score.close.remote(session_id),
                             self.vae.close.remote(session_id), return_exceptions=True)

    # ------------------------------------------------------------------ StreamSession

    async def StreamSession(self, request_stream, grpc_context=None):
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
        except ApiError as error:
            _fail(grpc_context, error)
            raise StreamAborted(error.message) from None
        parent = context_from_grpc_metadata(_metadata(grpc_context))
        session_id = record.session_id
        with span(SESSION_SPAN, inject_context(parent), **{"session.id": session_id,
                                                           "preset": self.settings.preset}) as session_span:
            session_carrier = inject_context()
            stream = _SessionStream(self, record, session_carrier, request_stream)
            async for message in stream.run(first.attach.resume_from_chunk):
                yield message
            session_span.set_attribute("chunks", stream.chunks_sent)
        if stream.error is not None:
            _fail(grpc_context, stream.error)
            raise StreamAborted(stream.error.message)


class _SessionStream:
    """One attached StreamSession: reads input, keeps <= max_chunks_in_flight chunks generating, yields output."""

    def __init__(self, ingress: SessionIngress, record: SessionRecord, carrier: dict, request_stream):
        self.ingress, self.record, self.carrier = ingress, record, carrier
        self.session_id = record.session_id
        self.request_stream = request_stream
        self.num_characters = max(1, len(record.characters))
        self.in_flight = asyncio.Semaphore(ingress.settings.max_chunks_in_flight)
        self.outputs: asyncio.Queue = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()
        self.error: ApiError | None = None
        self.chunks_sent = 0
        self.sample_rate_hz: int | None = None
        self.stop = asyncio.Event()
        self.stop_reason = ""
        self.attached_at = time.perf_counter()
        self.last_sent_at: float | None = None
        self.first_audio_at: float | None = None
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
        next_chunk = await self._resume(resume_from_chunk, audio_state)
        ingress.store.update(session_id, state=SessionState.STREAMING, attached_by=ingress.replica_id)
        yield pb.SessionOutput(event=pb.Event(type=pb.Event.ATTACHED, session_id=session_id,
                                              audio_samples_received=audio_state["samples_received"],
                                              next_chunk_index=next_chunk))
        reader = asyncio.ensure_future(self._read())
        pending: dict[int, DecodedChunk] = {}
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
                pending[item.chunk_index] = item
                while next_chunk in pending:
                    decoded = pending.pop(next_chunk)
                    next_chunk += 1
                    yield self._video_chunk(decoded)
                    if decoded.final:
                        ingress.store.update(session_id, state=SessionState.ENDED)
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

    async def _resume(self, resume_from_chunk: int, audio_state: dict) -> int:
        """Re-attach: send what is buffered from `resume_from_chunk`, resubmit chunks cut but never submitted."""
        ingress, session_id = self.ingress, self.session_id
        started = await ingress.score.progress.remote(session_id)
        cut = audio_state["chunk_index"]
        first = min(resume_from_chunk, started)
        for index in range(first, started):
            self._spawn(ingress.decoded.fetch.remote(session_id, index), counted=False)
        pending = await ingress.audio.pending.remote(session_id, started)
        if cut > started and not pending:
            self.error = ApiError(grpc.StatusCode.DATA_LOSS, "chunks were lost across the re-attach")
        for item in pending:
            await self._submit(item)
        return first

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
                    pcm, rate = validate_audio(message.audio, self.num_characters, self.sample_rate_hz,
                                               ingress.limits)
                    self.sample_rate_hz = rate
                    if self.first_audio_at is None:
                        self.first_audio_at = time.perf_counter()
                    inputs = await ingress.audio.push.remote(session_id, pcm, rate, int(message.audio.character),
                                                             self.carrier)
                    if int(message.audio.character) == 0:
                        self.samples_received += int(pcm.shape[0])
                    for item in inputs:
                        await self._submit(item)
                elif kind == "control":
                    speaking, end_of_input = validate_control(message.control, self.num_characters)
                    for character, value in speaking:
                        await ingress.audio.set_speaking.remote(session_id, character, value)
                    if end_of_input:
                        for item in await ingress.audio.end.remote(session_id, self.carrier):
                            await self._submit(item)
                        await self.outputs.put(pb.SessionOutput(event=pb.Event(
                            type=pb.Event.INPUT_ENDED, session_id=session_id, message="flushing remaining video")))
                else:
                    raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "attach may only be the first message")
            await self._finish(wait=True)    # the client closed its side: deliver what is in flight, then end
        except ApiError as error:
            self.error = error
            await self._finish(wait=False)
        except asyncio.CancelledError:
            raise
        except Exception as error:          # a worker failed: end this stream loudly, other sessions go on
            self.error = ApiError(grpc.StatusCode.INTERNAL, f"session {self.session_id}: {type(error).__name__}: "
                                                            f"{error}")
            await self._finish(wait=False)

    async def _finish(self, wait: bool) -> None:
        if wait and self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        await self.outputs.put(_END)

    async def _submit(self, item) -> None:
        await self.in_flight.acquire()   # backpressure: stop reading input while the pipeline is full
        self.ingress.telemetry.chunks_in_flight.add(1)
        self._spawn(self.ingress.score.generate.remote(item, self.carrier), counted=True)

    def _spawn(self, response, counted: bool) -> None:
        async def wait() -> None:
            try:
                await self.outputs.put(await response)
            except asyncio.CancelledError:
                raise
            except Exception as error:      # generation failed: the stream ends with INTERNAL naming the cause
                self.error = ApiError(grpc.StatusCode.INTERNAL, f"chunk generation failed for session "
                                                                f"{self.session_id}: {type(error).__name__}: {error}")
                await self.outputs.put(_END)
            finally:
                if counted:
                    self.in_flight.release()
                    self.ingress.telemetry.chunks_in_flight.add(-1)

        task = asyncio.ensure_future(wait())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _video_chunk(self, decoded: DecodedChunk) -> pb.SessionOutput:
        ingress, telemetry = self.ingress, self.ingress.telemetry
        now = time.perf_counter()
        ttbc_s = now - (self.last_sent_at or self.attached_at)
        with span(CHUNK_SPAN, self.carrier, **{"session.id": self.session_id, "chunk.index": decoded.chunk_index}):
            with span(EGRESS_SPAN, None, **{"session.id": self.session_id, "chunk.index": decoded.chunk_index,
                                            "frames": len(decoded.frames_jpeg)}):
                message = pb.SessionOutput(video_chunk=pb.VideoChunk(
                    chunk_index=decoded.chunk_index, pts_ms=round(decoded.first_frame * 1000 / decoded.fps),
                    width=decoded.width, height=decoded.height, frames=decoded.frames_jpeg,
                    audio_pcm_s16le=decoded.audio_pcm_s16le, sample_rate_hz=decoded.sample_rate_hz,
                    fps=decoded.fps, final=decoded.final, first_frame=decoded.first_frame,
                    stats=pb.ChunkStats(ttbc_ms=ttbc_s * 1000, stage_ms=decoded.stage_ms,
                                        chunks_in_flight=len(self.tasks))))
        if self.chunks_sent == 0 and self.first_audio_at is not None:
            telemetry.ttff.record(now - self.first_audio_at)
            ingress.ray_metrics.ttff.observe(now - self.first_audio_at)
        elif self.chunks_sent:
            telemetry.chunk_interval.record(ttbc_s)
            ingress.ray_metrics.chunk_interval.observe(ttbc_s)
        for stage, value_ms in decoded.stage_ms.items():
            telemetry.stage_duration.record(value_ms / 1000, {"stage": stage})
        chunk_s = len(decoded.frames_jpeg) / decoded.fps if decoded.frames_jpeg else 0.0
        if chunk_s:
            telemetry.realtime_factor.record(decoded.stage_ms.get("score", 0) / 1000 / chunk_s)
            telemetry.fps.record(len(decoded.frames_jpeg) / max(ttbc_s, 1e-6))
        self.last_sent_at = now
        self.chunks_sent += 1
        self.frames_sent = decoded.first_frame + len(decoded.frames_jpeg)
        ingress.store.record_progress(self.session_id, decoded.chunk_index + 1, self.frames_sent,
                                      self.samples_received)
        ingress.store.heartbeat(self.session_id, ingress.replica_id)
        return message

