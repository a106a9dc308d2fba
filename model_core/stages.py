"""The three Ray-free stages a chunk passes through, each owning its per-session state explicitly.

    AudioStage   pcm -> per-video-frame features -> one `ChunkAudioInput` per chunk whose audio window is complete
    ScoreStage   ChunkAudioInput -> noise -> denoising steps (each with its own KV cache) -> clean latents
    DecodeStage  clean latents -> streaming decode (per-session decode cache) -> RGB frames (`model_core.decode`)

`AvatarEngine` runs the three in one process; the Ray Serve deployments host the very same classes on different
workers (score and VAE on different GPUs), so both produce the same frames for the same seed.  What moves between
stages is small and explicit: `ChunkAudioInput` (features of one chunk), latents, and for the adaptive sink the
first clean latent frame.  A `ScoreStage` may own every denoising step (sequential, the TalkingMachines 1-GPU score)
or a subset (one stage per step, Live Avatar's pipeline); either way it runs the one loop `sampler.denoise`.

The audio stage and its per-chunk input live in `model_core.audio_stage` (its timeline and characters are described
there).

What may live here: the stages and the per-session state types they hand in and out; nothing about Ray, networks
or processes.  The denoising steps never wait for the device (`syncguard.no_host_sync` holds them to it in the
tests); the waits are once per chunk where a result leaves the device: the step timer's last CUDA event when the
chunk's latents are handed on, and the decode's copy of frames to the host — each explained where it happens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .audio_stage import ChunkAudioInput
from .cache import ChunkAudio, ChunkRope, ConditionCache, GatheredCaches, KVCache, SessionPool
from .config import StreamConfig
from .dit import CausalAvatarDiT
from .sampler import ChunkCondition, StepClock, Timestep, denoise, flow_schedule, step

# ============================================================================================ score


@dataclass
class ScoreSession:
    """A session's score state on one stage: conditioning, the caches of the steps this stage owns, noise RNG."""

    session_id: str
    stream: StreamConfig
    schedule: list[Timestep]
    condition: ConditionCache
    rope: ChunkRope
    caches: dict[int, KVCache]            # step index -> cache (only the steps this stage owns)
    regions: torch.Tensor                 # [1, K, S]
    reference_latent: torch.Tensor        # [1, 16, 1, h, w] (reference-image tokens are rebuilt from it)
    generator: torch.Generator
    latent_shape: tuple[int, int, int]    # (C, h, w)
    chunk_index: int = 0
    pool: SessionPool | None = None       # where `caches` and `condition` live (views of this session's slot)
    shown: torch.Tensor | None = None     # [1, 16, 1, h, w]: the last latent frame shown (the last step's stage)
    shown_listening: torch.Tensor | bool = False  # whether every character listened in it (`hold_listening`)

    @property
    def steps(self) -> list[int]:
        return sorted(self.caches)


@dataclass
class NoisyChunk:
    """What flows between score stages: a chunk's latents at some noise level plus what later steps need."""

    session_id: str
    chunk_index: int
    latents: torch.Tensor                 # [1, 16, C, h, w]
    audio: ChunkAudio                     # projected audio tokens
    renoise: torch.Tensor | None          # [S, 1, 16, C, h, w] for the "renoise" solver
    step_s: list[float] = field(default_factory=list)
    listening: torch.Tensor | None = None  # [C] bool: no character in speaking mode in the frames it shows


