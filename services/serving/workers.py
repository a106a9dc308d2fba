"""The worker deployments: thin Ray Serve classes over the Ray-free stages in `model_core.stages`.

    AudioEncoder      AudioStage: streaming PCM -> one ChunkAudioInput per ready chunk (CPU)
    ScoreWorkerGroup  ScoreStage: ChunkAudioInput -> clean latents (GPU); sequential (all steps here) or pipelined
                      (step 0 here, steps 1.. in child `ScoreStageWorker` actors, one GPU each); then hands the
                      latents to the VAEDecoder itself, so latents never pass through the ingress
    VAEDecoder        DecodeStage: latents -> frames -> JPEG (GPU); keeps the last chunks of each session for replay
    LLMBridge         the seam the audio-LLM bridge fills (a later issue); sessions run on raw audio without it

Per-session state lives in dicts of typed stage objects keyed by session id — never on an nn.Module.  Chunks of a
session are processed strictly in chunk order at every stage (`ChunkTurns`), whatever order requests arrive in, so
several chunks of one session may be in flight at once (score works on chunk n+1 while the VAE decodes chunk n).
Only `services/serving/app.py` binds these into a graph.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
from PIL import Image
from ray import serve

from model_core.audio import AudioConfig
from model_core.config import StreamConfig, get_preset
from model_core.engine import (Character, build_dit, build_vae, dit_config_for, region_masks, token_grid)
from model_core.stages import AudioStage, ChunkAudioInput, DecodeStage, NoisyChunk, ScoreStage
from model_core.text import build_prompt_encoder
from services.serving.settings import AppSettings
from services.telemetry import AUDIO_ENCODE_SPAN, SCORE_STEP_SPAN, VAE_DECODE_SPAN, setup_telemetry, span

REPLAY_CHUNKS = 16


@dataclass
class DecodedChunk:
    """A finished chunk as the ingress streams it: JPEG frames plus the audio they show and per-stage timings."""

    session_id: str
    chunk_index: int
    first_frame: int
    fps: float
    width: int
    height: int
    frames_jpeg: list[bytes]
    audio_pcm_s16le: bytes
    sample_rate_hz: int
    final: bool
    stage_ms: dict[str, float] = field(default_factory=dict)


def encode_jpeg(frames: torch.Tensor, quality: int) -> list[bytes]:
    """frames [T, 3, H, W] in [-1, 1] -> one baseline JPEG per frame (deterministic for the same pixels)."""
    pixels = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for frame in pixels:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def pcm_to_s16le(pcm: np.ndarray) -> bytes:
    return (np.clip(pcm, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


class ChunkTurns:
    """Per-session turnstile: chunk n of a session may enter only after chunk n-1 left."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}
        self._changed = asyncio.Condition()

    async def wait(self, session_id: str, chunk_index: int, timeout_s: float = 600.0) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self._next.get(session_id, 0) == chunk_index),
                                   timeout_s)

    async def wait_past(self, session_id: str, chunk_index: int, timeout_s: float = 600.0) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self._next.get(session_id, 0) > chunk_index),
                                   timeout_s)

    async def done(self, session_id: str, chunk_index: int) -> None:
        async with self._changed:
            self._next[session_id] = chunk_index + 1
            self._changed.notify_all()

    def next_index(self, session_id: str) -> int:
        return self._next.get(session_id, 0)

    def forget(self, session_id: str) -> None:
        self._next.pop(session_id, None)


async def run_on(executor: ThreadPoolExecutor, fn, *args):
    """Run blocking `fn(*args)` on a worker's device thread without blocking its event loop."""
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


def _gpu_ids() -> list[str]:
    return [str(gpu) for gpu in ray.get_gpu_ids()]


# ============================================================================================ AudioEncoder


