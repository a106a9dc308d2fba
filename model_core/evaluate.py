"""`facecast eval`'s engine: score videos of held-out world clips against their ground truth.

    evaluate(source, probe, video="model" | "truth" | "shift:K" | "frozen" | "swap", engine=None) -> report dict
    horizon(source, probe, engine, seconds, window_s=10, streams=1) -> report dict   sessions streaming `seconds` of
                                              speech each, scored on their first and last windows of whole loops

What is scored, per clip (single-character clips of the source; two-character clips are skipped):
* "model": the engine's video for the clip's reference (a neutral render of its identity) and its audio;
* "teacher": the bidirectional teacher's (`TeacherSampler`): many-step CFG sampling over 33-frame windows of the
  clip (the length it was trained on), each decoded by the VAE, joined at their shared frame;
* "truth": the ground-truth render itself (the ceiling);
* "vae": the truth through the engine's VAE (encode, streaming decode with the engine's default decoder): what the
  VAE alone keeps of the lip sync;
* "shift:K": the truth delayed by K frames (calibration: lag K);  "frozen": its first frame held (sync ~ 0);
* "swap": another identity's truth render against this clip's reference (calibration: low identity).

`landmark_sync_r` is sync_r read by dlib's landmarks instead of the probe (`model_core.landmarks`; present when the
`eval` extra is installed): an independent check on the probe.

Reported (see `model_core.lipsync` for the definitions): sync_r, sync_lag_frames, silence_motion, identity, psnr, ssim
against the truth render for the same identity and audio, each overall and per style, with the clip count and the
wall time. Clip scores are averaged over clips; the lag is the one maximising the clip-mean correlation.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from .landmarks import LandmarkReader
from .lipsync import identity_score, lagged_r, mouth_change, pearson, psnr, read_video, ssim, sync_scores
from .world.identity import STYLES, identity
from .world.render import FrameState, Renderer

VIDEOS = ("model", "teacher", "truth", "vae", "frozen", "swap", "shift:K")
MAX_LAG = 8


def check_video(video: str) -> None:
    if video in ("model", "teacher", "truth", "vae", "frozen", "swap"):
        return
    if video.startswith("shift:"):
        try:
            int(video.split(":", 1)[1])
            return
        except ValueError:
            pass
    raise ValueError(f"video={video!r} is invalid: allowed {', '.join(VIDEOS)} (K an integer number of frames)")


def reference_render(identity_id: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The identity's reference image: mouth closed, eyes open, head still; and its face box."""
    frame, boxes = Renderer(size).frame([(identity(seed, identity_id), FrameState())])
    return frame, boxes[0]


