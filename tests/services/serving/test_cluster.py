"""End to end over real gRPC into a real local Ray cluster (CPU, logical GPUs), a real Redis server and a real OTLP
receiver: frames equal the in-process engine's for the same seed; score and VAE sit on different GPUs; every bad
input gets its status while another session keeps streaming; a session survives its ingress replica being killed;
spans and metrics reach the collector under the client's trace."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import grpc
import hypothesis  # noqa: F401 - loaded (and rewritten by pytest) at collection, see the fuzz test
import numpy as np
import pytest
import ray
from ray import serve

from model_core.engine import AvatarEngine, Character, iter_pieces
from services.api import pb
from services.api.client import AvatarClient
from services.api.keys import hash_api_key
from services.llm.realtime_peer import RealtimePeer
from services.deploy.local_cluster import APP_NAME, LocalCluster
from services.net import free_port
from services.media import decode_image_bytes, image_to_tensor
from services.telemetry import serve_tracing_env
from services.serving.vae_decoder import encode_jpeg

from tests.model_core.helpers import burst_audio, expected_first_changed_latent, speech
from tests.otlp_receiver import OtlpReceiver
from tests.services.llm.test_realtime import speech_then_quiet
from tests.services.serving.helpers import engine_jpegs, pcm16, png, replica_killer

pytestmark = pytest.mark.integration

API_KEY = "test-key-3f9a-0123456789"
LLM_KEY = "test-llm-key-77c1-9876543210"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def receiver():
    with OtlpReceiver() as server:
        yield server


@pytest.fixture(scope="module")
def llm_peer():
    """The realtime LLM the cluster's LLMBridge talks to: the protocol peer, on an event loop of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    peer = RealtimePeer(reply_s=1.0, speedup=2.0)
    asyncio.run_coroutine_threadsafe(peer.__aenter__(), loop).result(10)
    yield peer
    asyncio.run_coroutine_threadsafe(peer.__aexit__(None, None, None), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def cluster(receiver, llm_peer):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_METRIC_EXPORT_INTERVAL": "500",
           "OTEL_BSP_SCHEDULE_DELAY": "200"}
    env.update({key: value for key, value in serve_tracing_env().items() if key.startswith("RAY_SERVE")})
    env.update(env)
    started = LocalCluster.start({"max_sessions": 3, "api_keys": {"tests": hash_api_key(API_KEY)},
                                  "realtime_url": llm_peer.url, "realtime_api_key": LLM_KEY},
                                 grpc_port=free_port(), num_cpus=4, num_gpus=3, env=env)
    yield started
    started.stop()


@pytest.fixture(scope="module")
def engine():
    return AvatarEngine.from_preset("tiny", seed=0)


@pytest.fixture
def client(cluster):
    connection = AvatarClient(cluster.target, api_key=API_KEY,
                              metadata=[("traceparent", f"00-{TRACE_ID}-{CLIENT_SPAN}-01")])
    yield connection
    connection.close()


