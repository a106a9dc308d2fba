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
Sessions are independent objects (`SessionState`): interleaving sessions gives the same frames as running each
alone.  Nothing per-session is stored on the model, the VAE or the audio front-end.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from .audio import AudioConfig, AudioFrontend, AudioStreamState
from .cache import ChunkRope, ConditionCache, KVCache
from .checkpoint import load_facecast_checkpoint
from .config import ConfigError, PresetConfig, StreamConfig, get_preset
from .dit import CausalAvatarDiT
from .sampler import ChunkCondition, Timestep, flow_schedule, step
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
class _CharacterAudio:
    """Per-character audio bookkeeping: front-end state and the features not yet consumed."""

    state: AudioStreamState
    features: list[torch.Tensor] = field(default_factory=list)  # consecutive rows starting at `base_frame`
    speaking: list[torch.Tensor] = field(default_factory=list)
    base_frame: int = 0
    frames: int = 0            # total video frames of features received
    speaking_now: bool = True


@dataclass
class SessionState:
    """Everything one session owns. Passed around explicitly; the engine keeps one per open session."""

    session_id: str
    stream: StreamConfig
    schedule: list[Timestep]
    condition: ConditionCache
    rope: ChunkRope
    caches: list[KVCache]
    decode_cache: DecodeCache
    regions: torch.Tensor                  # [1, K, S]
    characters: list[_CharacterAudio]
    generator: torch.Generator
    latent_shape: tuple[int, int, int]     # (C, h, w)
    chunk_index: int = 0
    input_ended: bool = False
    total_frames: int | None = None        # known once input ended
    frames_emitted: int = 0
    sample_rate_hz: int | None = None
    pcm: list[np.ndarray] = field(default_factory=list)  # input audio not yet covered by emitted frames
    pcm_base_sample: int = 0


