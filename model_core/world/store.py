"""Where clips come from: the world on the fly, its sharded cache on disk, or a folder of real talking-head videos.

    WorldSource(split, part, count, size)        renders clip i on demand (deterministic)
    write_shards(directory, source, shard_size)  caches a source to disk: sharded, atomic, resumable, progress bar
    is_complete(directory)                       whether such a cache is whole (else write_shards resumes it)
    ShardSource(directory)                       reads that cache back
    VideoFolderSource(directory, size)           *.mp4 / *.mkv / *.webm / *.mov with audio; no truth
    open_source(spec)                            "world:train", "world:eval", a shard directory or a video folder

Every source is a sequence of `Clip`s (`len`, `source[i]`), so training and evaluation code never ask where the
frames came from. A shard is one `.npz` holding several clips back to back plus a JSON index; it is written to a
temporary name and renamed, so an interrupted run leaves only whole shards and `write_shards` resumes after them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..audio_resample import resample
from .clips import FPS, WORLD_VERSION, Clip, Truth, clip_spec, make_clip
from .render import Renderer
from .speech import SAMPLE_RATE_HZ
from .split import WorldSplit

MANIFEST = "manifest.json"
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")


class WorldSource:
    """Clips 0..count-1 of one part of the world, rendered when asked for."""

    def __init__(self, split: WorldSplit, part: str, count: int, size: int = 128):
        if count < 1:
            raise ValueError(f"clip count={count} is invalid: at least 1")
        split._check_part(part)
        self.split, self.part, self.count, self.size = split, part, count, size
        self._renderer = Renderer(size)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Clip:
        if not 0 <= index < self.count:
            raise IndexError(index)
        return make_clip(clip_spec(self.split, self.part, index), self._renderer)

    def describe(self) -> dict:
        return {"kind": "world", "world_version": WORLD_VERSION, "part": self.part, "count": self.count,
                "size": self.size,
                "split": self.split.record()}


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.npz"


def write_shards(directory: str | Path, source: WorldSource, shard_size: int = 32, progress: bool = True,
                 workers: int = 1) -> dict:
    """Render `source` into shards under `directory`, skipping shards already there; returns the manifest.

    `workers` > 1 renders that many shards at once in spawned processes (each with its own speech helper); the
    shards are the same bytes whichever process renders them."""
    if workers < 1:
        raise ValueError(f"workers={workers} is invalid: at least 1")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / MANIFEST
    manifest = {"format": "facecast-world-shards/1", "shard_size": shard_size, **source.describe()}
    if manifest_path.exists():
        existing = json.loads(manifest_path.read_text())
        mismatched = [k for k in ("world_version", "part", "count", "size", "shard_size", "split")
                      if existing.get(k) != manifest[k]]
        if mismatched:
            raise ValueError(f"{directory} already holds a different dataset ({', '.join(mismatched)} differ); "
                             "choose another --out or delete it")
    manifest_path.write_text(json.dumps(manifest, indent=1))
    shards = (len(source) + shard_size - 1) // shard_size
    todo = [n for n in range(shards) if not (directory / _shard_name(n)).exists()]
    started, frames_done = time.perf_counter(), 0
    bar = tqdm(total=len(source), initial=(shards - len(todo)) * shard_size if todo else len(source), unit="clip",
               desc=f"world {source.part}", disable=not progress)
    jobs = [(number, shard_size, str(directory / _shard_name(number))) for number in todo]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker,
                                   initargs=(source.split, source.part, source.count, source.size))
        results = (future.result() for future in as_completed([pool.submit(_render_in_worker, *job)
                                                                 for job in jobs]))
    else:
        pool, results = None, (_render_shard(source, *job) for job in jobs)
    try:
        for clips, frames in results:
            frames_done += frames
            bar.update(clips)
            bar.set_postfix(frames_per_s=f"{frames_done / max(time.perf_counter() - started, 1e-9):.0f}")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    bar.close()
    elapsed = time.perf_counter() - started
    manifest["written"] = {"shards": len(todo), "frames": frames_done, "seconds": round(elapsed, 2),
                           "frames_per_s": round(frames_done / elapsed, 1) if elapsed > 0 else None}
    return manifest


_WORKER_SOURCE: WorldSource | None = None
"""A shard-rendering worker process's source, built once by `_start_worker`."""