def model_video(engine, reference: np.ndarray, audio: np.ndarray, sample_rate: int, frames: int,
                listening: np.ndarray | None = None) -> np.ndarray:
    """The engine's frames (uint8 [T, H, W, 3]) for a reference image and its audio. `listening` [T] bool: where the
    character is set not speaking (silence mode, as a call sets its avatar between replies), per 200 ms of audio."""
    image = torch.from_numpy(np.array(reference)).permute(2, 0, 1).float().div(127.5).sub(1.0)
    session = engine.open_session(image)
    chunks = []
    speaking = True
    try:
        for start in range(0, len(audio), sample_rate // 5):
            if listening is not None:
                frame = min(int(start / sample_rate * engine.preset.stream.fps), len(listening) - 1)
                if speaking == bool(listening[frame]):
                    speaking = not speaking
                    engine.set_speaking(session, 0, speaking)
            chunks += engine.push_audio(session, audio[start:start + sample_rate // 5], sample_rate)
        chunks += engine.end_input(session)
    finally:
        engine.close_session(session)
    video = torch.cat([chunk.frames for chunk in chunks])[:frames]
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _video_for(mode: str, clip, others, engine, reference, listen: bool = False) -> np.ndarray:
    truth = clip.frames
    if mode == "truth":
        return truth
    if mode == "frozen":
        return np.repeat(truth[:1], len(truth), axis=0)
    if mode.startswith("shift:"):
        k = int(mode.split(":", 1)[1])
        index = np.clip(np.arange(len(truth)) - k, 0, len(truth) - 1)
        return truth[index]
    if mode == "swap":
        other = next(o for o in others if int(o.truth.identity[0]) != int(clip.truth.identity[0]))
        frames = other.frames[:len(truth)]
        if len(frames) < len(truth):
            frames = np.concatenate([frames, np.repeat(frames[-1:], len(truth) - len(frames), axis=0)])
        return frames
    if mode == "vae":
        return vae_video(engine.vae, truth, engine.decoder.fast if engine.decoder.default == "fast" else None)
    if mode == "teacher":
        return engine.video(reference, clip.audio, clip.sample_rate, len(truth))
    return model_video(engine, reference, clip.audio, clip.sample_rate, len(truth),
                       ~clip.truth.speaking[:, 0].astype(bool) if listen else None)


class TeacherSampler:
    """The teacher as a video maker for `evaluate(video="teacher", engine=TeacherSampler(...))`."""

    def __init__(self, teacher, vae, frontend, *, steps: int = 12, guidance: float = 2.0, shift: float = 3.0,
                 window: int = 9, seed: int = 0):
        self.teacher, self.vae, self.frontend = teacher.eval(), vae, frontend
        self.steps, self.guidance, self.shift, self.window, self.seed = steps, guidance, shift, window, seed

    @torch.no_grad()
    def video(self, reference: np.ndarray, audio: np.ndarray, sample_rate: int, frames: int) -> np.ndarray:
        from .training.latents import audio_windows
        from .training.teacher_stage import teacher_sample

        ratio = self.vae.temporal_compression
        image = torch.from_numpy(np.array(reference)).permute(2, 0, 1).float().div(127.5).sub(1.0)
        reference_latent = self.vae.encode_image(image[None]).float()
        features = self.frontend.encode(audio, sample_rate)[None]
        speaking = torch.ones(features.shape[:2], dtype=torch.bool)
        grid = reference_latent.shape[-2:]
        tokens = (grid[0] // self.teacher.config.patch_size[1]) * (grid[1] // self.teacher.config.patch_size[2])
        stride = ratio * (self.window - 1)
        generator = torch.Generator().manual_seed(self.seed)
        pieces = []
        for start in range(0, max(frames - 1, 1), stride):
            first_latent = start // ratio
            window_features, talk = audio_windows(features, speaking, first_latent, self.window, ratio,
                                                  self.teacher.config.audio_window)
            batch = {"reference": reference_latent, "features": window_features[None], "speaking": talk[None],
                     "regions": torch.ones(1, 1, tokens)}
            noise = torch.randn(1, 16, self.window, *grid, generator=generator)
            latents = teacher_sample(self.teacher, batch, noise, steps=self.steps, guidance=self.guidance,
                                     shift=self.shift)
            decoded = self.vae.decode(latents.to(self.vae.dtype))[0]               # [3, 1 + 4 (n - 1), H, W]
            pieces.append(decoded[:, (1 if pieces else 0):])
        video = torch.cat(pieces, 1)[:, :frames]
        return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()


@torch.no_grad()
def vae_video(vae, frames: np.ndarray, decoder=None) -> np.ndarray:
    """Frames through the VAE: encode the whole clip, decode it chunk by chunk as a session would (with `decoder`, a
    fast decoder for the VAE's latents, instead of the VAE's own)."""
    decoder = decoder or vae
    usable = len(frames) - (len(frames) - 1) % vae.temporal_compression
    video = torch.from_numpy(np.array(frames[:usable])).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1.0)
    latents = vae.normalize(vae.vae.encode(video.to(vae.device, vae.dtype)).latent_dist.mean)
    cache, pieces = decoder.new_decode_cache(), []
    for start in range(0, latents.shape[2], 3):
        decoded, cache = decoder.decode_chunk(latents[:, :, start:start + 3], cache)
        pieces.append(decoded)
    out = ((torch.cat(pieces, 2)[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
    return np.concatenate([out, frames[usable:]]) if usable < len(frames) else out


def _balanced_singles(source, clips: int | None) -> list:
    """The single-character clips, taken round-robin over styles so any `clips` count covers every style."""
    by_style: dict[int, list] = {}
    for index in range(len(source)):
        clip = source[index]
        if clip.truth is None:
            raise ValueError("evaluation needs clips with ground truth (world data), not a folder of videos")
        if clip.truth.mouth_open.shape[1] == 1:
            by_style.setdefault(int(clip.truth.style[0]), []).append(clip)
    if not by_style:
        raise ValueError("the evaluation set has no single-character clips")
    ordered: list = []
    queues = [list(g) for _, g in sorted(by_style.items())]
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.pop(0))
    return ordered[:clips] if clips else ordered


def score_frames(probe, frames: np.ndarray, truth_frames: np.ndarray, boxes: np.ndarray, truth_open: np.ndarray,
                 speaking: np.ndarray, reference_embedding: np.ndarray) -> dict:
    """One video's scores against its truth (all arrays frame-aligned): sync, lag curve, identity, psnr, ssim."""
    measured, embeddings = read_video(probe, frames, boxes)
    shown, truth = frames.astype(np.float64) / 255, truth_frames.astype(np.float64) / 255
    return {
        **sync_scores(measured, truth_open, speaking, MAX_LAG),
        **mouth_change(frames, boxes, speaking),
        "lag_curve": [lagged_r(measured, truth_open, speaking, k) for k in range(-MAX_LAG, MAX_LAG + 1)],
        "identity": identity_score(embeddings, reference_embedding),
        "psnr": float(np.mean([psnr(a, b) for a, b in zip(shown[::4], truth[::4])])),
        "ssim": float(np.mean([ssim(a, b) for a, b in zip(shown[::4], truth[::4])])),
    }


HORIZON_METRICS = ("sync_r", "identity", "psnr", "ssim")


def horizon_windows(seconds: float, window_s: float, period: int, fps: float, at: tuple[float, ...] = ()) -> dict:
    """The long horizon's windows, in frames [start, stop): each spans the whole loops of a `period`-frame clip nearest
    `window_s` (at least one) and starts on a loop boundary, so every window hears the same speech frame for frame and
    is scored against the same truth: what differs between them is the stream's drift alone. `first` starts at 0, each
    mark of `at` at the loop boundary nearest it (`at_<mark>`), `last` at the last boundary it fits before the end."""
    if window_s <= 0:
        raise ValueError(f"window_s={window_s:g} is invalid: > 0")
    total = int(round(seconds * fps))
    loops = max(1, int(round(window_s * fps / period)))
    width = loops * period
    if total < 2 * width:
        raise ValueError(f"seconds={seconds:g} is invalid: at least two windows ({2 * width / fps:g} s: window_s="
                         f"{window_s:g} is {loops} loop(s) of the {period / fps:g} s clip)")
    last = (total - width) // period * period
    windows = {"first": (0, width)}
    for mark in at:
        start = int(round(mark * fps / period)) * period
        if not width <= start <= last - width:
            raise ValueError(f"at={mark:g} is invalid: a window start between the first window's end "
                             f"({width / fps:g} s) and the last window's start less one window "
                             f"({(last - width) / fps:g} s)")
        windows[f"at_{mark:g}"] = (start, start + width)
    windows["last"] = (last, last + width)
    return windows


@torch.no_grad()
def horizon(source, probe, engine, seconds: float, window_s: float = 10.0, seed: int = 0,
            progress: bool = True, at: tuple[float, ...] = (), streams: int = 1) -> dict:
    """The long horizon: `streams` sessions, one after another, each streaming `seconds` of speech (one of the first
    single-character held-out clips, taken round-robin over the styles: its audio looped, cut to its frames so frame t
    is the clip's frame t mod N, and its own reference image), scored on windows of whole loops (`horizon_windows`):
    the first, the last and one per mark of `at` (`at_<s>`). Each window's metrics are the mean over the streams
    (`per_stream` keeps each one's); `change` is last / first - 1 per metric (the issue's target: within 3 %), and
    `change_at_<s>` the same for a mark. Only the windows' frames are kept, so an hour holds a few windows in memory."""
    if streams < 1:
        raise ValueError(f"streams={streams} is invalid: at least 1")
    clips = _balanced_singles(source, streams)
    if len(clips) < streams:
        raise ValueError(f"streams={streams} is invalid: the evaluation set has {len(clips)} single-character clips")
    fps = float(engine.preset.stream.fps)
    plans = [horizon_windows(seconds, window_s, clip.num_frames, fps, at) for clip in clips]
    began = time.perf_counter()
    per_stream = [_horizon_stream(clip, windows, probe, engine, seconds, fps, seed, progress, f"{index + 1}/{streams}")
                  for index, (clip, windows) in enumerate(zip(clips, plans))]
    report = {"seconds": seconds, "window_s": window_s, "streams": streams,
              "frames": sum(stream.pop("frames") for stream in per_stream),
              "wall_s": round(time.perf_counter() - began, 2)}
    for name in plans[0]:
        report[name] = {key: _mean([stream[name][key] for stream in per_stream]) for key in per_stream[0][name]
                        if key != "span_s"}
        report[name]["span_s"] = [stream[name]["span_s"] for stream in per_stream]
    for scores in (report, *per_stream):
        scores.update(_changes(scores, plans[0]))
    report["per_stream"] = per_stream
    return report


def _mean(values: list) -> float | None:
    kept = [value for value in values if value is not None]
    return round(float(np.mean(kept)), 4) if kept else None


def _changes(scores: dict, windows) -> dict:
    """`change` (the last window) and `change_<name>` (the others): later / first - 1 per metric."""
    first = scores["first"]
    return {("change" if name == "last" else f"change_{name}"): {
        key: (round(scores[name][key] / first[key] - 1.0, 4)
              if first.get(key) not in (None, 0.0) and scores[name].get(key) is not None else None)
        for key in HORIZON_METRICS} for name in windows if name != "first"}


def _horizon_stream(clip, windows: dict, probe, engine, seconds: float, fps: float, seed: int, progress: bool,
                    label: str) -> dict:
    """One session streaming the clip's looped audio for `seconds`; its scores on each window."""
    rate, period = int(clip.sample_rate), clip.num_frames
    samples = int(round(period * rate / fps))
    loop_audio = np.zeros(samples, np.float32)
    loop_audio[:min(samples, len(clip.audio))] = clip.audio[:samples]
    total = int(round(seconds * fps))
    reference, reference_box = reference_render(int(clip.truth.identity[0]), seed, clip.frames.shape[1])
    _, reference_embedding = read_video(probe, reference[None], reference_box[None])
    kept = {name: [] for name in windows}
    image = torch.from_numpy(np.array(reference)).permute(2, 0, 1).float().div(127.5).sub(1.0)
    session = engine.open_session(image)
    bar = tqdm(total=total, desc=f"horizon {seconds:g} s, stream {label}", unit="frame", disable=not progress)
    produced, pushed, piece = 0, 0, rate // 5

    def keep(chunks):
        nonlocal produced
        for chunk in chunks:
            frames = ((chunk.frames.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            for name, (start, stop) in windows.items():
                first, last = max(start, produced), min(stop, produced + len(frames))
                if first < last:
                    kept[name].append(frames[first - produced:last - produced])
            produced += len(frames)
            bar.update(len(frames))

    try:
        needed = int(round(total * rate / fps))
        while pushed < needed:
            offset = pushed % samples
            size = min(piece, samples - offset, needed - pushed)
            keep(engine.push_audio(session, loop_audio[offset:offset + size], rate))
            pushed += size
        keep(engine.end_input(session))
    finally:
        engine.close_session(session)
        bar.close()
    report = {"clip_frames": period, "identity_index": int(clip.truth.identity[0]), "frames": produced}
    for name, (start, stop) in windows.items():
        frames = np.concatenate(kept[name])[:stop - start]
        index = np.arange(start, start + len(frames)) % period
        scores = score_frames(probe, frames, clip.frames[index], clip.truth.face_box[index, 0],
                              clip.truth.mouth_open[index, 0], clip.truth.speaking[index, 0], reference_embedding[0])
        scores.pop("lag_curve")
        report[name] = {key: (round(float(value), 4) if value is not None else None) for key, value in scores.items()}
        report[name]["span_s"] = [round(start / fps, 2), round(stop / fps, 2)]
    return report


def evaluate(source, probe, video: str = "model", engine=None, clips: int | None = None, seed: int = 0,
             progress: bool = True, landmarks: bool = True, listen: bool = False) -> dict:
    """`listen`: the model's character is set not speaking where the clip's truth says it listens (a call's avatar
    between its replies), so the session's listening behaviour is scored (`StreamConfig.listening_hold`)."""
    check_video(video)
    if listen and video != "model":
        raise ValueError(f"listen sets the streaming engine's speaking mode: it needs video='model', not {video!r}")
    reader = LandmarkReader() if landmarks and LandmarkReader.available() else None
    if video in ("model", "vae", "teacher") and engine is None:
        raise ValueError(f"video={video!r} needs an engine")
    began = time.perf_counter()
    loaded = _balanced_singles(source, clips)
    rows = []
    for index, clip in enumerate(tqdm(loaded, desc=f"eval {video}", unit="clip", disable=not progress)):
        ident = int(clip.truth.identity[0])
        reference, reference_box = reference_render(ident, seed, clip.frames.shape[1])
        others = loaded[index + 1:] + loaded[:index]
        frames = _video_for(video, clip, others, engine, reference, listen)
        n = min(len(frames), clip.num_frames)
        boxes = clip.truth.face_box[:n, 0]
        _, reference_embedding = read_video(probe, reference[None], reference_box[None])
        speaking = clip.truth.speaking[:n, 0]
        truth_open = clip.truth.mouth_open[:n, 0]
        rows.append({**score_frames(probe, frames[:n], clip.frames[:n], boxes, truth_open, speaking,
                                    reference_embedding[0]),
                     "style": STYLES[int(clip.truth.style[0])]})
        if reader is not None:  # the independent check: dlib's landmarks, not trained on anything of ours
            ratio = reader.mouth_ratio(frames[:n], boxes)
            rows[-1]["landmark_sync_r"] = pearson(ratio[speaking], truth_open[speaking])
    report = _aggregate(rows)
    report["per_style"] = {style: _aggregate([r for r in rows if r["style"] == style])
                           for style in STYLES if any(r["style"] == style for r in rows)}
    report.update(video=video, clips=len(rows), wall_s=round(time.perf_counter() - began, 2),
                  **({"listen": True} if listen else {}))
    return report


def _aggregate(rows: list[dict]) -> dict:
    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]
        return round(float(np.mean(values)), 4) if values else None

    curve = np.mean([r["lag_curve"] for r in rows], axis=0)
    best = int(np.argmax(curve))
    return {"sync_r": mean("sync_r"), "sync_lag_frames": best - MAX_LAG if curve[best] > 0 else None,
            "silence_motion": mean("silence_motion"), "identity": mean("identity"), "psnr": mean("psnr"),
            "ssim": mean("ssim"), "landmark_sync_r": mean("landmark_sync_r"),
            "listening_change": mean("listening_change"), "speaking_change": mean("speaking_change"),
            "clips": len(rows)}