def test_cluster_streams_the_engines_frames_for_the_same_seed(client, engine):
    image, pcm = png(1), pcm16(speech(1.5, seed=21))
    session = client.create_session(image)
    assert session.session_token and session.state == pb.CREATED
    assert (session.options.width, session.options.height, session.options.steps) == (64, 64, 2)
    result = client.stream(session, pcm, 16000)
    assert [chunk.chunk_index for chunk in result.chunks] == list(range(len(result.chunks)))
    assert result.chunks[-1].final and result.events[-1].type == pb.Event.SESSION_ENDED
    assert sum(len(chunk.frames) for chunk in result.chunks) == int(np.ceil(1.5 * 25))
    assert result.frames_jpeg == engine_jpegs(engine, image, pcm)
    audio_bytes = b"".join(chunk.audio_pcm_s16le for chunk in result.chunks)
    assert abs(len(audio_bytes) // 2 - pcm.shape[0]) <= 2
    assert set(result.chunks[1].stats.stage_ms) >= {"audio", "score", "vae", "score_step_1", "score_step_2"}
    record = client.get_session(session.session_id, session.session_token)
    assert record.state == pb.ENDED and record.chunks_emitted == len(result.chunks)
    closed = client.close_session(session.session_id, session.session_token)
    assert closed.state == pb.CLOSED


def test_standard_health_and_reflection(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(cluster.target)
    health = health_pb2_grpc.HealthStub(channel)
    metadata = [("application", APP_NAME)]
    answer = health.Check(health_pb2.HealthCheckRequest(service=""), metadata=metadata, timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    answer = health.Check(health_pb2.HealthCheckRequest(service="facecast.v1.AvatarService"), metadata=metadata)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="nope.Service"), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=30)
    services = {service.name for reply in replies for service in reply.list_services_response.service}
    assert {"facecast.v1.AvatarService", "grpc.health.v1.Health"} <= services
    channel.close()


def test_silence_mode_and_update_session_over_grpc(client):
    image = png(50)
    loud, other = pcm16(speech(1.2, seed=51)), pcm16(speech(1.2, seed=52))
    first, second = client.create_session(image), client.create_session(image)
    listening = [client.stream(session, audio, 16000, speaking=[(0, False)])
                 for session, audio in ((first, loud), (second, other))]
    assert listening[0].frames_jpeg == listening[1].frames_jpeg, "a listening character's audio leaked into video"
    talking = client.create_session(image)
    assert client.stream(talking, loud, 16000).frames_jpeg != listening[0].frames_jpeg

    ended = pb.UpdateSessionRequest(session_id=talking.session_id, session_token=talking.session_token,
                                    prompt="too late")
    expect(grpc.StatusCode.FAILED_PRECONDITION, lambda: client.stub.UpdateSession(ended, metadata=client.metadata),
           "ENDED")
    finished, talking = talking, client.create_session(image)       # updates apply to a live session
    update = pb.UpdateSessionRequest(session_id=talking.session_id, session_token=talking.session_token)
    update.speaking.add(character=0, speaking=False)
    assert client.stub.UpdateSession(update, metadata=client.metadata).session_id == talking.session_id
    bad_character = pb.UpdateSessionRequest(session_id=talking.session_id, session_token=talking.session_token)
    bad_character.speaking.add(character=5, speaking=True)
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.stub.UpdateSession(bad_character,
                                                                               metadata=client.metadata), "character")
    new_prompt = pb.UpdateSessionRequest(session_id=talking.session_id, session_token=talking.session_token,
                                         prompt="a calm newsreader")
    assert client.stub.UpdateSession(new_prompt, metadata=client.metadata).prompt == "a calm newsreader"
    assert client.get_session(talking.session_id, talking.session_token).prompt == "a calm newsreader"
    too_long = pb.UpdateSessionRequest(session_id=talking.session_id, session_token=talking.session_token,
                                       prompt="x" * 5000)
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.stub.UpdateSession(too_long, metadata=client.metadata),
           "prompt")
    forged = pb.UpdateSessionRequest(session_id=talking.session_id, session_token="forged")
    expect(grpc.StatusCode.PERMISSION_DENIED, lambda: client.stub.UpdateSession(forged, metadata=client.metadata))
    for session in (first, second, finished, talking):
        client.close_session(session.session_id, session.session_token)


def decoded_by(receiver, session_id: str, chunks: int) -> dict[int, dict]:
    """Per chunk of the session: the egress span's record of who decoded it (deployment, replica, GPU ids)."""
    def egress(spans):
        return {s.attributes["chunk.index"]: s.attributes for s in spans
                if s.name == "facecast.egress" and s.attributes.get("session.id") == session_id}

    return egress(receiver.wait_for_spans(lambda got: len(egress(got)) >= chunks, timeout_s=30))


def test_every_chunk_is_decoded_by_the_vae_decoder_on_a_gpu_the_score_group_does_not_use(receiver, client):
    score = serve.get_deployment_handle("ScoreWorkerGroup", app_name=APP_NAME).placement.remote().result()
    vae = serve.get_deployment_handle("VAEDecoder", app_name=APP_NAME).placement.remote().result()
    assert len(score["score"]) == 1 and len(vae["vae"]) == 1
    assert set(score["score"]).isdisjoint(vae["vae"]), (score, vae)
    session = client.create_session(png(12))
    result = client.stream(session, pcm16(speech(1.0, seed=12)), 16000)
    client.close_session(session.session_id, session.session_token)
    by_chunk = decoded_by(receiver, session.session_id, len(result.chunks))
    assert sorted(by_chunk) == list(range(len(result.chunks)))
    for index, attributes in by_chunk.items():    # what the decoding worker said about itself, per chunk
        assert attributes["decoded_by.deployment"] == "VAEDecoder", (index, attributes)
        assert attributes["decoded_by.gpu_ids"].split(",") == vae["vae"], (index, attributes, vae)
        assert attributes["decoded_by.gpu_ids"] not in score["score"]


