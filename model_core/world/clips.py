"""Talking clips with ground truth: one or two characters, real speech, turns, listening, blinks and head motion.

    spec = clip_spec(split, part, index)          what clip `index` of a part is (pure; deterministic)
    clip = make_clip(spec, renderer)              render it: frames, audio, per-frame Truth
    Clip / Truth                                  also what real datasets load into (truth None)

A single-character clip alternates speech and listening (silences where the mouth rests and the head idles); a
two-character clip passes the turn between speakers, each with their own voice. Per video frame and character the
truth holds mouth opening, viseme, speaking flag and face box; per character the identity and style.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .identity import identity
from .render import FrameState, Renderer
from .sentences import sentence
from .speech import SAMPLE_RATE_HZ, Voice, speak_fresh
from .split import WorldSplit
from .visemes import mouth_track

FPS = 25.0
WORLD_VERSION = 2
"""Bumped whenever the renderer, the mouth model or the clip layout changes: caches record it, and evaluation
refuses a cache made by another version (its truth would not match what this code renders)."""


@dataclass(frozen=True)
class Turn:
    speaker: int          # slot in the scene
    sentence: int         # index into the sentence pool
    voice: Voice
    gap_before_s: float   # silence before this turn (the other side listens / everyone listens)


@dataclass(frozen=True)
class ClipSpec:
    seed: int
    part: str
    index: int
    identities: tuple[int, ...]
    turns: tuple[Turn, ...]
    tail_s: float
    motion_seed: int


@dataclass
class Truth:
    mouth_open: np.ndarray   # [T, C] float32 0..1
    viseme: np.ndarray       # [T, C] int8 (visemes.VISEMES)
    speaking: np.ndarray     # [T, C] bool
    face_box: np.ndarray     # [T, C, 4] float32 x0, y0, x1, y1 in pixels
    identity: np.ndarray     # [C] int32
    style: np.ndarray        # [C] int8 (identity.STYLES)


@dataclass
class Clip:
    frames: np.ndarray       # [T, H, W, 3] uint8
    audio: np.ndarray        # [N] float32 mono
    sample_rate: int = SAMPLE_RATE_HZ
    fps: float = FPS
    truth: Truth | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def clip_spec(split: WorldSplit, part: str, index: int, duo_fraction: float = 0.2) -> ClipSpec:
    """Clip `index` of `part`: who is in it, who says what in which voice, and the silences."""
    rng = np.random.default_rng([split.seed, PARTS_CODE[part], int(index)])
    people = split.identities(part)
    voices = split.voices(part)
    duo = rng.random() < duo_fraction
    chosen = tuple(int(i) for i in rng.choice(people, size=2 if duo else 1, replace=False))
    voice_of = [voices[int(rng.integers(len(voices)))] for _ in chosen]
    if duo and len(voices) > 1:
        while voice_of[1] == voice_of[0]:
            voice_of[1] = voices[int(rng.integers(len(voices)))]
    turns = []
    count = int(rng.integers(2, 4)) if duo else int(rng.integers(1, 3))
    for k in range(count):
        speaker = k % 2 if duo else 0
        voice = Voice(voice_of[speaker], rate=int(rng.integers(140, 210)), pitch=int(rng.integers(25, 75)),
                      range=int(rng.integers(30, 80)))
        turns.append(Turn(speaker=speaker, sentence=split.sample_sentence(rng, part), voice=voice,
                          gap_before_s=float(rng.uniform(0.2, 0.6) if k == 0 else rng.uniform(0.4, 1.2))))
    return ClipSpec(seed=split.seed, part=part, index=int(index), identities=chosen, turns=tuple(turns),
                    tail_s=float(rng.uniform(0.3, 0.8)), motion_seed=int(rng.integers(2 ** 31)))


PARTS_CODE = {"train": 1, "eval": 2}


def _smooth_noise(rng: np.random.Generator, times: np.ndarray, low: float, high: float, parts: int = 3):
    out = np.zeros_like(times)
    for _ in range(parts):
        out += np.sin(2 * np.pi * rng.uniform(low, high) * times + rng.uniform(0, 2 * np.pi))
    return out / parts


def _frame_energy(track: np.ndarray, frames: int) -> np.ndarray:
    hop = SAMPLE_RATE_HZ / FPS
    energy = np.array([np.sqrt(np.mean(track[int(t * hop):int((t + 1) * hop)] ** 2) + 1e-12) for t in range(frames)])
    energy = energy / max(1e-6, float(energy.max()))
    kernel = np.exp(-np.abs(np.arange(-6, 7)) / 3.0)
    return np.convolve(energy, kernel / kernel.sum(), mode="same")


def _blinks(rng: np.random.Generator, frames: int) -> np.ndarray:
    blink = np.zeros(frames, np.float32)
    t = rng.uniform(0.3, 2.5) * FPS
    shape = np.array([0.5, 1.0, 1.0, 0.5])
    while t < frames:
        start = int(t)
        span = blink[start:start + len(shape)]
        blink[start:start + len(span)] = shape[:len(span)]
        t += rng.uniform(1.8, 5.0) * FPS
    return blink


def make_clip(spec: ClipSpec, renderer: Renderer) -> Clip:
    """Synthesise the speech, lay out the turns, derive every character's mouth and motion, render the frames."""
    people = [identity(spec.seed, i) for i in spec.identities]
    utterances = speak_fresh([(sentence(turn.sentence), turn.voice) for turn in spec.turns])
    offsets, cursor = [], 0.0
    for turn, utterance in zip(spec.turns, utterances):
        cursor += turn.gap_before_s
        offsets.append(cursor)
        cursor += utterance.duration_s
    duration = cursor + spec.tail_s
    frames = int(np.ceil(duration * FPS))
    samples = int(round(frames / FPS * SAMPLE_RATE_HZ))
    tracks = np.zeros((len(people), samples), np.float32)
    phonemes = [[] for _ in people]
    for turn, utterance, offset in zip(spec.turns, utterances, offsets):
        start = int(round(offset * SAMPLE_RATE_HZ))
        piece = utterance.pcm[:samples - start]
        tracks[turn.speaker, start:start + len(piece)] += piece
        phonemes[turn.speaker] += [(s + offset, e + offset, p) for s, e, p in utterance.phonemes]
    rng = np.random.default_rng(spec.motion_seed)
    times = np.arange(frames) / FPS
    states, mouths = [], []
    for slot, person in enumerate(people):
        mouth = mouth_track(phonemes[slot], tracks[slot], SAMPLE_RATE_HZ, FPS, frames)
        energy = _frame_energy(tracks[slot], frames)
        amplitude = person.motion * (0.25 + 0.9 * energy)
        dx = 0.012 * amplitude * _smooth_noise(rng, times, 0.15, 0.6)
        dy = 0.008 * amplitude * _smooth_noise(rng, times, 0.3, 1.2) + 0.01 * person.motion * energy
        roll = 3.0 * amplitude * _smooth_noise(rng, times, 0.1, 0.5)
        blink = _blinks(rng, frames)
        states.append([FrameState(opening=float(mouth.opening[t]), width=float(mouth.width[t]),
                                  blink=float(blink[t]), dx=float(dx[t]), dy=float(dy[t]), roll=float(roll[t]),
                                  brow=float(0.6 * energy[t])) for t in range(frames)])
        mouths.append(mouth)
    images, boxes = [], []
    for t in range(frames):
        image, box = renderer.frame([(person, states[slot][t]) for slot, person in enumerate(people)])
        images.append(image)
        boxes.append(box)
    audio = tracks.sum(0)
    peak = float(np.abs(audio).max(initial=0.0))
    if peak > 0.99:
        audio = audio * (0.99 / peak)
    truth = Truth(mouth_open=np.stack([m.opening for m in mouths], 1),
                  viseme=np.stack([m.viseme for m in mouths], 1),
                  speaking=np.stack([m.speaking for m in mouths], 1),
                  face_box=np.stack(boxes).astype(np.float32),
                  identity=np.array(spec.identities, np.int32), style=np.array([p.style for p in people], np.int8))
    meta = {"seed": spec.seed, "part": spec.part, "index": spec.index, "identities": list(spec.identities),
            "styles": [p.style_name for p in people],
            "turns": [{"speaker": t.speaker, "sentence": t.sentence, "text": sentence(t.sentence),
                       "voice": t.voice.name, "rate": t.voice.rate, "pitch": t.voice.pitch,
                       "start_s": round(o, 4)} for t, o in zip(spec.turns, offsets)]}
    return Clip(frames=np.stack(images), audio=audio.astype(np.float32), truth=truth, meta=meta)
