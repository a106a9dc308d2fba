"""Speech fed into a facecast session's audio track at real time, with silence in between, and a record of where
every piece of it landed — shared by the voice agent's avatar and the conversation driver.

    say(speech) / end_segment()  ─► pending ─► take(n) each tick: pending speech first, silence when there is none
                                                 └─ runs: [track samples start, end) -> the segment they belong to
    a chunk comes back ─► speech_in(frame span): the speech that frame shows ─► ended_by(played): segment ends

Feeding at real time (plus a small lead) is what makes an interruption cheap: `clear()` drops the speech not yet fed,
so the session gets silence from the next tick and the chunks not yet generated show a listening face.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(eq=False)
class Segment:
    ident: int
    tag: object = None              # the caller's name for it (a reply item id)
    end: int | None = None          # track sample where its speech ended (known once its end was fed)
    closing: bool = False           # no more speech will come for it
    ended: bool = False             # its end was reported
    interrupted: bool = False       # cleared: neither its remaining speech nor its end is played
    voice: int = 0                  # the character that says it (multi-character conversations)


@dataclass
class Run:
    start: int
    end: int
    segment: Segment


class SpeechTrack:
    def __init__(self, sample_rate: int, voice: int = 0):
        self.rate = int(sample_rate)
        self.pending: deque = deque()          # (int16 samples | None end marker, segment), oldest first
        self.runs: list[Run] = []
        self.segment: Segment | None = None    # receiving speech now
        self.ids = itertools.count()
        self.sent = 0                          # samples fed so far (speech and silence)
        self.last_fed_speech = False
        self.voice = voice                     # the character the track feeds now (silence goes to it too)

    def say(self, samples: np.ndarray, tag: object = None, voice: int = 0) -> Segment:
        """Queue speech (int16 mono) on the current segment; a new segment starts after `end_segment`, or when the
        tag or the voice changes."""
        if self.segment is None or (tag is not None and self.segment.tag != tag) or self.segment.voice != voice:
            self.end_segment()
            self.segment = Segment(next(self.ids), tag, voice=voice)
        self.pending.append((np.asarray(samples, dtype=np.int16), self.segment))
        return self.segment

    def end_segment(self) -> Segment | None:
        segment, self.segment = self.segment, None
        if segment is not None:
            segment.closing = True
            self.pending.append((None, segment))
        return segment

    def clear(self) -> int:
        """Interrupt: drop the speech not yet fed; every segment not yet ended is interrupted. Returns the samples
        dropped."""
        dropped = sum(len(samples) for samples, _ in self.pending if samples is not None)
        for segment in {id(s): s for s in [run.segment for run in self.runs] + [s for _, s in self.pending]
                        + ([self.segment] if self.segment else [])}.values():
            if not segment.ended:
                segment.interrupted = True
        self.pending.clear()
        self.segment = None
        return dropped

    def speaking(self) -> bool:
        """Whether the last sample fed was speech."""
        return self.last_fed_speech

    @property
    def pending_samples(self) -> int:
        return sum(len(samples) for samples, _ in self.pending if samples is not None)

    def take(self, count: int) -> np.ndarray:
        """The next `count` samples of the track: pending speech, then silence."""
        out = []
        while self.pending and (count or self.pending[0][0] is None):
            samples, segment = self.pending[0]
            if samples is None:                # the segment's end: it ends where its speech stopped
                segment.end = self.sent
                self.pending.popleft()
                continue
            piece = samples[:count]
            if len(piece) == len(samples):
                self.pending.popleft()
            else:
                self.pending[0] = (samples[count:], segment)
            if self.runs and self.runs[-1].segment is segment and self.runs[-1].end == self.sent:
                self.runs[-1].end += len(piece)
            else:
                self.runs.append(Run(self.sent, self.sent + len(piece), segment))
            out.append(piece)
            self.sent += len(piece)
            count -= len(piece)
        self.last_fed_speech = bool(out) and not count
        if count:
            out.append(np.zeros(count, np.int16))
            self.sent += count
        return np.concatenate(out) if out else np.zeros(0, np.int16)

    def take_voiced(self, count: int) -> list[tuple[int, np.ndarray]]:
        """`take(count)` split where the voice changes: [(character, samples), ...]. Silence goes to the voice of the
        speech before it (the track's first voice, before any speech)."""
        out = []
        while count > 0:
            voices = [segment.voice for samples, segment in self.pending if samples is not None]
            if voices and voices[0] != self.voice:
                self.voice = voices[0]
            changes = [i for i, voice in enumerate(voices) if voice != self.voice]
            n = count
            if changes:      # only this voice's speech now; the rest after the switch
                n = min(count, sum(len(samples) for samples, _ in
                                   [item for item in self.pending if item[0] is not None][:changes[0]]))
            out.append((self.voice, self.take(n)))
            count -= n
        return out

    def speech_in(self, start: int, end: int) -> list[tuple[int, int, Segment]]:
        """The speech (not interrupted) in track samples [start, end), in order."""
        return [(max(start, run.start), min(end, run.end), run.segment) for run in self.runs
                if max(start, run.start) < min(end, run.end) and not run.segment.interrupted]

    def ended_by(self, played_to: int) -> list[Segment]:
        """Segments whose speech has all been played by track sample `played_to` (each reported once)."""
        done = []
        for segment in {id(run.segment): run.segment for run in self.runs}.values():
            if segment.closing and not segment.ended and not segment.interrupted and segment.end is not None \
                    and segment.end <= played_to:
                segment.ended = True
                done.append(segment)
        return done

    def forget_before(self, sample: int) -> None:
        """Drop the record of speech played before `sample` whose segment is settled (ended or interrupted)."""
        self.runs = [run for run in self.runs if run.end > sample or not (run.segment.ended or
                                                                          run.segment.interrupted)]
