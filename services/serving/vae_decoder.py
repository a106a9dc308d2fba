"""`VAEDecoder`: reference encoding and streaming decode for every session, on its own GPU (a thin Serve class over
`SessionDecoder`, which wraps `model_core.stages.DecodeStage`).

    ScoredChunk (from the score group, resolved here) ─► streaming VAE decode (per-session DecodeCache) ─► JPEG
        ─► DecodedFrames ─► the ingress (and this replica's replay buffer, for a re-attaching client)

The latents arrive in the message (or its ref), or — `latent_transport: collective` — over a latent link whose
receiving end lives here (`services.serving.latent_link`), the message carrying only a `LatentTicket`.

What may live here: per-session decode caches and replay buffers keyed by session id, the device thread, a JPEG
thread pool, the receiving ends of latent links.  After each chunk the session's decode cache goes to the
`ResumeStore` (taken on the device thread, before the next chunk changes it), so a replacement replica continues
the session exactly (`restore`: the last checkpoint of the cache, then the chunks since decoded again from their
latents, which are saved every chunk; see `services.serving.resume`); the replay buffer is not kept (a re-attach
after a decoder failure is told which chunks it can no longer get).  Chunks of one session decode strictly in
chunk order (`ChunkTurns`); chunks of different sessions with equal latent shapes decode as one batch
(`MicroBatcher`), and a member whose session is gone fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from PIL import Image
from ray import serve

from model_core.decode import DecodeStage
from model_core.fastdecode import FastDecodeCache
from model_core.models import build_fast_decoder, build_vae
from model_core.snapshot import pack, to_device, unpack
from services.media import decode_image_bytes, image_to_tensor
from services.serving.affinity import AFFINITY_ROUTER, ReportsSessions
from services.serving.latent_link import LatentReceiver, LinkError, drop_broken
from services.serving.messages import DecodedFrames, DecodeRequest, LinkedChunk, ScoredChunk
from services.serving.ordering import ChunkTurns, MicroBatcher, run_on
from services.serving.resume import DECODE_CHECKPOINT_CHUNKS, ResumeStore, SessionNotHere, restore_call
from services.serving.settings import REPLAY_CHUNKS, AppSettings
from services.telemetry import VAE_DECODE_SPAN, setup_telemetry, span

logger = logging.getLogger("facecast.vae_decoder")
LINK_BREAK_WAIT_S = 5.0
"""How long a new latent link waits for a dead sender's link to be seen broken before it is refused."""

def encode_jpeg(frames: torch.Tensor, quality: int) -> list[bytes]:
    """frames [T, 3, H, W] in [-1, 1] -> one baseline JPEG per frame (deterministic for the same pixels)."""
    pixels = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for frame in pixels:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def worker_identity(deployment: str) -> dict:
    """Which deployment, replica (actor id, pid) and GPU ids are doing the work, as seen from inside the worker."""
    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:       # outside a Serve replica (plain asyncio tests)
        replica = f"pid-{os.getpid()}"
    gpu_ids = [str(gpu) for gpu in ray.get_gpu_ids()] if ray.is_initialized() else []
    return {"deployment": deployment, "replica": replica, "gpu_ids": gpu_ids}


