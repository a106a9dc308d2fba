"""`AvatarEngine`: the in-process streaming engine (no Ray) — the single source of generation truth.

A session's life:

    1. open_session(reference image, prompt, options)
         reference -> VAE latent -> sink keys/values (t = 0) and reference-image tokens
         prompt -> text states; both -> per-block cross-attention keys/values, step modulations (once)
    2. push_audio(pcm)            any number of times, any piece sizes, per character
         audio front-end -> per-video-frame features (bounded lookahead)
         every chunk whose audio window is complete is generated at once and returned:
           audio tokens (window of 5 latent frames per frame) -> noise -> `steps` denoising steps, each with its
           own KV cache -> clean latents -> (chunk 0: Adaptive Attention Sink) -> streaming VAE decode -> frames
    3. end_input()                flushes the audio (silence padding) and returns the remaining chunks, trimmed
                                  so the video has exactly ceil(duration * fps) frames
    4. close_session()

Timeline: latent frame f covers video frames [4f-3, 4f] (frame 0 alone); a chunk of C latent frames needs audio
features up to video frame 4*(last latent frame + 2), i.e. two latent frames (8 video frames) of lookahead.
Sessions are independent objects (`EngineSession`): interleaving sessions gives the same frames as running each
alone.  Nothing per-session is stored on the model, the VAE or the audio front-end.

The engine only drives sessions: it is given a DiT and a VAE (`AvatarEngine.from_preset` gets them from
`model_core.models`), and it knows nothing of Ray or the network.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from .audio import AudioConfig
from .audio_stage import AudioSession, AudioStage, ChunkAudioInput
from .config import ConfigError, PresetConfig, StreamConfig, get_preset
from .dit import CausalAvatarDiT
from .models import audio_config_for, build_fast_decoder, build_models
from .sampler import step
from .decode import DecodeStage
from .stages import ScoreSession, ScoreStage
from .text import build_prompt_encoder
from .vae import DecodeCache, StreamingVAE


@dataclass(frozen=True)
class Character:
    """One on-screen character: its audio stream drives the tokens inside `region` (x0, y0, x1, y1 in [0, 1])."""

    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.region
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise ConfigError(f"characters.region={self.region!r} is invalid: need 0 <= x0 < x1 <= 1 and "
                              "0 <= y0 < y1 <= 1 (fractions of width and height)")


@dataclass
class ChunkTimings:
    """Wall-clock seconds per stage of one chunk."""

    audio_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    vae_s: float = 0.0
    total_s: float = 0.0


@dataclass
class VideoChunk:
    """One generated chunk.

    frames: [T, 3, H, W] float32 in [-1, 1]; first_frame: index of frames[0] in the session's video;
    audio_start_s / audio_end_s: the span of input audio these frames show; audio_pcm: that span of the input
    (float32 mono at `sample_rate_hz`, the rate the audio was pushed at); latents: [16, C, h, w] clean latents.
    """

    session_id: str
    chunk_index: int
    first_frame: int
    fps: float
    frames: torch.Tensor
    audio_start_s: float
    audio_end_s: float
    audio_pcm: np.ndarray
    sample_rate_hz: int
    latents: torch.Tensor
    timings: ChunkTimings
    final: bool = False

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]


@dataclass
class EngineSession:
    """One session's state in the three stages (see `model_core.stages`)."""

    session_id: str
    stream: StreamConfig
    audio: AudioSession
    score: ScoreSession
    decode: DecodeCache


