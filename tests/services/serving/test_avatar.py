"""facecast as a LiveKit voice agent's avatar, end to end in process: the agent side is livekit-agents' own
`DataStreamAudioOutput`; the avatar is facecast's worker (livekit-agents' `AvatarRunner` + `DataStreamAudioReceiver`
over a facecast session) hosted by the real ingress and worker classes; between them a protocol-level LiveKit peer
(tests/services/delivery/fake_livekit.py). Held: the segments the agent sends come back as playback_finished with
their played length, clear_buffer interrupts with the position reached, the session is paced so an interruption
leaves little speech behind, and the avatar leaves (and its session closes) when the agent does."""

from __future__ import annotations

import asyncio
import time

from livekit import rtc
from livekit.agents.voice.avatar import DataStreamAudioOutput

from services.api import pb
from services.store.sessions import SessionState
from tests.model_core.helpers import speech

from ..delivery.fake_livekit import FakeLiveKit
from ..delivery.test_livekit_room import FakeConnector
from .helpers import pcm16, png, settle_tasks
from .recording_transport import GrpcContext
from .test_ingress import livekit_cluster, redis_url, store  # noqa: F401 (fixtures)

RATE = 16000
FRAME = RATE // 50     # 20 ms, as an agent's TTS output comes


def avatar_request(agent: str = "agent-1") -> pb.CreateSessionRequest:
    return pb.CreateSessionRequest(reference_image=png(9), delivery=pb.Delivery(livekit=pb.LiveKitDelivery(
        room="call-7", identity="facecast-avatar", agent_identity=agent)))


async def say(output: DataStreamAudioOutput, seconds: float, seed: int) -> float:
    """One speech segment, pushed as fast as TTS produces it, then closed; returns its length in seconds."""
    samples = pcm16(speech(seconds, seed=seed))
    for start in range(0, len(samples), FRAME):
        piece = samples[start:start + FRAME]
        await output.capture_frame(rtc.AudioFrame(piece.astype("<i2").tobytes(), RATE, 1, len(piece)))
    output.flush()
    return len(samples) / RATE


def test_a_voice_agent_speaks_through_the_facecast_avatar_and_can_interrupt_it(store):
    server = FakeLiveKit("call-7")

    async def main():
        cluster = livekit_cluster(store)
        try:
            return await asyncio.wait_for(converse(cluster), 120)
        finally:                 # whatever failed, no avatar is left running into the next test
            for session_id in list(cluster.ingress.avatars):
                await cluster.ingress._close(session_id)
            await settle_tasks()

    async def converse(cluster):
        cluster.ingress.room_connector = FakeConnector(server=server)
        agent_room = server.join("agent-1", rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
        context = GrpcContext()
        session = await cluster.ingress.CreateSession(avatar_request(), context)
        assert context.code is None, context.details
        avatar_room = server.rooms["facecast-avatar"]
        output = DataStreamAudioOutput(agent_room, destination_identity="facecast-avatar", sample_rate=RATE,
                                       wait_remote_track=rtc.TrackKind.KIND_VIDEO)
        finished = []
        output.on("playback_finished", finished.append)

        lengths = [await say(output, 1.2, seed=1)]                   # a whole segment
        await asyncio.wait_for(output.wait_for_playout(), 30)

        started = time.monotonic()
        await say(output, 3.0, seed=2)                               # a long one, interrupted
        while output._pushed_duration and time.monotonic() - started < 1.6:
            await asyncio.sleep(0.05)
        worker = cluster.ingress.avatars[session.session_id]
        output.clear_buffer()
        await asyncio.wait_for(output.wait_for_playout(), 30)

        lengths.append(await say(output, 0.6, seed=3))               # and the avatar goes on after it
        await asyncio.wait_for(output.wait_for_playout(), 30)
        stats = worker.generator.stats
        await agent_room.disconnect()                                # the agent leaves: so does the avatar
        for _ in range(100):
            if session.session_id not in cluster.ingress.avatars:
                break
            await asyncio.sleep(0.05)
        return cluster, session, avatar_room, finished, stats, lengths

    cluster, session, avatar_room, finished, stats, lengths = asyncio.run(main())
    assert not finished[0].interrupted and abs(finished[0].playback_position - lengths[0]) < 0.02, finished[0]
    assert finished[1].interrupted and 0.1 < finished[1].playback_position < 2.0, finished[1]
    # after an interruption the runner may count one frame of the cut speech that was already on its way to the
    # synchroniser (it resets its position asynchronously): at most one video frame's worth, 40 ms
    assert not finished[2].interrupted and abs(finished[2].playback_position - lengths[1]) <= 0.041, finished[2]
    assert len(finished) == 3
    assert stats.interruptions == 1 and stats.dropped_s > 0.8, stats            # the rest of the segment dropped
    (sent_s, shown_s), = stats.clears
    assert 0 <= sent_s - shown_s <= 0.48 + 0.32 + 0.12 + 0.5, stats.clears     # paced: little speech held back
    published = avatar_room.local_participant.track_publications.values()
    assert {publication.kind for publication in published} == {rtc.TrackKind.KIND_VIDEO, rtc.TrackKind.KIND_AUDIO}
    methods = [method for caller, _, method, _ in server.rpc_log if caller == "facecast-avatar"]
    assert methods.count("lk.playback_finished") == 3 and "lk.clear_buffer" in [
        method for caller, _, method, _ in server.rpc_log if caller == "agent-1"]
    assert not avatar_room.connected and session.session_id not in cluster.ingress.avatars
    assert cluster.ingress.store.get(session.session_id).state == SessionState.CLOSED


def test_an_avatar_for_an_agent_that_is_not_in_the_room_fails_clearly(store):
    server = FakeLiveKit("call-7")

    async def main():
        cluster = livekit_cluster(store, FakeConnector(server=server))
        cluster.ingress.avatar_agent_timeout_s = 1.0
        context = GrpcContext()
        await cluster.ingress.CreateSession(avatar_request("nobody"), context)
        return context, cluster

    context, cluster = asyncio.run(main())
    assert context.code.name == "UNAVAILABLE" and "'nobody' is not in LiveKit room 'call-7'" in context.details
    assert cluster.held()["score"] == 0 and "facecast-avatar" not in server.rooms
