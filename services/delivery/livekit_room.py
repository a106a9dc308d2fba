"""LiveKit delivery: the avatar joins a room as its own participant and publishes its face and voice, in sync.

    Egress ─► LiveKitSink.write(MediaChunk) ─► JPEG -> RGBA VideoFrame, PCM -> 10 ms AudioFrames
                                               ─► rtc.AVSynchronizer (paces video at the chunk's fps, audio beside it)
                                               ─► VideoSource / AudioSource ─► tracks published in the room

The server URL, API key and secret come from configuration (`LiveKitConfig`: the Serve config's args or the
environment), never from a client.  facecast mints the avatar's token itself (`avatar_token`): one room, publish only
(no subscribing), a TTL; an avatar that acts for a voice agent also carries `lk.publish_on_behalf`.

The room is behind facecast's own interface (`RoomConnector` -> `AvatarRoom`): `LiveKitConnector` is the real one
(an `rtc.Room`); the tests put a fake room behind the same interface, with the real rtc sources, tracks and
synchroniser in front of it.  When the connection drops mid-call the sink reconnects (a fresh token each time,
backing off) and publishes its tracks again; chunks that arrive while it is away are dropped (a live sink), never
queued up as delay.  A server that does not answer fails fast with `DeliveryError` naming the URL.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import logging
import os
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from services.delivery.egress import MediaChunk, Sink

logger = logging.getLogger(__name__)

AUDIO_FRAME_MS = 10
PUBLISH_ON_BEHALF = "lk.publish_on_behalf"


class DeliveryError(RuntimeError):
    """Delivery cannot start or go on (not configured, server not answering); the message says what and where."""


@dataclass(frozen=True)
class LiveKitConfig:
    """Where the LiveKit server is and the credentials facecast mints tokens with (never from a client)."""

    url: str
    api_key: str
    api_secret: str
    token_ttl_s: float = 6 * 3600.0
    connect_timeout_s: float = 5.0
    public_url: str | None = None       # what browsers connect to, when not `url` (a cluster-internal address)

    @property
    def browser_url(self) -> str:
        return self.public_url or self.url

    @classmethod
    def from_settings(cls, url: str | None = None, api_key: str | None = None, api_secret: str | None = None,
                      token_ttl_s: float | None = None, env=os.environ,
                      public_url: str | None = None) -> "LiveKitConfig | None":
        """From the Serve config's args, each falling back to $LIVEKIT_URL / $LIVEKIT_API_KEY / $LIVEKIT_API_SECRET
        ($LIVEKIT_PUBLIC_URL for `public_url`); None when no URL is configured (LiveKit delivery is then off). A URL
        without credentials is an error."""
        url = url or env.get("LIVEKIT_URL")
        if not url:
            return None
        public_url = public_url or env.get("LIVEKIT_PUBLIC_URL") or None
        for name, value in (("livekit_url", url), ("livekit_public_url", public_url)):
            if value is not None and not value.startswith(("ws://", "wss://", "http://", "https://")):
                raise DeliveryError(f"{name}={value!r} is invalid: a ws://, wss://, http:// or https:// URL")
        api_key, api_secret = api_key or env.get("LIVEKIT_API_KEY"), api_secret or env.get("LIVEKIT_API_SECRET")
        if not api_key or not api_secret:
            missing = [name for name, value in (("LIVEKIT_API_KEY", api_key), ("LIVEKIT_API_SECRET", api_secret))
                       if not value]
            raise DeliveryError(f"LiveKit at {url} is configured without {' and '.join(missing)}: set them in the "
                                "environment (or livekit_api_key / livekit_api_secret in the Serve config's args)")
        return cls(url, api_key, api_secret, **({"token_ttl_s": token_ttl_s} if token_ttl_s else {}),
                   public_url=public_url)


def avatar_token(config: LiveKitConfig, room: str, identity: str, *, name: str | None = None,
                 publish_on_behalf: str | None = None, ttl_s: float | None = None) -> str:
    """A JWT that lets `identity` join `room` only and publish there (tracks, and data for the avatar protocol's
    RPCs), never subscribe; it expires after `ttl_s` (default: the config's). With `publish_on_behalf` (a voice
    agent's identity) it is an agent token carrying `lk.publish_on_behalf`, as LiveKit's avatar plugins mint."""
    from livekit import api

    if not room or not identity:
        raise DeliveryError(f"a LiveKit token needs a room and an identity; got room={room!r} identity={identity!r}")
    token = (api.AccessToken(config.api_key, config.api_secret).with_identity(identity).with_name(name or identity)
             .with_grants(api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=False,
                                          can_publish_data=True))
             .with_ttl(datetime.timedelta(seconds=ttl_s or config.token_ttl_s)))
    if publish_on_behalf:
        token = token.with_kind("agent").with_attributes({PUBLISH_ON_BEHALF: publish_on_behalf})
    return token.to_jwt()


def caller_token(config: LiveKitConfig, room: str, identity: str, ttl_s: float | None = None) -> str:
    """The browser's token for a call in a LiveKit room: join `room` only, publish a microphone and nothing else,
    subscribe (to the avatar's face and voice); it expires after `ttl_s` (default: the config's)."""
    from livekit import api

    return (api.AccessToken(config.api_key, config.api_secret).with_identity(identity).with_name("caller")
            .with_grants(api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True,
                                         can_publish_data=False, can_publish_sources=["microphone"]))
            .with_ttl(datetime.timedelta(seconds=ttl_s or config.token_ttl_s)).to_jwt())


def listener_token(config: LiveKitConfig, room: str, identity: str) -> str:
    """facecast's ear in a call's room: hidden, subscribe only (it hears the caller for the conversation)."""
    from livekit import api

    return (api.AccessToken(config.api_key, config.api_secret).with_identity(identity).with_name("facecast")
            .with_grants(api.VideoGrants(room_join=True, room=room, can_publish=False, can_subscribe=True,
                                         can_publish_data=False, hidden=True))
            .with_ttl(datetime.timedelta(seconds=config.token_ttl_s)).to_jwt())


class RoomEar(ABC):
    """One participant's microphone in a room, heard as mono int16 pieces at `rate`."""

    rate: int

    @abstractmethod
    def pieces(self):
        """Async iterator of np.int16 arrays, from when the speaker publishes until the room or its track ends."""

    @abstractmethod
    async def close(self) -> None:
        ...


class AvatarRoom(ABC):
    """What the sink needs of a connected room."""

    disconnected: asyncio.Event
    """Set when the connection is lost (not by `disconnect`)."""

    @abstractmethod
    async def publish(self, track, source: int) -> None:
        """Publish a local track (`rtc.LocalVideoTrack` / `LocalAudioTrack`) as `source` (an rtc.TrackSource)."""

    @abstractmethod
    async def disconnect(self) -> None:
        ...


class RoomConnector(ABC):
    @abstractmethod
    async def connect(self, url: str, token: str, timeout_s: float) -> AvatarRoom:
        """Join; raise `DeliveryError` naming the URL when the server does not answer."""

    @abstractmethod
    async def connect_rtc(self, url: str, token: str, timeout_s: float):
        """Join and return the connected `rtc.Room` itself (or an object with its surface): the avatar protocol's
        livekit-agents classes work on the room directly. `DeliveryError` as `connect`."""

    async def hear(self, url: str, token: str, timeout_s: float, speaker: str, rate: int = 16000) -> RoomEar:
        """Join (a listener's token) and hear `speaker`'s microphone. `DeliveryError` as `connect`."""
        return _RtcEar(await self.connect_rtc(url, token, timeout_s), speaker, rate)


class _LiveKitRoom(AvatarRoom):
    def __init__(self, room):
        self.room = room
        self.disconnected = asyncio.Event()
        self.leaving = False
        room.on("disconnected", self._on_disconnected)

    def _on_disconnected(self, *args) -> None:
        if not self.leaving:
            self.disconnected.set()

    async def publish(self, track, source: int) -> None:
        from livekit import rtc

        await self.room.local_participant.publish_track(track, rtc.TrackPublishOptions(source=source))

    async def disconnect(self) -> None:
        self.leaving = True
        await self.room.disconnect()


class LiveKitConnector(RoomConnector):
    """The real thing: an `rtc.Room` per connection."""

    async def connect(self, url: str, token: str, timeout_s: float) -> AvatarRoom:
        return _LiveKitRoom(await self.connect_rtc(url, token, timeout_s))

    async def connect_rtc(self, url: str, token: str, timeout_s: float):
        from livekit import rtc

        room = rtc.Room()
        try:
            await asyncio.wait_for(room.connect(url, token, rtc.RoomOptions(auto_subscribe=False,
                                                                            connect_timeout=timeout_s)),
                                   timeout_s * 4)
        except (rtc.ConnectError, TimeoutError, OSError) as error:
            raise DeliveryError(f"the LiveKit server at {url} did not answer: {error}") from None
        return room


class _RtcEar(RoomEar):
    def __init__(self, room, speaker: str, rate: int):
        self.room, self.speaker, self.rate = room, speaker, rate
        self.joined = asyncio.Event()
        room.on("participant_connected", lambda participant: participant.identity == speaker and self.joined.set())
        room.on("track_published", self._subscribe)

    def _subscribe(self, publication, participant) -> None:
        from livekit import rtc

        if participant.identity == self.speaker and publication.source == rtc.TrackSource.SOURCE_MICROPHONE:
            publication.set_subscribed(True)

    async def pieces(self):
        from livekit import rtc

        while self.speaker not in self.room.remote_participants:
            self.joined.clear()
            await self.joined.wait()
        participant = self.room.remote_participants[self.speaker]
        for publication in list(participant.track_publications.values()):
            self._subscribe(publication, participant)
        stream = rtc.AudioStream.from_participant(participant=participant, sample_rate=self.rate, num_channels=1,
                                                  track_source=rtc.TrackSource.SOURCE_MICROPHONE)
        try:
            async for event in stream:
                yield np.frombuffer(bytes(event.frame.data), dtype=np.int16).copy()
        finally:
            await _quietly(stream.aclose())

    async def close(self) -> None:
        await _quietly(self.room.disconnect())


def jpeg_to_rgba(data: bytes) -> tuple[int, int, bytes]:
    with Image.open(io.BytesIO(data)) as image:
        rgba = image.convert("RGBA")
        return rgba.width, rgba.height, rgba.tobytes()


def audio_frames(pcm_s16le: bytes, sample_rate_hz: int, start_s: float):
    """Yield (rtc.AudioFrame of 10 ms, its end time in session seconds) covering the PCM (the last may be shorter)."""
    from livekit import rtc

    samples = np.frombuffer(pcm_s16le, dtype="<i2")
    step = sample_rate_hz * AUDIO_FRAME_MS // 1000
    for offset in range(0, len(samples), step):
        piece = samples[offset:offset + step]
        end_s = start_s + (offset + len(piece)) / sample_rate_hz
        yield rtc.AudioFrame(piece.tobytes(), sample_rate_hz, 1, len(piece)), end_s


class LiveKitSink(Sink):
    """Publishes a session's chunks to a LiveKit room (see the module docstring). A live sink: lossy, 2 behind."""

    lossy = True
    max_pending = 2

    def __init__(self, config: LiveKitConfig, room: str, identity: str, connector: RoomConnector | None = None,
                 name: str = "livekit", publish_on_behalf: str | None = None, max_reconnects: int = 8):
        self.config, self.room_name, self.identity, self.name = config, room, identity, name
        self.connector = connector or LiveKitConnector()
        self.publish_on_behalf, self.max_reconnects = publish_on_behalf, max_reconnects
        self.room: AvatarRoom | None = None
        self.sync = self.video_source = self.audio_source = None
        self.format: tuple[int, int, int, float] | None = None   # width, height, sample rate, fps
        self.connects = 0
        self.offsets_ms: deque = deque(maxlen=1024)   # video - audio time after each recent chunk (+ = video ahead)

    async def open(self) -> None:
        """Join the room now, so a server that does not answer fails the delivery before the first chunk (once:
        a second call does nothing)."""
        if self.room is None:
            self.room = await self._connect()

    async def _connect(self) -> AvatarRoom:
        token = avatar_token(self.config, self.room_name, self.identity, publish_on_behalf=self.publish_on_behalf)
        room = await self.connector.connect(self.config.url, token, self.config.connect_timeout_s)
        self.connects += 1
        return room

    async def _publish(self) -> None:
        from livekit import rtc

        video = rtc.LocalVideoTrack.create_video_track(f"{self.identity}-video", self.video_source)
        audio = rtc.LocalAudioTrack.create_audio_track(f"{self.identity}-audio", self.audio_source)
        await self.room.publish(video, rtc.TrackSource.SOURCE_CAMERA)
        await self.room.publish(audio, rtc.TrackSource.SOURCE_MICROPHONE)

    async def _start_media(self, chunk: MediaChunk) -> None:
        from livekit import rtc

        self.format = (chunk.width, chunk.height, chunk.sample_rate_hz, chunk.fps)
        self.video_source = rtc.VideoSource(chunk.width, chunk.height)
        self.audio_source = rtc.AudioSource(chunk.sample_rate_hz, 1)
        self.sync = rtc.AVSynchronizer(audio_source=self.audio_source, video_source=self.video_source,
                                       video_fps=chunk.fps)
        await self._publish()

    async def _reconnect(self) -> None:
        """The room dropped us: join again (fresh token, backing off) and publish the same sources."""
        await _quietly(self.room.disconnect())
        for attempt in range(self.max_reconnects):
            await asyncio.sleep(min(0.25 * 2 ** attempt, 5.0))
            try:
                self.room = await self._connect()
            except DeliveryError as error:
                logger.warning("LiveKit reconnect %d/%d failed: %s", attempt + 1, self.max_reconnects, error)
                continue
            await self._publish()
            self.sync.reset()
            return
        raise DeliveryError(f"lost the LiveKit room {self.room_name!r} at {self.config.url} and could not rejoin "
                            f"after {self.max_reconnects} attempts")

    async def write(self, chunk: MediaChunk) -> None:
        from livekit import rtc

        if self.room.disconnected.is_set():
            await self._reconnect()
            return      # this chunk is stale by now: a live viewer wants the next one
        if self.format is None:
            await self._start_media(chunk)
        elif self.format != (chunk.width, chunk.height, chunk.sample_rate_hz, chunk.fps):
            raise DeliveryError(f"chunk {chunk.chunk_index} changes the published format from {self.format} to "
                                f"{(chunk.width, chunk.height, chunk.sample_rate_hz, chunk.fps)}")
        audio = list(audio_frames(chunk.audio_pcm_s16le, chunk.sample_rate_hz, chunk.start_s))
        per_frame = max(1, round(len(audio) / max(len(chunk.frames_jpeg), 1)))
        for index, data in enumerate(chunk.frames_jpeg):   # each picture, then the voice it shows
            width, height, rgba = jpeg_to_rgba(data)
            frame = rtc.VideoFrame(width, height, rtc.VideoBufferType.RGBA, rgba)
            await self.sync.push(frame, chunk.start_s + (index + 1) / chunk.fps)
            for audio_frame, end_s in audio[index * per_frame:(index + 1) * per_frame]:
                await self.sync.push(audio_frame, end_s)
        for audio_frame, end_s in audio[len(chunk.frames_jpeg) * per_frame:]:
            await self.sync.push(audio_frame, end_s)
        self.offsets_ms.append((self.sync.last_video_time - self.sync.last_audio_time) * 1000)

    async def close(self) -> None:
        if self.sync is not None:
            await _quietly(asyncio.wait_for(self.sync.wait_for_playout(), 2.0))
            await _quietly(self.sync.aclose())
        for source in (self.video_source, self.audio_source):
            if source is not None:
                await _quietly(source.aclose())
        if self.room is not None:
            await _quietly(self.room.disconnect())


async def _quietly(awaitable) -> None:
    try:
        await awaitable
    except Exception as error:     # closing: nothing left to tell anyone
        logger.debug("ignored while closing LiveKit delivery: %s", error)