def stream_session(client, session, messages, timeout_s: float = 180):
    """One StreamSession with exactly these input messages after attach; returns (video chunks, events)."""
    attach = pb.SessionInput(attach=pb.Attach(session_id=session.session_id, session_token=session.session_token))
    outputs = list(client.stub.StreamSession(iter([attach, *messages]), metadata=client.metadata, timeout=timeout_s))
    return ([output.video_chunk for output in outputs if output.WhichOneof("output") == "video_chunk"],
            [output.event for output in outputs if output.WhichOneof("output") == "event"])


def audio_message(pcm: np.ndarray, character: int = 0) -> pb.SessionInput:
    return pb.SessionInput(audio=pb.AudioInput(pcm_s16le=pcm.astype("<i2").tobytes(), sample_rate_hz=16000,
                                               channels=1, character=character))


def speaking_message(*states: tuple[int, bool]) -> pb.SessionInput:
    return pb.SessionInput(control=pb.Control(speaking=[pb.SpeakingState(character=character, speaking=value)
                                                        for character, value in states]))


END_OF_INPUT = pb.SessionInput(control=pb.Control(end_of_input=True))


def test_a_tone_burst_first_changes_exactly_the_chunk_whose_audio_window_covers_it(client):
    """Audio-video alignment through the cluster: a burst inside video frame 29 may change nothing before the chunk
    holding the first latent frame whose 5-frame audio window covers frame 29 (worked out by hand in the helper),
    and must change that chunk. The whole clip goes in one message, so a window reading ahead cannot hide."""
    burst_frame, image = 29, png(60)
    runs = []
    for amplitude in (0.0, 0.5):
        session = client.create_session(image)
        chunks, _ = stream_session(client, session, [audio_message(pcm16(burst_audio(1.6, burst_frame,
                                                                                        amplitude=amplitude))),
                                                      END_OF_INPUT])
        client.close_session(session.session_id, session.session_token)
        runs.append([list(chunk.frames) for chunk in chunks])
    silent, burst = runs
    assert len(silent) == len(burst) >= 3
    first_changed = next(index for index, (a, b) in enumerate(zip(silent, burst)) if a != b)
    assert first_changed == expected_first_changed_latent(burst_frame) // 3


def test_two_characters_take_turns_over_grpc_and_stream_the_engines_frames_and_mixed_audio(client):
    """Two characters, left and right: character 0 talks while 1 listens, then they swap. Every chunk waits for the
    audio of every speaking character; the video lasts as long as the longest track; each chunk carries the mix."""
    regions = [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]
    image, first, second = png(70), pcm16(speech(1.0, seed=71)), pcm16(speech(1.0, seed=72))
    script = [speaking_message((1, False))]
    script += [audio_message(first[i:i + 640], 0) for i in range(0, first.shape[0], 640)]
    script += [speaking_message((0, False), (1, True))]
    script += [audio_message(second[i:i + 640], 1) for i in range(0, second.shape[0], 640)]
    session = client.create_session(image, characters=regions)
    assert len(session.characters) == 2
    chunks, events = stream_session(client, session, script + [END_OF_INPUT])
    client.close_session(session.session_id, session.session_token)
    assert chunks[-1].final and events[-1].type == pb.Event.SESSION_ENDED
    assert [chunk.chunk_index for chunk in chunks] == list(range(len(chunks)))
    assert sum(len(chunk.frames) for chunk in chunks) == 50           # 2.0 s: the turns follow each other
    mixed = np.frombuffer(b"".join(chunk.audio_pcm_s16le for chunk in chunks), "<i2").astype(np.int32)
    spoken = np.concatenate([first, second]).astype(np.int32)
    assert mixed.shape == spoken.shape and np.abs(mixed - spoken).max() <= 2   # the mix: one voice at a time

    engine = AvatarEngine.from_preset("tiny", seed=0)
    sid = engine.open_session(image_to_tensor(decode_image_bytes(image), 64, 64), "",
                              characters=[Character(region) for region in regions])
    expected = []
    engine.set_speaking(sid, 1, False)
    for piece in iter_pieces(first, 640):
        expected += engine.push_audio(sid, piece, 16000, character=0)
    engine.set_speaking(sid, 0, False)
    engine.set_speaking(sid, 1, True)
    for piece in iter_pieces(second, 640):
        expected += engine.push_audio(sid, piece, 16000, character=1)
    expected += engine.end_input(sid)
    assert [jpeg for chunk in chunks for jpeg in chunk.frames] == [
        jpeg for chunk in expected for jpeg in encode_jpeg(chunk.frames, 90)]


