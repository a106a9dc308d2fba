"""`AudioStage`: pcm -> per-video-frame features -> one `ChunkAudioInput` per chunk whose audio window is complete
(the first of the three stages in `model_core.stages`), with its per-session state (`AudioSession`, one
`CharacterAudio` per character).

Timeline (r = 4 video frames per latent frame, h = 2 latent frames of audio lookahead, C = chunk latent frames):
latent frame f shows video frames [r*f - (r-1), r*f] (frame 0 alone) and its audio tokens are the features of video
frames [r*(f-h) - (r-1), r*(f+h)].  A chunk is ready once features exist up to video frame r*(last latent + h).

Characters (K per session, one audio track each, see `AudioStage`):
  * Every track starts at session time 0 and goes on with each push for that character.  All characters send at
    the session's one sample rate, fixed by its first audio; other audio rates are a ConfigError on sample_rate_hz.
  * A chunk is cut once every character that is speaking (the default; `set_speaking`) has features through the
    chunk's window, and at least one character has: a speaking character that is late holds the chunk.
  * A character set not-speaking never holds a chunk back: after every push (and at `set_speaking`) its track is
    padded with silence up to the longest track, so whatever it sends next (speech after turning to speaking, in
    a turn change: 0 speaks, 0 -> not speaking, 1 -> speaking, 1 speaks) starts now.  A speaking change applies
    to the video frames that start after the track's end at the time of the change (speaking False: the model
    ignores those tokens).
  * At end of input the video lasts as long as the longest track.  A chunk's `audio_pcm` is the mix of every track
    over the chunk's span: the sum, clipped to [-1, 1], ending where the longest track ends.

Ray-free, like the other stages: nothing about Ray, networks or processes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

from .audio import AudioConfig, AudioFrontend, AudioStreamState
from .audio_resample import as_float_pcm
from .config import ConfigError, DiTConfig, StreamConfig


@dataclass
class ChunkAudioInput:
    """One chunk's worth of audio conditioning and bookkeeping, produced by `AudioStage`.

    features: [1, K, C, T, D] float (CPU) per character, latent frame and window token; speaking: [1, K, C, T] bool.
    first_frame/num_frames: the video frames this chunk will show (already trimmed at the end of input).
    audio_pcm: [S] the input audio those frames cover, float32 mono at sample_rate_hz: the mix (sum clipped to
    [-1, 1]) of every character's track.
    """

    session_id: str
    chunk_index: int
    features: torch.Tensor
    speaking: torch.Tensor
    first_frame: int
    num_frames: int
    fps: float
    audio_pcm: np.ndarray
    sample_rate_hz: int
    final: bool
    audio_s: float = 0.0

    @property
    def audio_start_s(self) -> float:
        return self.first_frame / self.fps

    @property
    def audio_end_s(self) -> float:
        return (self.first_frame + self.num_frames) / self.fps


@dataclass
class CharacterAudio:
    """One character's audio track. The track starts at session time 0; sample n of it sits at n / sample_rate_hz.

    state: front-end state; state.n_input_samples is the track's length (samples received + silence inserted).
    features / speaking: rows [N, D] / flags [N] not yet consumed, consecutive video frames from `base_frame`.
    frames: video frames of features produced so far on this track.
    speaking_now: the current mode; a speaking character holds chunks back until its audio covers their window.
    frame_flag / speaking_from: the speaking flag of the next produced frame, and the (first video frame, flag)
        changes not yet reached, in order (a change applies to the frames that start after the track's end at the
        time of `set_speaking`, i.e. to the audio pushed from then on).
    samples_received: samples the caller sent for this character (where a resuming client continues).
    silence_samples: silence inserted to keep the track level with the longest one while the character is not speaking.
    pcm / pcm_base_sample: the track's samples (float32, at the session rate) not yet handed out in a chunk's
        `audio_pcm`, starting at track sample `pcm_base_sample`.
    """

    state: AudioStreamState
    features: list[torch.Tensor] = field(default_factory=list)
    speaking: list[torch.Tensor] = field(default_factory=list)
    base_frame: int = 0
    frames: int = 0
    speaking_now: bool = True
    frame_flag: bool = True
    speaking_from: list[tuple[int, bool]] = field(default_factory=list)
    samples_received: int = 0
    silence_samples: int = 0
    pcm: list[np.ndarray] = field(default_factory=list)
    pcm_base_sample: int = 0


@dataclass
class AudioSession:
    """One session's audio: a track per character, the chunk counter and (after end of input) the video length.

    sample_rate_hz: the session's one input rate, fixed by its first audio (None before).
    total_frames: video frames of the whole session, known at end of input (the longest track).
    """

    session_id: str
    stream: StreamConfig
    characters: list[CharacterAudio]
    chunk_index: int = 0
    input_ended: bool = False
    total_frames: int | None = None
    frames_emitted: int = 0
    sample_rate_hz: int | None = None


class AudioStage:
    """Streaming audio -> per-chunk audio windows. One instance serves any number of sessions."""

    def __init__(self, audio_config: AudioConfig, dit_config: DiTConfig, dtype=torch.float32):
        self.audio_config = audio_config
        self.ratio = dit_config.temporal_compression
        self.half = dit_config.audio_lookahead_latent_frames
        self.tokens = dit_config.audio_tokens_per_frame
        self.audio_dim = dit_config.audio_dim
        self.dtype = dtype
        self._frontends: dict[float, AudioFrontend] = {}

    def frontend(self, fps: float) -> AudioFrontend:
        if fps not in self._frontends:
            self._frontends[fps] = AudioFrontend(dataclasses.replace(self.audio_config, fps=fps))
        return self._frontends[fps]

    def open(self, session_id: str, stream: StreamConfig, num_characters: int) -> AudioSession:
        frontend = self.frontend(stream.fps)
        return AudioSession(session_id, stream, [CharacterAudio(frontend.new_state()) for _ in range(num_characters)])

    def character(self, session: AudioSession, character: int) -> CharacterAudio:
        if not 0 <= character < len(session.characters):
            raise ConfigError(f"character={character} is invalid; this session has characters "
                              f"0..{len(session.characters) - 1}")
        return session.characters[character]

    def set_speaking(self, session: AudioSession, character: int, speaking: bool) -> None:
        """Speaking mode of a character for the audio it sends from now on.

        A not-speaking track is first levelled with the longest one (silence), so speech that follows starts now.
        Never cuts a chunk: one this releases comes out on the next `push` or `end`.
        """
        audio = self.character(session, character)
        speaking = bool(speaking)
        if speaking == audio.speaking_now:
            return
        self._level_listeners(session)
        audio.speaking_now = speaking
        track = audio.state.n_input_samples  # the change applies to the first video frame starting at the track's end
        fps = Fraction(repr(float(session.stream.fps)))
        first = math.ceil(Fraction(track) * fps / audio.state.input_rate_hz) if track else 0
        audio.speaking_from.append((first, speaking))

    def push(self, session: AudioSession, pcm, sample_rate_hz: int, character: int = 0) -> list[ChunkAudioInput]:
        """pcm: [S] mono int16 or float in [-1, 1]. Returns the inputs of every chunk that became ready."""
        if session.input_ended:
            raise ConfigError(f"session {session.session_id!r}: end_of_input was already sent; no more audio is "
                              "accepted")
        audio = self.character(session, character)
        if session.sample_rate_hz is not None and sample_rate_hz != session.sample_rate_hz:
            raise ConfigError(f"sample_rate_hz={sample_rate_hz!r} for character={character} is invalid: this "
                              f"session's audio is at {session.sample_rate_hz} Hz and every character sends at one "
                              f"rate; allowed values: ({session.sample_rate_hz},)")
        started = time.perf_counter()
        samples = as_float_pcm(pcm)
        self._push_track(session, audio, samples, sample_rate_hz)
        session.sample_rate_hz = int(sample_rate_hz)
        audio.samples_received += samples.shape[0]
        self._level_listeners(session)
        return self._ready(session, time.perf_counter() - started)

    def end(self, session: AudioSession) -> list[ChunkAudioInput]:
        """No more audio: pad with silence; returns the remaining chunks (the last one is final).

        The video lasts as long as the longest character's track.
        """
        if session.input_ended:
            return []
        started = time.perf_counter()
        frontend = self.frontend(session.stream.fps)
        for audio in session.characters:
            audio.state, features = frontend.flush(audio.state)
            self._append(audio, features)
        session.input_ended = True
        session.total_frames = max(audio.frames for audio in session.characters)
        return self._ready(session, time.perf_counter() - started)

    # ---------------------------------------------------------------- internals

    def _push_track(self, session: AudioSession, audio: CharacterAudio, samples: np.ndarray,
                    sample_rate_hz: int) -> None:
        """samples: [S] float32 appended to the character's track (front end first: it validates the rate)."""
        audio.state, features = self.frontend(session.stream.fps).push(audio.state, samples, sample_rate_hz)
        self._append(audio, features)
        audio.pcm.append(samples)

    def _level_listeners(self, session: AudioSession) -> None:
        """Pad every not-speaking track that is behind the longest track with silence up to it."""
        if session.input_ended or session.sample_rate_hz is None:
            return
        longest = max(audio.state.n_input_samples for audio in session.characters)
        for audio in session.characters:
            missing = longest - audio.state.n_input_samples
            if not audio.speaking_now and missing > 0:
                self._push_track(session, audio, np.zeros(missing, np.float32), session.sample_rate_hz)
                audio.silence_samples += missing

    def _append(self, audio: CharacterAudio, features: torch.Tensor) -> None:
        count = features.shape[0]
        if not count:
            return
        flags = torch.full((count,), audio.frame_flag, dtype=torch.bool)
        while audio.speaking_from and audio.speaking_from[0][0] < audio.frames + count:
            first, audio.frame_flag = audio.speaking_from.pop(0)
            flags[max(0, first - audio.frames):] = audio.frame_flag
        audio.features.append(features.to("cpu", self.dtype))
        audio.speaking.append(flags)
        audio.frames += count

    def total_latents(self, session: AudioSession) -> int:
        return 1 + math.ceil(max(session.total_frames - 1, 0) / self.ratio)

    def _is_ready(self, session: AudioSession) -> bool:
        """Every speaking character (and at least one character) has features through the chunk's window."""
        chunk = session.stream.chunk_latent_frames
        first_latent = session.chunk_index * chunk
        if session.input_ended:
            return bool(session.total_frames) and first_latent < self.total_latents(session)
        needed_video = self.ratio * (first_latent + chunk - 1 + self.half)
        return (max(audio.frames for audio in session.characters) > needed_video
                and all(audio.frames > needed_video for audio in session.characters if audio.speaking_now))

    def _ready(self, session: AudioSession, audio_s: float) -> list[ChunkAudioInput]:
        inputs = []
        while self._is_ready(session):
            inputs.append(self._cut(session, audio_s))
            audio_s = 0.0
        return inputs

    def _window(self, session: AudioSession, first_video: int, count: int, keep_from: int):
        """features [1, K, count, D] and speaking [1, K, count] for video frames [first_video, +count).

        Frames before 0 or beyond what a character has sent are silence (speaking False, zero features).
        Drops buffered rows before `keep_from`, so memory stays bounded.
        """
        feats, speaking = [], []
        for audio in session.characters:
            rows = torch.cat(audio.features) if audio.features else torch.zeros(0, self.audio_dim, dtype=self.dtype)
            talk = torch.cat(audio.speaking) if audio.speaking else torch.zeros(0, dtype=torch.bool)
            index = torch.arange(first_video, first_video + count) - audio.base_frame
            valid = (index >= 0) & (index < rows.shape[0])
            safe = index.clamp(0, max(rows.shape[0] - 1, 0))
            window = rows[safe] if rows.shape[0] else torch.zeros(count, self.audio_dim, dtype=self.dtype)
            feats.append(torch.where(valid[:, None], window, torch.zeros_like(window)))
            speaking.append(valid & (talk[safe] if talk.shape[0] else torch.zeros(count, dtype=torch.bool)))
            drop = max(0, min(keep_from - audio.base_frame, rows.shape[0]))
            audio.features = [rows[drop:]] if rows.shape[0] > drop else []
            audio.speaking = [talk[drop:]] if talk.shape[0] > drop else []
            audio.base_frame += drop
        return torch.stack(feats)[None], torch.stack(speaking)[None]

    def _cut(self, session: AudioSession, audio_s: float) -> ChunkAudioInput:
        ratio, half, chunk = self.ratio, self.half, session.stream.chunk_latent_frames
        first_latent = session.chunk_index * chunk
        first_video = ratio * (first_latent - half) - (ratio - 1)
        span = ratio * (chunk - 1) + self.tokens
        next_first = ratio * (first_latent + chunk - half) - (ratio - 1)
        features, speaking = self._window(session, first_video, span, keep_from=next_first)
        offsets = (torch.arange(chunk) * ratio)[:, None] + torch.arange(self.tokens)[None]
        num_frames = chunk * ratio - ((ratio - 1) if session.chunk_index == 0 else 0)
        final = False
        if session.input_ended:
            num_frames = max(0, min(num_frames, session.total_frames - session.frames_emitted))
            final = (session.chunk_index + 1) * chunk >= self.total_latents(session)
        first_frame = session.frames_emitted
        pcm = self._take_pcm(session, first_frame, num_frames)
        inputs = ChunkAudioInput(
            session_id=session.session_id, chunk_index=session.chunk_index, features=features[:, :, offsets],
            speaking=speaking[:, :, offsets], first_frame=first_frame, num_frames=num_frames,
            fps=session.stream.fps, audio_pcm=pcm, sample_rate_hz=session.sample_rate_hz or 16000, final=final,
            audio_s=audio_s)
        session.frames_emitted += num_frames
        session.chunk_index += 1
        return inputs

    def _take_pcm(self, session: AudioSession, first_frame: int, num_frames: int) -> np.ndarray:
        """The mix [S] float32 of every character's track over video frames [first_frame, +num_frames): the sum,
        clipped to [-1, 1]; S stops where the longest track ends. Drops the samples handed out."""
        fps, rate = session.stream.fps, session.sample_rate_hz or 16000
        longest = max(audio.state.n_input_samples for audio in session.characters)
        begin = round(first_frame / fps * rate)
        end = max(begin, min(round((first_frame + num_frames) / fps * rate), longest))
        mix = np.zeros(end - begin, np.float32)
        for audio in session.characters:
            pcm = np.concatenate(audio.pcm) if audio.pcm else np.zeros(0, np.float32)
            base = audio.pcm_base_sample
            low, high = max(begin, base), min(end, base + pcm.shape[0])
            if high > low:
                mix[low - begin:high - begin] += pcm[low - base:high - base]
            cut = min(max(end - base, 0), pcm.shape[0])
            audio.pcm = [pcm[cut:]] if pcm.shape[0] > cut else []
            audio.pcm_base_sample += cut
        return np.clip(mix, -1.0, 1.0)
