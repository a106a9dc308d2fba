"""A session delivered to a LiveKit room through the real ingress and worker classes: the room gets the engine's
frames and the voice, the gRPC stream carries events only (unless asked for both); a server without LiveKit refuses
the delivery at CreateSession, and a LiveKit server that does not answer fails the attach with UNAVAILABLE naming its
URL while another session streams on."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from livekit import rtc

from model_core.engine import AvatarEngine
from services.api import pb
from services.delivery.livekit_room import jpeg_to_rgba
from services.net import free_port
from tests.model_core.helpers import speech

from ..delivery.test_livekit_room import FakeConnector, RecordingAudioSource, RecordingVideoSource
from .helpers import engine_jpegs, pcm16, png
from .recording_transport import GrpcContext
from .test_ingress import (Cluster, audio_messages, chunks_of, events_of, livekit_cluster, redis_url,  # noqa: F401
                           store)

SECRET = "a-secret-of-at-least-32-characters-long"


def livekit_request(image: bytes, room: str = "call-7", **fields) -> pb.CreateSessionRequest:
    return pb.CreateSessionRequest(reference_image=image, delivery=pb.Delivery(
        livekit=pb.LiveKitDelivery(room=room, **fields)))


class RecordingFrames(RecordingVideoSource):
    data: list = []

    def capture_frame(self, frame, **kwargs):
        RecordingFrames.data.append(bytes(frame.data))
        super().capture_frame(frame, **kwargs)


def test_a_livekit_session_publishes_the_engines_frames_and_voice_to_its_room(store, monkeypatch):
    monkeypatch.setattr(rtc, "VideoSource", RecordingFrames)
    monkeypatch.setattr(rtc, "AudioSource", RecordingAudioSource)
    RecordingFrames.data, RecordingAudioSource.captured = [], []
    image, pcm = png(5), pcm16(speech(1.2, seed=5))

    async def main():
        cluster = livekit_cluster(store, connector := FakeConnector())
        context = GrpcContext()
        session = await cluster.ingress.CreateSession(livekit_request(image), context)
        assert context.code is None, context.details
        outputs, context = await cluster.stream(session, audio_messages(pcm))
        for _ in range(100):                # the sink plays out what it has after the stream ends, then leaves
            if connector.rooms and connector.rooms[0].left:
                break
            await asyncio.sleep(0.1)
        return session, outputs, context, connector

    session, outputs, context, connector = asyncio.run(main())
    assert context.code is None, context.details
    assert chunks_of(outputs) == [], "with LiveKit delivery the gRPC stream carries events only"
    assert [event.type for event in events_of(outputs)][-1] == pb.Event.SESSION_ENDED
    (room,) = connector.rooms
    assert [kind for kind, _ in room.published] == ["LocalVideoTrack", "LocalAudioTrack"]
    expected = engine_jpegs(AvatarEngine.from_preset("tiny", seed=0), image, pcm)
    assert RecordingFrames.data == [jpeg_to_rgba(jpeg)[2] for jpeg in expected], "the room shows the engine's frames"
    voice = b"".join(data for _, _, data in RecordingAudioSource.captured)
    assert voice == pcm.astype("<i2").tobytes()[:len(voice)] and len(voice) >= 2 * (len(expected) - 1) * 640
    assert room.left


def test_livekit_delivery_needs_a_configured_server_and_a_valid_room(store):
    async def main():
        plain = Cluster(store)
        configured = Cluster(store, livekit_url="ws://livekit.test:7880", livekit_api_key="devkey",
                             livekit_api_secret=SECRET)
        results = []
        for cluster, request in ((plain, livekit_request(png(1))), (configured, livekit_request(png(1), room="")),
                                 (configured, livekit_request(png(1), identity="bad identity!"))):
            context = GrpcContext()
            await cluster.ingress.CreateSession(request, context)
            results.append((context.code, context.details))
        return results

    (no_server, no_room, bad_identity) = asyncio.run(main())
    assert no_server[0] == grpc.StatusCode.FAILED_PRECONDITION and "no LiveKit configured" in no_server[1]
    assert no_room[0] == grpc.StatusCode.INVALID_ARGUMENT and "delivery.livekit.room is invalid" in no_room[1]
    assert bad_identity[0] == grpc.StatusCode.INVALID_ARGUMENT and "delivery.livekit.identity" in bad_identity[1]


def test_a_livekit_server_that_does_not_answer_fails_the_attach_naming_its_url(store):
    url = f"ws://127.0.0.1:{free_port()}"
    image, pcm = png(6), pcm16(speech(1.0, seed=6))

    async def main():
        cluster = Cluster(store, livekit_url=url, livekit_api_key="devkey", livekit_api_secret=SECRET)
        context = GrpcContext()
        lost = await cluster.ingress.CreateSession(livekit_request(image), context)
        healthy = await cluster.create(image)
        (lost_out, lost_ctx), (ok_out, ok_ctx) = await asyncio.gather(
            cluster.stream(lost, audio_messages(pcm)), cluster.stream(healthy, audio_messages(pcm)))
        return lost_out, lost_ctx, ok_out, ok_ctx

    lost_out, lost_ctx, ok_out, ok_ctx = asyncio.run(main())
    assert lost_ctx.code == grpc.StatusCode.UNAVAILABLE and lost_ctx.details.startswith(
        f"the LiveKit server at {url} did not answer"), lost_ctx.details
    assert lost_out == []
    assert ok_ctx.code is None and chunks_of(ok_out) and chunks_of(ok_out)[-1].final


def test_a_livekit_session_can_also_stream_its_video_on_grpc(store):
    image, pcm = png(7), pcm16(speech(0.8, seed=7))

    async def main():
        cluster = livekit_cluster(store, FakeConnector())
        context = GrpcContext()
        session = await cluster.ingress.CreateSession(livekit_request(image, also_stream=True), context)
        return await cluster.stream(session, audio_messages(pcm))

    outputs, context = asyncio.run(main())
    assert context.code is None and chunks_of(outputs) and chunks_of(outputs)[-1].final
    assert np.sum([len(chunk.frames) for chunk in chunks_of(outputs)]) > 0
