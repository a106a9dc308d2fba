"""The MP4 file sink: a session's chunks recorded as H.264 + AAC, the voice muxed in sync (`services.media`).

A recording keeps every chunk (not lossy; a bound of several minutes of backlog guards memory) and encodes off the
event loop, in a worker thread, so the ingress's loop never waits for the encoder.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
from PIL import Image

from services.delivery.egress import MediaChunk, Sink
from services.video import Mp4Writer


def jpeg_to_rgb(data: bytes) -> np.ndarray:
    """One baseline JPEG -> [H, W, 3] uint8 RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


class Mp4Sink(Sink):
    """Records a session to `path`; the file is complete (moov at the front) once the egress closes."""

    lossy = False
    max_pending = 512      # ~4 minutes of 480 ms chunks behind before anything is dropped

    def __init__(self, path: str | Path, name: str = "mp4"):
        self.path, self.name = Path(path), name
        self.writer: Mp4Writer | None = None
        self.frames = 0          # video frames recorded so far
        self.last: np.ndarray | None = None

    async def write(self, chunk: MediaChunk) -> None:
        await asyncio.to_thread(self._write, chunk)

    def _write(self, chunk: MediaChunk) -> None:
        if self.writer is None:
            self.writer = Mp4Writer(self.path, chunk.fps, chunk.width, chunk.height, None, chunk.sample_rate_hz,
                                    stream_audio=True)
        frames = [jpeg_to_rgb(frame) for frame in chunk.frames_jpeg]
        audio = np.frombuffer(chunk.audio_pcm_s16le, dtype="<i2")
        per_frame = chunk.sample_rate_hz / chunk.fps
        if self.last is None:     # the recording starts with the first chunk it gets
            self.frames = chunk.first_frame
        gap = chunk.first_frame - self.frames
        if gap < 0:        # frames already recorded (a replayed chunk after a re-attach): keep the rest only
            frames, audio = frames[-gap:], audio[round(-gap * per_frame):]
        elif gap > 0:   # frames never delivered (a lossy re-attach): the timeline stays
            self.writer.append_audio(np.zeros(round(gap * per_frame), np.int16))   # true, the last picture holds
            self.writer.write(np.stack([self.last] * gap))
            self.frames += gap
        if not frames:
            return
        self.writer.append_audio(audio)
        self.writer.write(np.stack(frames))
        self.frames += len(frames)
        self.last = frames[-1]

    async def close(self) -> None:
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)
