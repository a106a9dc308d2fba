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
import redis
from ray import serve

from services.api import SERVICE_NAME, pb
from services.api.servicer import require_decodable
from services.api.validation import (ApiError, check_api_key, check_internal_key, check_token, new_token,
                                     require_session_id, session_to_proto, validate_create, validate_update)
from services.delivery.avatar import AvatarWorker, chunk_ready_points
from services.delivery.livekit_room import DeliveryError, LiveKitConnector
from services.serving.affinity import for_session, on_every_replica
from services.serving.conversation import ConversationCall
from services.serving.session_stream import LocalSessionLink, SessionStream, internal_error
from services.serving.settings import AppSettings
from services.store.sessions import SessionNotFound, SessionRecord, SessionState, connect_store
from services.telemetry import SESSION_SPAN, context_from_grpc_metadata, inject_context, setup_telemetry, span
from services.telemetry.ray_metrics import RayMetrics

logger = logging.getLogger("facecast.ingress")

AVATAR_SAMPLE_RATE_HZ = 16000
"""A voice agent's avatar session runs at this rate (the agent helper streams its speech at it; other rates are
resampled by the worker)."""
STOP_POLL_S = 0.25
"""How often an ingress replica looks whether Serve has begun stopping it."""

STORE_DOWN = ApiError(grpc.StatusCode.UNAVAILABLE, "the session store (Redis) is unreachable; sessions already "
                     "streaming go on; retry in a few seconds")
"""What a call that needs the session store gets while Redis is away."""


def _refusal(error: Exception) -> ApiError:
    """The status a unary RPC answers for a caller's error or an unreachable session store."""
    return STORE_DOWN if isinstance(error, redis.RedisError) else error


def _metadata(grpc_context) -> list[tuple[str, str]]:
    return list(grpc_context.invocation_metadata() or []) if grpc_context is not None else []


def _fail(grpc_context, error: ApiError) -> None:
    grpc_context.set_code(error.code)
    grpc_context.set_details(error.message)


class StreamAborted(Exception):
    """Raised after setting the gRPC status on a streaming call: Serve sends the status that was set (a status set
    without raising is dropped once a stream has started)."""


def serve_stopping_probe():
    """A callable that says whether Serve has begun stopping this replica, or None outside a Serve replica. Serve
    (Ray 2.60, pinned) has no public hook that runs before it waits for a replica's requests to end; its replica's
    `_shutting_down` flag is set at that moment (as the router's private hooks, checked by the tests on upgrade)."""
    try:
        from ray._private.worker import global_worker

        replica = global_worker.actors[global_worker.actor_id]._replica_impl
        bool(replica._shutting_down)
    except Exception:  # noqa: BLE001 - not in a replica, or another Ray: no early drain, Serve's own stop remains
        return None
    return lambda: bool(replica._shutting_down)


