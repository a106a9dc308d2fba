"""The other layouts on a real local cluster: the pipelined score group (one GPU per denoising step, Live Avatar's
timestep-forcing pipeline) and the self-contained worker with cross-session batching."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image
from ray import serve

from model_core.engine import AvatarEngine
from services.api.client import AvatarClient
from services.deploy.local_cluster import LocalCluster
from services.net import free_port
from services.serving.affinity import ROUTING_STATS_PERIOD_S

from tests.model_core.helpers import speech
from .helpers import engine_jpegs, pcm16, png, replica_killer, step_actor_killer

pytestmark = pytest.mark.integration

PIPELINED, SELF_CONTAINED, LINKED, PIPELINED_OBJECTS = "pipelined", "selfcontained", "linked", "pipelinedobjects"
REPLICATED = "replicated"


@pytest.fixture(scope="module")
def cluster():
    started = LocalCluster.start({"max_sessions": 8}, grpc_port=free_port(), num_cpus=12, num_gpus=17)
    started.deploy_app(PIPELINED, {"score_mode": "pipelined", "steps": 3, "max_batch_size": 1,
                                   "latent_transport": "collective"}, {
        "ScoreWorkerGroup": {"placement_group_bundles": [{"CPU": 0.25, "GPU": 1}] * 3,
                             "placement_group_strategy": "STRICT_PACK",
                             "ray_actor_options": {"num_cpus": 0.25, "num_gpus": 1}}})
    started.deploy_app(SELF_CONTAINED, {"vae_placement": "colocated", "max_batch_size": 4})
    started.deploy_app(LINKED, {"latent_transport": "collective", "max_batch_size": 4})
    started.deploy_app(PIPELINED_OBJECTS, {"score_mode": "pipelined", "steps": 2, "max_batch_size": 1}, {
        "ScoreWorkerGroup": {"placement_group_bundles": [{"CPU": 0.25, "GPU": 1}] * 2,
                             "placement_group_strategy": "STRICT_PACK",
                             "ray_actor_options": {"num_cpus": 0.25, "num_gpus": 1}}})
    started.deploy_app(REPLICATED, {"max_batch_size": 1}, {"ScoreWorkerGroup": {"num_replicas": 2},
                                                           "VAEDecoder": {"num_replicas": 2}}, declarative=True)
    yield started
    started.stop()


def test_pipelined_score_group_streams_the_engines_frames(cluster):
    client = AvatarClient(cluster.target, application=PIPELINED)
    image, pcm = png(31), pcm16(speech(2.0, seed=31))
    session = client.create_session(image)
    assert session.options.steps == 3
    result = client.stream(session, pcm, 16000)
    engine = AvatarEngine.from_preset("tiny", seed=0)
    engine.preset = engine.preset.__class__(**{**engine.preset.__dict__,
                                               "stream": engine.preset.stream.replace(steps=3)})
    assert result.frames_jpeg == engine_jpegs(engine, image, pcm)
    placement = serve.get_deployment_handle("ScoreWorkerGroup", app_name=PIPELINED).placement.remote().result()
    vae = serve.get_deployment_handle("VAEDecoder", app_name=PIPELINED).placement.remote().result()["vae"]
    gpus = [tuple(placement["score"])] + [tuple(ids) for ids in placement["steps"]] + [tuple(vae)]
    assert len(gpus) == 4 and len(set(gpus)) == 4, f"every step and the VAE need their own GPU: {gpus}"
    latents = serve.get_deployment_handle("VAEDecoder", app_name=PIPELINED).latent_stats.remote().result()
    chunks = len(result.chunks)   # every chunk, chunk 0 (whose first frame the score replica gets as the sink) too
    assert latents["arrived"] == {"message": 0, "link": chunks}, latents
    assert [link["received"] for link in latents["links"]] == [chunks], "from the last step actor, over one link"
    client.close_session(session.session_id, session.session_token)
    client.close()


def _decode(jpegs: list[bytes]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16) for data in jpegs])


def _stream_together(client, inputs) -> list:
    """Stream every (image, pcm) as its own session at once, paced in real time; returns (sessions, results)."""
    sessions = [client.create_session(image) for image, _ in inputs]
    results = [None] * len(inputs)

    def run(index):
        results[index] = client.stream(sessions[index], inputs[index][1], 16000, realtime=True)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    return sessions, results


def _assert_engine_frames(inputs, results) -> None:
    """Each session's frames are the engine's: batched forwards differ from single ones only by float rounding (~1e-6
    in the latents), which JPEG turns into the odd flipped quantisation step, so compare pictures, not bytes."""
    engine = AvatarEngine.from_preset("tiny", seed=0)
    for (image, pcm), result in zip(inputs, results):
        assert result is not None and result.chunks[-1].final
        expected, got = _decode(engine_jpegs(engine, image, pcm)), _decode(result.frames_jpeg)
        assert got.shape == expected.shape
        mse = np.mean((got.astype(np.float64) - expected) ** 2)
        assert 10 * np.log10(255.0**2 / max(mse, 1e-12)) > 45, f"PSNR too low (MSE {mse:.4f})"


def test_self_contained_worker_batches_sessions_and_matches_the_engine(cluster):
    client = AvatarClient(cluster.target, application=SELF_CONTAINED)
    inputs = [(png(40 + i), pcm16(speech(2.0, seed=40 + i))) for i in range(3)]
    sessions, results = _stream_together(client, inputs)
    _assert_engine_frames(inputs, results)
    stats = serve.get_deployment_handle("ScoreWorkerGroup", app_name=SELF_CONTAINED).batch_stats.remote().result()
    assert stats["max_batch_size"] >= 2, stats               # score forwards batched across sessions
    decodes = serve.get_deployment_handle("ScoreWorkerGroup", app_name=SELF_CONTAINED).decode_stats.remote().result()
    assert decodes["max_batch_size"] >= 2, decodes            # and VAE decodes too
    for session in sessions:
        client.close_session(session.session_id, session.session_token)
    client.close()


def test_latents_go_from_the_score_worker_to_the_decoder_over_the_latent_link(cluster):
    """latent_transport 'collective' (gloo here, NCCL on GPUs): no chunk's latents travel in a message; two sessions
    streaming at once (their score forwards batched) get the engine's frames."""
    client = AvatarClient(cluster.target, application=LINKED)
    inputs = [(png(50 + i), pcm16(speech(1.6, seed=50 + i))) for i in range(2)]
    sessions, results = _stream_together(client, inputs)
    _assert_engine_frames(inputs, results)
    chunks = sum(len(result.chunks) for result in results)
    latents = serve.get_deployment_handle("VAEDecoder", app_name=LINKED).latent_stats.remote().result()
    assert latents["arrived"] == {"message": 0, "link": chunks}, latents
    (link,) = latents["links"]
    assert link["backend"] == "gloo" and link["received"] == chunks and link["kept"] == 0 and not link["broken"]
    for session in sessions:
        client.close_session(session.session_id, session.session_token)
    client.close()