def expect(code: grpc.StatusCode, call, *needles: str):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, (caught.value.code(), caught.value.details())
    for needle in needles:
        assert needle in caught.value.details(), caught.value.details()
    return caught.value


def stream_messages(client, messages):
    return list(client.stub.StreamSession(iter(messages), metadata=client.metadata, timeout=60))


def test_every_bad_input_gets_its_status_while_another_session_keeps_streaming(cluster, client, engine):
    image, pcm = png(2), pcm16(speech(2.5, seed=22))
    good = client.create_session(image)
    results = {}
    streamer = threading.Thread(target=lambda: results.update(good=client.stream(good, pcm, 16000, realtime=True)))
    streamer.start()
    time.sleep(0.5)

    # INVALID_ARGUMENT: bad image, bad options, bad audio format
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.create_session(b"not an image"), "reference_image")
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.create_session(png(3), options={"fps": 500}),
           "options.fps")
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: client.create_session(png(3), options={"width": 72}),
           "options.width")
    victim = client.create_session(png(4))
    attach = pb.SessionInput(attach=pb.Attach(session_id=victim.session_id, session_token=victim.session_token))
    bad_rate = pb.SessionInput(audio=pb.AudioInput(pcm_s16le=b"\0\0" * 100, sample_rate_hz=1000, channels=1))
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stream_messages(client, [attach, bad_rate]),
           "audio.sample_rate_hz")
    odd_bytes = pb.SessionInput(audio=pb.AudioInput(pcm_s16le=b"\0\0\0", sample_rate_hz=16000, channels=1))
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stream_messages(client, [attach, odd_bytes]),
           "audio.pcm_s16le")
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stream_messages(client, [bad_rate]), "attach")

    # UNAUTHENTICATED: no key / wrong key
    anonymous = AvatarClient(cluster.target)
    expect(grpc.StatusCode.UNAUTHENTICATED, lambda: anonymous.create_session(png(5)), "authorization")
    wrong = AvatarClient(cluster.target, api_key="nope")
    expect(grpc.StatusCode.UNAUTHENTICATED, lambda: wrong.get_session(victim.session_id, victim.session_token))
    assert "nope" not in expect(grpc.StatusCode.UNAUTHENTICATED,
                                lambda: wrong.create_session(png(5))).details()
    anonymous.close()
    wrong.close()

    # PERMISSION_DENIED: wrong session token; NOT_FOUND: unknown and closed sessions
    expect(grpc.StatusCode.PERMISSION_DENIED, lambda: client.get_session(victim.session_id, "forged-token"),
           "session_token")
    expect(grpc.StatusCode.NOT_FOUND, lambda: client.get_session("0" * 32, "x"), "does not exist")
    client.close_session(victim.session_id, victim.session_token)
    expect(grpc.StatusCode.NOT_FOUND, lambda: client.get_session(victim.session_id, victim.session_token), "closed")

    # RESOURCE_EXHAUSTED: admission limit (3 active sessions: `good` plus two more)
    extra = [client.create_session(png(6)), client.create_session(png(7))]
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: client.create_session(png(8)), "limit of 3")
    for session in extra:
        client.close_session(session.session_id, session.session_token)

    streamer.join(timeout=120)
    good_result = results["good"]
    assert good_result.chunks[-1].final
    assert good_result.frames_jpeg == engine_jpegs(engine, image, pcm), "the healthy session was disturbed"
    client.close_session(good.session_id, good.session_token)


