"""The DiT stages' training data: world clips encoded once into what the score model sees.

    encode_clip(clip, vae, frontend, dit_config) -> LatentClip     one clip
    build_latent_cache(source, vae, out_dir, ...)                  every clip, sharded, resumable, with progress
    LatentSource(out_dir)                                          the cache, indexable like a clip source
    audio_windows(features, speaking, first_latent, count, ...)    per-latent-frame audio tokens, as inference cuts them

A `LatentClip` holds normalised VAE latents of segments of the clip: `segment_latents` latent frames each
(1 + 4 (n - 1) video frames, 33 for 9), starting every 32 video frames, each encoded from its own start as a session's
stream is (its latent 0 is one video frame alone, latent k covers the segment's video frames [4k-3, 4k]); encoding
segments in a batch costs a third of encoding the clip in one pass on a CPU. Also the reference latent (the
identity's neutral render, as `facecast eval` and a user give it), the audio features of every
video frame per character (each character's own track: a two-character clip's mix is split at the turns), who is
speaking, each character's token region, a mouth weight per latent position (from the truth's face boxes) and each
character's mouth opening per latent frame (the truth's, averaged over the video frames the latent frame covers: what
the teacher's latent lip reader is fitted to).

The cache records the VAE (a digest of its weights), the audio front-end and the world version; a stage refuses a
cache made with another VAE, because latents from one VAE mean nothing to another.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import DiTConfig
from ..evaluate import reference_render
from ..vae import vae_digest
from ..world.render import FrameState, Renderer
from ..world.identity import identity
from .data import frames_to_tensor, mouth_mask

CACHE_VERSION = 2
"""2: `LatentClip.opening` (the truth's mouth opening per latent frame)."""
SHARD_CLIPS = 32


@dataclass
class LatentClip:
    latents: torch.Tensor     # [G, 16, n, h, w] float16, normalised: G segments of n latent frames
    starts: torch.Tensor      # [G] int, the video frame each segment starts at (a multiple of 4)
    reference: torch.Tensor   # [16, 1, h, w] float16, normalised
    features: torch.Tensor    # [K, N, D] float16, per video frame
    speaking: torch.Tensor    # [K, N] bool, the truth's speaking flag (mouth moving with speech)
    regions: torch.Tensor     # [K, S] float32, token masks (S = post-patch tokens per latent frame)
    mouth: torch.Tensor       # [G, n, h, w] float16, mouth weight 0..1 per latent position
    opening: torch.Tensor     # [K, G, n] float16, each character's mean mouth opening (0..1) per latent frame
    identity: int
    style: int

    @property
    def segments(self) -> int:
        return int(self.latents.shape[0])

    @property
    def segment_latents(self) -> int:
        return int(self.latents.shape[2])

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("latents", "starts", "reference", "features", "speaking", "regions",
                                              "mouth", "opening", "identity", "style")}


def speaker_tracks(clip) -> np.ndarray:
    """[K, N] each character's own audio: a single character's is the clip's; a scene's mix is split at the turns
    (turns never overlap: each sample belongs to the speaker of the turn that started last)."""
    people = clip.truth.mouth_open.shape[1]
    if people == 1:
        return clip.audio[None].astype(np.float32)
    tracks = np.zeros((people, len(clip.audio)), np.float32)
    turns = sorted(clip.meta.get("turns", []), key=lambda t: t["start_s"])
    if not turns:
        raise ValueError("a two-character clip without turn metadata cannot be split into speakers")
    bounds = [int(round(t["start_s"] * clip.sample_rate)) for t in turns] + [len(clip.audio)]
    bounds[0] = 0
    for turn, start, end in zip(turns, bounds, bounds[1:]):
        tracks[turn["speaker"], start:end] = clip.audio[start:end]
    return tracks


def character_regions(face_boxes: np.ndarray, size: int, grid: tuple[int, int]) -> torch.Tensor:
    """[K, S] token masks: one character covers the frame; several split it at the midpoints between their faces
    (the default `Character` region, and the left/right split a two-person session would give)."""
    people = face_boxes.shape[1]
    gh, gw = grid
    if people == 1:
        return torch.ones(1, gh * gw)
    centres = np.nanmean((face_boxes[:, :, 0] + face_boxes[:, :, 2]) / 2, axis=0) / size
    order = np.argsort(centres)
    cuts = [0.0] + [float((centres[order[i]] + centres[order[i + 1]]) / 2) for i in range(people - 1)] + [1.0]
    xs = (torch.arange(gw) + 0.5) / gw
    masks = torch.zeros(people, gh, gw)
    for rank, slot in enumerate(order):
        masks[slot, :, (xs >= cuts[rank]) & (xs < cuts[rank + 1])] = 1.0
    return masks.flatten(1)


