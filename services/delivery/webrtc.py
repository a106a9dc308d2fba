"""The browser call's media: an aiortc peer per call, the avatar's video and voice out, the caller's microphone in.

    browser ── offer (mic audio sendrecv, video recvonly, data channel "events") ──► CallPeer.answer
    session's video chunks ─► push_chunk(frames, audio) ─► AvatarVideoTrack (paced at fps; the last frame again when
                                                          │                 nothing new came: the picture never stops;
                                                          │                 the reference image before the first chunk)
                                                          └► AvatarAudioTrack (20 ms frames; silence when none)
    mic ─► on_audio(int16 mono, rate) (the caller's speech, as it arrives)
    events (turn latency, who is speaking, the call's state) ─► the "events" data channel as JSON

The voice is the clock: the audio track plays at real time (silence when nothing is queued), and each video frame
has the position in the voice where it belongs; the video track sends, at its frame rate, the latest frame whose
position the voice has reached (the last one again when none has).  So a late chunk stalls both together, and
picture and sound never drift apart by more than a frame.  `AvatarMedia.offsets_ms` records, per chunk, how far apart
its first frame and its first audio sample were sent (the A/V offset the sender adds; BENCHMARKS).  Knows aiortc and
av, nothing about sessions.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import logging
import time
from collections import deque

import av
import numpy as np

logger = logging.getLogger("facecast.webrtc")

AUDIO_RATE_HZ = 48000
AUDIO_FRAME_S = 0.02
VIDEO_CLOCK_HZ = 90000


class AvatarMedia:
    """The two outgoing queues, the voice's clock and the sender-side A/V offset record of one call."""

    def __init__(self, fps: float, width: int, height: int, still: np.ndarray | None = None):
        """`still`: RGB uint8 [height, width, 3], the picture the video shows until the first chunk (the reference
        image, as a phone shows the callee's photo while it connects); None: black."""
        self.fps, self.width, self.height = fps, width, height
        if still is not None and still.shape != (height, width, 3):
            raise ValueError(f"still: {still.shape} is not the stream's [{height}, {width}, 3]")
        self.still = still if still is not None else np.zeros((height, width, 3), np.uint8)
        self.frames: deque = deque()            # (av.VideoFrame, voice position in samples, chunk index or None)
        self.audio: deque = deque()             # (int16 samples at 48 kHz, chunk index or None)
        self.written = 0                        # voice samples queued so far
        self.played = 0                         # voice samples sent so far (silence in between not counted)
        self.video_sent_at: dict[int, float] = {}
        self.audio_sent_at: dict[int, float] = {}
        self.offsets_ms: list[float] = []
        self.chunks = 0
        self.frames_sent = 0
        self.resampler = None

    def push_chunk(self, frames: list[np.ndarray], pcm: np.ndarray, sample_rate_hz: int) -> None:
        """One chunk: RGB uint8 frames and the int16 mono audio they show."""
        index = self.chunks
        self.chunks += 1
        samples = self._at_48k(np.asarray(pcm, dtype=np.int16), sample_rate_hz)
        if not len(samples):          # a chunk always spans its frames' time: silent, if it brought no sound
            samples = np.zeros(round(len(frames) * AUDIO_RATE_HZ / self.fps), np.int16)
        per_frame = len(samples) / max(1, len(frames))
        for k, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            self.frames.append((frame, self.written + k * per_frame, index if k == 0 else None))
        self.audio.append((samples, index))
        self.written += len(samples)

    def clear(self) -> None:
        """Drop what has not been sent (a hang-up)."""
        self.frames.clear()
        self.audio.clear()

    def next_frame(self):
        """The latest frame the voice has reached (older due ones are skipped), or None."""
        due, slack = None, AUDIO_RATE_HZ / self.fps / 2
        while self.frames and self.frames[0][1] <= self.played + slack:
            frame, _, index = self.frames.popleft()
            self._sent(index, video=True)
            due = frame
        if due is not None:
            self.frames_sent += 1
        return due

    def next_audio(self, size: int) -> np.ndarray:
        out = np.zeros(size, np.int16)
        filled = 0
        while filled < size and self.audio:
            samples, index = self.audio[0]
            self._sent(index, video=False)
            take = min(size - filled, len(samples))
            out[filled:filled + take] = samples[:take]
            filled += take
            if take == len(samples):
                self.audio.popleft()
            else:
                self.audio[0] = (samples[take:], None)
        self.played += filled
        return out

    def _at_48k(self, pcm: np.ndarray, rate: int) -> np.ndarray:
        if rate == AUDIO_RATE_HZ:
            return pcm
        from services.llm.conversation import PcmResampler

        self.resampler = self.resampler or PcmResampler(AUDIO_RATE_HZ)
        return self.resampler.push(pcm, rate)

    def _sent(self, index: int | None, video: bool) -> None:
        if index is None:
            return
        (self.video_sent_at if video else self.audio_sent_at)[index] = time.monotonic()
        if index in self.video_sent_at and index in self.audio_sent_at:
            self.offsets_ms.append((self.audio_sent_at.pop(index) - self.video_sent_at.pop(index)) * 1000)
            del self.offsets_ms[:-500]