def _start_worker(split: WorldSplit, part: str, count: int, size: int) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = WorldSource(split, part, count, size)


def _render_in_worker(number: int, shard_size: int, path: str) -> tuple[int, int]:
    return _render_shard(_WORKER_SOURCE, number, shard_size, path)


def _render_shard(source: WorldSource, number: int, shard_size: int, path: str) -> tuple[int, int]:
    """Render and write shard `number`; returns (clips, frames)."""
    clips = [source[i] for i in range(number * shard_size, min(len(source), (number + 1) * shard_size))]
    _write_shard(Path(path), clips)
    return len(clips), sum(c.num_frames for c in clips)


def _write_shard(path: Path, clips: list[Clip]) -> None:
    truth = [c.truth for c in clips]
    characters = max(t.mouth_open.shape[1] for t in truth)

    def padded(arrays, fill):
        return np.concatenate([np.concatenate([a, np.full(a.shape[:1] + (characters - a.shape[1],) + a.shape[2:],
                                                          fill, a.dtype)], 1) for a in arrays])

    arrays = {
        "frames": np.concatenate([c.frames for c in clips]),
        "audio": np.concatenate([np.round(np.clip(c.audio, -1, 1) * 32767).astype(np.int16) for c in clips]),
        "frame_counts": np.array([c.num_frames for c in clips], np.int64),
        "audio_counts": np.array([len(c.audio) for c in clips], np.int64),
        "mouth_open": padded([t.mouth_open for t in truth], np.nan),
        "viseme": padded([t.viseme for t in truth], -1),
        "speaking": padded([t.speaking for t in truth], False),
        "face_box": padded([t.face_box for t in truth], np.nan),
        "characters": np.array([t.mouth_open.shape[1] for t in truth], np.int64),
        "identity": np.concatenate([np.pad(t.identity, (0, characters - len(t.identity)), constant_values=-1)
                                    for t in truth]).reshape(len(clips), characters),
        "style": np.concatenate([np.pad(t.style, (0, characters - len(t.style)), constant_values=-1)
                                 for t in truth]).reshape(len(clips), characters),
        "meta": np.array(json.dumps([c.meta for c in clips])),
    }
    temporary = path.with_suffix(".tmp.npz")
    np.savez_compressed(temporary, **arrays)
    os.replace(temporary, path)


