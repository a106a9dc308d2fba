"""The agent-side helper over real gRPC on loopback: `await FacecastAvatarSession(...).start(agent_session, room)`
makes the facecast cluster join the agent's room as its avatar and routes the agent's speech there; closing it
closes the session. And a missing acknowledgement never hangs the agent."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from livekit import rtc
from livekit.agents import AgentSession
from livekit.agents.voice.avatar import DataStreamAudioOutput

from services.api.generated.facecast.v1 import avatar_pb2_grpc
from services.delivery.agent_avatar import AvatarError, FacecastAvatarSession, GuardedAudioOutput
from services.store.sessions import SessionState

from ..delivery.fake_livekit import FakeLiveKit
from ..delivery.test_livekit_room import FakeConnector
from .helpers import png, settle_tasks
from .test_avatar import say
from .test_ingress import Cluster, livekit_cluster, redis_url, store  # noqa: F401 (fixtures)

AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT


async def serve_ingress(ingress):
    server = grpc.aio.server()
    avatar_pb2_grpc.add_AvatarServiceServicer_to_server(ingress, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_the_agent_helper_gives_the_agent_its_facecast_face(store):
    server = FakeLiveKit("call-7")

    async def main():
        cluster = livekit_cluster(store, FakeConnector(server=server))
        grpc_server, target = await serve_ingress(cluster.ingress)
        try:
            agent_room = server.join("agent-1", AGENT)
            agent_session = AgentSession()
            avatar = FacecastAvatarSession(target=target, reference_image=png(9), avatar_identity="face-1")
            await avatar.start(agent_session, agent_room)
            joined = dict(server.rooms["face-1"].local_participant.attributes)
            output = agent_session.output.audio
            finished = []
            output.on("playback_finished", finished.append)
            length = await say(output, 0.8, seed=4)
            await asyncio.wait_for(output.wait_for_playout(), 30)
            session_id = avatar.session.session_id
            await avatar.aclose()
            return cluster, joined, output, finished, length, session_id
        finally:
            for session_id in list(cluster.ingress.avatars):
                await cluster.ingress._close(session_id)
            await grpc_server.stop(None)
            await settle_tasks()

    cluster, joined, output, finished, length, session_id = asyncio.run(main())
    assert joined == {"lk.publish_on_behalf": "agent-1"}
    assert isinstance(output, GuardedAudioOutput) and output.unacknowledged == 0
    assert len(finished) == 1 and not finished[0].interrupted and abs(finished[0].playback_position - length) < 0.02
    assert cluster.ingress.store.get(session_id).state == SessionState.CLOSED and "face-1" not in server.rooms


def test_the_helper_says_why_when_facecast_cannot_start_the_avatar(store):
    server = FakeLiveKit("call-7")

    async def main():
        cluster = Cluster(store)                    # no LiveKit configured on this cluster
        grpc_server, target = await serve_ingress(cluster.ingress)
        try:
            avatar = FacecastAvatarSession(target=target, reference_image=png(9))
            with pytest.raises(AvatarError) as info:
                await avatar.start(AgentSession(), server.join("agent-1", AGENT))
            return str(info.value)
        finally:
            await grpc_server.stop(None)

    message = asyncio.run(main())
    assert message.startswith("facecast at 127.0.0.1:") and "FAILED_PRECONDITION" in message
    assert "no LiveKit configured" in message


def test_a_missing_playback_acknowledgement_never_hangs_the_agent():
    """An avatar that takes the speech and never answers lk.playback_finished (agents#3917): the plain output
    waits forever; the guarded one marks the segment finished after its length plus the grace."""
    async def main():
        server = FakeLiveKit("call-7")
        agent_room = server.join("agent-1", AGENT)
        mute = server.join("mute-avatar", AGENT)
        mute.register_byte_stream_handler("lk.audio_stream", lambda reader, identity: None)
        plain = DataStreamAudioOutput(agent_room, destination_identity="mute-avatar", sample_rate=16000)
        await say(plain, 0.4, seed=5)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(plain.wait_for_playout(), 2.0)
        guarded = GuardedAudioOutput(agent_room, destination_identity="mute-avatar", sample_rate=16000,
                                     ack_grace_s=0.5)
        started = time.monotonic()
        length = await say(guarded, 0.4, seed=6)
        event = await asyncio.wait_for(guarded.wait_for_playout(), 5.0)
        return event, time.monotonic() - started, length, guarded.unacknowledged

    event, took, length, unacknowledged = asyncio.run(main())
    assert not event.interrupted and event.playback_position == pytest.approx(length)
    assert took < length + 0.5 + 1.0 and unacknowledged == 1
