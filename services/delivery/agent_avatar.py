"""The agent side: give any LiveKit voice agent a facecast face, in the style of LiveKit's avatar plugins.

    from services.delivery.agent_avatar import FacecastAvatarSession

    avatar = FacecastAvatarSession(target="facecast.example:9000", reference_image=open("face.png", "rb").read(),
                                   api_key=os.environ["FACECAST_API_KEY"])
    await avatar.start(agent_session, room)          # facecast joins the room; the agent's speech goes to it

`start` asks the facecast cluster (gRPC `CreateSession`, `delivery.livekit.agent_identity` = this agent) to join the
agent's room as the avatar — the cluster mints its own token, publishing on the agent's behalf — and routes the
agent's speech to it with livekit-agents' `DataStreamAudioOutput` (byte stream `lk.audio_stream`, RPCs
`lk.clear_buffer` / `lk.playback_finished`).  The avatar's LiveKit credentials never leave the cluster.

Missing acknowledgements never hang the agent (agents#3917): a segment the avatar does not report finished within
its length plus `ack_grace_s` is marked finished by the agent side itself (with a warning), and `clear_buffer` keeps
a finite timeout (never None: agents PR #6164).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from livekit import rtc
from livekit.agents.voice.avatar import AvatarSession, DataStreamAudioOutput

from services.api import pb
from services.api.generated.facecast.v1 import avatar_pb2_grpc

logger = logging.getLogger(__name__)

SAMPLE_RATE_HZ = 16000
"""The rate the agent's speech is streamed at (the facecast avatar session's rate)."""


class AvatarError(RuntimeError):
    """facecast could not give the agent its avatar; the message says why (the gRPC status and details)."""


class GuardedAudioOutput(DataStreamAudioOutput):
    """`DataStreamAudioOutput` that cannot wait forever for a `lk.playback_finished` that never comes."""

    def __init__(self, *args, ack_grace_s: float = 5.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.ack_grace_s = ack_grace_s
        self.watchdogs: set[asyncio.Task] = set()
        self.unacknowledged = 0

    def flush(self) -> None:
        duration, was_open = self._pushed_duration, self._stream_writer is not None
        super().flush()
        if was_open:
            task = asyncio.ensure_future(self._watch(duration, self.captured_playout_segments))
            self.watchdogs.add(task)
            task.add_done_callback(self.watchdogs.discard)

    async def _watch(self, duration: float, segment: int) -> None:
        await asyncio.sleep(duration + self.ack_grace_s)
        finished = self.captured_playout_segments - self._pending_playback_count
        if finished < segment:
            self.unacknowledged += 1
            logger.warning("the facecast avatar did not report segment %d finished within %.1f s; marking it "
                           "finished so the agent goes on", segment, duration + self.ack_grace_s)
            self.on_playback_finished(playback_position=duration, interrupted=False)


class FacecastAvatarSession(AvatarSession):
    """A facecast avatar for a LiveKit `AgentSession` (see the module docstring)."""

    def __init__(self, *, target: str, reference_image: bytes, api_key: str | None = None,
                 avatar_identity: str = "facecast-avatar", prompt: str = "", options: dict | None = None,
                 credentials: grpc.ChannelCredentials | None = None, ack_grace_s: float = 5.0,
                 create_timeout_s: float = 60.0):
        super().__init__()
        if not reference_image:
            raise ValueError("reference_image is empty: give the PNG or JPEG bytes of the avatar's face")
        self.target, self.reference_image, self.api_key = target, reference_image, api_key
        self._identity, self.prompt, self.options = avatar_identity, prompt, dict(options or {})
        self.credentials, self.ack_grace_s, self.create_timeout_s = credentials, ack_grace_s, create_timeout_s
        self.channel = self.session = self.output = None

    @property
    def avatar_identity(self) -> str:
        return self._identity

    @property
    def provider(self) -> str:
        return "facecast"

    def _metadata(self) -> list[tuple[str, str]]:
        return [("x-api-key", self.api_key)] if self.api_key else []

    async def start(self, agent_session, room: rtc.Room) -> None:
        await super().start(agent_session, room)
        self.channel = (grpc.aio.secure_channel(self.target, self.credentials) if self.credentials
                        else grpc.aio.insecure_channel(self.target))
        stub = avatar_pb2_grpc.AvatarServiceStub(self.channel)
        request = pb.CreateSessionRequest(
            reference_image=self.reference_image, prompt=self.prompt, options=pb.SessionOptions(**self.options),
            delivery=pb.Delivery(livekit=pb.LiveKitDelivery(room=room.name, identity=self._identity,
                                                            agent_identity=room.local_participant.identity)))
        try:
            self.session = await stub.CreateSession(request, metadata=self._metadata(),
                                                    timeout=self.create_timeout_s)
        except grpc.aio.AioRpcError as error:
            await self.channel.close()
            raise AvatarError(f"facecast at {self.target} did not start the avatar: {error.code().name}: "
                              f"{error.details()}") from None
        self.output = GuardedAudioOutput(room, destination_identity=self._identity, sample_rate=SAMPLE_RATE_HZ,
                                         wait_remote_track=rtc.TrackKind.KIND_VIDEO, clear_buffer_timeout=2.0,
                                         ack_grace_s=self.ack_grace_s)
        agent_session.output.replace_audio_tail(self.output)

    async def aclose(self) -> None:
        if self.session is not None and self.channel is not None:
            try:
                await avatar_pb2_grpc.AvatarServiceStub(self.channel).CloseSession(pb.CloseSessionRequest(
                    session_id=self.session.session_id, session_token=self.session.session_token),
                    metadata=self._metadata(), timeout=10)
            except grpc.aio.AioRpcError as error:
                logger.warning("closing the facecast avatar session failed: %s", error.details())
            self.session = None
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        await super().aclose()
