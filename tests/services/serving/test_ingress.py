"""The ingress and the real worker classes in one asyncio loop, no Ray: a recording transport stands in for Serve's
handles (tests/services/serving/recording_transport.py), a real Redis holds the records.

Held here: the one-way data path (the hop test), frames equal to the in-process engine's, freeing worker state when
a session ends or its record expires, the events the proto promises (BACKPRESSURE, WARNING, FAILED), audio after
end_of_input as a caller error, and INTERNAL without internals.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys

import grpc
import numpy as np
import pytest

from model_core.engine import AvatarEngine
from services.api import pb
from services.serving import audio_encoder as audio_encoder_module
from services.serving import vae_decoder as vae_decoder_module
from services.media import decode_image_bytes, image_to_tensor
from services.serving.audio_encoder import AudioEncoder
from services.serving.ingress import SessionIngressServicer, StreamAborted
from services.serving.llm_bridge import LLMBridge
from services.serving.messages import ChunkFeatures, ChunkTicket, DecodedFrames, ScoredChunk
from model_core.stages import ScoreStage
from services.serving.score_group import ScoreWorkerGroup, build_score_stage
from services.serving.settings import AppSettings
from services.serving.vae_decoder import VAEDecoder, encode_jpeg
from services.store.sessions import SessionState, connect_store
from tests.model_core.helpers import speech

from .helpers import engine_jpegs, pcm16, png
from .recording_transport import GrpcContext, Ref, Transport


@pytest.fixture(scope="module")
def redis_url():
    store, owner = connect_store(None)
    yield owner.url
    owner.close()


@pytest.fixture
def store(redis_url):
    return connect_store(redis_url)[0]


class Cluster:
    """The real worker classes behind recording handles, and an ingress over them."""

    def __init__(self, store, score_stage=None, **args):
        self.settings = AppSettings.from_args({"preset": "tiny", "redis_url": _url(store), **args})
        self.transport = Transport()
        self.audio = AudioEncoder.func_or_class(self.settings, put=self.transport.put)
        self.score = ScoreWorkerGroup.func_or_class(self.settings, score_stage)
        self.decoder = VAEDecoder.func_or_class(self.settings)
        self.llm = LLMBridge.func_or_class(self.settings)
        self.ingress = self.replica()

    def replica(self) -> SessionIngressServicer:
        """An ingress replica over the same workers and store (the first is `self.ingress`)."""
        return SessionIngressServicer(
            self.settings, self.transport.handle("AudioEncoder", self.audio),
            self.transport.handle("ScoreWorkerGroup", self.score), self.transport.handle("VAEDecoder", self.decoder),
            self.transport.handle("LLMBridge", self.llm), ray_metrics=False)

    async def create(self, image: bytes):
        context = GrpcContext()
        session = await self.ingress.CreateSession(pb.CreateSessionRequest(reference_image=image), context)
        assert context.code is None, context.details
        return session

    async def stream(self, session, messages, resume_from_chunk: int = 0):
        """Run one StreamSession; returns (outputs, gRPC context)."""
        async def requests():
            yield pb.SessionInput(attach=pb.Attach(session_id=session.session_id,
                                                   session_token=session.session_token,
                                                   resume_from_chunk=resume_from_chunk))
            if hasattr(messages, "__aiter__"):   # a scripted caller that takes its time
                async for message in messages:
                    yield message
                return
            for message in messages:
                yield message
                await asyncio.sleep(0)

        context, outputs = GrpcContext(), []
        try:
            async for output in self.ingress.StreamSession(requests(), context):
                outputs.append(output)
        except StreamAborted:
            pass
        return outputs, context

    def held(self) -> dict[str, int]:
        return {"audio": len(self.audio.session_ids()), "score": len(self.score.session_ids()),
                "decoder": len(self.decoder.session_ids()), "score_bytes": self.score.held_bytes(),
                "decoder_bytes": self.decoder.held_bytes(), "audio_bytes": self.audio.held_bytes()}


LIVEKIT_ARGS = {"livekit_url": "ws://livekit.test:7880", "livekit_api_key": "devkey",
                "livekit_api_secret": "a-secret-of-at-least-32-characters-long"}


def livekit_cluster(store, connector=None, **args) -> Cluster:
    """A cluster whose server has LiveKit configured; `connector` (a fake room's) stands in for real rooms."""
    cluster = Cluster(store, **LIVEKIT_ARGS, **args)
    cluster.ingress.room_connector = connector
    return cluster


def _url(store) -> str:
    kwargs = store.client.connection_pool.connection_kwargs
    auth = f":{kwargs['password']}@" if kwargs.get("password") else ""
    return f"redis://{auth}{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def audio_messages(pcm: np.ndarray, end: bool = True, rate: int = 16000, character: int = 0):
    piece = rate // 25
    messages = [pb.SessionInput(audio=pb.AudioInput(pcm_s16le=pcm[start:start + piece].astype("<i2").tobytes(),
                                                    sample_rate_hz=rate, channels=1, character=character))
                for start in range(0, pcm.shape[0], piece)]
    if end:
        messages.append(pb.SessionInput(control=pb.Control(end_of_input=True)))
    return messages


def chunks_of(outputs) -> list:
    return [output.video_chunk for output in outputs if output.WhichOneof("output") == "video_chunk"]


def events_of(outputs) -> list:
    return [output.event for output in outputs if output.WhichOneof("output") == "event"]


def _carries_pcm_or_frames(value) -> bool:
    if isinstance(value, (bytes, bytearray, np.ndarray, ChunkTicket, DecodedFrames)):
        return True
    return any(hasattr(value, name) for name in ("audio_pcm", "audio_pcm_s16le", "frames_jpeg"))


def test_the_data_path_flows_one_way_and_streams_the_engines_frames(store):
    async def main():
        cluster = Cluster(store)
        image, pcm = png(1), pcm16(speech(1.5, seed=21))
        session = await cluster.create(image)
        outputs, context = await cluster.stream(session, audio_messages(pcm))
        return cluster, image, pcm, outputs, context

    cluster, image, pcm, outputs, context = asyncio.run(main())
    assert context.code is None, context.details
    chunks = chunks_of(outputs)
    assert chunks and chunks[-1].final
    engine = AvatarEngine.from_preset("tiny", seed=0)
    assert [jpeg for chunk in chunks for jpeg in chunk.frames] == engine_jpegs(engine, image, pcm)
    calls = cluster.transport

    # 1. the score replica never receives PCM (or tickets, or frames) and never returns frames
    score_calls = calls.to("ScoreWorkerGroup")
    assert {call.method for call in score_calls} >= {"open", "generate"}
    for call in score_calls:
        assert not any(_carries_pcm_or_frames(value) for value in call.values), (call.method, call.values)
        assert not _carries_pcm_or_frames(call.result), call.method
    generates = calls.to("ScoreWorkerGroup", "generate")
    assert len(generates) == len(chunks)
    assert all(isinstance(call.values[0], ChunkFeatures) and isinstance(call.result, ScoredChunk)
               for call in generates)

    # 2. features, latents and the reference latent are handed on unresolved: resolved by the next deployment only
    for call in generates:
        assert isinstance(call.args[0], Ref) and call.args[0].resolved_by == ["ScoreWorkerGroup"], call.args
    handed_on = {("ScoreWorkerGroup", "generate"): "VAEDecoder", ("VAEDecoder", "encode_reference"): "ScoreWorkerGroup"}
    for (deployment, method), consumer in handed_on.items():
        for call in calls.to(deployment, method):
            assert not call.response.awaited_by_caller, f"{deployment}.{method} was resolved by the ingress"
            assert call.response.resolved_by == [consumer], (deployment, method, call.response.resolved_by)

    # 3. frames come back from the decoder; the chunk's audio went from the AudioEncoder to the ingress only
    decodes = calls.to("VAEDecoder", "decode")
    assert len(decodes) == len(chunks)
    assert all(call.response.awaited_by_caller and isinstance(call.result, DecodedFrames) for call in decodes)
    tickets = [ticket for call in calls.to("AudioEncoder", "push") + calls.to("AudioEncoder", "end")
               for ticket in call.result]
    assert [chunk.audio_pcm_s16le for chunk in chunks] == [ticket.audio_pcm_s16le for ticket in tickets]
    assert b"".join(chunk.audio_pcm_s16le for chunk in chunks) == pcm.astype("<i2").tobytes()


def test_the_ingress_module_imports_neither_torch_nor_diffusers():
    code = ("import sys, services.serving.ingress; "
            "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_worker_state_is_freed_when_a_session_ends_and_when_its_record_expires(store):
    async def main():
        cluster = Cluster(store, session_ttl_s=1.0, session_sweep_s=3600, session_idle_timeout_s=7200)
        empty = cluster.held()
        ended = await cluster.create(png(2))
        outputs, _ = await cluster.stream(ended, audio_messages(pcm16(speech(1.0, seed=3))))
        after_end = cluster.held()
        idle = await cluster.create(png(3))
        while_open = cluster.held()
        await asyncio.sleep(1.6)    # the idle session's record expires in Redis
        freed = await cluster.ingress.sweep()
        return empty, outputs, after_end, idle, while_open, freed, cluster.held()

    empty, outputs, after_end, idle, while_open, freed, after_sweep = asyncio.run(main())
    assert events_of(outputs)[-1].type == pb.Event.SESSION_ENDED
    assert empty == {key: 0 for key in empty}
    assert after_end == empty, after_end                 # everything the ended session held is gone
    assert while_open["score"] == 1 and while_open["score_bytes"] > 0 and while_open["decoder"] == 1
    assert freed == [idle.session_id]
    assert after_sweep == empty, after_sweep


def test_a_dropped_stream_is_closed_when_idle_freeing_its_slot_and_worker_memory_while_a_quiet_call_stays(store):
    """A client streams half its audio and vanishes (no end_of_input, no CloseSession); another is attached but
    silent. After the idle timeout the sweep closes the first — its worker state gone on every deployment, its
    admission slot free for a new session — and keeps the second: the replica it is attached to heartbeats it, so
    another replica's sweep, which cannot see the stream, keeps it too."""
    async def main():
        for leftover in store.admitted_ids():   # earlier tests' sessions must not take this test's two slots
            store.release(leftover)
        cluster = Cluster(store, max_sessions=2, session_sweep_s=0.5, session_idle_timeout_s=1.5)
        empty = cluster.held()
        dropped, quiet = await cluster.create(png(4)), await cluster.create(png(5))
        await cluster.stream(dropped, audio_messages(pcm16(speech(1.0, seed=5)), end=False))

        async def silent():
            await asyncio.sleep(4.0)
            yield pb.SessionInput(control=pb.Control(end_of_input=True))

        quiet_call = asyncio.ensure_future(cluster.stream(quiet, silent()))
        await asyncio.sleep(0.3)
        both_held, full = cluster.held(), await _create_status(cluster)
        await asyncio.sleep(2.5)          # past the idle timeout; the sweeper runs every 0.5 s
        await cluster.replica().sweep()
        after = cluster.held()
        records = {name: store.get(session.session_id).state for name, session in
                   (("dropped", dropped), ("quiet", quiet))}
        admitted = await _create_status(cluster)
        await quiet_call
        return empty, both_held, full, after, records, admitted

    empty, both_held, full, after, records, admitted = asyncio.run(main())
    assert both_held["score"] == 2 and both_held["decoder"] == 2 and both_held["audio"] == 2
    assert full == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert records == {"dropped": SessionState.CLOSED, "quiet": SessionState.STREAMING}
    assert after["score"] == after["decoder"] == after["audio"] == 1
    for kind in ("score_bytes", "decoder_bytes", "audio_bytes"):   # the dropped session's memory came back
        assert after[kind] < both_held[kind], kind
    assert admitted is None, admitted


async def _create_status(cluster):
    context = GrpcContext()
    await cluster.ingress.CreateSession(pb.CreateSessionRequest(reference_image=png(6)), context)
    return context.code


def test_a_batch_member_whose_session_closed_fails_alone():
    async def main():
        settings = AppSettings.from_args({"preset": "tiny", "max_batch_size": 4})
        decoder = VAEDecoder.func_or_class(settings)
        alone = VAEDecoder.func_or_class(dataclasses.replace(settings, max_batch_size=1))
        latents = {name: torch_randn(seed) for seed, name in enumerate(("closing", "healthy"))}
        for name in latents:
            decoder.open_decode(name)
        alone.open_decode("healthy")
        from services.serving.messages import DecodeRequest

        tasks = {name: asyncio.ensure_future(decoder.decode(DecodeRequest(name, 0, 9),
                                                            ScoredChunk(name, 0, latents=latents[name])))
                 for name in latents}
        for _ in range(2):   # the shielded decodes start, and reach the micro-batch
            await asyncio.sleep(0)
        decoder.close_decode("closing")        # closed while its chunk waits in the micro-batch
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        reference = await alone.decode(DecodeRequest("healthy", 0, 9), ScoredChunk("healthy", 0,
                                                                                   latents=latents["healthy"]))
        return dict(zip(tasks, results)), reference, decoder.decode_stats()

    results, reference, stats = asyncio.run(main())
    assert isinstance(results["closing"], KeyError), results["closing"]
    assert isinstance(results["healthy"], DecodedFrames), results["healthy"]
    assert results["healthy"].frames_jpeg == reference.frames_jpeg
    assert stats["max_batch_size"] == 2, stats            # they really were one batch


def torch_randn(seed: int):
    import torch

    return torch.randn((1, 16, 3, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_audio_after_end_of_input_is_a_caller_error_and_spares_the_healthy_session(store):
    async def main():
        cluster = Cluster(store)
        broken, healthy = await cluster.create(png(4)), await cluster.create(png(5))
        pcm = pcm16(speech(1.5, seed=5))
        late = audio_messages(pcm16(speech(0.5, seed=4))) + audio_messages(pcm16(speech(0.2, seed=6)), end=False)

        async def break_then_close():
            outputs, context = await cluster.stream(broken, late)
            closed = await cluster.ingress.CloseSession(pb.CloseSessionRequest(
                session_id=broken.session_id, session_token=broken.session_token), GrpcContext())
            return outputs, context, closed

        (broken_out, broken_ctx, closed), (healthy_out, healthy_ctx) = await asyncio.gather(
            break_then_close(), cluster.stream(healthy, audio_messages(pcm)))
        return broken_ctx, closed, healthy_out, healthy_ctx, healthy.session_id, pcm

    broken_ctx, closed, healthy_out, healthy_ctx, healthy_id, pcm = asyncio.run(main())
    assert broken_ctx.code == grpc.StatusCode.FAILED_PRECONDITION, (broken_ctx.code, broken_ctx.details)
    assert "end_of_input" in broken_ctx.details
    assert closed.state == pb.CLOSED
    assert healthy_ctx.code is None, healthy_ctx.details
    chunks = chunks_of(healthy_out)
    assert [chunk.chunk_index for chunk in chunks] == list(range(len(chunks))) and chunks[-1].final
    assert sum(len(chunk.frames) for chunk in chunks) == int(np.ceil(1.5 * 25))


def test_a_flood_of_tiny_messages_is_refused_and_the_session_resumes_while_another_streams_on(store):
    """One-sample audio messages far beyond the message rate: RESOURCE_EXHAUSTED naming the limit for that stream
    only; the session is not lost (a re-attach streams it to the end) and a concurrent session is untouched."""
    async def main():
        cluster = Cluster(store, limits={"message_burst": 50, "max_messages_per_s": 20.0})
        flooder, healthy = await cluster.create(png(7)), await cluster.create(png(8))
        pcm = pcm16(speech(1.0, seed=8))
        flood = [pb.SessionInput(audio=pb.AudioInput(pcm_s16le=b"\x01\x00", sample_rate_hz=16000, channels=1))
                 for _ in range(2000)]
        (flood_out, flood_ctx), (healthy_out, healthy_ctx) = await asyncio.gather(
            cluster.stream(flooder, flood), cluster.stream(healthy, audio_messages(pcm)))
        resumed_out, resumed_ctx = await cluster.stream(flooder, audio_messages(pcm16(speech(0.4, seed=9))))
        return flood_ctx, healthy_out, healthy_ctx, resumed_out, resumed_ctx

    flood_ctx, healthy_out, healthy_ctx, resumed_out, resumed_ctx = asyncio.run(main())
    assert flood_ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (flood_ctx.code, flood_ctx.details)
    assert "at most 20 per second after a burst of 50" in flood_ctx.details
    assert healthy_ctx.code is None and chunks_of(healthy_out)[-1].final
    assert sum(len(chunk.frames) for chunk in chunks_of(healthy_out)) == 25
    assert resumed_ctx.code is None, resumed_ctx.details
    assert events_of(resumed_out)[-1].type == pb.Event.SESSION_ENDED


def test_an_api_key_is_held_to_its_session_limit_inside_the_clusters(store):
    from services.api.keys import hash_api_key

    async def main():
        keys = {"ops": "ops-key-0123456789abc", "agent": "agent-key-0123456789"}
        cluster = Cluster(store, max_sessions=50, max_sessions_per_key=1,
                          api_keys={name: hash_api_key(key) for name, key in keys.items()})

        async def create(name):
            context = GrpcContext([("x-api-key", keys[name])])
            session = await cluster.ingress.CreateSession(pb.CreateSessionRequest(reference_image=png(9)), context)
            return session, context

        first, _ = await create("ops")
        _, refused = await create("ops")
        _, other_key = await create("agent")
        await cluster.ingress.CloseSession(pb.CloseSessionRequest(session_id=first.session_id,
                                                                  session_token=first.session_token),
                                           GrpcContext([("x-api-key", keys["ops"])]))
        _, again = await create("ops")
        return refused, other_key, again

    refused, other_key, again = asyncio.run(main())
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.details == "API key 'ops' holds its limit of 1 active sessions; close one or retry later"
    assert other_key.code is None and again.code is None, (other_key.details, again.details)


def test_backpressure_is_announced_when_input_reading_pauses(store):
    async def main():
        cluster = Cluster(store, max_chunks_in_flight=1)
        session = await cluster.create(png(6))
        return await cluster.stream(session, audio_messages(pcm16(speech(3.0, seed=7))))

    outputs, context = asyncio.run(main())
    assert context.code is None, context.details
    backpressure = [event for event in events_of(outputs) if event.type == pb.Event.BACKPRESSURE]
    assert backpressure and "in flight" in backpressure[0].message
    assert chunks_of(outputs)[-1].final


def test_a_reattach_past_the_replay_buffer_warns_and_resumes_at_the_oldest_buffered_chunk(store, monkeypatch):
    monkeypatch.setattr(vae_decoder_module, "REPLAY_CHUNKS", 2)
    monkeypatch.setattr(audio_encoder_module, "REPLAY_CHUNKS", 2)

    async def main():
        cluster = Cluster(store)
        session = await cluster.create(png(7))
        first, _ = await cluster.stream(session, audio_messages(pcm16(speech(3.0, seed=8)), end=False))
        again, context = await cluster.stream(session, [pb.SessionInput(control=pb.Control(end_of_input=True))],
                                              resume_from_chunk=0)
        return first, again, context

    first, again, context = asyncio.run(main())
    sent = len(chunks_of(first))
    assert sent >= 4
    assert context.code is None, context.details
    events = events_of(again)
    assert events[0].type == pb.Event.ATTACHED and events[0].next_chunk_index == sent - 2
    assert events[1].type == pb.Event.WARNING and f"chunks 0 to {sent - 3}" in events[1].message
    indices = [chunk.chunk_index for chunk in chunks_of(again)]
    assert indices[:2] == [sent - 2, sent - 1] and indices == list(range(sent - 2, sent - 2 + len(indices)))


def test_a_worker_failure_ends_the_stream_with_internal_and_a_correlation_id_and_marks_the_session_failed(store):
    class ExplodingStage(ScoreStage):
        """A score engine whose forward fails the way a dead GPU worker's does, with internals in the message."""

        def denoise(self, session, audio_input):
            raise RuntimeError("worker pid=4242 at 10.1.2.3 actor_id=abcdef exploded")

        def denoise_batch(self, sessions, inputs):
            return [self.denoise(session, item) for session, item in zip(sessions, inputs)]

    async def main():
        settings = AppSettings.from_args({"preset": "tiny"})
        cluster = Cluster(store, score_stage=ExplodingStage(build_score_stage(settings)[0].dit))
        session = await cluster.create(png(8))
        outputs, context = await cluster.stream(session, audio_messages(pcm16(speech(1.0, seed=9))))
        state = store.get(session.session_id).state
        _, again = await cluster.stream(session, [])
        return context, state, again

    context, state, again = asyncio.run(main())
    assert context.code == grpc.StatusCode.INTERNAL
    assert "correlation id" in context.details
    for leak in ("4242", "10.1.2.3", "abcdef", "RuntimeError", "Traceback"):
        assert leak not in context.details, context.details
    assert state == SessionState.FAILED
    assert again.code == grpc.StatusCode.FAILED_PRECONDITION and "failed" in again.details


def test_an_attach_whose_worker_state_is_gone_for_good_gets_data_loss_saying_why(store):
    """The AudioEncoder lost the session and its snapshot with it (closed there): the attach cannot restore it, and
    says so (not INTERNAL, no raw error)."""
    async def main():
        cluster = Cluster(store)
        session = await cluster.create(png(9))
        cluster.audio.close(session.session_id)
        return await cluster.stream(session, [])

    outputs, context = asyncio.run(main())
    assert context.code == grpc.StatusCode.DATA_LOSS, (context.code, context.details)
    assert "audio worker lost the session" in context.details and "no snapshot" in context.details, context.details
    assert "KeyError" not in context.details and "Traceback" not in context.details


def test_chunks_scored_but_never_handed_to_the_decoder_are_decoded_after_a_reattach(store):
    """The ingress orchestrates the chunk path, so one that dies between `generate` and `decode` leaves scored chunks
    the decoder never received. A re-attach must hand them over again, in order, and the video must be the engine's."""
    image, pcm = png(10), pcm16(speech(1.5, seed=30))

    async def main():
        cluster = Cluster(store)
        session = await cluster.create(image)
        # what the dead ingress did: all the audio in, end of input, chunks 0 and 1 scored, nothing decoded
        tickets = cluster.audio.push(session.session_id, pcm, 16000, 0) + cluster.audio.end(session.session_id)
        for ticket in tickets[:2]:
            await cluster.score.generate(ticket.features.value)
        # bounded: without the re-hand-over the decoder waits forever for chunks 0 and 1
        outputs, context = await asyncio.wait_for(cluster.stream(session, [], resume_from_chunk=0), 60)
        return outputs, context, len(tickets), cluster.transport.to("ScoreWorkerGroup", "scored")

    outputs, context, cut, rescored = asyncio.run(main())
    assert context.code is None, context.details
    chunks = chunks_of(outputs)
    assert [chunk.chunk_index for chunk in chunks] == list(range(cut)) and chunks[-1].final
    assert sorted(call.values[1] for call in rescored) == [0, 1]
    engine = AvatarEngine.from_preset("tiny", seed=0)
    sid = engine.open_session(image_to_tensor(decode_image_bytes(image), 64, 64), "")
    expected = engine.push_audio(sid, pcm, 16000) + engine.end_input(sid)
    assert [jpeg for chunk in chunks for jpeg in chunk.frames] == [
        jpeg for chunk in expected for jpeg in encode_jpeg(chunk.frames, 90)]


def test_a_session_streams_with_the_decoder_it_chose_where_the_server_ships_it(store):
    """talk128 ships a fast decoder: a session asking for it gets the engine's fast-decoder frames exactly, and its
    options say so; the default stays the full decoder. tiny ships none: asking for it is INVALID_ARGUMENT."""
    pcm = pcm16(speech(1.2, seed=8))

    async def main():
        tiny = Cluster(store)
        refused = GrpcContext()
        await tiny.ingress.CreateSession(pb.CreateSessionRequest(
            reference_image=png(3), options=pb.SessionOptions(decoder="fast")), refused)
        cluster = Cluster(store, preset="talk128", max_batch_size=1)
        image = png(3, size=128)
        sessions = {}
        for decoder in ("fast", ""):
            context = GrpcContext()
            sessions[decoder or "default"] = await cluster.ingress.CreateSession(pb.CreateSessionRequest(
                reference_image=image, options=pb.SessionOptions(decoder=decoder)), context)
            assert context.code is None, context.details
        outputs = {name: await cluster.stream(session, audio_messages(pcm)) for name, session in sessions.items()}
        return refused, sessions, outputs, image

    refused, sessions, outputs, image = asyncio.run(main())
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.details == "options.decoder='fast' is invalid; allowed on this server: full"
    assert sessions["fast"].options.decoder == "fast" and sessions["default"].options.decoder == "full"
    assert sessions["fast"].options.listening_hold == 0.5, "the session reports the server's listening hold"
    for name, decoder in (("fast", "fast"), ("default", "full")):
        frames = [frame for chunk in chunks_of(outputs[name][0]) for frame in chunk.frames]
        want = engine_jpegs(AvatarEngine.from_preset("talk128", decoder=decoder), image, pcm)
        assert frames == want, f"{name}: the cluster's frames are not the engine's with the {decoder} decoder"