def latent_mouth_weight(face_box: np.ndarray, size: int, num_latents: int, ratio: int, grid: tuple[int, int]):
    """[L, h, w] fraction of each latent cell's pixels (over the video frames it covers) inside a mouth region."""
    pixels = mouth_mask(face_box, size)                                   # [T, H, W]
    h, w = grid
    cells = pixels.reshape(len(pixels), h, size // h, w, size // w).mean(axis=(2, 4))
    out = np.zeros((num_latents, h, w), np.float32)
    for f in range(num_latents):
        first, last = max(0, ratio * f - (ratio - 1)), min(len(cells) - 1, ratio * f)
        if first > last:
            continue
        out[f] = cells[first:last + 1].mean(0)
    return torch.from_numpy(out)


def latent_openings(mouth_open: np.ndarray, num_latents: int, ratio: int) -> torch.Tensor:
    """[T, K] per-video-frame openings of one segment -> [K, L]: latent frame f's mean over the video frames it
    covers ([ratio*f - (ratio-1), ratio*f], frame 0 alone), as `latent_mouth_weight` groups them."""
    out = np.zeros((mouth_open.shape[1], num_latents), np.float32)
    for f in range(num_latents):
        first, last = max(0, ratio * f - (ratio - 1)), min(len(mouth_open) - 1, ratio * f)
        if first <= last:
            out[:, f] = mouth_open[first:last + 1].mean(0)
    return torch.from_numpy(out)


SEGMENT_STRIDE = 32
"""Video frames between segment starts (a multiple of the VAE's temporal stride)."""


@torch.no_grad()
def encode_clip(clip, vae, frontend, dit_config: DiTConfig, seed: int = 0, segment_latents: int = 9,
                max_segments: int = 3) -> LatentClip:
    """One world clip -> a `LatentClip` (see the module docstring): up to `max_segments` segments, spread over
    the clip."""
    ratio = vae.temporal_compression
    length = 1 + ratio * (segment_latents - 1)
    possible = list(range(0, clip.num_frames - length + 1, SEGMENT_STRIDE))
    if not possible:
        raise ValueError(f"clip {clip.meta.get('index')} has {clip.num_frames} frames; a segment needs {length}")
    chosen = [possible[int(i)] for i in np.unique(np.linspace(0, len(possible) - 1, min(max_segments,
                                                                                        len(possible))).round())]
    video = torch.stack([frames_to_tensor(clip.frames[s:s + length]) for s in chosen]).to(vae.device, vae.dtype)
    latents = vae.normalize(vae.vae.encode(video).latent_dist.mean)
    people = [identity(seed, int(i)) for i in clip.truth.identity]
    size = clip.frames.shape[1]
    if len(people) == 1:
        reference, _ = reference_render(int(clip.truth.identity[0]), seed, size)
    else:
        reference, _ = Renderer(size).frame([(person, FrameState()) for person in people])
    reference_latent = vae.encode_image(frames_to_tensor(reference[None]).permute(1, 0, 2, 3))[0]
    tracks = speaker_tracks(clip)
    features = torch.stack([frontend.encode(track, clip.sample_rate) for track in tracks])
    frames = min(features.shape[1], clip.num_frames)
    grid = (latents.shape[-2] // dit_config.patch_size[1], latents.shape[-1] // dit_config.patch_size[2])
    mouth = torch.stack([latent_mouth_weight(clip.truth.face_box[s:s + length], size, segment_latents, ratio,
                                             latents.shape[-2:]) for s in chosen])
    opening = torch.stack([latent_openings(clip.truth.mouth_open[s:s + length], segment_latents, ratio)
                           for s in chosen], dim=1)
    return LatentClip(
        latents=latents.half().cpu(), starts=torch.tensor(chosen), reference=reference_latent.half().cpu(),
        features=features[:, :frames].half(), speaking=torch.from_numpy(clip.truth.speaking[:frames].T.copy()),
        regions=character_regions(clip.truth.face_box, size, grid), mouth=mouth.half(), opening=opening.half(),
        identity=int(clip.truth.identity[0]), style=int(clip.truth.style[0]))


def audio_windows(features: torch.Tensor, speaking: torch.Tensor, first_latent: int, count: int, ratio: int,
                  window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Audio tokens of latent frames [first_latent, +count): features [K, N, D], speaking [K, N] ->
    [K, count, window * ratio, D] and [K, count, window * ratio].

    Latent frame f's tokens are the features of video frames ratio*(f - window//2) - (ratio-1) + j, j < window*ratio
    (the frames it shows and two latent frames either side); frames before 0 or past the audio are silence (zero
    features, not speaking). This is how `AudioStage` cuts a stream, written out for whole clips."""
    half, tokens = window // 2, window * ratio
    starts = ratio * (torch.arange(first_latent, first_latent + count) - half) - (ratio - 1)
    index = starts[:, None] + torch.arange(tokens)[None]                  # [count, T]
    valid = (index >= 0) & (index < features.shape[1])
    safe = index.clamp(0, features.shape[1] - 1)
    windows = features[:, safe] * valid[None, :, :, None].to(features.dtype)
    return windows, speaking[:, safe] & valid[None]


def dit_config_for_latents(preset, latents) -> DiTConfig:
    """The preset's DiT shape with the audio width the cache's front-end gives."""
    import dataclasses

    return dataclasses.replace(preset.dit, audio_dim=int(latents.manifest["frontend"]["feature_dim"]))


# ============================================================================================ the cache


def frontend_record(source) -> dict:
    """A score-model export's metadata for the audio front end its latents were made with (`AUDIO_FRONTEND_KEY`):
    what a session must feed the checkpoint (`model_core.models.audio_config_for`)."""
    from ..checkpoint import AUDIO_FRONTEND_KEY

    frontend = (getattr(source, "manifest", None) or {}).get("frontend")
    return {AUDIO_FRONTEND_KEY: frontend} if frontend else {}


def cache_manifest(vae, frontend_config: dict, source_manifest: dict, count: int) -> dict:
    return {"kind": "latents", "version": CACHE_VERSION, "segment_stride": SEGMENT_STRIDE,
            "vae_digest": vae_digest(vae), "frontend": frontend_config,
            "source": source_manifest, "count": count, "shard_clips": SHARD_CLIPS}


def build_latent_cache(source, vae, frontend, dit_config: DiTConfig, out_dir: str | Path, *,
                       progress: bool = True, seed: int = 0, max_segments: int = 3) -> Path:
    """Encode every ground-truth clip of `source` into shards of `out_dir` (resumes: finished shards are kept)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frontend_config = {"backend": frontend.config.backend, "fps": frontend.config.fps,
                       "feature_dim": frontend.feature_dim}
    manifest = cache_manifest(vae, frontend_config, getattr(source, "manifest", {}) or {}, len(source))
    manifest_path = out_dir / "manifest.json"
    if manifest_path.is_file():
        existing = json.loads(manifest_path.read_text())
        if {k: existing.get(k) for k in ("vae_digest", "count", "version", "frontend")} != \
                {k: manifest[k] for k in ("vae_digest", "count", "version", "frontend")}:
            raise ValueError(f"{out_dir} holds latents of another VAE, audio front end or data set; remove it or "
                             "choose another --latents directory")
    else:
        manifest_path.write_text(json.dumps(manifest, indent=1))
    shards = (len(source) + SHARD_CLIPS - 1) // SHARD_CLIPS
    bar = tqdm(total=len(source), desc="encode latents", unit="clip", disable=not progress)
    for shard in range(shards):
        path = out_dir / f"shard-{shard:05d}.pt"
        first, last = shard * SHARD_CLIPS, min(len(source), (shard + 1) * SHARD_CLIPS)
        if path.is_file():
            bar.update(last - first)
            continue
        clips = []
        for index in range(first, last):
            clip = source[index]
            if clip.truth is None:
                raise ValueError("the DiT stages train on clips with ground truth (world data)")
            clips.append(encode_clip(clip, vae, frontend, dit_config, seed, max_segments=max_segments).to_dict())
            bar.update(1)
        temporary = path.with_suffix(".tmp")
        torch.save(clips, temporary)
        os.replace(temporary, path)
    bar.close()
    return out_dir


def is_latent_cache_complete(path: Path) -> bool:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    record = json.loads(manifest.read_text())
    shards = (int(record["count"]) + int(record["shard_clips"]) - 1) // int(record["shard_clips"])
    return all((path / f"shard-{i:05d}.pt").is_file() for i in range(shards))


class LatentSource:
    """A latent cache as a sequence of `LatentClip`s (shards loaded on first use and kept)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{self.path} is not a latent cache (no manifest.json); build one with "
                                    "`facecast train teacher` or `build_latent_cache`")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("version") != CACHE_VERSION:
            raise ValueError(f"{self.path} is a version-{self.manifest.get('version')} latent cache; this facecast "
                             f"reads version {CACHE_VERSION} (it adds the mouth openings): rebuild it")
        self.count = int(self.manifest["count"])
        self.shard_size = int(self.manifest["shard_clips"])
        if not is_latent_cache_complete(self.path):
            raise ValueError(f"{self.path} is incomplete (shards missing); re-run the command that builds it to "
                             "finish it")
        self._shards: dict[int, list[LatentClip]] = {}  # all kept: a cache of 768 clips is ~250 MB

    def __len__(self) -> int:
        return self.count

    def check_vae(self, vae) -> None:
        if self.manifest["vae_digest"] != vae_digest(vae):
            raise ValueError(f"{self.path} was encoded with another VAE (digest {self.manifest['vae_digest']}, this "
                             f"one {vae_digest(vae)}); rebuild it")

    def check_frontend(self, backend: str) -> None:
        made = self.manifest["frontend"]["backend"]
        if made != backend:
            raise ValueError(f"{self.path} holds the {made!r} audio front end's features, not {backend!r}'s; rebuild "
                             "it or choose another --latents directory")

    def __getitem__(self, index: int) -> LatentClip:
        if not 0 <= index < self.count:
            raise IndexError(index)
        shard, offset = divmod(index, self.shard_size)
        if shard not in self._shards:
            rows = torch.load(self.path / f"shard-{shard:05d}.pt", weights_only=False)
            self._shards[shard] = [LatentClip(**row) for row in rows]
        return self._shards[shard][offset]