@pytest.mark.parametrize("app", [PIPELINED_OBJECTS, SELF_CONTAINED, LINKED])
def test_a_killed_score_replica_of_the_other_layouts_resumes_its_session_with_the_engines_frames(cluster, app):
    """Pipelined: the replica dies with its step actor (each owning a step's caches); the replacement starts a new
    one and restores every step. Self-contained: the replica that dies held the decode cache too. Linked (latents
    over the latent link, gloo here): the decoder tears the dead sender's link down and the replacement links up
    again. Each way one RESUMED, no re-attach, the engine's frames."""
    from services.api import pb

    client = AvatarClient(cluster.target, application=app)
    image, pcm = png(60), pcm16(speech(3.0, seed=60))
    session = client.create_session(image)
    result = client.stream(session, pcm, 16000, realtime=True,
                           after_chunks=(2, replica_killer("ScoreWorkerGroup", app)))
    resumed = [event for event in result.events if event.type == pb.Event.RESUMED]
    assert len(resumed) == 1 and "ScoreWorkerGroup" in resumed[0].message, [e.message for e in result.events]
    assert result.reattaches == 0 and result.chunks[-1].final
    engine = AvatarEngine.from_preset("tiny", seed=0)
    steps = session.options.steps
    engine.preset = engine.preset.__class__(**{**engine.preset.__dict__,
                                               "stream": engine.preset.stream.replace(steps=steps)})
    assert result.frames_jpeg == engine_jpegs(engine, image, pcm)
    if app == LINKED:      # the chunks after the fault came over a new link, not in the messages
        latents = serve.get_deployment_handle("VAEDecoder", app_name=app).latent_stats.remote().result()
        (link,) = latents["links"]
        assert latents["arrived"]["message"] == 0 and link["received"] > 0 and not link["broken"], latents
    client.close_session(session.session_id, session.session_token)
    client.close()