class AvatarEngine:
    """Streams lip-synced video for any number of independent sessions on one model (see module docstring)."""

    def __init__(self, preset: PresetConfig, dit: CausalAvatarDiT, vae: StreamingVAE, *,
                 audio_config: AudioConfig | None = None, text_encoder_path: str | None = None,
                 device="cpu", dtype=torch.float32, weights_note: str = ""):
        self.preset = preset
        self.dit = dit.to(device=device, dtype=dtype).eval()
        self.vae = vae
        self.device, self.dtype = torch.device(device), dtype
        self.audio_config = audio_config or AudioConfig(backend=preset.audio_backend)
        self.prompt_encoder = build_prompt_encoder(preset.text_encoder, dit.config.text_dim, dit.config.text_len,
                                                   text_encoder_path, device)
        self.weights_note = weights_note
        self._frontends: dict[float, AudioFrontend] = {}
        self._sessions: dict[str, SessionState] = {}
        self._step = step
        if vae.temporal_compression != dit.config.temporal_compression:
            raise ConfigError(f"VAE temporal compression {vae.temporal_compression} != DiT's "
                              f"{dit.config.temporal_compression}")
        feature_dim = self.frontend(preset.stream.fps).feature_dim
        if feature_dim != dit.config.audio_dim:
            raise ConfigError(f"audio front-end {self.audio_config.backend!r} gives {feature_dim} features per frame "
                              f"but the model expects audio_dim={dit.config.audio_dim}; use the front-end the "
                              "checkpoint was trained with")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_preset(cls, preset: str | PresetConfig, *, checkpoint: str | None = None, device="cpu",
                    dtype=torch.float32, seed: int = 0, audio_config: AudioConfig | None = None) -> "AvatarEngine":
        """Build the engine for a preset: weights from `checkpoint` (a facecast .safetensors) or seeded random.

        With random weights the DiT's audio input width follows the audio front-end (so any backend works); a
        checkpoint must have been trained with the front-end it is given.
        """
        preset = get_preset(preset) if isinstance(preset, str) else preset
        audio_config = audio_config or AudioConfig(backend=preset.audio_backend)
        if checkpoint:
            dit, metadata, vae_state = load_facecast_checkpoint(checkpoint)
            vae = (StreamingVAE.from_state(metadata["vae_config"], vae_state) if vae_state
                   else StreamingVAE.from_config(preset.vae, seed=seed))
            note = f"weights: {checkpoint}"
        else:
            feature_dim = AudioFrontend(audio_config).feature_dim
            dit = random_dit(dataclasses.replace(preset.dit, audio_dim=feature_dim), seed, device, dtype)
            vae = StreamingVAE.from_config(preset.vae, seed=seed)
            note = "weights: RANDOM (no trained checkpoint given) - the video shows noise, not a face"
        vae = StreamingVAE(vae.vae.to(device=device))
        return cls(preset, dit, vae, audio_config=audio_config, device=device, dtype=dtype, weights_note=note)

    def compile(self, **options) -> None:
        """Compile the denoising step (one graph per step index, reused for every chunk of every session)."""
        options.setdefault("fullgraph", True)
        options.setdefault("dynamic", False)
        self._step = torch.compile(step, **options)

    # ------------------------------------------------------------------ helpers

    def frontend(self, fps: float) -> AudioFrontend:
        if fps not in self._frontends:
            config = AudioConfig(**{**self.audio_config.__dict__, "fps": fps})
            self._frontends[fps] = AudioFrontend(config, device=self.device, dtype=self.dtype)
        return self._frontends[fps]

    def stream_config(self, **overrides) -> StreamConfig:
        stream = self.preset.stream.replace(**{k: v for k, v in overrides.items() if v is not None})
        self.preset.check_resolution(stream)
        return stream

    def session(self, session_id: str) -> SessionState:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise KeyError(f"session {session_id!r} is not open") from None

    @property
    def session_ids(self) -> list[str]:
        return list(self._sessions)

    # ------------------------------------------------------------------ 1. open

    @torch.no_grad()
    def open_session(self, reference_image: torch.Tensor, prompt: str = "", stream: StreamConfig | None = None,
                     characters: list[Character] | None = None, session_id: str | None = None) -> str:
        """reference_image: [3, H, W] in [-1, 1] at the stream's resolution. Returns the session id."""
        stream = stream or self.preset.stream
        self.preset.check_resolution(stream)
        expected = (3, stream.height, stream.width)
        if tuple(reference_image.shape) != expected:
            raise ConfigError(f"reference_image has shape {tuple(reference_image.shape)}; expected {expected} "
                              "(3 x height x width, values in [-1, 1])")
        characters = characters or [Character()]
        if not 1 <= len(characters) <= 8:
            raise ConfigError(f"characters has {len(characters)} entries; allowed: 1 to 8")
        session_id = session_id or uuid.uuid4().hex
        if session_id in self._sessions:
            raise ConfigError(f"session_id={session_id!r} is already open")
        dit = self.dit
        reference_latent = self.vae.encode_image(reference_image[None].to(self.device)).to(self.dtype)
        sink = reference_latent.repeat(1, 1, stream.sink_frames, 1, 1)
        schedule = flow_schedule(stream.steps, stream.shift)
        step_timesteps = torch.tensor([t.model_timestep for t in schedule[:-1]], device=self.device)
        text_states = self.prompt_encoder([prompt]).to(self.device, self.dtype)
        condition = dit.prepare_conditions(text_states, dit.reference_tokens(reference_latent), step_timesteps)
        _, _, _, height, width = reference_latent.shape
        p_h, p_w = dit.config.patch_size[1:]
        grid_h, grid_w = height // p_h, width // p_w
        caches = [dit.allocate_cache(1, stream.sink_frames, stream.chunk_latent_frames, grid_h * grid_w)
                  for _ in range(stream.steps)]
        sink_key, sink_value = dit.compute_sink(sink, condition)
        for cache in caches:
            cache.set_sink(sink_key, sink_value)
        frontend = self.frontend(stream.fps)
        state = SessionState(
            session_id=session_id, stream=stream, schedule=schedule, condition=condition, caches=caches,
            rope=dit.chunk_rope(stream.chunk_latent_frames, grid_h, grid_w, stream.sink_frames,
                                stream.sink_rope_offset),
            decode_cache=self.vae.new_decode_cache(), regions=region_masks(characters, grid_h, grid_w).to(self.device),
            characters=[_CharacterAudio(state=frontend.new_state()) for _ in characters],
            generator=torch.Generator(device=self.device).manual_seed(stream.seed),
            latent_shape=(stream.chunk_latent_frames, height, width))
        self._sessions[session_id] = state
        return session_id

    # ------------------------------------------------------------------ 2. audio in, chunks out

    def set_speaking(self, session_id: str, character: int, speaking: bool) -> None:
        """Speaking/silence mode of a character for the audio pushed from now on."""
        state = self.session(session_id)
        self._character(state, character).speaking_now = bool(speaking)

    @torch.no_grad()
    def push_audio(self, session_id: str, pcm, sample_rate_hz: int, character: int = 0) -> list[VideoChunk]:
        """pcm: [S] mono int16 or float in [-1, 1]. Returns every chunk that became ready (possibly none)."""
        state = self.session(session_id)
        if state.input_ended:
            raise ConfigError(f"session {session_id!r}: end_of_input was already sent; no more audio is accepted")
        audio = self._character(state, character)
        started = time.perf_counter()
        audio.state, features = self.frontend(state.stream.fps).push(audio.state, pcm, sample_rate_hz)
        self._append_features(audio, features)
        if character == 0:
            self._keep_pcm(state, pcm, sample_rate_hz)
        return self._generate_ready(state, time.perf_counter() - started)

    @torch.no_grad()
    def end_input(self, session_id: str) -> list[VideoChunk]:
        """No more audio: pad with silence and return the remaining chunks (the last one is marked final)."""
        state = self.session(session_id)
        if state.input_ended:
            return []
        started = time.perf_counter()
        frontend = self.frontend(state.stream.fps)
        for audio in state.characters:
            audio.state, features = frontend.flush(audio.state)
            self._append_features(audio, features)
        state.input_ended = True
        state.total_frames = state.characters[0].frames
        return self._generate_ready(state, time.perf_counter() - started)

    def close_session(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    # ------------------------------------------------------------------ internals: audio bookkeeping

    def _character(self, state: SessionState, character: int) -> _CharacterAudio:
        if not 0 <= character < len(state.characters):
            raise ConfigError(f"character={character} is invalid; this session has characters "
                              f"0..{len(state.characters) - 1}")
        return state.characters[character]

    def _append_features(self, audio: _CharacterAudio, features: torch.Tensor) -> None:
        if features.shape[0]:
            audio.features.append(features.to("cpu", self.dtype))
            audio.speaking.append(torch.full((features.shape[0],), audio.speaking_now, dtype=torch.bool))
            audio.frames += features.shape[0]

    def _keep_pcm(self, state: SessionState, pcm, sample_rate_hz: int) -> None:
        array = np.asarray(pcm)
        array = array.astype(np.float32) / 32768.0 if array.dtype == np.int16 else array.astype(np.float32)
        if state.sample_rate_hz is None:
            state.sample_rate_hz = int(sample_rate_hz)
        state.pcm.append(array.reshape(-1))

    def _window(self, state: SessionState, first_video: int, count: int, keep_from: int):
        """Features [1, K, count, D] and speaking [1, K, count] for video frames [first_video, first_video+count).

        Frames before 0 or beyond what a character has sent are silence (speaking False, zero features).
        Drops buffered rows before `keep_from`.
        """
        feats, speaking = [], []
        dim = self.dit.config.audio_dim
        for audio in state.characters:
            rows = torch.cat(audio.features) if audio.features else torch.zeros(0, dim, dtype=self.dtype)
            talk = torch.cat(audio.speaking) if audio.speaking else torch.zeros(0, dtype=torch.bool)
            index = torch.arange(first_video, first_video + count) - audio.base_frame
            valid = (index >= 0) & (index < rows.shape[0])
            safe = index.clamp(0, max(rows.shape[0] - 1, 0))
            window = rows[safe] if rows.shape[0] else torch.zeros(count, dim, dtype=self.dtype)
            feats.append(torch.where(valid[:, None], window, torch.zeros_like(window)))
            speaking.append(valid & (talk[safe] if talk.shape[0] else torch.zeros(count, dtype=torch.bool)))
            drop = max(0, min(keep_from - audio.base_frame, rows.shape[0]))
            audio.features = [rows[drop:]] if rows.shape[0] > drop else []
            audio.speaking = [talk[drop:]] if talk.shape[0] > drop else []
            audio.base_frame += drop
        return torch.stack(feats)[None].to(self.device), torch.stack(speaking)[None].to(self.device)

    # ------------------------------------------------------------------ internals: generation

    def _chunk_ready(self, state: SessionState) -> bool:
        config = self.dit.config
        chunk = state.stream.chunk_latent_frames
        first_latent = state.chunk_index * chunk
        if state.input_ended:
            if not state.total_frames:
                return False
            total_latents = 1 + math.ceil(max(state.total_frames - 1, 0) / config.temporal_compression)
            return first_latent < total_latents
        needed_video = config.temporal_compression * (first_latent + chunk - 1 + config.audio_lookahead_latent_frames)
        return max(audio.frames for audio in state.characters) > needed_video

    def _generate_ready(self, state: SessionState, audio_s: float) -> list[VideoChunk]:
        chunks = []
        while self._chunk_ready(state):
            chunks.append(self._generate_chunk(state, audio_s))
            audio_s = 0.0
        return chunks

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _generate_chunk(self, state: SessionState, audio_s: float) -> VideoChunk:
        dit, config, stream = self.dit, self.dit.config, state.stream
        ratio, half = config.temporal_compression, config.audio_lookahead_latent_frames
        chunk, height, width = state.latent_shape
        first_latent = state.chunk_index * chunk
        timings = ChunkTimings(audio_s=audio_s)
        started = time.perf_counter()

        # 1. audio tokens: latent frame f sees video frames [ratio*(f-half) - (ratio-1), ratio*(f+half)]
        first_video = ratio * (first_latent - half) - (ratio - 1)
        span = ratio * (chunk - 1) + config.audio_tokens_per_frame
        next_first = ratio * (first_latent + chunk - half) - (ratio - 1)
        features, speaking = self._window(state, first_video, span, keep_from=next_first)
        offsets = (torch.arange(chunk) * ratio)[:, None] + torch.arange(config.audio_tokens_per_frame)[None]
        audio = dit.project_audio(features[:, :, offsets], speaking[:, :, offsets], state.regions)
        self._synchronize()
        timings.audio_s += time.perf_counter() - started

        # 2. denoise: one step function, each step with its own cache
        noise = torch.randn((1, 16, chunk, height, width), generator=state.generator, device=self.device,
                            dtype=torch.float32).to(self.dtype)
        renoise = None
        if stream.solver == "renoise":
            renoise = torch.randn((stream.steps, 1, 16, chunk, height, width), generator=state.generator,
                                  device=self.device, dtype=torch.float32).to(self.dtype)
        cond = ChunkCondition(state.condition, audio, state.rope, stream.solver, renoise)
        latents = noise
        for t, t_next in zip(state.schedule[:-1], state.schedule[1:]):
            step_started = time.perf_counter()
            latents, state.caches[t.index] = self._step(dit, latents, t, t_next, state.caches[t.index], cond)
            self._synchronize()
            timings.step_s.append(time.perf_counter() - step_started)

        # 3. Adaptive Attention Sink: the first generated latent frame(s) become the sink
        if state.chunk_index == 0 and stream.adaptive_sink:
            sink = latents[:, :, :1].repeat(1, 1, stream.sink_frames, 1, 1)
            sink_key, sink_value = dit.compute_sink(sink, state.condition)
            for cache in state.caches:
                cache.set_sink(sink_key, sink_value)

        # 4. decode
        vae_started = time.perf_counter()
        frames, state.decode_cache = self.vae.decode_chunk(latents, state.decode_cache)
        self._synchronize()
        timings.vae_s = time.perf_counter() - vae_started
        frames = frames[0].transpose(0, 1).float()  # [T, 3, H, W]
        first_frame = state.frames_emitted
        final = False
        if state.input_ended and state.total_frames is not None:
            frames = frames[: max(state.total_frames - first_frame, 0)]
            final = not self._more_after(state)
        state.frames_emitted += frames.shape[0]
        state.chunk_index += 1
        timings.total_s = time.perf_counter() - started + audio_s
        return self._package(state, frames, first_frame, latents, timings, final)

    def _more_after(self, state: SessionState) -> bool:
        chunk = state.stream.chunk_latent_frames
        total_latents = 1 + math.ceil(max(state.total_frames - 1, 0) / self.dit.config.temporal_compression)
        return (state.chunk_index + 1) * chunk < total_latents

    def _package(self, state: SessionState, frames, first_frame: int, latents, timings, final) -> VideoChunk:
        fps = state.stream.fps
        start_s, end_s = first_frame / fps, (first_frame + frames.shape[0]) / fps
        rate = state.sample_rate_hz or 16000
        pcm = np.concatenate(state.pcm) if state.pcm else np.zeros(0, np.float32)
        begin = max(0, round(start_s * rate) - state.pcm_base_sample)
        end = max(begin, round(end_s * rate) - state.pcm_base_sample)
        chunk_pcm = pcm[begin:end].copy()
        state.pcm = [pcm[end:]] if pcm.shape[0] > end else []
        state.pcm_base_sample += min(end, pcm.shape[0])
        return VideoChunk(session_id=state.session_id, chunk_index=state.chunk_index - 1, first_frame=first_frame,
                          fps=fps, frames=frames.cpu(), audio_start_s=start_s, audio_end_s=end_s,
                          audio_pcm=chunk_pcm, sample_rate_hz=rate, latents=latents[0].detach().cpu(),
                          timings=timings, final=final)


def random_dit(config, seed: int, device="cpu", dtype=torch.float32) -> CausalAvatarDiT:
    """A model with seeded random weights everywhere (the zero-initialised audio value projection included,
    so audio changes the output as it would in a trained model). Built directly on `device`, so the
    wan-14b shape never materialises in host memory; the same seed gives the same weights on the same device type.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        model = CausalAvatarDiT(config)
        for block in model.blocks:
            torch.nn.init.normal_(block.attn2.audio_v_proj.weight, std=config.dim ** -0.5)
    return model.to(dtype)


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