class AvatarEngine:
    """Streams lip-synced video for any number of independent sessions on one model (see module docstring)."""

    def __init__(self, preset: PresetConfig, dit: CausalAvatarDiT, vae: StreamingVAE, *,
                 audio_config: AudioConfig | None = None, text_encoder_path: str | None = None,
                 device="cpu", dtype=torch.float32, weights_note: str = "", fast_decoder=None,
                 decoder: str = "full"):
        """`fast_decoder`: a `fastdecode.FastDecoder` sessions may choose; `decoder`: the sessions' default."""
        self.preset = preset
        self.device, self.dtype = torch.device(device), dtype
        self.audio_config = audio_config or AudioConfig(backend=preset.audio_backend)
        self.score = ScoreStage(dit, device, dtype)
        self.decoder = DecodeStage(vae, fast_decoder, decoder)
        self.audio = AudioStage(self.audio_config, dit.config, dtype)
        self.prompt_encoder = build_prompt_encoder(preset.text_encoder, dit.config.text_dim, dit.config.text_len,
                                                   text_encoder_path, device)
        self.weights_note = weights_note
        self._sessions: dict[str, EngineSession] = {}
        if vae.temporal_compression != dit.config.temporal_compression:
            raise ConfigError(f"VAE temporal compression {vae.temporal_compression} != DiT's "
                              f"{dit.config.temporal_compression}")
        feature_dim = self.audio.frontend(preset.stream.fps).feature_dim
        if feature_dim != dit.config.audio_dim:
            raise ConfigError(f"audio front-end {self.audio_config.backend!r} gives {feature_dim} features per frame "
                              f"but the model expects audio_dim={dit.config.audio_dim}; use the front-end the "
                              "checkpoint was trained with")

    @property
    def dit(self) -> CausalAvatarDiT:
        return self.score.dit

    @property
    def vae(self) -> StreamingVAE:
        return self.decoder.vae

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_preset(cls, preset: str | PresetConfig, *, checkpoint: str | None = None, device="cpu",
                    dtype=torch.float32, seed: int = 0, audio_config: AudioConfig | None = None,
                    decoder: str = "full", fast_decoder: str | None = None) -> "AvatarEngine":
        """Build the engine for a preset: weights from `checkpoint` (a facecast .safetensors) or seeded random.
        `decoder`: the sessions' default decoder ("full" or "fast"); `fast_decoder`: a fast decoder directory
        (default: the preset's shipped one, when it has one for this VAE).

        With random weights the DiT's audio input width follows the audio front-end (so any backend works); a
        checkpoint must have been trained with the front-end it is given.
        """
        preset = get_preset(preset) if isinstance(preset, str) else preset
        audio_config = audio_config or audio_config_for(preset, checkpoint)
        dit, vae, note = build_models(preset, checkpoint=checkpoint, device=device, dtype=dtype, seed=seed,
                                      audio_config=audio_config)
        fast = build_fast_decoder(preset, vae, device=device, path=fast_decoder)
        return cls(preset, dit, vae, audio_config=audio_config, device=device, dtype=dtype, weights_note=note,
                   fast_decoder=fast, decoder=decoder)

    def compile(self, **options) -> None:
        """Compile the denoising step (one graph per step index, reused for every chunk of every session)."""
        options.setdefault("fullgraph", True)
        options.setdefault("dynamic", False)
        self.score.step_fn = torch.compile(step, **options)

    # ------------------------------------------------------------------ helpers

    def frontend(self, fps: float):
        return self.audio.frontend(fps)

    def stream_config(self, **overrides) -> StreamConfig:
        stream = self.preset.stream.replace(**{k: v for k, v in overrides.items() if v is not None})
        self.preset.check_resolution(stream)
        return stream

    def session(self, session_id: str) -> EngineSession:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise KeyError(f"session {session_id!r} is not open") from None

    @property
    def session_ids(self) -> list[str]:
        return list(self._sessions)

    def text_states(self, prompt: str) -> torch.Tensor:
        return self.prompt_encoder([prompt])

    # ------------------------------------------------------------------ 1. open

    @torch.no_grad()
    def open_session(self, reference_image: torch.Tensor, prompt: str = "", stream: StreamConfig | None = None,
                     characters: list[Character] | None = None, session_id: str | None = None,
                     decoder: str | None = None) -> str:
        """reference_image: [3, H, W] in [-1, 1] at the stream's resolution; decoder: "full" or "fast" (None: the
        stream's `decoder`, else the engine's default). Returns the session id."""
        stream = stream or self.preset.stream
        characters = check_session_inputs(self.preset, stream, reference_image, characters)
        session_id = session_id or uuid.uuid4().hex
        if session_id in self._sessions:
            raise ConfigError(f"session_id={session_id!r} is already open")
        decode = self.decoder.open(decoder or stream.decoder or None)   # unknown / unavailable: fails before work
        reference_latent = self.decoder.encode_reference(reference_image)
        grid = token_grid(self.dit.config, reference_latent)
        score = self.score.open(session_id, stream, reference_latent, self.text_states(prompt),
                                region_masks(characters, *grid))
        self._sessions[session_id] = EngineSession(session_id, stream,
                                                   self.audio.open(session_id, stream, len(characters)), score,
                                                   decode)
        return session_id

    # ------------------------------------------------------------------ 2. audio in, chunks out

    def set_speaking(self, session_id: str, character: int, speaking: bool) -> None:
        """Speaking/silence mode of a character for the audio pushed from now on."""
        self.audio.set_speaking(self.session(session_id).audio, character, speaking)

    @torch.no_grad()
    def push_audio(self, session_id: str, pcm, sample_rate_hz: int, character: int = 0) -> list[VideoChunk]:
        """pcm: [S] mono int16 or float in [-1, 1]. Returns every chunk that became ready (possibly none)."""
        session = self.session(session_id)
        return [self._generate(session, inputs)
                for inputs in self.audio.push(session.audio, pcm, sample_rate_hz, character)]

    @torch.no_grad()
    def end_input(self, session_id: str) -> list[VideoChunk]:
        """No more audio: pad with silence and return the remaining chunks (the last one is marked final)."""
        session = self.session(session_id)
        return [self._generate(session, inputs) for inputs in self.audio.end(session.audio)]

    def close_session(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self.score.close(session.score)

    def _generate(self, session: EngineSession, inputs: ChunkAudioInput) -> VideoChunk:
        started = time.perf_counter()
        denoised = self.score.denoise(session.score, inputs)
        frames, vae_s = self.decoder.decode(session.decode, denoised.latents, inputs.num_frames)
        timings = ChunkTimings(audio_s=inputs.audio_s, step_s=denoised.step_s, vae_s=vae_s,
                               total_s=time.perf_counter() - started + inputs.audio_s)
        return make_video_chunk(inputs, frames, denoised.latents[0].detach().cpu(), timings)


def check_session_inputs(preset: PresetConfig, stream: StreamConfig, reference_image: torch.Tensor,
                         characters: list[Character] | None) -> list[Character]:
    preset.check_resolution(stream)
    expected = (3, stream.height, stream.width)
    if tuple(reference_image.shape) != expected:
        raise ConfigError(f"reference_image has shape {tuple(reference_image.shape)}; expected {expected} "
                          "(3 x height x width, values in [-1, 1])")
    characters = characters or [Character()]
    if not 1 <= len(characters) <= 8:
        raise ConfigError(f"characters has {len(characters)} entries; allowed: 1 to 8")
    return characters


def token_grid(config, reference_latent: torch.Tensor) -> tuple[int, int]:
    """Post-patch token grid (h, w) of a latent [B, 16, F, h, w]."""
    return reference_latent.shape[-2] // config.patch_size[1], reference_latent.shape[-1] // config.patch_size[2]


def make_video_chunk(inputs: ChunkAudioInput, frames: torch.Tensor, latents: torch.Tensor,
                     timings: ChunkTimings) -> VideoChunk:
    return VideoChunk(session_id=inputs.session_id, chunk_index=inputs.chunk_index, first_frame=inputs.first_frame,
                      fps=inputs.fps, frames=frames, audio_start_s=inputs.audio_start_s,
                      audio_end_s=inputs.audio_end_s, audio_pcm=inputs.audio_pcm,
                      sample_rate_hz=inputs.sample_rate_hz, latents=latents, timings=timings, final=inputs.final)


def region_masks(characters: list[Character], grid_h: int, grid_w: int) -> torch.Tensor:
    """Token masks [1, K, grid_h*grid_w]: 1 where a token's centre lies in the character's region."""
    ys = (torch.arange(grid_h) + 0.5) / grid_h
    xs = (torch.arange(grid_w) + 0.5) / grid_w
    masks = []
    for character in characters:
        x0, y0, x1, y1 = character.region
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        masks.append(inside.flatten().float())
    return torch.stack(masks)[None]


def iter_pieces(pcm: np.ndarray, piece: int):
    """Split [S] into consecutive pieces of `piece` samples (the last may be shorter)."""
    for start in itertools.count(0, piece):
        if start >= pcm.shape[0]:
            return
        yield pcm[start:start + piece]