def test_a_pipelined_step_actor_dying_on_its_own_is_started_again_and_the_session_resumes(cluster):
    """The replica stays; only its step-1 actor (owning that step's caches of every session) dies: the replica
    starts it again, drops its sessions, and the stream restores every step from the snapshots: one RESUMED, no
    re-attach, the engine's frames."""
    from services.api import pb

    client = AvatarClient(cluster.target, application=PIPELINED_OBJECTS)
    image, pcm = png(65), pcm16(speech(3.0, seed=65))
    session = client.create_session(image)
    result = client.stream(session, pcm, 16000, realtime=True, after_chunks=(2, step_actor_killer(PIPELINED_OBJECTS)))
    resumed = [event for event in result.events if event.type == pb.Event.RESUMED]
    assert len(resumed) == 1 and "ScoreWorkerGroup" in resumed[0].message, [e.message for e in result.events]
    assert result.reattaches == 0 and result.chunks[-1].final
    assert [chunk.chunk_index for chunk in result.chunks] == list(range(len(result.chunks)))
    engine = AvatarEngine.from_preset("tiny", seed=0)
    assert session.options.steps == engine.preset.stream.steps == 2
    assert result.frames_jpeg == engine_jpegs(engine, image, pcm)
    client.close_session(session.session_id, session.session_token)
    client.close()


def _holdings(deployment: str, app: str) -> dict[str, set[str]]:
    """Replica id -> the sessions it holds, asked of every running replica of `deployment` (what it reports to the
    routers; a replica just killed may still be asked, and answers with its death)."""
    handle = serve.get_deployment_handle(deployment, app_name=app)
    reports = handle.broadcast("record_routing_stats").results(timeout_s=30, return_exceptions=True)
    return {report["replica"]: set(report["sessions"]) for report in reports if not isinstance(report, Exception)}


def test_sessions_spread_over_two_score_and_vae_replicas_stay_there_and_move_when_one_dies(cluster):
    """Four sessions over 2 score + 2 VAE replicas: two on each, every call of a session on its replica, also from a
    router that never routed them (it learns where they are from the replicas' reports). The score
    replica of two of them is killed mid-stream: those two resume on the survivor (one RESUMED each, the engine's
    frames), the other two are untouched (no event, not moved to the replacement replica); closing frees every
    replica."""
    from services.api import pb

    client = AvatarClient(cluster.target, application=REPLICATED)
    inputs = [(png(70 + i), pcm16(speech(4.0, seed=70 + i))) for i in range(4)]
    sessions = [client.create_session(image) for image, _ in inputs]
    ids = [session.session_id for session in sessions]
    for deployment in ("ScoreWorkerGroup", "VAEDecoder"):
        held = _holdings(deployment, REPLICATED)
        assert len(held) == 2 and sorted(map(len, held.values())) == [2, 2], (deployment, held)
        assert set().union(*held.values()) == set(ids), (deployment, held)
    time.sleep(2 * ROUTING_STATS_PERIOD_S + 1)     # every replica has reported the sessions it holds
    for deployment in ("ScoreWorkerGroup", "VAEDecoder"):    # a router that never routed them (a new ingress's)
        fresh = serve.get_deployment_handle(deployment, app_name=REPLICATED)
        for session_id in ids:
            keyed = fresh.options(multiplexed_model_id=session_id)
            assert session_id in keyed.session_ids.remote().result(timeout_s=30), (deployment, session_id)
    before = _holdings("ScoreWorkerGroup", REPLICATED)
    victim = next(replica for replica, held in before.items() if ids[0] in held)
    moved = before[victim]
    kill = replica_killer("ScoreWorkerGroup", REPLICATED, replica=victim)
    results, at_end = [None] * len(inputs), [None] * len(inputs)

    def run(index):
        def look(chunk):      # late in each stream (~9 chunks): any move is over, its state is still held
            if chunk.chunk_index == 6:
                at_end[index] = _holdings("ScoreWorkerGroup", REPLICATED)

        results[index] = client.stream(sessions[index], inputs[index][1], 16000, realtime=True,
                                       after_chunks=(2, kill) if index == 0 else None, on_chunk=look)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    engine = AvatarEngine.from_preset("tiny", seed=0)
    for session_id, (image, pcm), result in zip(ids, inputs, results):
        assert result is not None and result.chunks[-1].final and result.reattaches == 0 and len(result.chunks) > 7
        resumed = [event for event in result.events if event.type == pb.Event.RESUMED]
        if session_id in moved:
            assert len(resumed) == 1 and "ScoreWorkerGroup" in resumed[0].message, [e.message for e in result.events]
        else:
            assert resumed == [], [event.message for event in resumed]
        assert [chunk.chunk_index for chunk in result.chunks] == list(range(len(result.chunks)))
        assert result.frames_jpeg == engine_jpegs(engine, image, pcm)
    for session_id, held in zip(ids, at_end):
        homes = [replica for replica, sessions in held.items() if session_id in sessions]
        assert len(homes) == 1, (session_id, held)                                   # held by one replica
        if session_id in moved:
            assert homes[0] != victim, (session_id, held)                            # moved off the dead one
        else:
            assert session_id in before[homes[0]], (session_id, before, held)        # stayed where it was
    for session in sessions:
        client.close_session(session.session_id, session.session_token)
    for deployment in ("ScoreWorkerGroup", "VAEDecoder", "AudioEncoder"):
        assert all(not held for held in _holdings(deployment, REPLICATED).values()), deployment
    client.close()