@serve.deployment(name="AudioEncoder", max_ongoing_requests=256)
class AudioEncoder:
    """Streaming audio -> per-chunk audio windows, for every session (state per session id)."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.telemetry = setup_telemetry("facecast-audio")
        preset = get_preset(settings.preset)
        audio_config = AudioConfig(backend=preset.audio_backend)
        self.stage = AudioStage(audio_config, dit_config_for(preset, settings.checkpoint, audio_config))
        self.sessions = {}
        self.recent: dict[str, deque] = {}  # the last chunks cut per session, for a re-attaching ingress

    def open(self, session_id: str, stream: StreamConfig, num_characters: int) -> None:
        self.sessions[session_id] = self.stage.open(session_id, stream, num_characters)
        self.recent[session_id] = deque(maxlen=REPLAY_CHUNKS)

    def push(self, session_id: str, pcm: np.ndarray, sample_rate_hz: int, character: int,
             carrier: dict | None = None) -> list[ChunkAudioInput]:
        with span(AUDIO_ENCODE_SPAN, carrier, **{"session.id": session_id, "samples": int(pcm.shape[0])}):
            return self._remember(session_id, self.stage.push(self._session(session_id), pcm, sample_rate_hz,
                                                              character))

    def _remember(self, session_id: str, inputs: list[ChunkAudioInput]) -> list[ChunkAudioInput]:
        self.recent[session_id].extend(inputs)
        return inputs

    def pending(self, session_id: str, from_chunk: int) -> list[ChunkAudioInput]:
        """Chunks already cut whose index is >= from_chunk (those a dead ingress may never have submitted)."""
        return [item for item in self.recent.get(session_id, ()) if item.chunk_index >= from_chunk]

    def set_speaking(self, session_id: str, character: int, speaking: bool) -> None:
        self.stage.set_speaking(self._session(session_id), character, speaking)

    def end(self, session_id: str, carrier: dict | None = None) -> list[ChunkAudioInput]:
        with span(AUDIO_ENCODE_SPAN, carrier, **{"session.id": session_id, "end_of_input": True}):
            return self._remember(session_id, self.stage.end(self._session(session_id)))

    def state(self, session_id: str) -> dict:
        session = self._session(session_id)
        return {"chunk_index": session.chunk_index, "input_ended": session.input_ended,
                "sample_rate_hz": session.sample_rate_hz,
                "samples_received": session.characters[0].state.n_input_samples}

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
        self.recent.pop(session_id, None)

    def _session(self, session_id: str):
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"AudioEncoder has no session {session_id!r}") from None


# ============================================================================================ ScoreWorkerGroup


class ScoreStageWorker:
    """One pipelined score stage (a Ray actor on its own GPU): owns some denoising steps and their caches."""

    def __init__(self, settings: AppSettings, steps: list[int]):
        self.telemetry = setup_telemetry("facecast-score")
        self.stage, _ = _score_stage(settings)
        self.steps = steps
        self.sessions = {}

    def open(self, session_id, stream, reference_latent, text_states, regions) -> None:
        self.sessions[session_id] = self.stage.open(session_id, stream, reference_latent, text_states, regions,
                                                    steps=self.steps)

    def run(self, chunk: NoisyChunk, carrier: dict | None = None) -> NoisyChunk:
        with span(SCORE_STEP_SPAN, carrier, **{"session.id": chunk.session_id, "chunk.index": chunk.chunk_index,
                                               "step": ",".join(map(str, self.steps))}):
            return self.stage.run_steps(self.sessions[chunk.session_id], chunk)

    def set_sink(self, session_id: str, sink_latent: torch.Tensor) -> None:
        self.stage.set_sink(self.sessions[session_id], sink_latent)

    def set_prompt(self, session_id: str, text_states: torch.Tensor) -> None:
        self.stage.set_prompt(self.sessions[session_id], text_states)

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def gpu_ids(self) -> list[str]:
        return _gpu_ids()


def _device(settings: AppSettings) -> str:
    if settings.device == "cuda" and torch.cuda.is_available():
        return "cuda"  # Ray sets CUDA_VISIBLE_DEVICES to this worker's GPU
    return "cpu"


def _score_stage(settings: AppSettings) -> tuple[ScoreStage, str]:
    """The DiT of the settings' preset/checkpoint/seed on this worker's device, and the weights note."""
    preset, device = get_preset(settings.preset), _device(settings)
    dit, note = build_dit(preset, checkpoint=settings.checkpoint, device=device, dtype=settings.torch_dtype,
                          seed=settings.seed, audio_config=AudioConfig(backend=preset.audio_backend))
    return ScoreStage(dit, device, settings.torch_dtype), note


@serve.deployment(name="ScoreWorkerGroup", max_ongoing_requests=64)
class ScoreWorkerGroup:
    """The causal DiT for every session. Sequential: this replica runs every step. Pipelined: it runs step 0 and
    child actors (one GPU each, placed in this replica's placement group) run steps 1..S-1, chunk n+1 entering step 0
    while chunk n is in later steps."""

    def __init__(self, settings: AppSettings, vae):
        self.settings = settings
        self.telemetry = setup_telemetry("facecast-score")
        self.vae = vae
        preset, device = get_preset(settings.preset), _device(settings)
        self.stage, self.weights_note = _score_stage(settings)
        dit_config = self.stage.dit.config
        self.prompt_encoder = build_prompt_encoder(preset.text_encoder, dit_config.text_dim, dit_config.text_len)
        self.pipelined = settings.score_mode == "pipelined" and settings.steps > 1
        self.local_steps = [0] if self.pipelined else list(range(settings.steps))
        worker = ray.remote(num_cpus=0, num_gpus=1)(ScoreStageWorker)
        self.stage_workers = ([worker.remote(settings, [k]) for k in range(1, settings.steps)]
                              if self.pipelined else [])
        self.sessions = {}
        self.turns = ChunkTurns()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self.batcher = (MicroBatcher(self._denoise_group, settings.max_batch_size)
                        if not self.pipelined and settings.max_batch_size > 1 else None)
        # Self-contained layout (the baseline of the disaggregation benchmark): this worker decodes too.
        self.local_decoder = (LocalDecoder(DecodeStage(build_vae(preset, checkpoint=settings.checkpoint,
                                                                 device=device, seed=settings.seed)),
                                           settings.jpeg_quality, self._compute, settings.max_batch_size)
                              if settings.vae_placement == "colocated" else None)

    async def open(self, session_id: str, stream: StreamConfig, reference_latent: torch.Tensor, prompt: str,
                   characters: list[Character]) -> None:
        if stream.steps != self.settings.steps:
            raise ValueError(f"stream.steps={stream.steps} but this score group runs {self.settings.steps} steps")
        text_states = self.prompt_encoder([prompt])
        regions = region_masks(characters, *token_grid(self.stage.dit.config, reference_latent))
        self.sessions[session_id] = await self._compute(self.stage.open, session_id, stream, reference_latent,
                                                        text_states, regions, self.local_steps)
        await asyncio.gather(*(worker.open.remote(session_id, stream, reference_latent, text_states, regions)
                               for worker in self.stage_workers))
        if self.local_decoder is not None:
            self.local_decoder.open(session_id)

    async def _compute(self, fn, *args):
        return await run_on(self.executor, fn, *args)

    async def set_prompt(self, session_id: str, prompt: str) -> None:
        """New prompt conditioning on every stage; it applies from the next chunk that starts denoising."""
        text_states = self.prompt_encoder([prompt])
        await self._compute(self.stage.set_prompt, self.sessions[session_id], text_states)
        await asyncio.gather(*(worker.set_prompt.remote(session_id, text_states) for worker in self.stage_workers))

    async def generate(self, audio_input: ChunkAudioInput, carrier: dict | None = None) -> DecodedChunk:
        """Denoise one chunk (strictly after the session's previous chunk), then decode it on the VAEDecoder.

        Shielded: if the caller goes away (an ingress replica dies), the chunk still completes and lands in the
        VAEDecoder's replay buffer, so session state stays consistent and a re-attaching client gets it."""
        return await asyncio.shield(asyncio.ensure_future(self._generate(audio_input, carrier)))

    def progress(self, session_id: str) -> int:
        """The next chunk index this group will accept for the session (chunks below it were started)."""
        return self.turns.next_index(session_id)

    async def _generate(self, audio_input: ChunkAudioInput, carrier: dict | None) -> DecodedChunk:
        session_id, index = audio_input.session_id, audio_input.chunk_index
        session = self.sessions[session_id]
        started = time.perf_counter()
        await self.turns.wait(session_id, index)
        try:
            chunk = (None if self.batcher is not None and not self.pipelined
                     else await self._compute(self._first_steps, session, audio_input, carrier))
            if self.pipelined:
                refs = chunk
                for worker in self.stage_workers:
                    refs = worker.run.remote(refs, carrier)
                if index == 0 and session.stream.adaptive_sink:
                    chunk = await refs  # secondary warm-up: every stage needs the new sink before chunk 1
                    await self._set_sink_everywhere(session, chunk.latents[:, :, :1])
                    await self.turns.done(session_id, index)
                else:
                    await self.turns.done(session_id, index)  # chunk n+1 may enter step 0 now
                    chunk = await refs
            elif self.batcher is not None:
                chunk = await self.batcher.submit(ScoreStage.batch_key(session), (session, audio_input, carrier))
                await self.turns.done(session_id, index)
            else:
                await self.turns.done(session_id, index)
        except BaseException:
            await self.turns.done(session_id, index)
            raise
        score_ms = (time.perf_counter() - started) * 1000
        stage_ms = {"audio": audio_input.audio_s * 1000, "score": score_ms,
                    **{f"score_step_{k + 1}": s * 1000 for k, s in enumerate(chunk.step_s)}}
        if self.local_decoder is not None:
            return await self.local_decoder.decode(audio_input, chunk.latents, stage_ms, carrier)
        return await self.vae.decode.remote(audio_input, chunk.latents, stage_ms, carrier)

    async def fetch(self, session_id: str, chunk_index: int, timeout_s: float = 120.0) -> DecodedChunk:
        """Self-contained layout: the decoded chunk from this worker's replay buffer (see VAEDecoder.fetch)."""
        return await self.local_decoder.fetch(session_id, chunk_index, timeout_s)

    async def _denoise_group(self, group: list) -> list[NoisyChunk]:
        """One cross-session batch: a score span per chunk, one forward per step for all."""
        with contextlib.ExitStack() as spans:
            for session, audio_input, carrier in group:
                spans.enter_context(span(SCORE_STEP_SPAN, carrier, **{
                    "session.id": session.session_id, "chunk.index": audio_input.chunk_index, "step": "all",
                    "batch.size": len(group)}))
            return await self._compute(self.stage.denoise_batch, [item[0] for item in group],
                                       [item[1] for item in group])

    def _first_steps(self, session, audio_input: ChunkAudioInput, carrier) -> NoisyChunk:
        with span(SCORE_STEP_SPAN, carrier, **{"session.id": session.session_id,
                                               "chunk.index": audio_input.chunk_index,
                                               "step": ",".join(map(str, self.local_steps))}):
            if self.pipelined:
                return self.stage.run_steps(session, self.stage.begin_chunk(session, audio_input))
            return self.stage.denoise(session, audio_input)

    async def _set_sink_everywhere(self, session, sink_latent: torch.Tensor) -> None:
        await self._compute(self.stage.set_sink, session, sink_latent)
        await asyncio.gather(*(worker.set_sink.remote(session.session_id, sink_latent)
                               for worker in self.stage_workers))

    async def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
        self.turns.forget(session_id)
        if self.local_decoder is not None:
            self.local_decoder.close(session_id)
        await asyncio.gather(*(worker.close.remote(session_id) for worker in self.stage_workers))

    def batch_stats(self) -> dict:
        """Sizes of the recent cross-session batches: score forwards, and decodes when this worker decodes."""
        empty = {"batches": 0, "max_batch_size": 0, "mean_batch_size": 0.0}
        stats = self.batcher.stats() if self.batcher is not None else dict(empty)
        if self.local_decoder is not None:
            stats["decode"] = self.local_decoder.stats()
        return stats

    async def placement(self) -> dict:
        """GPU ids of this replica and of its stage actors (for placement checks)."""
        stages = await asyncio.gather(*(worker.gpu_ids.remote() for worker in self.stage_workers))
        return {"score": _gpu_ids(), "stages": [list(ids) for ids in stages], "weights": self.weights_note}


class MicroBatcher:
    """Cross-session batching: calls arriving within `wait_s` of each other (up to `max_batch_size`) whose keys are
    equal run as one group through `run_group(payloads) -> results`; every caller gets its own result (or the
    group's exception)."""

    def __init__(self, run_group, max_batch_size: int, wait_s: float = 0.003):
        self.run_group, self.max_batch_size, self.wait_s = run_group, max_batch_size, wait_s
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batch_sizes: deque = deque(maxlen=1000)

    async def submit(self, key, payload):
        if self.task is None or self.task.done():
            self.queue = asyncio.Queue()
            self.task = asyncio.ensure_future(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((key, payload, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(items) < self.max_batch_size:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:
                    break
            groups: dict = {}
            for key, payload, future in items:
                groups.setdefault(key, []).append((payload, future))
            for group in groups.values():
                self.batch_sizes.append(len(group))
                try:
                    results = await self.run_group([payload for payload, _ in group])
                except BaseException as error:
                    for _, future in group:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, future), result in zip(group, results):
                    if not future.done():
                        future.set_result(result)

    def stats(self) -> dict:
        sizes = list(self.batch_sizes)
        return {"batches": len(sizes), "max_batch_size": max(sizes, default=0),
                "mean_batch_size": float(np.mean(sizes)) if sizes else 0.0}


class LocalDecoder:
    """The decode half of a worker: per-session decode caches, cross-session batched decodes, JPEG encoding, and a
    replay buffer of recent chunks. `compute` runs a blocking function on the owner's device thread."""

    def __init__(self, stage: DecodeStage, jpeg_quality: int, compute, max_batch_size: int = 1):
        self.stage, self.jpeg_quality, self.compute = stage, jpeg_quality, compute
        self.caches: dict = {}
        self.replay_buffers: dict[str, deque] = {}
        self.turns = ChunkTurns()      # decode order per session
        self.buffered = ChunkTurns()   # replay-buffer order per session (JPEG encodes may finish out of order)
        self.batcher = MicroBatcher(self._decode_group, max_batch_size) if max_batch_size > 1 else None
        # JPEG encoding stays off the device thread, so the next decode starts while this chunk is encoded.
        self.jpeg_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="jpeg")

    def open(self, session_id: str) -> None:
        self.caches[session_id] = self.stage.open()
        self.replay_buffers[session_id] = deque(maxlen=REPLAY_CHUNKS)

    def close(self, session_id: str) -> None:
        self.caches.pop(session_id, None)
        self.replay_buffers.pop(session_id, None)
        self.turns.forget(session_id)
        self.buffered.forget(session_id)

    def stats(self) -> dict:
        return self.batcher.stats() if self.batcher is not None else {"batches": 0, "max_batch_size": 0,
                                                                      "mean_batch_size": 0.0}

    async def _decode_group(self, group: list) -> list[tuple[torch.Tensor, float]]:
        with contextlib.ExitStack() as spans:
            for audio_input, _, carrier in group:
                spans.enter_context(span(VAE_DECODE_SPAN, carrier, **{
                    "session.id": audio_input.session_id, "chunk.index": audio_input.chunk_index,
                    "batch.size": len(group)}))
            frames, vae_s = await self.compute(self.stage.decode_batch,
                                               [self.caches[item[0].session_id] for item in group],
                                               [item[1] for item in group], [item[0].num_frames for item in group])
        return [(item_frames, vae_s) for item_frames in frames]

    async def decode(self, audio_input: ChunkAudioInput, latents: torch.Tensor, stage_ms: dict,
                     carrier: dict | None) -> DecodedChunk:
        session_id, index = audio_input.session_id, audio_input.chunk_index
        try:
            decoded = await self._decode(audio_input, latents, stage_ms, carrier)
        except BaseException:
            await self.buffered.wait(session_id, index)   # keep the order for the session's later chunks
            await self.buffered.done(session_id, index)
            raise
        await self.buffered.wait(session_id, index)
        self.replay_buffers[session_id].append(decoded)
        await self.buffered.done(session_id, index)
        return decoded

    async def _decode(self, audio_input: ChunkAudioInput, latents: torch.Tensor, stage_ms: dict,
                      carrier: dict | None) -> DecodedChunk:
        session_id, index = audio_input.session_id, audio_input.chunk_index
        await self.turns.wait(session_id, index)
        try:
            if self.batcher is not None:
                frames, vae_s = await self.batcher.submit(tuple(latents.shape), (audio_input, latents, carrier))
            else:
                ((frames, vae_s),) = await self._decode_group([(audio_input, latents, carrier)])
        finally:
            await self.turns.done(session_id, index)
        jpeg = await run_on(self.jpeg_executor, encode_jpeg, frames, self.jpeg_quality)
        return DecodedChunk(
            session_id=session_id, chunk_index=index, first_frame=audio_input.first_frame, fps=audio_input.fps,
            width=int(frames.shape[-1]), height=int(frames.shape[-2]), frames_jpeg=jpeg,
            audio_pcm_s16le=pcm_to_s16le(audio_input.audio_pcm), sample_rate_hz=audio_input.sample_rate_hz,
            final=audio_input.final, stage_ms={**stage_ms, "vae": vae_s * 1000})

    async def fetch(self, session_id: str, chunk_index: int, timeout_s: float) -> DecodedChunk:
        await self.buffered.wait_past(session_id, chunk_index, timeout_s)
        for chunk in self.replay_buffers.get(session_id, ()):
            if chunk.chunk_index == chunk_index:
                return chunk
        raise KeyError(f"chunk {chunk_index} of session {session_id!r} is no longer buffered")

    def replay(self, session_id: str, from_chunk: int) -> tuple[list[DecodedChunk], int]:
        buffer = self.replay_buffers.get(session_id, deque())
        oldest = buffer[0].chunk_index if buffer else from_chunk
        return [chunk for chunk in buffer if chunk.chunk_index >= from_chunk], oldest


# ============================================================================================ VAEDecoder


@serve.deployment(name="VAEDecoder", max_ongoing_requests=64)
class VAEDecoder:
    """Reference encoding and streaming decode for every session; keeps the last chunks of each for replay."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.telemetry = setup_telemetry("facecast-vae")
        preset = get_preset(settings.preset)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vae")
        self.decoder = LocalDecoder(DecodeStage(build_vae(preset, checkpoint=settings.checkpoint,
                                                          device=_device(settings), seed=settings.seed)),
                                    settings.jpeg_quality, self._compute, settings.max_batch_size)

    async def _compute(self, fn, *args):
        return await run_on(self.executor, fn, *args)

    async def encode_reference(self, image: torch.Tensor) -> torch.Tensor:
        return await self._compute(self.decoder.stage.encode_reference, image)

    def open(self, session_id: str) -> None:
        self.decoder.open(session_id)

    async def decode(self, audio_input: ChunkAudioInput, latents: torch.Tensor, stage_ms: dict,
                     carrier: dict | None = None) -> DecodedChunk:
        """Decode in chunk order per session (shielded: completes even if the caller goes away)."""
        return await asyncio.shield(asyncio.ensure_future(
            self.decoder.decode(audio_input, latents, stage_ms, carrier)))

    async def fetch(self, session_id: str, chunk_index: int, timeout_s: float = 120.0) -> DecodedChunk:
        """Wait until chunk `chunk_index` of the session has been decoded, then return it from the replay buffer."""
        return await self.decoder.fetch(session_id, chunk_index, timeout_s)

    def replay(self, session_id: str, from_chunk: int) -> tuple[list[DecodedChunk], int]:
        """Buffered chunks with index >= from_chunk, and the oldest index still buffered."""
        return self.decoder.replay(session_id, from_chunk)

    def close(self, session_id: str) -> None:
        self.decoder.close(session_id)

    def placement(self) -> dict:
        return {"vae": _gpu_ids()}

    def batch_stats(self) -> dict:
        return self.decoder.stats()


# ============================================================================================ LLMBridge


@serve.deployment(name="LLMBridge", max_ongoing_requests=64)
class LLMBridge:
    """Where an audio LLM (OpenAI Realtime protocol, or the offline VAD -> ASR -> LLM -> TTS cascade) will turn a
    caller's speech into the avatar's reply audio.  Until a provider is configured (a later issue), sessions are
    driven by raw audio from the product backend and this deployment says so instead of pretending to answer."""

    def __init__(self, settings: AppSettings):
        self.settings = settings

    def status(self) -> dict:
        """Whether a provider is attached. The bridge (realtime LLM session per avatar session, reply audio pushed
        into AudioEncoder, barge-in clearing queued chunks) is the next delivery issue's work."""
        return {"available": False,
                "message": "no audio-LLM provider is configured; drive sessions with raw audio (StreamSession audio)"}