class ShardSource:
    """The clips of a shard directory written by `write_shards`, in order."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.directory} is not a world dataset (no {MANIFEST}); "
                                    "make one with `facecast world generate`")
        self.manifest = json.loads(path.read_text())
        self.shard_size = self.manifest["shard_size"]
        self.split = WorldSplit.from_record(self.manifest["split"])
        shards = (self.manifest["count"] + self.shard_size - 1) // self.shard_size
        missing = [n for n in range(shards) if not (self.directory / _shard_name(n)).exists()]
        if missing:
            raise ValueError(f"{self.directory} is incomplete: {len(missing)} of {shards} shards missing "
                             "(resume with the same `facecast world generate` command)")
        self._cache: tuple[int, dict] | None = None

    @property
    def stale(self) -> bool:
        """Made by another version of the world's code: its pixels are usable, its truth may not match."""
        return self.manifest.get("world_version") != WORLD_VERSION

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def _shard(self, number: int) -> dict:
        if self._cache is None or self._cache[0] != number:
            with np.load(self.directory / _shard_name(number)) as data:
                self._cache = (number, {key: data[key] for key in data.files})
        return self._cache[1]

    def __getitem__(self, index: int) -> Clip:
        if not 0 <= index < len(self):
            raise IndexError(index)
        data = self._shard(index // self.shard_size)
        row = index % self.shard_size
        f0, f1 = int(data["frame_counts"][:row].sum()), int(data["frame_counts"][:row + 1].sum())
        a0, a1 = int(data["audio_counts"][:row].sum()), int(data["audio_counts"][:row + 1].sum())
        c = int(data["characters"][row])
        truth = Truth(mouth_open=data["mouth_open"][f0:f1, :c], viseme=data["viseme"][f0:f1, :c],
                      speaking=data["speaking"][f0:f1, :c], face_box=data["face_box"][f0:f1, :c],
                      identity=data["identity"][row, :c], style=data["style"][row, :c])
        return Clip(frames=data["frames"][f0:f1], audio=data["audio"][a0:a1].astype(np.float32) / 32767.0,
                    truth=truth, meta=json.loads(str(data["meta"]))[row])


class VideoFolderSource:
    """Real talking-head videos: every video file under `directory`, centre-cropped to a square of `size`,
    resampled to the world's 25 fps and 16 kHz mono. Clips carry no truth (the measure uses its own probe)."""

    def __init__(self, directory: str | Path, size: int = 128):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"video folder {str(self.directory)!r} does not exist")
        self.files = sorted(p for p in self.directory.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        if not self.files:
            raise ValueError(f"{self.directory} holds no video files ({', '.join(VIDEO_SUFFIXES)})")
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Clip:
        import av
        from PIL import Image

        path = self.files[index]
        frames, chunks, rate = [], [], SAMPLE_RATE_HZ
        with av.open(str(path)) as container:
            video = container.streams.video[0]
            source_fps = float(video.average_rate or FPS)
            for frame in container.decode(video=0):
                image = frame.to_image()
                side = min(image.size)
                left, top = (image.width - side) // 2, (image.height - side) // 2
                frames.append(np.asarray(image.crop((left, top, left + side, top + side))
                                         .resize((self.size, self.size), Image.BILINEAR).convert("RGB")))
        with av.open(str(path)) as container:
            if container.streams.audio:
                stream = container.streams.audio[0]
                rate = stream.rate
                for frame in container.decode(audio=0):
                    samples = frame.to_ndarray().astype(np.float32)
                    if frame.format.name.startswith("s16"):
                        samples /= 32768.0
                    chunks.append(samples.reshape(-1, len(frame.layout.channels)).mean(1)
                                  if frame.format.is_packed else samples.mean(0))
        if not frames:
            raise ValueError(f"{path} has no video frames")
        picks = np.clip(np.round(np.arange(int(len(frames) / source_fps * FPS)) * source_fps / FPS).astype(int),
                        0, len(frames) - 1)
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        if len(audio) and rate != SAMPLE_RATE_HZ:
            audio = resample(audio, rate, SAMPLE_RATE_HZ)
        return Clip(frames=np.stack([frames[i] for i in picks]), audio=audio.astype(np.float32),
                    meta={"path": str(path)})


def is_complete(directory: str | Path) -> bool:
    """A world shard directory with its manifest and every shard written (what `write_shards` resumes otherwise)."""
    try:
        ShardSource(directory)
    except (FileNotFoundError, ValueError):
        return False
    return True


def open_source(spec: str, *, seed: int = 0, count: int = 64, size: int = 128):
    """A clip source by name: 'world:train' / 'world:eval' (on the fly), a shard directory, or a video folder."""
    if spec.startswith("world:"):
        return WorldSource(WorldSplit(seed), spec.split(":", 1)[1], count, size)
    path = Path(spec)
    if (path / MANIFEST).is_file():
        return ShardSource(path)
    if path.is_dir():
        return VideoFolderSource(path, size)
    raise FileNotFoundError(f"data {spec!r} is neither world:train / world:eval, a world shard directory "
                            "nor a folder of videos")