def test_a_score_replica_scaled_down_mid_stream_hands_its_session_to_the_survivor(cluster):
    """The score group scaled from 2 replicas to 1 while two sessions stream in real time, one on each (the config
    edited, as a RayService's serveConfigV2 is, and applied in place): the replica Serve stops finishes its chunks in
    flight, its session resumes on the survivor from its snapshot (one RESUMED naming the chunk), the other session
    is untouched (no event), both deliver every chunk with the engine's frames, and the survivor holds both."""
    from services.api import pb

    deadline = time.monotonic() + 60
    while len(_holdings("ScoreWorkerGroup", REPLICATED)) != 2 and time.monotonic() < deadline:
        time.sleep(1)                                       # (the replacement of the replica killed above)
    client = AvatarClient(cluster.target, application=REPLICATED)
    inputs = [(png(80 + i), pcm16(speech(4.0, seed=80 + i))) for i in range(2)]
    sessions = [client.create_session(image) for image, _ in inputs]
    ids = [session.session_id for session in sessions]
    before = _holdings("ScoreWorkerGroup", REPLICATED)
    assert sorted(len(held & set(ids)) for held in before.values()) == [1, 1], before
    results, late = [None, None], [None, None]

    def run(index):
        def look(chunk):      # late in the stream (its state is freed when it ends)
            if chunk.chunk_index == 6:
                late[index] = _holdings("ScoreWorkerGroup", REPLICATED)

        try:
            results[index] = client.stream(
                sessions[index], inputs[index][1], 16000, realtime=True, on_chunk=look,
                after_chunks=(2, lambda: cluster.scale(REPLICATED, "ScoreWorkerGroup", 1)) if index == 0 else None)
        except Exception as error:  # noqa: BLE001 - reported by the assertions below
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    deadline = time.monotonic() + 60
    while len(after := _holdings("ScoreWorkerGroup", REPLICATED)) != 1 and time.monotonic() < deadline:
        time.sleep(1)                                           # the stopped replica is gone once it drained
    assert all(not isinstance(result, Exception) for result in results), results
    assert len(after) == 1, after
    (survivor,), (removed,) = after, set(before) - set(after)
    for held in late:                                   # both sessions were on the survivor late in their streams
        assert set(ids) <= held[survivor], (before, late)
    engine = AvatarEngine.from_preset("tiny", seed=0)
    for session_id, (image, pcm), result in zip(ids, inputs, results):
        assert result is not None and result.chunks[-1].final and result.reattaches == 0
        resumed = [event for event in result.events if event.type == pb.Event.RESUMED]
        if session_id in before[removed]:
            assert len(resumed) == 1 and "ScoreWorkerGroup" in resumed[0].message, [e.message for e in result.events]
        else:
            assert resumed == [], [event.message for event in resumed]
        assert [chunk.chunk_index for chunk in result.chunks] == list(range(len(result.chunks)))
        assert result.frames_jpeg == engine_jpegs(engine, image, pcm)
    for session in sessions:
        client.close_session(session.session_id, session.session_token)
    client.close()


def test_an_ingress_replica_serve_replaces_drains_its_stream_to_the_new_one(cluster):
    """The ingress's options change (as a redeploy of the RayService does): Serve starts a new ingress replica and
    stops the old one, whose stream is told (DRAINING) and ended at once rather than held until Serve's shutdown
    timeout; the client re-attaches to the new replica and every chunk arrives with the engine's frames."""
    from services.api import pb

    client = AvatarClient(cluster.target, application=REPLICATED)
    image, pcm = png(90), pcm16(speech(5.0, seed=90))
    session = client.create_session(image)
    redeploy = lambda: cluster.update(REPLICATED, "SessionIngress",  # noqa: E731
                                      ray_actor_options={"num_cpus": 0.2, "num_gpus": 0})
    began = time.monotonic()
    result = client.stream(session, pcm, 16000, realtime=True, after_chunks=(2, redeploy))
    took = time.monotonic() - began
    kinds = [event.type for event in result.events]
    assert pb.Event.DRAINING in kinds and result.reattaches >= 1, [event.message for event in result.events]
    assert [chunk.chunk_index for chunk in result.chunks] == list(range(len(result.chunks)))
    assert result.chunks[-1].final
    assert result.frames_jpeg == engine_jpegs(AvatarEngine.from_preset("tiny", seed=0), image, pcm)
    assert took < 5.0 + 15.0, f"the stream took {took:.0f} s: held until Serve's shutdown timeout?"
    client.close_session(session.session_id, session.session_token)
    client.close()