def _kill_ingress_replica() -> None:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "SessionIngress" in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError("no SessionIngress replica found")


def test_a_session_survives_its_ingress_replica_being_killed(client, engine):
    image, pcm = png(9), pcm16(speech(3.0, seed=23))
    session = client.create_session(image)
    result = client.stream(session, pcm, 16000, realtime=True, after_chunks=(2, _kill_ingress_replica))
    assert result.reattaches >= 1
    assert [chunk.chunk_index for chunk in result.chunks] == list(range(len(result.chunks)))
    assert result.chunks[-1].final
    assert result.frames_jpeg == engine_jpegs(engine, image, pcm)
    client.close_session(session.session_id, session.session_token)


@pytest.mark.parametrize("deployment", ["ScoreWorkerGroup", "VAEDecoder", "AudioEncoder"])
def test_a_session_survives_a_worker_replica_being_killed_with_the_engines_frames(client, engine, deployment):
    """The replica holding the session is killed after chunk 2 (chunks in flight): Serve starts a replacement, the
    session is restored there from its snapshots and goes on on the same stream (no re-attach), with one RESUMED
    event, and every frame equals the uninterrupted engine's for the same seed."""
    image, pcm = png(13), pcm16(speech(3.0, seed=41))
    session = client.create_session(image)
    result = client.stream(session, pcm, 16000, realtime=True, after_chunks=(2, replica_killer(deployment)))
    resumed = [event for event in result.events if event.type == pb.Event.RESUMED]
    assert len(resumed) == 1 and deployment in resumed[0].message, [event.message for event in result.events]
    assert 2 <= resumed[0].next_chunk_index <= 2 + 2      # within 2 chunks of the fault (max_chunks_in_flight)
    assert result.reattaches == 0
    assert [chunk.chunk_index for chunk in result.chunks] == list(range(len(result.chunks)))
    assert result.chunks[-1].final
    assert result.frames_jpeg == engine_jpegs(engine, image, pcm)
    client.close_session(session.session_id, session.session_token)


def test_a_conversation_survives_its_llm_bridge_replica_being_killed_and_remembers_what_was_said(client, llm_peer):
    """The LLMBridge replica is killed between two questions: Serve starts a replacement, the call reopens the
    conversation there with the first exchange (RESUMED naming LLMBridge; no re-attach, no error), and the second
    question is answered."""
    request = pb.CreateSessionRequest(reference_image=png(14), conversation=pb.ConversationOptions(
        mode=pb.ConversationOptions.REALTIME))
    session = client.stub.CreateSession(request, metadata=client.metadata, timeout=120)
    question = np.concatenate(speech_then_quiet(0.6, 0.5))
    quiet = np.zeros(16000 * 8, np.int16)
    pcm = np.concatenate([question, quiet, question, quiet[:16000 * 4]])
    first = llm_peer.turns + 1
    result = client.stream(session, pcm, 16000, realtime=True, after_chunks=(8, replica_killer("LLMBridge")))
    resumed = [event for event in result.events if event.type == pb.Event.RESUMED]
    assert len(resumed) == 1 and "LLMBridge" in resumed[0].message, [event.message for event in result.events]
    assert [event.type for event in result.events].count(pb.Event.REPLY_STARTED) == 2
    assert llm_peer.items[-1] == [("user", f"question {first}"), ("assistant", f"answer {first}")]
    assert result.reattaches == 0 and result.chunks[-1].final
    client.close_session(session.session_id, session.session_token)