class ScoreStage:
    """The causal DiT and the denoising steps. Owns either every step (sequential) or a subset (pipelined)."""

    def __init__(self, dit: CausalAvatarDiT, device="cpu", dtype=torch.float32, step_fn=step, pool_capacity: int = 4):
        """`pool_capacity`: slots preallocated per shape class of sessions (`batch_key`); a full pool doubles."""
        self.dit = dit.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = torch.device(device), dtype
        self.step_fn = step_fn
        self.pool_capacity = pool_capacity
        self.pools: dict[tuple, SessionPool] = {}

    @property
    def held_bytes(self) -> int:
        """Bytes of the session pools (preallocated slots included)."""
        return sum(pool.nbytes for pool in self.pools.values())

    def close(self, session: ScoreSession) -> None:
        """Free the session's slot (the last session of its pool moves into it); idempotent. The session can run no
        chunk after this (its slot may hold another session)."""
        pool = session.pool
        if pool is None:
            return
        pool.remove(session)
        session.pool = None
        session.condition = None
        session.caches = {k: None for k in session.caches}
        if not len(pool):
            self.pools = {key: held for key, held in self.pools.items() if held is not pool}

    @torch.no_grad()
    def open(self, session_id: str, stream: StreamConfig, reference_latent: torch.Tensor, text_states: torch.Tensor,
             regions: torch.Tensor, steps: list[int] | None = None) -> ScoreSession:
        """reference_latent [1, 16, 1, h, w]; text_states [1, Lt, text_dim]; regions [1, K, S]; steps: owned step
        indices (None: all)."""
        dit = self.dit
        reference_latent = reference_latent.to(self.device, self.dtype)
        schedule = flow_schedule(stream.steps, stream.shift)
        step_timesteps = torch.tensor([t.model_timestep for t in schedule[:-1]], device=self.device)
        condition = dit.prepare_conditions(text_states.to(self.device, self.dtype),
                                           dit.reference_tokens(reference_latent), step_timesteps)
        _, _, _, height, width = reference_latent.shape
        p_h, p_w = dit.config.patch_size[1:]
        grid_h, grid_w = height // p_h, width // p_w
        owned = list(range(stream.steps)) if steps is None else sorted(steps)
        caches = {k: dit.allocate_cache(1, stream.sink_frames, stream.chunk_latent_frames, grid_h * grid_w)
                  for k in owned}
        session = ScoreSession(
            session_id=session_id, stream=stream, schedule=schedule, condition=condition,
            rope=dit.chunk_rope(stream.chunk_latent_frames, grid_h, grid_w, stream.sink_frames,
                                stream.sink_rope_offset),
            caches=caches, regions=regions.to(self.device), reference_latent=reference_latent,
            generator=torch.Generator(device=self.device).manual_seed(stream.seed),
            latent_shape=(stream.chunk_latent_frames, height, width))
        session.pool = self.pools.setdefault(self.batch_key(session), SessionPool(self.pool_capacity))
        session.pool.add(session, caches, condition)     # the session's state now lives in its slot
        self.set_sink(session, reference_latent)
        return session

    @torch.no_grad()
    def set_prompt(self, session: ScoreSession, text_states: torch.Tensor) -> None:
        """A new prompt from the next chunk on: the session's conditioning is rebuilt (caches and sink stay)."""
        self._check_open(session)
        step_timesteps = torch.tensor([t.model_timestep for t in session.schedule[:-1]], device=self.device)
        condition = self.dit.prepare_conditions(text_states.to(self.device, self.dtype),
                                                self.dit.reference_tokens(session.reference_latent), step_timesteps)
        for name, value in vars(condition).items():      # into the session's slot of the pool
            getattr(session.condition, name).copy_(value)

    @torch.no_grad()
    def set_sink(self, session: ScoreSession, sink_latent: torch.Tensor) -> None:
        """sink_latent [1, 16, 1, h, w]: recompute the sink's keys/values (t = 0) in every owned cache."""
        self._check_open(session)
        sink = sink_latent.to(self.device, self.dtype).repeat(1, 1, session.stream.sink_frames, 1, 1)
        key, value = self.dit.compute_sink(sink, session.condition)
        for cache in session.caches.values():
            cache.set_sink(key, value)

    @torch.no_grad()
    def begin_chunk(self, session: ScoreSession, audio_input: ChunkAudioInput) -> NoisyChunk:
        """First stage only: project the chunk's audio and draw its noise from the session's generator."""
        stream = session.stream
        chunk, height, width = session.latent_shape
        audio = self.dit.project_audio(audio_input.features.to(self.device, self.dtype),
                                       audio_input.speaking.to(self.device), session.regions)
        noise = torch.randn((1, 16, chunk, height, width), generator=session.generator, device=self.device,
                            dtype=torch.float32).to(self.dtype)
        renoise = None
        if stream.solver == "renoise":
            renoise = torch.randn((stream.steps, 1, 16, chunk, height, width), generator=session.generator,
                                  device=self.device, dtype=torch.float32).to(self.dtype)
        # [1, K, C, T] window tokens -> [C]: no character speaking in the video frames each latent frame shows (its
        # window's middle `ratio` tokens, `latents.audio_windows`' layout)
        window = self.dit.config.audio_window
        ratio = audio_input.speaking.shape[-1] // window
        shows = audio_input.speaking[0, :, :, ratio * (window // 2):ratio * (window // 2 + 1)]
        listening = ~shows.bool().any(-1).any(0)
        return NoisyChunk(session.session_id, audio_input.chunk_index, noise, audio, renoise, listening=listening)

    @torch.no_grad()
    def run_steps(self, session: ScoreSession, chunk: NoisyChunk) -> NoisyChunk:
        """Run the steps this stage owns on `chunk` (latents at the first owned step's noise level)."""
        self._check_open(session)
        if not session.stream.rolling_rope:  # the ablation: absolute positions, new tables for every chunk
            _, height, width = session.latent_shape
            p_h, p_w = self.dit.config.patch_size[1:]
            session.rope = self.dit.absolute_chunk_rope(chunk.chunk_index, session.stream.chunk_latent_frames,
                                                        height // p_h, width // p_w, session.stream.sink_frames)
        cond = ChunkCondition(session.condition, chunk.audio, session.rope, session.stream.solver, chunk.renoise)
        clock = StepClock(self.device, chunk.step_s)
        chunk.latents = denoise(self.dit, chunk.latents.to(self.device, self.dtype), session.schedule, session.steps,
                                session.caches, cond, self.step_fn, clock)
        clock.finish()
        session.chunk_index = chunk.chunk_index + 1
        self._show(session, chunk)
        return chunk

    @staticmethod
    def _show(session: ScoreSession, chunk: NoisyChunk) -> None:
        """On the stage that runs the last step: the latents as shown (`hold_listening`), and the last one kept."""
        if session.steps[-1] != session.stream.steps - 1 or chunk.listening is None:
            return
        chunk.latents = hold_listening(chunk.latents, chunk.listening, session.shown, session.shown_listening,
                                       session.stream.listening_hold)
        session.shown, session.shown_listening = chunk.latents[:, :, -1:].clone(), chunk.listening[-1].clone()

    @torch.no_grad()
    def denoise(self, session: ScoreSession, audio_input: ChunkAudioInput) -> NoisyChunk:
        """Sequential: every step of one chunk, then (chunk 0) the adaptive sink. Returns clean latents."""
        chunk = self.run_steps(session, self.begin_chunk(session, audio_input))
        if chunk.chunk_index == 0 and session.stream.adaptive_sink:
            self.set_sink(session, chunk.latents[:, :, :1])
        return chunk

    @staticmethod
    def closed_error(session: ScoreSession) -> KeyError:
        return KeyError(f"session {session.session_id!r} is closed; its score state was freed")

    def _check_open(self, *sessions: ScoreSession) -> None:
        for session in sessions:
            if session.pool is None:
                raise self.closed_error(session)

    @staticmethod
    def batch_key(session: ScoreSession) -> tuple:
        """Sessions with equal keys can share one forward per step (same shapes, schedule and RoPE)."""
        stream = session.stream
        return (session.latent_shape, tuple(session.steps), stream.steps, stream.shift, stream.solver,
                stream.sink_frames, stream.sink_rope_offset, tuple(session.regions.shape[1:]),
                stream.rolling_rope or session.session_id)  # absolute positions differ per session: never batched

    @torch.no_grad()
    def denoise_batch(self, sessions: list[ScoreSession], inputs: list[ChunkAudioInput]) -> list[NoisyChunk]:
        """`denoise` for chunks of several sessions at once: one forward per step over the stacked batch.

        Every session keeps its own noise generator, conditioning and caches; each step reads the sessions' caches of
        that step stacked and writes their new previous-chunk entries back (`_BatchedCaches`), so results equal
        per-session `denoise` up to float rounding.
        """
        if len({self.batch_key(session) for session in sessions}) != 1:
            raise ValueError("denoise_batch needs sessions with equal batch_key (shapes, schedule, RoPE, characters)")
        if len({session.session_id for session in sessions}) != len(sessions):
            raise ValueError("denoise_batch got two chunks of one session; a session's chunks must run in order")
        self._check_open(*sessions)
        if len(sessions) == 1:
            return [self.denoise(sessions[0], inputs[0])]
        pool = sessions[0].pool
        if any(session.pool is not pool or pool is None for session in sessions):
            raise ValueError("denoise_batch needs sessions opened on this ScoreStage")
        order = sorted(range(len(sessions)), key=lambda row: pool.slot_of(sessions[row]))
        sessions, inputs = [sessions[row] for row in order], [inputs[row] for row in order]
        slots = [pool.slot_of(session) for session in sessions]
        chunks = [self.begin_chunk(session, item) for session, item in zip(sessions, inputs)]
        first = sessions[0]
        if slots == list(range(slots[0], slots[0] + len(slots))):
            caches, condition = pool.views(slots[0], len(slots))   # the batch is a view of the pool: no copy
        else:
            caches, condition = GatheredCaches(pool, slots), pool.gather_condition(slots)
        audio = ChunkAudio(tokens=torch.cat([c.audio.tokens for c in chunks]),
                           regions=torch.cat([c.audio.regions for c in chunks]))
        renoise = (torch.cat([c.renoise for c in chunks], dim=1) if chunks[0].renoise is not None else None)
        cond = ChunkCondition(condition, audio, first.rope, first.stream.solver, renoise)
        step_s = []
        clock = StepClock(self.device, step_s)
        latents = denoise(self.dit, torch.cat([c.latents for c in chunks]), first.schedule, first.steps,
                          caches, cond, self.step_fn, clock)
        clock.finish()
        for row, (session, chunk) in enumerate(zip(sessions, chunks)):
            chunk.latents, chunk.step_s = latents[row:row + 1], list(step_s)
            session.chunk_index = chunk.chunk_index + 1
            self._show(session, chunk)
            if chunk.chunk_index == 0 and session.stream.adaptive_sink:
                self.set_sink(session, chunk.latents[:, :, :1])
        results = [None] * len(chunks)
        for row, chunk in zip(order, chunks):
            results[row] = chunk
        return results


def hold_listening(latents: torch.Tensor, listening: torch.Tensor, shown: torch.Tensor | None,
                   shown_listening, hold: float) -> torch.Tensor:
    """The chunk's latents [1, 16, C, h, w] as shown: a latent frame in which every character listens (`listening`
    [C] bool), after one that listened too, moves only `hold` of the way from the frame shown before it to the model's
    (an exponential average over the listening stretch; `shown` [1, 16, 1, h, w] is the previous chunk's last frame
    and `shown_listening` whether it listened; None at the start). The model's own history (its caches) is untouched:
    only what is shown is held. Tensor operations only (no host sync): the flags may live on the host, the latents on
    the device.

    Why: a listening face should stand still, but the 2-step student's consecutive latent frames differ where the audio
    does not move them, and each new latent frame is a visible jump (BENCHMARKS, "Where the student's listening
    flicker sits"); speech is shown exactly as the model made it."""
    if hold >= 1:
        return latents
    listening = listening.to(latents.device)
    if shown is None:
        previous, previous_listening = latents[:, :, :1], torch.zeros((), dtype=torch.bool, device=latents.device)
    else:
        previous = shown.to(latents.device, latents.dtype)
        previous_listening = torch.as_tensor(shown_listening, dtype=torch.bool).to(latents.device)
    frames = []
    for frame in range(latents.shape[2]):
        now = latents[:, :, frame:frame + 1]
        previous = torch.where(listening[frame] & previous_listening, previous + hold * (now - previous), now)
        previous_listening = listening[frame]
        frames.append(previous)
    return torch.cat(frames, 2)