class SessionIngressServicer:
    """The gRPC servicer (and, over HTTP, the browser call page: `services.serving.call_page`). `audio`, `score`,
    `decoder`, `llm` are deployment handles (or, in unit tests, objects with
    the same `.method.remote(...)` surface); `store` overrides the Redis session store (tests)."""

    def __init__(self, settings: AppSettings, audio, score, decoder, llm, *, store=None, ray_metrics: bool = True):
        self.settings = settings
        self.audio, self.score, self.decoder, self.llm = audio, score, decoder, llm
        self.stream_defaults = settings.stream_defaults()
        self.decoders = settings.decoders()
        self.limits = settings.api_limits()
        self.api_keys = settings.effective_api_keys()
        self.livekit = settings.livekit_config()       # None: LiveKit delivery is off on this server
        self.conversation_modes = settings.conversation_modes()   # "realtime", "offline": what CreateSession allows
        self.room_connector = None                     # None: real LiveKit rooms (tests put a fake room here)
        self.avatars: dict[str, AvatarWorker] = {}     # voice agents' avatars hosted here, by session id
        self.avatar_agent_timeout_s = 30.0             # how long CreateSession waits for the agent to be in the room
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
        self.streams: dict[str, SessionStream] = {}   # session id -> the stream attached here
        self._sweeper: asyncio.Task | None = None
        self._stopping = serve_stopping_probe()       # None outside a Serve replica
        self._watcher: asyncio.Task | None = None
        self.store_down_since: float | None = None     # when a store write last failed (None: Redis answers)
        self.draining = False                          # shutting down: no new sessions or attaches here

    async def chunk_ready_points(self, record: SessionRecord, sample_rate_hz: int):
        """`pace`'s chunk_ready for this session's stream (its fps and chunk, the preset's timeline)."""
        stream = self.stream_defaults.replace(**record.options)
        dit = self.settings.preset_config.dit
        frontend_s = await self.audio.frontend_lookahead_s.remote(stream.fps)
        return chunk_ready_points(stream.fps, sample_rate_hz, stream.chunk_latent_frames, dit.temporal_compression,
                                  dit.audio_lookahead_latent_frames, frontend_s)

    def __serve_build_asgi_app__(self):
        """The browser call page and its calls (HTTP, Serve's proxy)."""
        from services.serving.call_page import build_call_app

        return build_call_app(self)

    # ------------------------------------------------------------------ helpers

    def _authorize(self, grpc_context) -> str | None:
        """The caller's API key name (None without keys); UNAUTHENTICATED for a call that bypassed the front door
        (when `facecast serve` runs one) or carries no valid key."""
        metadata = _metadata(grpc_context)
        if self.settings.internal_key_sha256:
            check_internal_key(metadata, self.settings.internal_key_sha256)
        return check_api_key(metadata, self.api_keys)

    def store_quietly(self, method: str, *args, **kwargs):
        """A store write a running stream makes (progress, heartbeat, state): with Redis away the stream goes on
        and the write is skipped (logged once per outage); the next one after Redis returns brings the record up to
        date. Returns the method's result, or None when skipped."""
        try:
            result = getattr(self.store, method)(*args, **kwargs)
        except redis.RedisError as error:
            if self.store_down_since is None:
                self.store_down_since = time.monotonic()
                logger.warning("the session store is unreachable (%s: %s); streams go on, their records are "
                               "updated when it returns", type(error).__name__, error)
            return None
        if self.store_down_since is not None:
            logger.warning("the session store is back after %.1f s", time.monotonic() - self.store_down_since)
            self.store_down_since = None
        return result

    async def drain(self, grace_s: float = 3.0) -> int:
        """This replica is about to stop: refuse new sessions and attaches (UNAVAILABLE, health NOT_SERVING), let
        each attached stream deliver its chunks in flight, then tell its client (DRAINING, then UNAVAILABLE) so it
        re-attaches elsewhere; sessions stay resumable. Returns how many streams were drained."""
        self.draining = True
        streams = [stream for stream in self.streams.values() if isinstance(stream, SessionStream)]
        await asyncio.gather(*(stream.drain(grace_s) for stream in streams), return_exceptions=True)
        logger.info("drained %d streams", len(streams))
        return len(streams)

    def _refuse_while_draining(self) -> None:
        if self.draining:
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "this server is shutting down (draining); retry on another "
                           "replica or after it restarts")

    def _record(self, session_id: str, token: str) -> SessionRecord:
        require_session_id(session_id)
        try:
            record = self.store.get(session_id)
        except SessionNotFound:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"session {session_id!r} does not exist or has expired")
        except redis.RedisError:
            raise STORE_DOWN from None
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
        if self._stopping is not None and self._watcher is None:
            self._watcher = asyncio.ensure_future(self._drain_when_stopped())

    async def _drain_when_stopped(self) -> None:
        """Serve stopping this replica (a redeploy, a scale-down, the pod going away) waits for its requests to end,
        and a stream does not end on its own: drain them (DRAINING, then UNAVAILABLE; the clients re-attach to
        another replica) as soon as the stop begins."""
        while not self._stopping():
            await asyncio.sleep(STOP_POLL_S)
        logger.warning("Serve is stopping this ingress replica: draining its streams")
        await self.drain()

    # ------------------------------------------------------------------ grpc.health.v1.Health

    async def Check(self, request, grpc_context=None):
        """Standard gRPC health: SERVING when the session store answers and every worker deployment responds.
        `service` may be "" (the whole server) or "facecast.v1.AvatarService"."""
        from grpc_health.v1 import health_pb2

        try:
            if self.settings.internal_key_sha256:   # health needs no API key (probes), but comes through the door
                check_internal_key(_metadata(grpc_context), self.settings.internal_key_sha256)
            require_decodable(request, "grpc.health.v1.HealthCheckRequest")
        except ApiError as error:
            _fail(grpc_context, error)
            return health_pb2.HealthCheckResponse()
        if request.service not in ("", SERVICE_NAME):
            _fail(grpc_context, ApiError(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}"))
            return health_pb2.HealthCheckResponse()
        healthy = not self.draining and self.store.ping()
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
            key_name = self._authorize(grpc_context)
            self._refuse_while_draining()
            require_decodable(request, "facecast.v1.CreateSessionRequest")
            spec = validate_create(request, self.stream_defaults, self.limits, preset=self.settings.preset_config,
                                   decoders=self.decoders, livekit=self.livekit is not None,
                                   conversation_modes=self.conversation_modes)
            if spec.stream.steps != self.settings.steps:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"options.steps={spec.stream.steps} is not served here: this cluster's score group "
                               f"runs {self.settings.steps} steps (send 0 for the default)")
            session_id, (token, token_hash) = uuid.uuid4().hex, new_token()
            per_key = self.settings.max_sessions_per_key
            admitted = (self.store.try_admit_in_group(session_id, self.settings.max_sessions, key_name, per_key)
                        if per_key and key_name else int(self.store.try_admit(session_id, self.settings.max_sessions)))
            if admitted != 1:
                reason = "admission_limit" if admitted == 0 else "key_limit"
                self.telemetry.sessions_rejected.add(1, {"reason": reason})
                if self.ray_metrics:
                    self.ray_metrics.sessions_rejected.inc()
                raise ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the cluster is at its limit of {self.settings.max_sessions} active sessions; "
                               "retry later" if admitted == 0 else f"API key {key_name!r} holds its limit of "
                               f"{per_key} active sessions; close one or retry later")
            now = time.time()
            record = SessionRecord(
                session_id=session_id, token_sha256=token_hash, owner=spec.owner,
                options={name: getattr(spec.stream, name) for name in
                         ("fps", "width", "height", "steps", "chunk_latent_frames", "seed", "decoder",
                          "listening_hold")},
                characters=[list(region) for region in spec.characters], prompt=spec.prompt,
                state=SessionState.CREATED, created_at=now, updated_at=now, heartbeat_at=now, delivery=spec.delivery,
                conversation=spec.conversation or {})
            self.store.create(record)   # before the workers open, so a sweep never frees a session being opened
            try:
                await self._open_workers(session_id, spec, request.reference_image)
                if spec.delivery.get("agent_identity"):
                    await self._start_avatar(record)
            except BaseException:
                self.store.close(session_id)
                self.store.release(session_id)
                await self._release_workers(session_id)
                raise
            self.telemetry.sessions_active.add(1)
            if self.ray_metrics:
                self.ray_metrics.session_delta(1)
            return self._session_proto(record, token)
        except (ApiError, redis.RedisError) as error:
            _fail(grpc_context, _refusal(error))
            return pb.Session()
        except Exception as error:
            _fail(grpc_context, internal_error(session_id, "opening the session", error))
            return pb.Session()

    def workers(self, session_id: str) -> tuple:
        """The (audio, score, decoder) handles whose calls reach the replicas holding `session_id`
        (`services.serving.affinity`)."""
        return tuple(for_session(handle, session_id) for handle in (self.audio, self.score, self.decoder))

    async def _open_workers(self, session_id: str, spec, image_bytes: bytes) -> None:
        stream = spec.stream
        audio, score, decoder = self.workers(session_id)
        latent = decoder.encode_reference.remote(image_bytes, stream.width, stream.height)  # resolved in score
        regions = [tuple(region) for region in spec.characters]
        await asyncio.gather(score.open.remote(session_id, stream, latent, spec.prompt, regions),
                             audio.open.remote(session_id, stream, max(1, len(regions))),
                             decoder.open_decode.remote(session_id, stream.decoder))

    async def _start_avatar(self, record: SessionRecord) -> None:
        """A voice agent's avatar: join its room now and drive the session from the agent's speech there
        (`services.delivery.avatar`); the session closes when the agent leaves. UNAVAILABLE naming the URL when the
        LiveKit server does not answer."""
        delivery, options = record.delivery, record.options
        link = LocalSessionLink(self, record, inject_context())
        worker = AvatarWorker(self.livekit, self.room_connector or LiveKitConnector(), delivery["room"],
                              delivery["identity"] or f"facecast-avatar-{record.session_id[:8]}",
                              delivery["agent_identity"], link, sample_rate=AVATAR_SAMPLE_RATE_HZ,
                              fps=options["fps"], width=options["width"], height=options["height"],
                              agent_timeout_s=self.avatar_agent_timeout_s,
                              chunk_ready=await self.chunk_ready_points(record, AVATAR_SAMPLE_RATE_HZ))
        try:
            await worker.start()
        except DeliveryError as error:
            await worker.aclose()
            raise ApiError(grpc.StatusCode.UNAVAILABLE, str(error)) from None
        self.avatars[record.session_id] = worker

        async def run() -> None:
            await worker.done.wait()
            await worker.aclose()
            if self.avatars.pop(record.session_id, None) is worker:
                await self._close(record.session_id)

        asyncio.ensure_future(run())

    async def _release_workers(self, session_id: str) -> None:
        """Free the session's state on every worker (KV caches, decode cache, replay buffer, audio state): on every
        replica, where a session that moved may have left a copy."""
        await asyncio.gather(on_every_replica(self.audio, "close", session_id),
                             on_every_replica(self.score, "close", session_id),
                             on_every_replica(self.decoder, "close_decode", session_id),
                             self.llm.close.remote(session_id), return_exceptions=True)

    async def GetSession(self, request, grpc_context=None):
        try:
            self._authorize(grpc_context)
            require_decodable(request, "facecast.v1.GetSessionRequest")
            return self._session_proto(self._record(request.session_id, request.session_token))
        except (ApiError, redis.RedisError) as error:
            _fail(grpc_context, _refusal(error))
            return pb.Session()

    async def UpdateSession(self, request, grpc_context=None):
        try:
            self._authorize(grpc_context)
            require_decodable(request, "facecast.v1.UpdateSessionRequest")
            record = self._record(request.session_id, request.session_token)
            spec = validate_update(request, max(1, len(record.characters)), self.limits)
            if record.state in (SessionState.ENDED, SessionState.FAILED):
                raise ApiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"session {record.session_id!r} is {record.state.value}: updates apply only to "
                               "sessions that are CREATED or STREAMING")
            if spec.speaking and record.conversation:
                raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, "speaking: in a conversation session the turns "
                               "decide who speaks (conversation.reply_characters at CreateSession)")
            changes = {}
            try:
                if spec.prompt is not None and spec.prompt != record.prompt:
                    await for_session(self.score, record.session_id).set_prompt.remote(record.session_id,
                                                                                       spec.prompt)
                    changes["prompt"] = spec.prompt
                for character, speaking in spec.speaking:
                    await for_session(self.audio, record.session_id).set_speaking.remote(record.session_id,
                                                                                         character, speaking)
            except Exception as error:
                raise internal_error(record.session_id, "updating the session", error) from None
            return self._session_proto(self.store.update(record.session_id, **changes))
        except (ApiError, redis.RedisError) as error:
            _fail(grpc_context, _refusal(error))
            return pb.Session()

    async def CloseSession(self, request, grpc_context=None):
        try:
            self._authorize(grpc_context)
            require_decodable(request, "facecast.v1.CloseSessionRequest")
            record = self._record(request.session_id, request.session_token)
            await self._close(record.session_id)
            return self._session_proto(self.store.get(record.session_id))
        except (ApiError, redis.RedisError) as error:
            _fail(grpc_context, _refusal(error))
            return pb.Session()

    async def _close(self, session_id: str) -> None:
        avatar = self.avatars.pop(session_id, None)
        if avatar is not None:
            await avatar.aclose()
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
        """Heartbeat the streams attached here; close every session that is idle (no stream attached anywhere for
        `session_idle_timeout_s`: its last heartbeat and last write are older); free worker state of every session
        whose record has expired, or that ended, failed or was closed, and that no stream here is delivering.
        Returns the ids freed or closed."""
        for session_id in list(self.streams):
            self.store_quietly("heartbeat", session_id, self.replica_id)
        held = await asyncio.gather(*(on_every_replica(handle, "session_ids")
                                      for handle in (self.audio, self.score, self.decoder)), return_exceptions=True)
        ids = set(self.store.admitted_ids())
        for results in held:
            for result in () if isinstance(results, BaseException) else results:
                if not isinstance(result, BaseException):
                    ids.update(result)
        freed, now = [], time.time()
        for session_id in sorted(ids):
            if session_id in self.streams or session_id in self.avatars:
                continue
            try:
                record = self.store.get(session_id)
            except SessionNotFound:
                record = None
            if record is None or record.state in (SessionState.ENDED, SessionState.FAILED, SessionState.CLOSED):
                self.store.release(session_id)
                await self._release_workers(session_id)
                freed.append(session_id)
            elif now - max(record.heartbeat_at, record.updated_at) > self.settings.session_idle_timeout_s:
                logger.info("closing session %s: no stream and no input for %.0f s", session_id,
                            now - max(record.heartbeat_at, record.updated_at))
                await self._close(session_id)
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
            self._authorize(grpc_context)
            try:
                first = await request_stream.__anext__()
            except StopAsyncIteration:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "the stream ended before attach{session_id, "
                                                                 "session_token}")
            self._refuse_while_draining()
            require_decodable(first, "facecast.v1.SessionInput")
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
            stream = (ConversationCall(self, record, session_carrier, request_stream) if record.conversation
                      else SessionStream(self, record, session_carrier, request_stream))
            try:
                async for message in stream.run(first.attach.resume_from_chunk):
                    yield message
            except Exception as error:   # a worker call failed while attaching: no Ray internals to the client
                stream._failed(internal_error(session_id, "attaching", error))
            session_span.set_attribute("chunks", stream.chunks_sent)
        if stream.error is not None:
            _fail(grpc_context, stream.error)
            raise StreamAborted(stream.error.message)


SessionIngress = serve.deployment(name="SessionIngress", max_ongoing_requests=1000)(
    serve.ingress()(SessionIngressServicer))
"""The deployment: gRPC through Serve's gRPC proxy, the call page through its HTTP proxy (the ASGI app is built per
replica, after __init__, by `__serve_build_asgi_app__`)."""