def test_sessions_stream_on_through_a_redis_outage_and_its_restart_loses_no_record(cluster, client, engine):
    """Redis killed mid-stream: the stream goes on (its frames still the engine's), health says NOT_SERVING and new
    sessions get UNAVAILABLE at once; the supervisor restarts Redis from its append-only file, and the session's
    record is all there, brought up to date by the writes after the restart."""
    import os
    import signal

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    redis_server = cluster.local_redis
    health = health_pb2_grpc.HealthStub(client.channel)
    image, pcm = png(12), pcm16(speech(3.0, seed=25))
    session = client.create_session(image)
    seen = {}

    def outage() -> None:
        redis_server.auto_restart = False
        os.kill(redis_server.pid, signal.SIGKILL)
        try:
            began = time.monotonic()
            status = health.Check(health_pb2.HealthCheckRequest(), metadata=client.metadata, timeout=30).status
            seen["health"] = (status, time.monotonic() - began)
            began = time.monotonic()
            seen["create"] = (expect(grpc.StatusCode.UNAVAILABLE, lambda: client.create_session(image),
                                     "session store").details(), time.monotonic() - began)
            time.sleep(1.0)   # chunks keep coming meanwhile; their record writes are skipped
        finally:
            redis_server.auto_restart = True

    result = client.stream(session, pcm, 16000, realtime=True, after_chunks=(2, outage))
    assert seen["health"][0] == health_pb2.HealthCheckResponse.NOT_SERVING and seen["health"][1] < 5
    assert seen["create"][1] < 5
    assert result.reattaches == 0 and result.chunks[-1].final
    assert result.frames_jpeg == engine_jpegs(engine, image, pcm)
    assert redis_server.restarts >= 1
    record = client.get_session(session.session_id, session.session_token)
    assert record.state == pb.ENDED and record.chunks_emitted == len(result.chunks)
    client.close_session(session.session_id, session.session_token)


def test_spans_and_metrics_reach_the_collector_under_the_clients_trace(receiver, client):
    session = client.create_session(png(10))
    client.stream(session, pcm16(speech(1.0, seed=24)), 16000)
    client.close_session(session.session_id, session.session_token)
    crowd = [client.create_session(png(11 + i)) for i in range(3)]   # fill the admission limit ...
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: client.create_session(png(15)))   # ... and get rejected
    for extra in crowd:
        client.close_session(extra.session_id, extra.session_token)
    names = {"facecast.session", "facecast.chunk", "facecast.audio.encode", "facecast.score.step",
             "facecast.vae.decode", "facecast.egress"}
    spans = receiver.wait_for_spans(lambda got: names <= {s.name for s in got if s.trace_id == TRACE_ID},
                                    timeout_s=30)
    ours = [s for s in spans if s.trace_id == TRACE_ID]
    by_id = {s.span_id: s for s in spans}
    session_spans = [s for s in ours if s.name == "facecast.session"]
    assert session_spans
    for span in session_spans:   # walk up: the chain ends at the client's own span
        current = span
        while current.parent_span_id in by_id:
            current = by_id[current.parent_span_id]
        assert current.parent_span_id == CLIENT_SPAN, current
    chunk_ids = {s.span_id for s in ours if s.name == "facecast.chunk"}
    assert any(s.parent_span_id in chunk_ids for s in ours if s.name == "facecast.egress")
    session_ids = {s.span_id for s in session_spans}
    for name in ("facecast.audio.encode", "facecast.score.step", "facecast.vae.decode"):
        assert any(_descends(s, session_ids, by_id) for s in ours if s.name == name), name
    for metric in ("facecast.session.ttff", "facecast.chunk.interval", "facecast.chunk.stage.duration",
                   "facecast.chunk.realtime_factor", "facecast.session.fps", "facecast.sessions.active",
                   "facecast.chunks.in_flight", "facecast.sessions.rejected"):
        assert receiver.wait_for_metric(metric, timeout_s=30), metric
    stages = {point.attributes.get("stage") for point in receiver.metrics()
              if point.name == "facecast.chunk.stage.duration"}
    assert {"audio", "score", "vae"} <= stages


def test_metrics_are_visible_through_rays_metrics_endpoint(cluster):
    import urllib.request

    wanted = ("facecast_session_ttff_seconds", "facecast_chunk_interval_seconds", "facecast_sessions_active",
              "facecast_sessions_rejected_total")
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10) as page:
            text = page.read().decode()
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"not in Ray's metrics: {missing}"


FUZZ_EXAMPLES = int(os.environ.get("FACECAST_FUZZ_EXAMPLES", "110"))


