"""LiveKit delivery with the real livekit objects (token minting and verification, rtc sources, tracks and the
A/V synchroniser) and a fake room behind facecast's own room interface — no LiveKit server runs here; the real
connector against a port where none answers fails fast naming the URL."""

from __future__ import annotations

import asyncio
import time

import pytest
from livekit import api, rtc

from services.delivery.egress import Egress
from services.delivery.livekit_room import (AvatarRoom, DeliveryError, LiveKitConfig, LiveKitConnector, LiveKitSink,
                                            RoomConnector, avatar_token)
from services.net import free_port

from .test_egress import FPS, FRAMES, RATE, SIZE, chunk

CONFIG = LiveKitConfig("ws://livekit.test:7880", "devkey", "a-secret-of-at-least-32-characters-long")


def test_the_avatar_token_grants_one_room_publish_only_with_a_ttl():
    claims = api.TokenVerifier("devkey", CONFIG.api_secret).verify(avatar_token(CONFIG, "call-7", "avatar-1",
                                                                                ttl_s=120))
    assert claims.identity == "avatar-1" and claims.video.room == "call-7" and claims.video.room_join
    assert claims.video.can_publish and not claims.video.can_subscribe
    assert not (claims.video.room_create or claims.video.room_admin or claims.video.room_list)
    agent = api.TokenVerifier("devkey", CONFIG.api_secret).verify(
        avatar_token(CONFIG, "call-7", "facecast-avatar", publish_on_behalf="agent-42"))
    assert agent.kind == "agent" and agent.attributes == {"lk.publish_on_behalf": "agent-42"}
    with pytest.raises(Exception):
        api.TokenVerifier("devkey", "another-secret-of-at-least-32-chars").verify(
            avatar_token(CONFIG, "call-7", "avatar-1"))


def test_the_server_url_and_keys_come_from_configuration():
    env = {"LIVEKIT_URL": "wss://lk.example", "LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s"}
    assert LiveKitConfig.from_settings(env={}) is None
    assert LiveKitConfig.from_settings(env=env) == LiveKitConfig("wss://lk.example", "k", "s")
    assert LiveKitConfig.from_settings("ws://other:7880", env=env).url == "ws://other:7880"
    with pytest.raises(DeliveryError, match="without LIVEKIT_API_SECRET"):
        LiveKitConfig.from_settings(env={"LIVEKIT_URL": "wss://lk.example", "LIVEKIT_API_KEY": "k"})
    with pytest.raises(DeliveryError, match="livekit_url='lk.example' is invalid"):
        LiveKitConfig.from_settings("lk.example", env=env)
    assert LiveKitConfig.from_settings(env=env).browser_url == "wss://lk.example"
    internal = LiveKitConfig.from_settings("ws://livekit.svc:7880",
                                           env={**env, "LIVEKIT_PUBLIC_URL": "wss://lk.example"})
    assert (internal.url, internal.browser_url) == ("ws://livekit.svc:7880", "wss://lk.example")
    with pytest.raises(DeliveryError, match="livekit_public_url='lk.example' is invalid"):
        LiveKitConfig.from_settings(env=env, public_url="lk.example")


class FakeRoom(AvatarRoom):
    def __init__(self, token):
        self.token, self.published, self.disconnected, self.left = token, [], asyncio.Event(), False

    async def publish(self, track, source):
        self.published.append((type(track).__name__, source))

    async def disconnect(self):
        self.left = True


class FakeConnector(RoomConnector):
    """Connects to `FakeRoom`s (the sink's interface) or, for the avatar protocol, joins a `FakeLiveKit` server the
    way a LiveKit server would admit the token: verified, identity, kind and attributes from its claims."""

    def __init__(self, refuse: int = 0, server=None):
        self.rooms, self.refuse, self.server = [], refuse, server

    async def connect_rtc(self, url, token, timeout_s):
        claims = api.TokenVerifier("devkey", CONFIG.api_secret).verify(token)
        assert claims.video.room == self.server.name, (claims.video.room, self.server.name)
        kind = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT if claims.kind == "agent" else \
            rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
        return self.server.join(claims.identity, kind, dict(claims.attributes or {}))

    async def connect(self, url, token, timeout_s):
        if self.refuse:
            self.refuse -= 1
            raise DeliveryError(f"the LiveKit server at {url} did not answer")
        self.rooms.append(FakeRoom(token))
        return self.rooms[-1]


