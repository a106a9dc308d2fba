"""From timed phonemes to a mouth track per video frame: visemes, coarticulation, pauses.

    VISEMES                       closed, open, rounded, wide, mid, labiodental (index = the label stored per frame)
    viseme_of(ipa) -> int         an IPA phoneme (espeak-ng's spelling) to its viseme
    mouth_track(phonemes, pcm, fps, frames) -> MouthTrack(opening [T], width [T], viseme [T], speaking [T])

Coarticulation follows the dominance model of Cohen & Massaro: every phoneme pulls the mouth towards its viseme's
target with a weight that decays exponentially from the phoneme's centre, so a vowel between two bilabials never
opens fully and lips round early before /u/. Bilabials (/p b m/) dominate strongly: the lips do close. Gaps in the
speech (espeak's pause after a comma, silence between sentences, trailing silence inside a phoneme interval found
from the audio energy) become `rest` segments whose target is the closed mouth. `opening` is 0 (closed) .. 1 (the
widest the renderer draws); the renderer draws exactly this value, which is the ground truth the probe learns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VISEMES: tuple[str, ...] = ("closed", "open", "rounded", "wide", "mid", "labiodental")
CLOSED, OPEN, ROUNDED, WIDE, MID, LABIODENTAL = range(len(VISEMES))

# (opening 0..1, width relative to the neutral mouth, dominance strength)
_TARGETS = {
    CLOSED: (0.0, 1.0, 3.5),
    OPEN: (0.95, 1.05, 1.0),
    ROUNDED: (0.55, 0.62, 1.4),
    WIDE: (0.35, 1.3, 1.0),
    MID: (0.4, 1.0, 0.7),
    LABIODENTAL: (0.12, 1.05, 3.0),
}
_REST = (0.0, 1.0, 2.0)

_OPEN_VOWELS = ("a", "ɑ", "æ", "ʌ", "ɐ", "ɒ", "aɪ", "aʊ", "ɜ")
_ROUNDED = ("o", "u", "ʊ", "ɔ", "w", "ʉ", "ɵ", "ø", "y", "ʏ", "ʃ", "ʒ", "tʃ", "dʒ", "ɹ", "r")
_WIDE = ("i", "ɪ", "e", "ɛ", "j", "s", "z", "ᵻ", "ɨ")


def viseme_of(ipa: str) -> int:
    """The viseme of one espeak-ng IPA phoneme (stress marks and length marks are ignored)."""
    core = ipa.strip("ˈˌ:ː̃ʲ ")
    if not core:
        return MID
    if core[0] in "pbm":
        return CLOSED
    if core[0] in "fv":
        return LABIODENTAL
    for prefixes, viseme in ((_OPEN_VOWELS, OPEN), (_ROUNDED, ROUNDED), (_WIDE, WIDE)):
        if core.startswith(prefixes):
            return viseme
    return MID


@dataclass(frozen=True)
class MouthTrack:
    opening: np.ndarray
    """[T] float32 0..1."""
    width: np.ndarray
    """[T] float32, 1 = neutral."""
    viseme: np.ndarray
    """[T] int8 index into VISEMES (CLOSED while not speaking)."""
    speaking: np.ndarray
    """[T] bool: a phoneme's voiced part covers the frame centre."""


def _voiced_end(start: float, end: float, energy: np.ndarray, hop_s: float, threshold: float) -> float:
    """Where the audio inside [start, end) last has energy: espeak folds pauses into the phoneme before them."""
    first, last = int(start / hop_s), int(np.ceil(end / hop_s))
    window = energy[first:last]
    loud = np.nonzero(window > threshold)[0]
    if len(loud) == 0:
        return min(end, start + 0.05)
    return min(end, max(start + 0.04, (first + loud[-1] + 1) * hop_s))


def segments(phonemes, pcm: np.ndarray, sample_rate: int) -> list[tuple[float, float, int]]:
    """(start, end, viseme) of the voiced part of each phoneme, with audio-silent tails cut off."""
    hop = int(sample_rate * 0.01)
    frames = len(pcm) // hop
    energy = np.sqrt(np.mean(pcm[:frames * hop].reshape(frames, hop) ** 2, axis=1)) if frames else np.zeros(0)
    threshold = max(1e-3, 0.04 * float(energy.max(initial=0.0)))
    out = []
    for start, end, ipa in phonemes:
        out.append((start, _voiced_end(start, end, energy, 0.01, threshold), viseme_of(ipa)))
    return out


def mouth_track(phonemes, pcm: np.ndarray, sample_rate: int, fps: float, frames: int,
                offset_s: float = 0.0) -> MouthTrack:
    """The mouth for `frames` video frames whose speech (`phonemes`, times relative to the utterance) starts at
    `offset_s` into the clip. Frame t is sampled at its centre, (t + 0.5) / fps."""
    times = (np.arange(frames) + 0.5) / fps
    spans = [(s + offset_s, e + offset_s, v) for s, e, v in segments(phonemes, pcm, sample_rate)]
    # rest segments fill the gaps (and the time before and after the speech)
    rests, cursor = [], 0.0
    for start, end, _ in spans:
        if start - cursor > 0.06:
            rests.append((cursor, start))
        cursor = max(cursor, end)
    rests.append((cursor, max(cursor, times[-1] if frames else cursor) + 1.0))
    weights, openings, widths = [], [], []
    for start, end, viseme in spans:
        opening, width, strength = _TARGETS[viseme]
        centre, half = (start + end) / 2, max(0.02, (end - start) / 2)
        distance = np.maximum(0.0, np.abs(times - centre) - half * 0.8)
        weights.append(strength * np.exp(-distance / 0.03))
        openings.append(opening)
        widths.append(width)
    for start, end in rests:
        centre, half = (start + end) / 2, (end - start) / 2
        distance = np.maximum(0.0, np.abs(times - centre) - half + 0.02)
        weights.append(_REST[2] * np.exp(-distance / 0.04))
        openings.append(_REST[0])
        widths.append(_REST[1])
    weight = np.stack(weights) + 1e-9
    opening = (weight * np.array(openings)[:, None]).sum(0) / weight.sum(0)
    width = (weight * np.array(widths)[:, None]).sum(0) / weight.sum(0)
    viseme = np.full(frames, CLOSED, np.int8)
    speaking = np.zeros(frames, bool)
    for start, end, label in spans:
        inside = (times >= start) & (times < end)
        viseme[inside] = label
        speaking[inside] = True
    # a frame inside a short within-word gap still counts as speaking
    _fill_short_gaps(speaking, max_gap=int(round(0.2 * fps)))
    return MouthTrack(opening=np.clip(opening, 0, 1).astype(np.float32), width=width.astype(np.float32),
                      viseme=viseme, speaking=speaking)


def _fill_short_gaps(flags: np.ndarray, max_gap: int) -> None:
    on = np.nonzero(flags)[0]
    for a, b in zip(on[:-1], on[1:]):
        if 1 < b - a <= max_gap + 1:
            flags[a:b] = True
