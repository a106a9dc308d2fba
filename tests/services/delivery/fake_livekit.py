"""A LiveKit server stand-in at the protocol level, for tests: no LiveKit server runs here.

`FakeLiveKit.join(identity, kind)` gives an object with the surface of a connected `rtc.Room` that livekit-agents'
avatar classes (`DataStreamAudioOutput`, `DataStreamAudioReceiver`, `AvatarRunner`) and facecast's avatar worker
use: events (`participant_active`, `track_published`, `connection_state_changed`, ...), remote participants with
their track publications, RPC between participants (`register_rpc_method` / `perform_rpc`, UNSUPPORTED_METHOD when
nobody registered the method), byte streams by topic with attributes (`stream_bytes` -> writer; the receiving room's
handler gets a reader whose chunks end when the writer closes), and `publish_track` (real rtc tracks are accepted
and recorded). Everything is delivered in process, in order, on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import dataclass, field

from livekit import rtc

_ids = itertools.count()


@dataclass
class FakePublication:
    sid: str
    kind: int
    source: int
    name: str
    track: object = None
    subscribed: bool = True

    async def wait_for_subscription(self) -> None:
        return None


@dataclass
class FakeParticipant:
    identity: str
    kind: int
    state: int = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
    attributes: dict = field(default_factory=dict)
    track_publications: dict = field(default_factory=dict)


class FakeStreamReader:
    def __init__(self, info: rtc.ByteStreamInfo):
        self.info = info
        self.chunks: asyncio.Queue = asyncio.Queue()

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.chunks.get()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class FakeStreamWriter:
    def __init__(self, readers: list[FakeStreamReader]):
        self.readers, self.closed = readers, False

    async def write(self, data: bytes) -> None:
        for reader in self.readers:
            reader.chunks.put_nowait(bytes(data))

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            for reader in self.readers:
                reader.chunks.put_nowait(None)


class FakeLocalParticipant(FakeParticipant):
    def __init__(self, room: "FakeRoom", identity: str, kind: int, attributes: dict):
        super().__init__(identity, kind, attributes=dict(attributes))
        self.room = room
        self._rpc_handlers: dict = {}

    def register_rpc_method(self, method: str, handler) -> None:
        self._rpc_handlers[method] = handler

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str,
                          response_timeout: float | None = None, max_round_trip_latency: float | None = None) -> str:
        self.room.server.rpc_log.append((self.identity, destination_identity, method, payload))
        peer = self.room.server.rooms.get(destination_identity)
        if peer is None or not peer.connected:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.RECIPIENT_NOT_FOUND, f"{destination_identity} is not here")
        handler = peer.local_participant._rpc_handlers.get(method)
        if handler is None:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD, f"{method} is not registered")
        await asyncio.sleep(0)
        result = handler(rtc.RpcInvocationData(uuid.uuid4().hex, self.identity, payload, 10.0, method))
        if asyncio.iscoroutine(result):
            result = await result
        return result

    async def stream_bytes(self, name: str, *, total_size=None, mime_type="application/octet-stream",
                           attributes=None, stream_id=None, destination_identities=None, topic="") -> FakeStreamWriter:
        info = rtc.ByteStreamInfo(stream_id=stream_id or uuid.uuid4().hex, mime_type=mime_type, topic=topic,
                                  timestamp=0, size=total_size, attributes=dict(attributes or {}), name=name)
        readers = []
        for identity, peer in self.room.server.rooms.items():
            if identity == self.identity or (destination_identities and identity not in destination_identities):
                continue
            handler = peer.stream_handlers.get(topic)
            if handler is not None:
                reader = FakeStreamReader(info)
                readers.append(reader)
                handler(reader, self.identity)
        self.room.server.streams.append((self.identity, topic, dict(attributes or {})))
        return FakeStreamWriter(readers)

    async def publish_track(self, track, options) -> FakePublication:
        kind = rtc.TrackKind.KIND_VIDEO if isinstance(track, rtc.LocalVideoTrack) else rtc.TrackKind.KIND_AUDIO
        publication = FakePublication(f"TR_{next(_ids)}", kind, options.source, track.name, track)
        self.track_publications[publication.sid] = publication
        self.room.server.broadcast(self.room, "track_published", publication, self.room.as_remote())
        return publication


class FakeRoom:
    """One participant's view of the room."""

    def __init__(self, server: "FakeLiveKit", identity: str, kind: int, attributes: dict):
        self.server, self.name = server, server.name
        self.local_participant = FakeLocalParticipant(self, identity, kind, attributes)
        self.handlers: dict[str, list] = {}
        self.stream_handlers: dict = {}
        self.connected = True

    # the rtc.Room surface --------------------------------------------------------------------------------------
    def isconnected(self) -> bool:
        return self.connected

    @property
    def connection_state(self) -> int:
        return rtc.ConnectionState.CONN_CONNECTED if self.connected else rtc.ConnectionState.CONN_DISCONNECTED

    @property
    def remote_participants(self) -> dict:
        return {identity: room.as_remote() for identity, room in self.server.rooms.items()
                if room is not self and room.connected}

    def on(self, event: str, callback=None):
        def register(fn):
            self.handlers.setdefault(event, []).append(fn)
            return fn
        return register(callback) if callback is not None else register

    def off(self, event: str, callback) -> None:
        if callback in self.handlers.get(event, []):
            self.handlers[event].remove(callback)

    def emit(self, event: str, *args) -> None:
        for callback in list(self.handlers.get(event, [])):
            callback(*args)

    def register_byte_stream_handler(self, topic: str, handler) -> None:
        self.stream_handlers[topic] = handler

    def unregister_byte_stream_handler(self, topic: str) -> None:
        self.stream_handlers.pop(topic, None)

    async def disconnect(self) -> None:
        self.server.leave(self)

    # ------------------------------------------------------------------------------------------------------------
    def as_remote(self) -> FakeParticipant:
        local = self.local_participant
        return FakeParticipant(local.identity, local.kind, attributes=local.attributes,
                               track_publications=local.track_publications)


class FakeLiveKit:
    """A room on a fake server: participants join, see each other, call each other and stream bytes."""

    def __init__(self, name: str = "call-7"):
        self.name = name
        self.rooms: dict[str, FakeRoom] = {}
        self.rpc_log: list = []
        self.streams: list = []

    def join(self, identity: str, kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
             attributes: dict | None = None) -> FakeRoom:
        room = FakeRoom(self, identity, kind, attributes or {})
        self.rooms[identity] = room
        self.broadcast(room, "participant_connected", room.as_remote())
        self.broadcast(room, "participant_active", room.as_remote())
        return room

    def leave(self, room: FakeRoom) -> None:
        if not room.connected:
            return
        room.connected = False
        self.rooms.pop(room.local_participant.identity, None)
        room.emit("connection_state_changed", rtc.ConnectionState.CONN_DISCONNECTED)
        room.emit("disconnected", "CLIENT_INITIATED")
        self.broadcast(room, "participant_disconnected", room.as_remote())

    def broadcast(self, source: FakeRoom, event: str, *args) -> None:
        for room in list(self.rooms.values()):
            if room is not source:
                room.emit(event, *args)
