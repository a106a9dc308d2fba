"""facecast as any LiveKit voice agent's avatar: LiveKit's avatar data-stream protocol on a facecast session.

    agent (DataStreamAudioOutput) ── lk.audio_stream (int16 PCM, one byte stream per speech segment) ──┐
          ▲  lk.playback_started / lk.playback_finished {playback_position, interrupted}  │  lk.clear_buffer
          └──────────────────────────────────────────────── AvatarRunner + DataStreamAudioReceiver (livekit-agents)
                                                                 │ push_audio / clear_buffer        ▲ frames, voice,
                                                                 ▼                                  │ segment ends
                                          FacecastVideoGenerator ── paced audio ──► a facecast session ─► chunks

`FacecastVideoGenerator` is the `VideoGenerator` the runner drives.  The agent's TTS arrives faster than real time;
the generator keeps it in a pending buffer and feeds the session at real time plus a small lead (silence when
nobody speaks, so the face keeps listening between turns).  What comes back is a chunk of frames and the audio the
session got: each frame goes out with the speech it shows (silence is not sent as audio, so the runner's playback
position counts speech only), and a segment's end goes out after the frame that shows its last sample.

`clear_buffer` (the agent interrupted its own speech): the pending speech is dropped at once, so the session gets
silence from the next tick — chunks not yet generated are driven by silence, the face stops talking within about one
chunk; speech of that segment already generated is not played (its frames still show, silently), and no segment end
is sent for it (the runner reports the interruption itself, with the position played).

`AvatarWorker` joins the room as the avatar (token: one room, publish only, `lk.publish_on_behalf` the agent) and
runs the runner until the agent leaves or the session closes.  The session it drives is reached through a
`SessionLink`: in the cluster, the ingress's own stream machinery (`services.serving.ingress`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from services.api import pb
from services.delivery.pacing import SpeechTrack
from services.delivery.livekit_room import DeliveryError, LiveKitConfig, RoomConnector, avatar_token, jpeg_to_rgba

logger = logging.getLogger(__name__)

TICK_S = 0.02
LEAD_S = 0.12
"""Audio the session holds ahead of real time: enough to never starve it, little enough that an interruption reaches
the face within about a chunk."""


class SessionLink(ABC):
    """A facecast session the avatar drives (already attached): inputs in, outputs out."""

    @abstractmethod
    async def send(self, message: pb.SessionInput) -> None:
        ...

    @abstractmethod
    def outputs(self):
        """Async iterator of `pb.SessionOutput`, ending with the stream."""

    @abstractmethod
    async def close(self) -> None:
        ...


@dataclass
class AvatarStats:
    speech_s_in: float = 0.0
    speech_s_out: float = 0.0
    dropped_s: float = 0.0
    segments_ended: int = 0
    interruptions: int = 0
    frames: int = 0
    clears: list[tuple[float, float]] = field(default_factory=list)
    """Per clear_buffer: (seconds of audio the session had been sent, seconds of it already handed out as frames):
    the difference is the speech the session still held, what the face can still show after an interruption."""


class FacecastVideoGenerator:
    """LiveKit's `VideoGenerator` on a facecast session (see the module docstring). Subclasses nothing at import
    time: `as_video_generator()` returns the livekit-agents subclass (livekit-agents loads only where it is used)."""

    def __init__(self, link: SessionLink, sample_rate: int, fps: float, width: int, height: int,
                 lead_s: float = LEAD_S, chunk_ready=None):
        self.link, self.rate, self.fps, self.lead_s = link, int(sample_rate), float(fps), lead_s
        self.chunk_ready = chunk_ready             # `pace`'s: the start of each segment is made without waiting
        self.track = SpeechTrack(sample_rate)
        self.out: asyncio.Queue = asyncio.Queue()
        self.stats = AvatarStats()
        self.started_at: float | None = None
        self.emitted_to = 0                        # track sample up to which frames have been handed out
        self.tasks: list[asyncio.Task] = []
        self.resamplers: dict[int, object] = {}

    # ----------------------------------------------------------------------------------------------- runner side
    async def start(self) -> None:
        self.started_at = time.monotonic()
        self.tasks = [asyncio.ensure_future(self._pace()), asyncio.ensure_future(self._receive())]

    async def push_audio(self, frame) -> None:
        from livekit.agents.voice.avatar import AudioSegmentEnd

        if isinstance(frame, AudioSegmentEnd):
            self.track.end_segment()
            return
        samples = self._mono_at_rate(frame)
        self.track.say(samples)
        self.stats.speech_s_in += len(samples) / self.rate

    def clear_buffer(self) -> None:
        """The agent interrupted itself: drop what it sent and we did not play (see the module docstring)."""
        self.stats.clears.append((self.track.sent / self.rate, self.emitted_to / self.rate))
        self.stats.dropped_s += self.track.clear() / self.rate
        self.stats.interruptions += 1
        kept = []                                  # frames already queued: pictures stay, that speech does not
        while not self.out.empty():
            item = self.out.get_nowait()
            if _is_video(item) or item is None:
                kept.append(item)
        for item in kept:
            self.out.put_nowait(item)

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.out.get()
        if item is None:
            self.out.put_nowait(None)
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.link.close()
        self.out.put_nowait(None)

    # ----------------------------------------------------------------------------------------------- session side
    def _mono_at_rate(self, frame) -> np.ndarray:
        from livekit import rtc

        if frame.sample_rate != self.rate:
            resampler = self.resamplers.setdefault(frame.sample_rate, rtc.AudioResampler(
                frame.sample_rate, self.rate, num_channels=frame.num_channels))
            frames = resampler.push(frame)
        else:
            frames = [frame]
        pieces = []
        for piece in frames:
            data = np.frombuffer(bytes(piece.data), dtype=np.int16).reshape(-1, piece.num_channels)
            pieces.append(data.mean(axis=1).astype(np.int16) if piece.num_channels > 1 else data[:, 0])
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int16)

    async def _pace(self) -> None:
        """Feed the session at real time + lead: pending speech first, silence when there is none."""
        await pace(self.track, self.link, self.started_at, self.lead_s, self.chunk_ready)

    async def _receive(self) -> None:
        try:
            async for output in self.link.outputs():
                if output.WhichOneof("output") == "video_chunk":
                    self._emit(output.video_chunk)
        finally:
            self.out.put_nowait(None)

    def _emit(self, chunk) -> None:
        from livekit import rtc
        from livekit.agents.voice.avatar import AudioSegmentEnd

        per_frame = self.rate / self.fps
        audio = np.frombuffer(chunk.audio_pcm_s16le, dtype="<i2")
        chunk_start = round(chunk.first_frame * per_frame)
        for index, jpeg in enumerate(chunk.frames):
            width, height, rgba = jpeg_to_rgba(jpeg)
            self.out.put_nowait(rtc.VideoFrame(width, height, rtc.VideoBufferType.RGBA, rgba))
            self.stats.frames += 1
            start = round((chunk.first_frame + index) * per_frame)
            end = round((chunk.first_frame + index + 1) * per_frame)
            for lo, hi, _ in self.track.speech_in(start, end):
                piece = audio[lo - chunk_start:hi - chunk_start]
                if len(piece):
                    self.out.put_nowait(rtc.AudioFrame(piece.tobytes(), self.rate, 1, len(piece)))
                    self.stats.speech_s_out += len(piece) / self.rate
            for _ in self.track.ended_by(end):
                self.stats.segments_ended += 1
                self.out.put_nowait(AudioSegmentEnd())
            self.emitted_to = end
        self.track.forget_before(self.emitted_to)


async def pace(track: SpeechTrack, link: SessionLink, started_at: float, lead_s: float,
               chunk_ready=None) -> None:
    """Feed `track` into the session behind `link` at real time + `lead_s`, every TICK_S, forever.

    `chunk_ready(sample)`: the track position at which the chunk showing `sample` can be generated (its audio and
    lookahead complete). With it, speech that begins after silence may be fed ahead of real time, as fast as it
    arrives, up to that point: the chunk that shows the reply's start is made as soon as its speech is there instead
    of when real time reaches the end of its window and lookahead (up to a chunk plus the lookahead later: ~0.8 s at
    25 fps, chunk 3). Past that point speech goes at real time again, and silence never runs ahead, so the session
    is back on real time within a chunk and an interruption costs at most that much more of the reply.

    Speech queued with another voice (`SpeechTrack.say(..., voice=k)`) is fed to character k, which is set speaking
    first, and the character fed before it is set not speaking: one character speaks at a time. Between its speech
    the voice listens too: once only silence follows what it said it is set not speaking (the silence mode the model
    was trained to listen in, and what a session holds still: `StreamConfig.listening_hold`), and speaking again
    before its next speech."""
    hold = 0                # the track position speech may run ahead to (0: none)
    fed_voice = track.voice  # the character fed so far; every other one is set not speaking before pace starts
    resting = False          # whether fed_voice is set not speaking (the track feeds it silence)
    while True:
        target = int((time.monotonic() - started_at + lead_s) * track.rate)
        pending = track.pending_samples
        if chunk_ready is not None and pending and not track.speaking():
            hold = chunk_ready(track.sent)
        if hold <= target:
            hold = 0
        count = max(min(pending, hold - track.sent), target - track.sent)
        for voice, samples in (track.take_voiced(count) if count > 0 else ()):
            if voice != fed_voice:   # the new voice speaks from here; the one before listens (mouth at rest)
                await link.send(_speaking((voice, True), (fed_voice, False)))
                fed_voice, resting = voice, False
            elif resting and samples.any():    # speech again (a take is speech first, then silence)
                await link.send(_speaking((voice, True)))
                resting = False
            await link.send(pb.SessionInput(audio=pb.AudioInput(
                pcm_s16le=samples.astype("<i2").tobytes(), sample_rate_hz=track.rate, channels=1, character=voice)))
        if count > 0 and not resting and not track.speaking():     # silence after the last speech: it listens
            await link.send(_speaking((fed_voice, False)))
            resting = True
        await asyncio.sleep(TICK_S)


def _speaking(*states: tuple[int, bool]) -> pb.SessionInput:
    return pb.SessionInput(control=pb.Control(speaking=[pb.SpeakingState(character=character, speaking=speaking)
                                                        for character, speaking in states]))


def chunk_ready_points(fps: float, rate: int, chunk_latent_frames: int, temporal_compression: int,
                       lookahead_latent_frames: int, frontend_lookahead_s: float = 0.0):
    """`chunk_ready` for `pace`: the engine's timeline (latent frame f shows video frames 4f-3..4f, frame 0 alone; a
    chunk of C latent frames is made once the audio reaches `lookahead` latent frames past its last one, and the
    audio front end has the audio it needs past that frame: `frontend_lookahead_s`, the AudioEncoder's
    `frontend_lookahead_s`). Short of that point by even a few ms, the rest of the chunk's audio would go at real
    time: up to a chunk late."""
    def ready(sample: int) -> int:
        frame = sample * fps / rate                                   # the video frame this sample shows
        latent = max(0, -(-int(frame) // temporal_compression))       # the latent frame showing it
        last = (latent // chunk_latent_frames + 1) * chunk_latent_frames - 1
        frames_needed = temporal_compression * (last + lookahead_latent_frames) + 1
        return int(np.ceil((frames_needed / fps + frontend_lookahead_s) * rate)) + 1

    return ready


def _is_video(item) -> bool:
    from livekit import rtc

    return isinstance(item, rtc.VideoFrame)


def as_video_generator(generator: FacecastVideoGenerator):
    """`generator` as a livekit-agents `VideoGenerator` (the ABC the runner checks against)."""
    from livekit.agents.voice.avatar import VideoGenerator

    class _Generator(VideoGenerator):
        async def push_audio(self, frame) -> None:
            await generator.push_audio(frame)

        def clear_buffer(self) -> None:
            generator.clear_buffer()

        def __aiter__(self):
            return generator

    return _Generator()


class AvatarWorker:
    """The avatar in the room: token, connection, `AvatarRunner` over a `FacecastVideoGenerator` on `link`."""

    def __init__(self, config: LiveKitConfig, connector: RoomConnector, room: str, identity: str,
                 agent_identity: str, link: SessionLink, *, sample_rate: int, fps: float, width: int, height: int,
                 agent_timeout_s: float = 30.0, chunk_ready=None):
        self.config, self.connector, self.room_name, self.identity = config, connector, room, identity
        self.agent_identity, self.agent_timeout_s = agent_identity, agent_timeout_s
        self.generator = FacecastVideoGenerator(link, sample_rate, fps, width, height, chunk_ready=chunk_ready)
        self.options = (width, height, fps, sample_rate)
        self.room = self.runner = None
        self.done = asyncio.Event()

    async def start(self) -> None:
        """Join the room (DeliveryError naming the URL when the server does not answer) and start the runner once
        the agent is in the room (DeliveryError when it does not come within `agent_timeout_s`)."""
        from livekit.agents.voice.avatar import AvatarOptions, AvatarRunner, DataStreamAudioReceiver

        token = avatar_token(self.config, self.room_name, self.identity, publish_on_behalf=self.agent_identity)
        self.room = await self.connector.connect_rtc(self.config.url, token, self.config.connect_timeout_s)
        width, height, fps, rate = self.options
        await self.generator.start()
        receiver = DataStreamAudioReceiver(self.room, sender_identity=self.agent_identity)
        runner = AvatarRunner(self.room, audio_recv=receiver, video_gen=as_video_generator(self.generator),
                              options=AvatarOptions(width, height, fps, rate, 1))
        try:
            await asyncio.wait_for(runner.start(), self.agent_timeout_s)
            self.runner = runner
        except TimeoutError:
            await receiver.aclose()
            raise DeliveryError(f"the agent {self.agent_identity!r} is not in LiveKit room {self.room_name!r} at "
                                f"{self.config.url} (waited {self.agent_timeout_s:.0f} s)") from None

        def on_left(participant) -> None:
            if participant.identity == self.agent_identity:
                self.done.set()

        self.room.on("participant_disconnected", on_left)
        self.room.on("disconnected", lambda *_: self.done.set())

    async def aclose(self) -> None:
        self.done.set()
        if self.runner is not None:
            await self.runner.aclose()
        await self.generator.aclose()
        if self.room is not None:
            await self.room.disconnect()
