"""`ScoreWorkerGroup`: the causal DiT for every session (a thin Serve class over `model_core.stages.ScoreStage`).

    ChunkFeatures ─► [step 0 ... step S-1] ─► ScoredChunk ─► (the ingress hands it, unresolved, to the decoder)

Sequential: this replica owns every denoising step (TalkingMachines' one score GPU); chunks of different sessions at
the same step are batched into one forward (`MicroBatcher`).  Pipelined (Live Avatar's timestep-forcing pipeline):
this replica owns step 0 and one `DenoiseStepActor` per further step (one GPU each, in this replica's placement
group) owns the rest; chunk n+1 enters step 0 as soon as chunk n has left it, and the last actor's output goes to
the decoder as an ObjectRef that this replica never resolves.  Every step owns its own KV cache (per-timestep
caches), so only latents move between steps.

With `latent_transport: collective` the clean latents do not travel in the `ScoredChunk` at all: the process that
holds them (this replica; pipelined: the last step actor) sends them over the latent link to the VAEDecoder, device
to device (`services.serving.latent_link`, joined on the first session), and the message carries a `LatentTicket`.

What may live here: per-session `ScoreSession`s keyed by id, the device thread, ordering.  Never PCM, never frames:
the score group neither receives audio samples nor returns pixels (a test asserts the hops).  In the self-contained
layout (`vae_placement: colocated`, the baseline the disaggregation benchmark compares against) this replica also
hosts a `SessionDecoder` and answers the decoder's calls itself; the builder then hands it to the ingress as the
decoder, so the ingress never knows where decoding runs.

After every chunk each stage's caches and noise generator go to the `ResumeStore` under the chunk's index (taken on
the device thread before the next chunk changes them, written before the chunk is answered), with the session's
open arguments and adaptive sink once; a replacement replica continues the session exactly from any of the last
few chunks (`restore`, asked by the ingress). A pipelined step actor that dies on its own is started again at the
next `restore` (`_replace_dead_steps`), and the replica's sessions, whose caches of that step died with it, restore
the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from ray import serve

from model_core.config import ConfigError
from model_core.engine import Character, region_masks, token_grid
from model_core.models import build_dit, build_vae
from model_core.snapshot import pack, restore_score, snapshot_score, unpack
from model_core.stages import NoisyChunk, ScoreStage
from model_core.text import build_prompt_encoder
from services.serving.affinity import AFFINITY_ROUTER, ReportsSessions
from services.serving.latent_link import LatentSender, backend_for, check_available, connect, new_link_name
from services.serving.messages import ChunkFeatures, DecodedFrames, DecodeRequest, LinkedChunk, ScoredChunk
from services.serving.ordering import ChunkTurns, MicroBatcher, run_on
from services.serving.resume import ResumeStore, SessionNotHere, restore_call
from services.serving.settings import AppSettings
from services.serving.vae_decoder import SessionDecoder, worker_identity
from services.telemetry import SCORE_STEP_SPAN, setup_telemetry, span


def build_score_stage(settings: AppSettings) -> tuple[ScoreStage, str]:
    """The DiT of the settings' preset/checkpoint/seed on this worker's device, and the weights note."""
    device = settings.worker_device()
    dit, note = build_dit(settings.preset_config, checkpoint=settings.checkpoint, device=device,
                          dtype=settings.torch_dtype, seed=settings.seed, audio_config=settings.audio_config())
    return ScoreStage(dit, device, settings.torch_dtype), note


def steps_part(steps: list[int]) -> str:
    """The resume store's name for the caches of `steps` ("score:0,1")."""
    return "score:" + ",".join(map(str, steps))


logger = logging.getLogger("facecast.score")
STEP_PING_S = 5.0
"""How long a pipelined step actor may take to answer a liveness ping (`_replace_dead_steps`); one that does not
answer in time is busy, not replaced."""
NO_LINK = "-"
"""`link_name` of a replica that could not link up with the decoder: its latents travel in the messages."""