class SessionDecoder:
    """Decode caches, ordered and batched decodes, JPEG encoding and a replay buffer for many sessions.

    `compute(fn, *args)` runs a blocking call on the owner's device thread; `owner` names the deployment that hosts
    this decoder (reported in every `DecodedFrames.decoded_by`)."""

    def __init__(self, vae, settings: AppSettings, compute, owner: str):
        """Sessions choose the VAE's decoder or the preset's fast one (when it ships one for this VAE);
        `settings.decoder` is the default."""
        fast = build_fast_decoder(settings.preset_config, vae, device=vae.device, dtype=vae.dtype)
        self.stage = DecodeStage(vae, fast, settings.decoder)
        self.jpeg_quality, self.compute, self.owner = settings.jpeg_quality, compute, owner
        self.caches: dict = {}
        self.replay_buffers: dict[str, deque] = {}
        self.turns = ChunkTurns()      # decode order per session
        self.claimed: dict[str, set[int]] = {}   # chunks handed to this decoder and not yet decoded, per session
        self.buffered = ChunkTurns()   # replay-buffer order per session (JPEG encodes may finish out of order)
        self.batcher = (MicroBatcher(self._decode_group, settings.max_batch_size)
                        if settings.max_batch_size > 1 else None)
        # JPEG encoding stays off the device thread, so the next decode starts while this chunk is encoded.
        self.jpeg_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="jpeg")
        self.identity = None
        self.device = vae.device
        self.links: dict[str, LatentReceiver] = {}   # latent links by name (latent_transport 'collective')
        self.arrivals = {"message": 0, "link": 0}     # how decoded chunks' latents arrived
        self.resume = ResumeStore.from_settings(settings)

    async def prepare_link(self, backend: str, wait_s: float = LINK_BREAK_WAIT_S) -> None:
        """Before a score replica links up: on gloo (one group per process) a link whose sender died is torn down,
        waiting up to `wait_s` for its receiver to see the death; LinkError when a live link holds the group (the score
        side then sends its latents in the messages)."""
        if backend != "gloo" or not self.links:
            return
        deadline = asyncio.get_running_loop().time() + wait_s
        while any(link.error is None for link in self.links.values()) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        for name in drop_broken(self.links, backend):
            logger.warning("%s: latent link %s lost its sender; torn down for the next one", self.owner, name)
        if self.links:
            raise LinkError(f"{self.owner} already receives latent link {next(iter(self.links))!r}, and gloo allows "
                            "one group per process (on CPU a VAEDecoder replica takes one score replica's link)")

    async def accept_link(self, name: str, backend: str) -> None:
        """Join latent link `name` as its receiving end (the score side joins at the same time)."""
        receiver = LatentReceiver(name, backend, self.device, asyncio.get_running_loop())
        await asyncio.to_thread(receiver.join)
        self.links[name] = receiver

    def latent_stats(self) -> dict:
        """How the latents of the chunks decoded here arrived (in the message or its ref: through the object store;
        over a latent link), and per link: chunks and bytes received, kept (not yet decoded), broken or not."""
        return {"arrived": dict(self.arrivals), "links": [link.stats() for link in self.links.values()]}

    async def _take(self, ticket) -> torch.Tensor:
        link = self.links.get(ticket.link)
        if link is None:
            raise LinkError(f"{self.owner} is not the receiving end of latent link {ticket.link!r} (chunk "
                            f"{ticket.chunk_index} of session {ticket.session_id!r}); it has {sorted(self.links)}")
        return await link.take(ticket)

    def worker(self) -> dict:
        """Who decodes here: deployment, replica and GPU ids (looked up once)."""
        if self.identity is None:
            self.identity = worker_identity(self.owner)
        return dict(self.identity)

    async def encode_reference(self, image_png: bytes, width: int, height: int) -> torch.Tensor:
        """A validated PNG/JPEG -> its normalised latent [1, 16, 1, height/8, width/8] (cropped to the aspect)."""
        image = image_to_tensor(decode_image_bytes(image_png), width, height)
        return await self.compute(self.stage.encode_reference, image)

    def open(self, session_id: str, decoder: str | None = None, cache=None) -> None:
        """A new session (its choice of decoder saved for a replacement), or with `cache` a restored one."""
        if cache is None and self.resume is not None:
            self.resume.put(session_id, {"decode-open": (decoder or "").encode()})
        self.caches[session_id] = cache if cache is not None else self.stage.open(decoder or None)
        self.claimed[session_id] = set()
        self.replay_buffers[session_id] = deque(maxlen=REPLAY_CHUNKS)

    async def restore(self, session_id: str, at_chunk: int) -> dict:
        """Make sure this decoder holds the session: a replacement loads the last decode-cache checkpoint at or
        before chunk `at_chunk` and decodes the chunks from there to `at_chunk` again from their saved latents (the
        same decodes in the same order: the cache comes out exactly as it was). Returns restored (whether it
        loaded) and next (the next chunk it decodes)."""
        if session_id in self.caches:
            return {"restored": False, "next": self.turns.next_index(session_id)}
        store = restore_call(self.resume, session_id)
        decoder = store.need(session_id, "decode-open", "the decoder's choice").decode()
        saved = [int(name.split(":")[1]) for name in store.names(session_id, "decode:")]
        start = max((index for index in saved if index <= at_chunk), default=0)
        cache = (to_device(unpack(store.need(session_id, f"decode:{start}", f"the decode cache before chunk {start}")),
                             self.device) if start > 0 else self.stage.open(decoder or None))
        for index in range(start, at_chunk):
            latents = unpack(store.need(session_id, f"latents:{index}", f"chunk {index}'s latents"))
            await self.compute(self.stage.decode_batch, [cache], [latents.to(self.device)], [0])
        self.open(session_id, decoder, cache)
        if at_chunk > 0:
            await self.turns.done(session_id, at_chunk - 1)
            await self.buffered.done(session_id, at_chunk - 1)
        return {"restored": True, "next": at_chunk}

    def close(self, session_id: str) -> None:
        if self.caches.pop(session_id, None) is not None and self.resume is not None:
            self.resume.forget(session_id)
        for link in self.links.values():
            link.forget(session_id)
        self.claimed.pop(session_id, None)
        self.replay_buffers.pop(session_id, None)
        self.turns.forget(session_id)
        self.buffered.forget(session_id)

    def session_ids(self) -> list[str]:
        return list(self.caches)

    def held_bytes(self) -> int:
        """Bytes of decode caches and buffered JPEGs held for open sessions."""
        total = 0
        for cache in self.caches.values():
            state = cache.memory if isinstance(cache, FastDecodeCache) else cache.features
            total += sum(feature.nbytes for feature in state if torch.is_tensor(feature))
        for buffer in self.replay_buffers.values():
            total += sum(len(frame) for chunk in buffer for frame in chunk.frames_jpeg)
        return total + sum(link.held_bytes() for link in self.links.values())

    def stats(self) -> dict:
        return (self.batcher.stats() if self.batcher is not None
                else {"batches": 0, "max_batch_size": 0, "mean_batch_size": 0.0})

    async def decode(self, request: DecodeRequest, scored: ScoredChunk, carrier: dict | None) -> DecodedFrames:
        """Decode in chunk order per session; the result also lands in the replay buffer, in chunk order.

        Idempotent per chunk: a chunk this decoder already has (decoded, or waiting for its turn) is not decoded
        twice — a re-attaching ingress may hand over again a chunk whose first hand-over was still on its way."""
        session_id, index = request.session_id, request.chunk_index
        if session_id not in self.caches:
            raise SessionNotHere(f"{self.owner} has no session {session_id!r}")
        claimed = self.claimed.get(session_id, set())
        if index < self.turns.next_index(session_id) or index in claimed:
            return await self.fetch(session_id, index, 600.0)
        claimed.add(index)
        try:
            decoded = await self._decode(request, scored, carrier)
        except asyncio.CancelledError:   # shutting down (callers never cancel: `decode` is shielded): no turn wait
            raise
        except BaseException:
            if self.turns.next_index(session_id) > index:   # decoded, then failed: the later chunks go on
                await self.buffered.wait(session_id, index)
                await self.buffered.done(session_id, index)
            # else it never got its turn (its latents did not arrive: a pipelined step actor died): both turnstiles
            # stay at it, and the ingress sends it again after restoring the session
            raise
        finally:
            claimed.discard(index)   # from here on the turnstile says it was decoded (or failed)
        await self.buffered.wait(session_id, index)
        if session_id in self.replay_buffers:
            self.replay_buffers[session_id].append(decoded)
        await self.buffered.done(session_id, index)
        return decoded

    async def _decode(self, request: DecodeRequest, scored: ScoredChunk, carrier: dict | None) -> DecodedFrames:
        session_id, index = request.session_id, request.chunk_index
        stage_ms = dict(scored.stage_ms)
        latents, ticket = scored.latents, scored.ticket
        if scored.pending is not None:   # pipelined: the last step actor's output, resolved only here
            noisy = await scored.pending
            if isinstance(noisy, LinkedChunk):
                ticket = noisy.ticket
            else:
                latents = noisy.latents
            stage_ms.update({f"score_step_{k + 1}": s * 1000 for k, s in enumerate(noisy.step_s)})
            stage_ms["score"] = sum(noisy.step_s) * 1000
        if ticket is not None:   # latent_transport 'collective': they came over the latent link
            latents = await self._take(ticket)
        self.arrivals["message" if ticket is None else "link"] += 1
        await self.turns.wait(session_id, index)
        try:
            if self.batcher is not None:
                frames, vae_s, snapshot = await self.batcher.submit(tuple(latents.shape), (request, latents, carrier))
            else:
                (result,) = await self._decode_group([(request, latents, carrier)])
                if isinstance(result, BaseException):
                    raise result
                frames, vae_s, snapshot = result
        finally:
            await self.turns.done(session_id, index)
        if snapshot is not None:   # before this chunk is answered: whatever the ingress received is restorable
            await asyncio.to_thread(self._save, session_id, index, *snapshot)
        jpeg = await run_on(self.jpeg_executor, encode_jpeg, frames, self.jpeg_quality)
        return DecodedFrames(session_id=session_id, chunk_index=index, width=int(frames.shape[-1]),
                             height=int(frames.shape[-2]), frames_jpeg=jpeg, stage_ms={**stage_ms, "vae": vae_s * 1000},
                             decoded_by=self.worker())

    async def _decode_group(self, group: list) -> list:
        """One batch of decodes -> per member (frames [T, 3, H, W], seconds, decode-cache snapshot or None) or the
        member's own exception: a member whose session was closed while it waited fails alone (KeyError), the others
        decode."""
        results: list = [None] * len(group)
        live = []
        for position, (request, latents, carrier) in enumerate(group):
            if request.session_id in self.caches:
                live.append(position)
            else:
                results[position] = KeyError(f"session {request.session_id!r} was closed before chunk "
                                             f"{request.chunk_index} was decoded")
        if live:
            identity = self.worker()
            with contextlib.ExitStack() as spans:
                for position in live:
                    request, _, carrier = group[position]
                    spans.enter_context(span(VAE_DECODE_SPAN, carrier, **{
                        "session.id": request.session_id, "chunk.index": request.chunk_index,
                        "batch.size": len(live), "worker.deployment": identity["deployment"],
                        "worker.replica": identity["replica"], "gpu.ids": ",".join(identity["gpu_ids"])}))
                frames, vae_s, snapshots = await self.compute(
                    self._decode_and_snapshot, [self.caches[group[p][0].session_id] for p in live],
                    [group[p][1] for p in live], [group[p][0].num_frames for p in live],
                    [group[p][0].chunk_index for p in live])
            for position, item_frames, snapshot in zip(live, frames, snapshots):
                results[position] = (item_frames, vae_s, snapshot)
        return results

    def _decode_and_snapshot(self, caches: list, latents: list, num_frames: list[int], indices: list[int]):
        """On the device thread: the batch's decode, then per member (latents as bytes, the cache as bytes when the
        next chunk starts a checkpoint — taken before the cache changes again), or None without snapshots."""
        frames, vae_s = self.stage.decode_batch(caches, latents, num_frames)
        if self.resume is None:
            return frames, vae_s, [None] * len(caches)
        return frames, vae_s, [(pack(z), pack(cache) if (index + 1) % DECODE_CHECKPOINT_CHUNKS == 0 else None)
                               for z, cache, index in zip(latents, caches, indices)]

    def _save(self, session_id: str, index: int, latents: bytes, cache: bytes | None) -> None:
        """Chunk `index`'s latents (and a cache checkpoint before chunk index + 1), dropping what no restore needs."""
        keep = 2 * DECODE_CHECKPOINT_CHUNKS
        fields = {f"latents:{index}": latents, **({f"decode:{index + 1}": cache} if cache is not None else {})}
        self.resume.put(session_id, fields, drop=[f"latents:{index - keep}", f"decode:{index + 1 - keep}"])

    async def fetch(self, session_id: str, chunk_index: int, timeout_s: float) -> DecodedFrames:
        """Wait until chunk `chunk_index` of the session has been decoded, then return it from the replay buffer."""
        if session_id not in self.caches:
            raise SessionNotHere(f"{self.owner} has no session {session_id!r}")
        await self.buffered.wait_past(session_id, chunk_index, timeout_s)
        for chunk in self.replay_buffers.get(session_id, ()):
            if chunk.chunk_index == chunk_index:
                return chunk
        raise KeyError(f"chunk {chunk_index} of session {session_id!r} is no longer buffered")

    def never_received(self, session_id: str, below: int) -> list[int]:
        """Chunks with index < `below` (those the score group has started) never handed to this decoder."""
        claimed = self.claimed.get(session_id, set())
        return [index for index in range(self.turns.next_index(session_id), below) if index not in claimed]

    def oldest_buffered(self, session_id: str) -> int | None:
        """Index of the oldest chunk still in the replay buffer (None: nothing buffered yet)."""
        buffer = self.replay_buffers.get(session_id)
        return buffer[0].chunk_index if buffer else None


