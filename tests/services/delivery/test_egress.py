"""The egress fan-out and the MP4 sink: a slow or failing sink never holds up generation or the other sinks; a
recording keeps every chunk, in sync, and its timeline stays true across replayed and skipped frames."""

from __future__ import annotations

import asyncio
import io

import av
import numpy as np
import pytest
from PIL import Image

from services.delivery.egress import Egress, MediaChunk, Sink
from services.delivery.mp4 import Mp4Sink
from services.video import probe_video

FPS, RATE, SIZE, FRAMES = 25.0, 16000, 32, 12


def jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE, 3), value, np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def chunk(index: int, first_frame: int | None = None, frames: int = FRAMES) -> MediaChunk:
    """Chunk `index`: frame f is grey level 10 * (f % 24) + 5; the audio is a 440 Hz tone only in odd chunks."""
    first = index * FRAMES if first_frame is None else first_frame
    samples = int(frames * RATE / FPS)
    t = (np.arange(samples) + first * RATE / FPS) / RATE
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) * (index % 2)) * 32767
    pictures = tuple(jpeg(10 * (f % 24) + 5) for f in range(first, first + frames))
    return MediaChunk("s", index, first, FPS, SIZE, SIZE, pictures, tone.astype("<i2").tobytes(), RATE)


class Recorder(Sink):
    def __init__(self, name, delay_s=0.0, fail_at=None, lossy=True, max_pending=2):
        self.name, self.delay_s, self.fail_at, self.lossy, self.max_pending = name, delay_s, fail_at, lossy, max_pending
        self.got, self.closed = [], False

    async def write(self, item):
        if item.chunk_index == self.fail_at:
            raise ConnectionError("room went away")
        await asyncio.sleep(self.delay_s)
        self.got.append(item.chunk_index)

    async def close(self):
        self.closed = True


def test_a_slow_sink_drops_its_oldest_chunks_a_failing_one_is_detached_and_the_others_get_everything():
    async def main():
        fast, slow, failing = Recorder("grpc"), Recorder("room", delay_s=0.2), Recorder("page", fail_at=3)
        egress = Egress([fast, slow, failing])
        await egress.start()
        loop = asyncio.get_running_loop()
        offered_in = []
        for index in range(10):
            started = loop.time()
            egress.offer(chunk(index))
            offered_in.append(loop.time() - started)
            await asyncio.sleep(0.02)          # chunks come 10x faster than the slow sink takes them
        stats = await egress.close(timeout_s=5)
        return fast, slow, failing, stats, offered_in

    fast, slow, failing, stats, offered_in = asyncio.run(main())
    assert max(offered_in) < 0.01, "offer must never wait for a sink"
    assert fast.got == list(range(10)) and stats["grpc"] == {"delivered": 10, "dropped": 0, "pending": 0,
                                                            "error": None}
    assert slow.got[0] == 0 and slow.got[-1] == 9 and slow.got == sorted(slow.got), slow.got   # the newest always
    assert stats["room"]["dropped"] == 10 - len(slow.got) > 0 and stats["room"]["error"] is None
    assert failing.got == [0, 1, 2] and stats["page"]["error"] == "ConnectionError: room went away"
    assert fast.closed and slow.closed and failing.closed


def test_sink_names_are_unique_per_session():
    with pytest.raises(ValueError, match="unique"):
        Egress([Recorder("x"), Recorder("x")])


def _decoded(path) -> tuple[np.ndarray, np.ndarray]:
    """(mean grey level per video frame, audio samples) of an MP4."""
    with av.open(str(path)) as container:
        greys = np.array([frame.to_ndarray(format="rgb24").mean() for frame in container.decode(video=0)])
    with av.open(str(path)) as container:
        audio = np.concatenate([frame.to_ndarray().reshape(-1) for frame in container.decode(audio=0)])
    return greys, audio


def test_the_mp4_sink_records_every_chunk_with_its_voice_in_sync(tmp_path):
    path = tmp_path / "call.mp4"

    async def main():
        egress = Egress([Mp4Sink(path)])
        await egress.start()
        for index in range(4):
            egress.offer(chunk(index))
        return await egress.close(timeout_s=60)

    stats = asyncio.run(main())
    assert stats["mp4"] == {"delivered": 4, "dropped": 0, "pending": 0, "error": None}
    info = probe_video(path)
    assert (info.num_frames, info.width, info.height, info.fps, info.has_audio) == (48, SIZE, SIZE, FPS, True)
    assert info.audio_duration_s == pytest.approx(48 / FPS, abs=0.07)
    greys, audio = _decoded(path)
    assert np.abs(greys - (10 * (np.arange(48) % 24) + 5)).max() < 3, "frames in order"
    per_chunk = int(FRAMES / FPS * RATE)
    loud = [np.sqrt(np.mean(audio[i * per_chunk + 800:(i + 1) * per_chunk - 800] ** 2)) for i in range(4)]
    assert loud[0] < 0.02 and loud[2] < 0.02 and loud[1] > 0.25 and loud[3] > 0.25, loud   # the tone where it was


def test_the_recording_timeline_stays_true_across_replayed_and_skipped_frames(tmp_path):
    path = tmp_path / "resumed.mp4"

    async def main():
        sink = Mp4Sink(path)
        for item in (chunk(0), chunk(1, first_frame=6),      # a replay overlapping frames 6..11: only 12..17 new
                     chunk(3, first_frame=30)):              # frames 18..29 never came: the last picture holds
            await sink.write(item)
        await sink.close()

    asyncio.run(main())
    greys, audio = _decoded(path)
    expected = [10 * (f % 24) + 5 for f in range(18)] + [10 * (17 % 24) + 5] * 12 + [
        10 * (f % 24) + 5 for f in range(30, 42)]
    assert len(greys) == 42 and np.abs(greys - np.array(expected)).max() < 3
    assert len(audio) / RATE == pytest.approx(42 / FPS, abs=0.07)