class DenoiseStepActor:
    """One pipelined denoising step (a Ray actor on its own GPU): owns that step and its per-session KV caches."""

    def __init__(self, settings: AppSettings, steps: list[int]):
        self.telemetry = setup_telemetry("facecast-score")
        self.stage, _ = build_score_stage(settings)
        self.steps = steps
        self.sessions = {}
        self.sender: LatentSender | None = None   # the last step's end of the latent link, when there is one
        self.resume = ResumeStore.from_settings(settings)

    def join_latent_link(self, name: str, backend: str) -> None:
        """Become the sending end of latent link `name` (blocks until the VAEDecoder joins too)."""
        sender = LatentSender(name, backend, self.stage.device)
        sender.join()
        self.sender = sender

    def open(self, session_id, stream, reference_latent, text_states, regions) -> None:
        self.sessions[session_id] = self.stage.open(session_id, stream, reference_latent, text_states, regions,
                                                    steps=self.steps)

    def run(self, chunk: NoisyChunk, carrier: dict | None = None) -> NoisyChunk | LinkedChunk:
        """This actor's steps. The last step, when it holds the latent link, sends the clean latents over it and
        answers with their ticket (plus, for chunk 0, the first clean frame: the adaptive sink)."""
        with span(SCORE_STEP_SPAN, carrier, **{"session.id": chunk.session_id, "chunk.index": chunk.chunk_index,
                                               "step": ",".join(map(str, self.steps))}):
            out = self.stage.run_steps(self.sessions[chunk.session_id], chunk)
        if self.resume is not None:
            self.resume.put_versioned(chunk.session_id, steps_part(self.steps), chunk.chunk_index + 1,
                                      snapshot_score(self.sessions[chunk.session_id]))
        if self.sender is None:
            return out
        sink = out.latents[:, :, :1].clone() if out.chunk_index == 0 else None
        return LinkedChunk(self.sender.send(out.session_id, out.chunk_index, out.latents), out.step_s, sink)

    def set_sink(self, session_id: str, sink_latent: torch.Tensor) -> None:
        self.stage.set_sink(self.sessions[session_id], sink_latent)

    def restore(self, session_id: str, at_chunk: int, sink_latent: torch.Tensor | None) -> None:
        """This actor's steps of a session opened again on a replacement: caches from before chunk `at_chunk`."""
        store = restore_call(self.resume, session_id)
        restore_score(self.stage, self.sessions[session_id], store.need(
            session_id, f"{steps_part(self.steps)}:{at_chunk}", f"steps {self.steps} before chunk {at_chunk}"),
            sink_latent)

    def set_prompt(self, session_id: str, text_states: torch.Tensor) -> None:
        self.stage.set_prompt(self.sessions[session_id], text_states)

    def close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.stage.close(session)

    def gpu_ids(self) -> list[str]:
        return [str(gpu) for gpu in ray.get_gpu_ids()]