@serve.deployment(name="VAEDecoder", max_ongoing_requests=64, request_router_config=AFFINITY_ROUTER)
class VAEDecoder(ReportsSessions):
    """Reference encoding and streaming decode for every session; keeps the last chunks of each for replay."""

    def __init__(self, settings: AppSettings, vae=None):
        """`vae`: the StreamingVAE to serve (tests inject one); None builds it from the settings."""
        self.settings = settings
        self.telemetry = setup_telemetry("facecast-vae")
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vae")
        if vae is None:
            vae = build_vae(settings.preset_config, checkpoint=settings.checkpoint, device=settings.worker_device(),
                            seed=settings.seed)
        self.decoder = SessionDecoder(vae, settings, self._compute, "VAEDecoder")

    async def _compute(self, fn, *args):
        return await run_on(self.executor, fn, *args)

    async def encode_reference(self, image_png: bytes, width: int, height: int) -> torch.Tensor:
        return await self.decoder.encode_reference(image_png, width, height)

    def open_decode(self, session_id: str, decoder: str | None = None) -> None:
        self.decoder.open(session_id, decoder)

    async def restore_decode(self, session_id: str, at_chunk: int) -> dict:
        return await self.decoder.restore(session_id, at_chunk)

    async def prepare_latent_link(self, backend: str) -> None:
        """Free what a dead score replica's link held, before a new one joins (`SessionDecoder.prepare_link`)."""
        await self.decoder.prepare_link(backend)

    async def accept_latent_link(self, name: str, backend: str) -> None:
        """The receiving end of a latent link (latent_transport 'collective'); the score side joins meanwhile."""
        await self.decoder.accept_link(name, backend)

    def latent_stats(self) -> dict:
        return self.decoder.latent_stats()

    async def decode(self, request: DecodeRequest, scored: ScoredChunk, carrier: dict | None = None) -> DecodedFrames:
        """Decode in chunk order per session (shielded: completes even if the caller goes away)."""
        return await asyncio.shield(asyncio.ensure_future(self.decoder.decode(request, scored, carrier)))

    async def fetch(self, session_id: str, chunk_index: int, timeout_s: float = 120.0) -> DecodedFrames:
        return await self.decoder.fetch(session_id, chunk_index, timeout_s)

    def oldest_buffered(self, session_id: str) -> int | None:
        return self.decoder.oldest_buffered(session_id)

    def never_received(self, session_id: str, below: int) -> list[int]:
        return self.decoder.never_received(session_id, below)

    def close_decode(self, session_id: str) -> None:
        self.decoder.close(session_id)

    def decode_stats(self) -> dict:
        return self.decoder.stats()

    def session_ids(self) -> list[str]:
        return self.decoder.session_ids()

    def held_bytes(self) -> int:
        return self.decoder.held_bytes()

    def placement(self) -> dict:
        return {"vae": worker_identity("VAEDecoder")["gpu_ids"]}