class RecordingVideoSource(rtc.VideoSource):
    captured: list = []

    def capture_frame(self, frame, **kwargs):
        RecordingVideoSource.captured.append((time.monotonic(), frame.width, frame.height))
        super().capture_frame(frame, **kwargs)


class RecordingAudioSource(rtc.AudioSource):
    captured: list = []

    async def capture_frame(self, frame):
        RecordingAudioSource.captured.append((time.monotonic(), frame.sample_rate, bytes(frame.data)))
        await super().capture_frame(frame)


def test_chunks_are_published_as_video_and_voice_paced_in_sync(monkeypatch):
    monkeypatch.setattr(rtc, "VideoSource", RecordingVideoSource)
    monkeypatch.setattr(rtc, "AudioSource", RecordingAudioSource)
    RecordingVideoSource.captured, RecordingAudioSource.captured = [], []
    connector = FakeConnector()

    async def main():
        sink = LiveKitSink(CONFIG, "call-7", "avatar-1", connector)
        egress = Egress([sink])
        await egress.start()
        for index in range(3):
            egress.offer(chunk(index))
            await asyncio.sleep(FRAMES / FPS)       # chunks arrive in real time
        stats = await egress.close(timeout_s=10)
        return sink, stats

    sink, stats = asyncio.run(main())
    assert stats["livekit"]["delivered"] == 3 and stats["livekit"]["error"] is None
    (room,) = connector.rooms
    claims = api.TokenVerifier("devkey", CONFIG.api_secret).verify(room.token)
    assert claims.video.room == "call-7" and claims.identity == "avatar-1"
    assert room.published == [("LocalVideoTrack", rtc.TrackSource.SOURCE_CAMERA),
                              ("LocalAudioTrack", rtc.TrackSource.SOURCE_MICROPHONE)]
    frames = RecordingVideoSource.captured
    assert len(frames) == 3 * FRAMES and {(w, h) for _, w, h in frames} == {(SIZE, SIZE)}
    span = frames[-1][0] - frames[0][0]
    assert span == pytest.approx((3 * FRAMES - 1) / FPS, rel=0.15), "video paced at the chunk's frame rate"
    assert all(abs(offset) <= 1000 / FPS + 1 for offset in sink.offsets_ms), sink.offsets_ms
    voice = RecordingAudioSource.captured
    assert {rate for _, rate, _ in voice} == {RATE}
    assert b"".join(data for _, _, data in voice) == b"".join(chunk(i).audio_pcm_s16le for i in range(3))
    # the voice goes out beside its pictures: by the time picture i is captured, about i frames' worth of voice
    # has been handed over (never a chunk ahead or behind)
    for captured_at, _, _ in frames[::6]:
        shown = sum(1 for t, _, _ in frames if t <= captured_at) / FPS
        voiced = sum(len(data) // 2 for t, _, data in voice if t <= captured_at) / RATE
        assert abs(voiced - shown) <= 2.5 / FPS, (shown, voiced)
    assert room.left


def test_a_dropped_connection_is_rejoined_and_the_tracks_published_again():
    connector = FakeConnector()

    async def main():
        sink = LiveKitSink(CONFIG, "call-7", "avatar-1", connector)
        await sink.open()
        await sink.write(chunk(0))
        connector.rooms[0].disconnected.set()          # the server dropped us
        connector.refuse = 1                           # and refuses the first attempt to come back
        await sink.write(chunk(1))                     # stale by the time we are back: dropped
        await sink.write(chunk(2))
        await sink.close()
        return sink

    sink = asyncio.run(main())
    assert sink.connects == 2 and len(connector.rooms) == 2
    assert [kind for kind, _ in connector.rooms[1].published] == ["LocalVideoTrack", "LocalAudioTrack"]


def test_a_server_that_does_not_answer_fails_fast_naming_the_url():
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    config = LiveKitConfig(url, "devkey", CONFIG.api_secret, connect_timeout_s=2.0)

    async def main():
        egress = Egress([LiveKitSink(config, "call-7", "avatar-1", LiveKitConnector())])
        started = time.monotonic()
        await egress.start()
        egress.offer(chunk(0))
        stats = await egress.close(timeout_s=30)
        return stats, time.monotonic() - started

    stats, took = asyncio.run(main())
    assert took < 15
    assert stats["livekit"]["error"].startswith(f"DeliveryError: the LiveKit server at {url} did not answer")