@serve.deployment(name="ScoreWorkerGroup", max_ongoing_requests=64, request_router_config=AFFINITY_ROUTER)
class ScoreWorkerGroup(ReportsSessions):
    """The causal DiT for every session; see the module docstring for the two modes."""

    def __init__(self, settings: AppSettings, stage: ScoreStage | None = None, decoder=None):
        """`stage`: the score engine to serve (tests inject one); None builds it from the settings. `decoder`: the
        VAEDecoder's handle, for the latent link (latent_transport 'collective'; bound by `build_app`)."""
        self.settings = settings
        self.decoder_handle = decoder
        if settings.latent_transport == "collective":   # a missing backend fails the deploy, not the first session
            check_available(backend_for(settings.worker_device()))
        self.link_name: str | None = None     # the latent link, once joined (on the first session)
        self.sender: LatentSender | None = None   # this replica's end of it (sequential; pipelined: the last step's)
        self.link_lock = asyncio.Lock()
        self.telemetry = setup_telemetry("facecast-score")
        if stage is None:
            stage, self.weights_note = build_score_stage(settings)
        else:
            self.weights_note = "weights: injected"
        self.stage = stage
        dit_config = self.stage.dit.config
        self.prompt_encoder = build_prompt_encoder(settings.preset_config.text_encoder, dit_config.text_dim,
                                                   dit_config.text_len)
        self.pipelined = settings.score_mode == "pipelined" and settings.steps > 1
        self.own_steps = [0] if self.pipelined else list(range(settings.steps))
        self.step_actors = [self._start_step(k) for k in range(1, settings.steps)] if self.pipelined else []
        self.steps_lock = asyncio.Lock()
        self.sessions = {}
        self.recent: dict[str, deque] = {}     # the last scored chunks per session (see `scored`)
        self.opened: dict[str, dict] = {}      # each session's open arguments (saved for a replacement replica)
        self.resume = ResumeStore.from_settings(settings)
        self.turns = ChunkTurns()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self.batcher = (MicroBatcher(self._denoise_group, settings.max_batch_size)
                        if not self.pipelined and settings.max_batch_size > 1 else None)
        self.decoder = (SessionDecoder(build_vae(settings.preset_config, checkpoint=settings.checkpoint,
                                                 device=settings.worker_device(), seed=settings.seed),
                                       settings, self._compute, "ScoreWorkerGroup")
                        if settings.vae_placement == "colocated" else None)

    async def _compute(self, fn, *args):
        return await run_on(self.executor, fn, *args)

    def _start_step(self, step: int):
        """The actor of pipelined step `step` (one GPU, in this replica's placement group), named after its replica
        (`ray list actors` shows whose it is)."""
        replica = worker_identity("ScoreWorkerGroup")["replica"]
        return ray.remote(num_cpus=0, num_gpus=1)(DenoiseStepActor).options(
            name=f"facecast-step{step}:{replica}:{time.time_ns()}").remote(self.settings, [step])

    async def _replace_dead_steps(self, timeout_s: float = STEP_PING_S) -> list[int]:
        """Pipelined: a step actor that died on its own (its replica alive) is started again, and every session this
        replica held is dropped (their caches of that step died with it), so each restores from its snapshots on
        its next `restore` (the ingress asks after any worker fault). Returns the steps replaced."""
        if not self.step_actors:
            return []
        async with self.steps_lock:
            answers = await asyncio.gather(*(asyncio.wait_for(actor.gpu_ids.remote(), timeout_s)
                                             for actor in self.step_actors), return_exceptions=True)
            dead = [k for k, answer in enumerate(answers, start=1)
                    if isinstance(answer, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))]
            if not dead:
                return []
            for step in dead:
                self.step_actors[step - 1] = self._start_step(step)
            held = list(self.sessions)
            for session_id in held:
                await self.close(session_id)
            if self.settings.steps - 1 in dead and self.link_name is not None:   # the link's sender died too
                self.link_name = None
            logger.warning("ScoreWorkerGroup: step actor(s) %s died; started again; %d session(s) dropped to be "
                           "restored from their snapshots", dead, len(held))
            return dead

    # ------------------------------------------------------------------ sessions

    async def open(self, session_id: str, stream, reference_latent: torch.Tensor, prompt: str,
                   regions: list[tuple[float, float, float, float]]) -> None:
        """reference_latent [1, 16, 1, h, w] (the decoder's encode_reference, resolved here, never in the ingress)."""
        if stream.steps != self.settings.steps:
            raise ConfigError(f"stream.steps={stream.steps} is not served here: this score group runs "
                              f"{self.settings.steps} steps")
        await self._ensure_link()
        text_states = self.prompt_encoder([prompt])
        characters = [Character(tuple(region)) for region in regions] or [Character()]
        masks = region_masks(characters, *token_grid(self.stage.dit.config, reference_latent))
        self.sessions[session_id] = await self._compute(self.stage.open, session_id, stream, reference_latent,
                                                        text_states, masks, self.own_steps)
        self.recent[session_id] = deque(maxlen=self.settings.max_chunks_in_flight + 2)
        await asyncio.gather(*(actor.open.remote(session_id, stream, reference_latent, text_states, masks)
                               for actor in self.step_actors))
        self.opened[session_id] = {"stream": stream, "reference_latent": reference_latent, "prompt": prompt,
                                   "regions": [tuple(region) for region in regions]}
        self._save_opened(session_id)

    def _save_opened(self, session_id: str) -> None:
        if self.resume is not None:
            self.resume.put(session_id, {"score-open": pack(self.opened[session_id])})

    async def restore(self, session_id: str, at_chunk: int | None) -> dict:
        """Make sure this replica holds the session: a replacement opens it again from its saved open arguments and
        loads every step's caches and the noise generator saved before chunk `at_chunk` (None: the latest saved, as
        a re-attach asks) and the adaptive sink. Returns restored (whether it loaded) and progress (the next chunk it
        accepts)."""
        await self._replace_dead_steps()
        if session_id in self.sessions:
            return {"restored": False, "progress": self.turns.next_index(session_id)}
        store = restore_call(self.resume, session_id)
        if at_chunk is None:
            prefix = steps_part(self.own_steps) + ":"
            at_chunk = max((int(name[len(prefix):]) for name in store.names(session_id, prefix)), default=0)
        opened = unpack(store.need(session_id, "score-open", "the score group's open arguments"))
        await self.open(session_id, **opened)
        if at_chunk > 0:
            sink = store.get(session_id, "sink")
            sink = unpack(sink) if sink is not None else None
            await self._compute(restore_score, self.stage, self.sessions[session_id], store.need(
                session_id, f"{steps_part(self.own_steps)}:{at_chunk}", f"the score caches before chunk {at_chunk}"),
                sink)
            await asyncio.gather(*(actor.restore.remote(session_id, at_chunk, sink) for actor in self.step_actors))
            await self.turns.done(session_id, at_chunk - 1)
        return {"restored": True, "progress": at_chunk}

    async def set_prompt(self, session_id: str, prompt: str) -> None:
        """New prompt conditioning on every step; it applies from the next chunk that starts denoising."""
        text_states = self.prompt_encoder([prompt])
        await self._compute(self.stage.set_prompt, self._session(session_id), text_states)
        await asyncio.gather(*(actor.set_prompt.remote(session_id, text_states) for actor in self.step_actors))
        self.opened[session_id]["prompt"] = prompt
        self._save_opened(session_id)

    async def close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        self.recent.pop(session_id, None)
        self.opened.pop(session_id, None)
        self.turns.forget(session_id)
        if session is not None:   # on the score thread, after any chunk of it in flight: the pool may move a session
            await self._compute(self.stage.close, session)
        await asyncio.gather(*(actor.close.remote(session_id) for actor in self.step_actors))

    async def _ensure_link(self) -> None:
        """latent_transport 'collective': join the latent link to the VAEDecoder once, before the first session."""
        if self.settings.latent_transport != "collective" or self.link_name is not None:
            return
        async with self.link_lock:
            if self.link_name is not None:
                return
            if self.decoder_handle is None:
                raise ConfigError("latent_transport='collective' needs the VAEDecoder's handle in the ScoreWorkerGroup "
                                  "(build_app binds it with vae_placement 'separate')")
            name, backend = new_link_name(), backend_for(self.settings.worker_device())
            try:    # first the decoder frees what a dead replica's link held (gloo: one group per process) ...
                await self.decoder_handle.prepare_latent_link.remote(backend)
            except Exception as error:   # ... or says it cannot take a link: latents travel in the messages
                logger.warning("ScoreWorkerGroup: no latent link to the VAEDecoder (%s); this replica's latents travel "
                               "in the messages (object store)", str(error).strip().splitlines()[-1][:300])
                self.link_name = NO_LINK
                return
            accept = self.decoder_handle.accept_latent_link.remote(name, backend)
            if self.pipelined:     # the last step actor holds the clean latents
                await connect(self.step_actors[-1].join_latent_link.remote(name, backend), accept)
            else:
                sender = LatentSender(name, backend, self.settings.worker_device())
                await connect(sender.join, accept)
                self.sender = sender
            self.link_name = name

    def session_ids(self) -> list[str]:
        return list(self.sessions)

    def held_bytes(self) -> int:
        """Bytes of per-session tensors on this replica (KV caches and conditioning; step actors not counted)."""
        total = self.stage.held_bytes     # the session pools, preallocated slots included
        total += sum(scored.latents.nbytes for recent in self.recent.values() for scored in recent
                     if scored.latents is not None)
        return total

    def _session(self, session_id: str):
        try:
            return self.sessions[session_id]
        except KeyError:
            raise SessionNotHere(f"ScoreWorkerGroup has no session {session_id!r}") from None

    # ------------------------------------------------------------------ one chunk

    async def generate(self, features: ChunkFeatures, carrier: dict | None = None) -> ScoredChunk:
        """Denoise one chunk, strictly after the session's previous chunk entered step 0.

        Shielded: if the caller goes away (an ingress replica dies) the chunk still completes, so the session's
        caches stay consistent and the decoder still receives it."""
        return await asyncio.shield(asyncio.ensure_future(self._generate(features, carrier)))

    async def _generate(self, features: ChunkFeatures, carrier: dict | None) -> ScoredChunk:
        session_id, index = features.session_id, features.chunk_index
        session = self._session(session_id)
        started = time.perf_counter()
        await self.turns.wait(session_id, index)
        pending = None
        try:
            if self.pipelined:
                (chunk, snapshot), pending = await self._pipelined(session, features, carrier)
            elif self.batcher is not None:
                chunk, snapshot = await self.batcher.submit(ScoreStage.batch_key(session), (session, features, carrier))
            else:
                chunk, snapshot = await self._compute(self._all_steps, session, features, carrier)
            if pending is not None:   # later steps' timings travel with the ref
                scored = ScoredChunk(session_id, index, pending=pending,
                                     stage_ms={"score_step_1": chunk.step_s[0] * 1000})
            else:
                stage_ms = {"score": (time.perf_counter() - started) * 1000,
                            **{f"score_step_{k + 1}": s * 1000 for k, s in enumerate(chunk.step_s)}}
                if isinstance(chunk, LinkedChunk):      # pipelined chunk 0: the last step sent it over the link
                    scored = ScoredChunk(session_id, index, ticket=chunk.ticket, stage_ms=stage_ms)
                elif self.sender is not None:
                    scored = ScoredChunk(session_id, index, stage_ms=stage_ms,
                                         ticket=self.sender.send(session_id, index, chunk.latents))
                else:
                    scored = ScoredChunk(session_id, index, latents=chunk.latents, stage_ms=stage_ms)
            self.recent[session_id].append(scored)
        finally:
            await self.turns.done(session_id, index)   # chunk n+1 may enter step 0 now
        if snapshot is not None:   # before this chunk is answered: whatever the ingress received is restorable
            extra = {}
            if index == 0 and session.stream.adaptive_sink:
                extra["sink"] = pack(self.sink_of(chunk))
            await asyncio.to_thread(self.resume.put_versioned, session_id, steps_part(self.own_steps), index + 1,
                                    snapshot, extra)
        return scored

    @staticmethod
    def sink_of(chunk) -> torch.Tensor:
        """The adaptive sink chunk 0 set: its first clean latent frame [1, 16, 1, h, w]."""
        return chunk.sink if isinstance(chunk, LinkedChunk) else chunk.latents[:, :, :1]

    def _snapshot(self, session) -> bytes | None:
        """On the score thread, right after the session's chunk: its caches and generator as bytes."""
        return snapshot_score(session) if self.resume is not None else None

    def scored(self, session_id: str, chunk_index: int) -> ScoredChunk:
        """A chunk this group already scored, again: for a re-attaching ingress whose predecessor died after
        `generate` but before handing the result to the decoder (the decoder ignores a chunk it already has)."""
        for scored in self.recent.get(session_id, ()):
            if scored.chunk_index == chunk_index:
                return scored
        raise KeyError(f"ScoreWorkerGroup: chunk {chunk_index} of session {session_id!r} is no longer kept")

    async def _pipelined(self, session, features: ChunkFeatures, carrier: dict | None):
        """Step 0 here, then the chain of step actors. Returns (chunk after step 0 or the clean chunk, ref or None)."""
        first, snapshot = await self._compute(self._first_step, session, features, carrier)
        ref = first
        for actor in self.step_actors:
            ref = actor.run.remote(ref, carrier)
        if features.chunk_index == 0 and session.stream.adaptive_sink:
            clean = await ref   # secondary warm-up: every step needs the new sink before chunk 1 enters
            sink = self.sink_of(clean)
            await self._compute(self.stage.set_sink, session, sink)
            await asyncio.gather(*(actor.set_sink.remote(session.session_id, sink) for actor in self.step_actors))
            return (clean, snapshot), None
        return (first, snapshot), ref

    def _first_step(self, session, features: ChunkFeatures, carrier) -> tuple[NoisyChunk, bytes | None]:
        with span(SCORE_STEP_SPAN, carrier, **{"session.id": session.session_id, "chunk.index": features.chunk_index,
                                               "step": "0"}):
            chunk = self.stage.run_steps(session, self.stage.begin_chunk(session, features))
            return chunk, self._snapshot(session)

    def _all_steps(self, session, features: ChunkFeatures, carrier) -> tuple[NoisyChunk, bytes | None]:
        with span(SCORE_STEP_SPAN, carrier, **{"session.id": session.session_id, "chunk.index": features.chunk_index,
                                               "step": "all"}):
            chunk = self.stage.denoise(session, features)
            return chunk, self._snapshot(session)

    async def _denoise_group(self, group: list) -> list:
        """One cross-session batch: a score span per chunk, one forward per step for all. Per member (chunk, its
        snapshot or None), or the member's own exception."""
        with contextlib.ExitStack() as spans:
            for session, features, carrier in group:
                spans.enter_context(span(SCORE_STEP_SPAN, carrier, **{
                    "session.id": session.session_id, "chunk.index": features.chunk_index, "step": "all",
                    "batch.size": len(group)}))
            return await self._compute(self._denoise_open, group)

    def _denoise_open(self, group: list) -> list:
        """On the score thread: the group's members whose sessions are still open, as one batch; a member closed
        while its chunk waited fails alone (its slot of the pool may hold another session by now)."""
        results: list = [ScoreStage.closed_error(session) if session.pool is None else None
                         for session, _, _ in group]
        live = [row for row, result in enumerate(results) if result is None]
        if live:
            chunks = self.stage.denoise_batch([group[row][0] for row in live], [group[row][1] for row in live])
            for row, chunk in zip(live, chunks):
                results[row] = (chunk, self._snapshot(group[row][0]))
        return results

    # ------------------------------------------------------------------ the decoder's calls (colocated layout only)

    async def encode_reference(self, image_png: bytes, width: int, height: int) -> torch.Tensor:
        return await self._own_decoder().encode_reference(image_png, width, height)

    def open_decode(self, session_id: str, decoder: str | None = None) -> None:
        self._own_decoder().open(session_id, decoder)

    async def decode(self, request: DecodeRequest, scored: ScoredChunk, carrier: dict | None = None) -> DecodedFrames:
        return await asyncio.shield(asyncio.ensure_future(self._own_decoder().decode(request, scored, carrier)))

    async def fetch(self, session_id: str, chunk_index: int, timeout_s: float = 120.0) -> DecodedFrames:
        return await self._own_decoder().fetch(session_id, chunk_index, timeout_s)

    def oldest_buffered(self, session_id: str) -> int | None:
        return self._own_decoder().oldest_buffered(session_id)

    def never_received(self, session_id: str, below: int) -> list[int]:
        return self._own_decoder().never_received(session_id, below)

    def close_decode(self, session_id: str) -> None:
        self._own_decoder().close(session_id)

    async def restore_decode(self, session_id: str, at_chunk: int) -> dict:
        return await self._own_decoder().restore(session_id, at_chunk)

    def decode_stats(self) -> dict:
        return self._own_decoder().stats()

    def _own_decoder(self) -> SessionDecoder:
        if self.decoder is None:
            raise RuntimeError("this ScoreWorkerGroup does not decode (vae_placement is 'separate'); the VAEDecoder "
                               "deployment does")
        return self.decoder

    # ------------------------------------------------------------------ introspection

    def batch_stats(self) -> dict:
        """Sizes of the recent cross-session score batches."""
        return (self.batcher.stats() if self.batcher is not None
                else {"batches": 0, "max_batch_size": 0, "mean_batch_size": 0.0})

    async def placement(self) -> dict:
        """GPU ids of this replica and of its step actors (for placement checks)."""
        steps = await asyncio.gather(*(actor.gpu_ids.remote() for actor in self.step_actors))
        return {"score": worker_identity("ScoreWorkerGroup")["gpu_ids"], "steps": [list(ids) for ids in steps],
                "weights": self.weights_note}