def test_hostile_calls_get_documented_statuses_while_a_healthy_session_streams_unchanged(cluster, client, engine):
    """Property-based (services/api/fuzz.py): every RPC driven with malformed and adversarial messages over real
    gRPC — thousands of messages — gets OK or a documented status, never INTERNAL; a session streaming in real time
    meanwhile delivers exactly the engine's frames. (hypothesis is imported at the top: imported here, under this
    load, pytest's rewrite of its modules once hit CPython 3.11's "AST constructor recursion depth mismatch".)"""
    from hypothesis import HealthCheck, given, settings

    from services.api.fuzz import Hostile, hostile_calls
    from services.store.sessions import connect_store

    image, pcm = png(18), pcm16(speech(16.0, seed=28))
    healthy = client.create_session(image)
    results = {}
    streamer = threading.Thread(target=lambda: results.update(good=client.stream(healthy, pcm, 16000, realtime=True,
                                                                                   timeout_s=300)))
    streamer.start()
    victims = [client.create_session(png(19)), client.create_session(png(20))]
    harness = Hostile(client.channel, client.metadata, victims, renew=lambda: client.create_session(png(21)))

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(hostile_calls(len(victims)))
    def fuzz(call):
        harness.send(call)

    try:
        fuzz()
    finally:
        streamer.join(timeout=300)
        store, _ = connect_store(cluster.redis_url)
        for session_id in store.admitted_ids():      # victims and whatever the fuzz managed to open
            store.close(session_id)
    assert harness.messages_sent >= 2000, harness.messages_sent
    assert harness.statuses["INVALID_ARGUMENT"] > 0 and harness.statuses["OK"] > 0, harness.statuses
    good = results["good"]
    assert good.reattaches == 0 and good.chunks[-1].final
    assert good.frames_jpeg == engine_jpegs(engine, image, pcm)


def test_no_api_key_or_session_token_reaches_logs_spans_or_metrics(cluster, receiver, client):
    """A session streamed with a known key and token, a refused wrong key, another session's token refused on this
    one: then every Ray log file of the cluster, every span and metric point the collector received and Ray's
    metrics page are searched for the key, the tokens and their hashes. (Runs last: it reads what all tests left.)"""
    import hashlib
    import urllib.request
    from pathlib import Path

    from services.store.sessions import hash_token

    session, other = client.create_session(png(16)), client.create_session(png(17))
    client.stream(session, pcm16(speech(1.0, seed=27)), 16000)
    expect(grpc.StatusCode.PERMISSION_DENIED, lambda: client.get_session(other.session_id, session.session_token))
    intruder = AvatarClient(cluster.target, api_key=API_KEY[:-1] + "X")
    expect(grpc.StatusCode.UNAUTHENTICATED, lambda: intruder.create_session(png(16)))
    intruder.close()
    for opened in (session, other):
        client.close_session(opened.session_id, opened.session_token)
    receiver.wait_for_spans(lambda got: any(s.attributes.get("session.id") == session.session_id for s in got),
                            timeout_s=30)
    time.sleep(1.5)     # a metrics export interval and a span batch after the last call
    secrets = {API_KEY, LLM_KEY, API_KEY[:-1] + "X", hash_api_key(API_KEY).removeprefix("sha256:"),
               hashlib.sha256(API_KEY.encode()).digest().hex().upper()}
    for opened in (session, other):
        secrets |= {opened.session_token, hash_token(opened.session_token)}
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    texts = {str(path): path.read_bytes().decode("utf-8", "replace") for path in logs_dir.rglob("*") if path.is_file()}
    assert any("SessionIngress" in text for text in texts.values()), "the replicas' logs were not found"
    texts["spans"] = repr(receiver.spans())
    texts["metrics"] = repr(receiver.metrics())
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10) as page:
        texts["prometheus"] = page.read().decode()
    leaks = sorted({(where, secret[:6]) for where, text in texts.items() for secret in secrets if secret in text})
    assert not leaks, f"secrets found in: {leaks}"


def _descends(span, ancestors: set[str], by_id: dict) -> bool:
    current = span
    for _ in range(32):
        if current.parent_span_id in ancestors:
            return True
        current = by_id.get(current.parent_span_id)
        if current is None:
            return False
    return False