def _tracks():
    from aiortc.mediastreams import MediaStreamTrack

    class AvatarVideoTrack(MediaStreamTrack):
        kind = "video"

        def __init__(self, media: AvatarMedia):
            super().__init__()
            self.media = media
            self.start: float | None = None
            self.count = 0
            self.last = av.VideoFrame.from_ndarray(np.ascontiguousarray(media.still), format="rgb24")

        async def recv(self):
            if self.start is None:
                self.start = time.monotonic()
            due = self.start + self.count / self.media.fps
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            frame = self.media.next_frame()
            if frame is not None:
                self.last = frame
            frame = self.last
            frame.pts = round(self.count * VIDEO_CLOCK_HZ / self.media.fps)
            frame.time_base = fractions.Fraction(1, VIDEO_CLOCK_HZ)
            self.count += 1
            return frame

    class AvatarAudioTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self, media: AvatarMedia):
            super().__init__()
            self.media = media
            self.start: float | None = None
            self.sent = 0

        async def recv(self):
            size = int(AUDIO_RATE_HZ * AUDIO_FRAME_S)
            if self.start is None:
                self.start = time.monotonic()
            due = self.start + self.sent / AUDIO_RATE_HZ
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            out = self.media.next_audio(size)
            frame = av.AudioFrame(format="s16", layout="mono", samples=size)
            frame.planes[0].update(out.tobytes())
            frame.sample_rate = AUDIO_RATE_HZ
            frame.pts = self.sent
            frame.time_base = fractions.Fraction(1, AUDIO_RATE_HZ)
            self.sent += size
            return frame

    return AvatarVideoTrack, AvatarAudioTrack


class CallPeer:
    """One browser's WebRTC connection (see the module docstring). `on_audio(pcm, rate)` gets the microphone;
    `on_closed()` is called once when the connection fails or closes."""

    def __init__(self, media: AvatarMedia, on_audio, on_closed):
        from aiortc import RTCPeerConnection

        self.media, self.on_audio, self.on_closed = media, on_audio, on_closed
        self.pc = RTCPeerConnection()
        video_track, audio_track = _tracks()
        self.video, self.audio = video_track(media), audio_track(media)
        self.channel = None
        self.pending_events: list[str] = []
        self.reader: asyncio.Task | None = None
        self.closed = False
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_channel)
        self.pc.on("connectionstatechange", self._on_state)

    async def answer(self, sdp: str, kind: str) -> tuple[str, str]:
        """Accept the browser's offer; returns the answer (ICE candidates included: no trickle)."""
        from aiortc import RTCSessionDescription

        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        self.pc.addTrack(self.audio)         # aiortc puts each on the offer's transceiver of its kind
        self.pc.addTrack(self.video)
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription.sdp, self.pc.localDescription.type

    def send_event(self, event: dict) -> None:
        text = json.dumps(event)
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(text)
        else:
            self.pending_events.append(text)
            del self.pending_events[:-50]

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.media.clear()
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        await self.pc.close()
        result = self.on_closed()
        if asyncio.iscoroutine(result):
            await result

    # ------------------------------------------------------------------------------------------------------------
    def _on_track(self, track) -> None:
        if track.kind == "audio" and self.reader is None:
            self.reader = asyncio.ensure_future(self._read_mic(track))

    def _on_channel(self, channel) -> None:
        self.channel = channel

        @channel.on("open")
        def flush() -> None:
            for text in self.pending_events:
                channel.send(text)
            self.pending_events.clear()

        if channel.readyState == "open":
            flush()

    async def _on_state(self) -> None:
        if self.pc.connectionState in ("failed", "closed") and not self.closed:
            logger.info("browser call connection %s", self.pc.connectionState)
            await self.close()

    async def _read_mic(self, track) -> None:
        from aiortc.mediastreams import MediaStreamError

        try:
            while True:
                frame = await track.recv()
                samples = frame.to_ndarray().reshape(-1)
                channels = len(frame.layout.channels)
                if channels > 1:
                    samples = samples.reshape(-1, channels).mean(axis=1)
                await self.on_audio(samples.astype(np.int16), frame.sample_rate)
        except MediaStreamError:
            return
