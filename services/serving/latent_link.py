"""The latent link: a chunk's clean latents from the score process to the VAEDecoder, device to device.

    score replica (sequential)             LatentSender.send(session, chunk, latents) -> LatentTicket (in the message)
    or the last step actor (pipelined)         └─ sender thread: header, payload ──► Ray collective p2p (NCCL | gloo)
                                                                                          │
    VAEDecoder replica                     receiver thread: header, payload ──► kept by (session, chunk) ──► take()

`latent_transport: collective` (AppSettings).  Without it the latents travel inside the `ScoredChunk` through Ray's
object store, i.e. through host memory on both ends.  With it they go over a two-rank group of Ray's collective API
(`ray.util.collective`): NCCL when the tensors live on GPUs (device to device; Ray's NCCL group needs cupy, the `gpu`
extra), gloo on CPU — the same code path, which is what the tests run.  The message keeps a `LatentTicket` only.

The wire: each item is an int64 header [kind, session key, chunk index, dtype, ndim, shape...] then, for latents, the
payload. One thread per end owns the group, so sends and receives match in order however the decoder's requests
interleave; the receiver keeps what arrived until the decode of that chunk takes it (or the session closes).  An idle
sender sends a keepalive header now and then, so a receiver's blocking wait never runs into the backend's timeout.
Neither end runs on the score or decode thread: a send never waits for the decoder, a receive never delays a decode.

On CUDA the sender waits for an event recorded when the latents were handed over (they are complete by then: the
step clock resolves once per chunk) and the receiver synchronises its device after a receive before the tensor is
handed out: both waits sit on the link's threads, not in the per-step path.

A link joins one sender process and one decoder process. gloo (torch.distributed) allows one group per process, so on
CPU a process takes part in one link; NCCL groups have no such limit. When a sender dies, its receiver sees the link
break; before the next link joins, the decoder tears a broken gloo link down (`drop_broken`), so a replacement score
replica links up again. Where no link can be had (a live gloo link already held), the score side sends its latents
in the messages instead (`ScoreWorkerGroup._ensure_link`): slower, never a failed call.
"""

from __future__ import annotations

import asyncio
import hashlib
import queue
import threading
import time
import uuid
from collections import deque

import torch

from services.serving.messages import LatentTicket

KIND_LATENTS, KIND_KEEPALIVE, KIND_CLOSE = 1, 2, 3
MAX_DIMS = 7
HEADER_LEN = 5 + MAX_DIMS
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KEEPALIVE_S = 20.0
SENDER_RANK, RECEIVER_RANK = 0, 1


class LinkError(RuntimeError):
    """The latent link cannot carry latents (not available, not joined, or broken); the message says which."""


def backend_for(device: str | torch.device) -> str:
    """NCCL between GPUs, gloo on CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def check_available(backend: str) -> None:
    """Raise LinkError naming the fix when this Ray install cannot run `backend` (NCCL needs cupy)."""
    from ray.util import collective

    available = collective.nccl_available() if backend == "nccl" else collective.gloo_available()
    if not available:
        fix = ("Ray's NCCL group needs cupy: pip install 'facecast[gpu]' (cupy-cuda12x)" if backend == "nccl"
               else "Ray's gloo group needs torch.distributed")
        raise LinkError(f"latent_transport='collective' needs the {backend} backend of ray.util.collective, which "
                        f"is not available here ({fix}); or set latent_transport: object_store")


def new_link_name() -> str:
    return f"facecast-latents-{uuid.uuid4().hex[:12]}"


def session_key(session_id: str) -> int:
    """A session id as a non-negative int64 for the header (the receiver keys what it keeps by it)."""
    return int.from_bytes(hashlib.blake2b(session_id.encode(), digest_size=7).digest(), "big")


def _join(name: str, rank: int, backend: str) -> None:
    """Join the two-rank group `name` (blocks until the other end joins too)."""
    from ray.util import collective

    check_available(backend)
    if backend == "gloo":
        import torch.distributed as dist

        if dist.is_initialized():
            raise LinkError(f"this process already takes part in a gloo group, and gloo allows one per process: on "
                            f"CPU a decoder takes one latent link (one score replica per VAEDecoder replica); link "
                            f"{name!r} refused")
    collective.init_collective_group(2, rank, backend=backend, group_name=name)


def drop_broken(links: dict, backend: str) -> list[str]:
    """Tear down the links of `links` (name -> LatentReceiver, removed from it) whose sender is gone, freeing the
    process's gloo group for the next link. Returns their names."""
    from ray.util import collective

    broken = [name for name, link in links.items() if link.error is not None]
    for name in broken:
        links.pop(name)
        try:
            collective.destroy_collective_group(name)
        except Exception:   # already gone with its peer
            pass
    if backend == "gloo" and broken and not links:
        import torch.distributed as dist

        if dist.is_initialized():    # the default group came with the dead link: gloo's one group per process
            dist.destroy_process_group()
    return broken


class LatentSender:
    """The score side of a link: `send` queues a chunk's latents and returns its ticket at once."""

    def __init__(self, name: str, backend: str, device: str | torch.device):
        self.name, self.backend, self.device = name, backend, torch.device(device)
        self.queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.sent = 0
        self.sent_bytes = 0
        self.thread: threading.Thread | None = None

    def join(self) -> None:
        """Blocking: join the group (the decoder joins at the same time), then start the sender thread."""
        _join(self.name, SENDER_RANK, self.backend)
        self.thread = threading.Thread(target=self._run, name=f"{self.name}-send", daemon=True)
        self.thread.start()

    def send(self, session_id: str, chunk_index: int, latents: torch.Tensor) -> LatentTicket:
        """Queue latents [..] (at most 7 dims) for the decoder; the ticket goes in the message instead."""
        if self.thread is None:
            raise LinkError(f"latent link {self.name!r} was not joined")
        if self.error is not None:
            raise LinkError(f"latent link {self.name!r} is broken: {self.error}") from self.error
        if latents.dtype not in DTYPES or latents.dim() > MAX_DIMS:
            raise LinkError(f"latent link carries {MAX_DIMS} dims at most of {[str(d) for d in DTYPES]}; got "
                            f"{latents.dtype} with shape {tuple(latents.shape)}")
        ready = None
        if latents.is_cuda:   # recorded on the stream that produced them; the sender thread waits for it
            ready = torch.cuda.Event()
            ready.record()
        self.queue.put((session_id, chunk_index, latents, ready))
        return LatentTicket(self.name, session_id, chunk_index, tuple(latents.shape), str(latents.dtype))

    def close(self) -> None:
        """Tell the receiver this end is going away (its waiters fail at once rather than at a timeout)."""
        if self.thread is not None and self.error is None:
            self.queue.put(None)

    def _run(self) -> None:
        from ray.util import collective

        while True:
            try:
                item = self.queue.get(timeout=KEEPALIVE_S)
            except queue.Empty:
                item = KIND_KEEPALIVE
            try:
                if item is None or item == KIND_KEEPALIVE:
                    kind = KIND_CLOSE if item is None else KIND_KEEPALIVE
                    collective.send(_header(kind, device=self.device), RECEIVER_RANK, self.name)
                    if item is None:
                        return
                    continue
                session_id, chunk_index, latents, ready = item
                if ready is not None:
                    ready.synchronize()
                payload = latents.contiguous()
                collective.send(_header(KIND_LATENTS, session_key(session_id), chunk_index, payload.dtype,
                                        payload.shape, payload.device), RECEIVER_RANK, self.name)
                collective.send(payload, RECEIVER_RANK, self.name)
                self.sent += 1
                self.sent_bytes += payload.nbytes
            except BaseException as error:   # the peer went away: every later send says so
                self.error = error
                return


def _header(kind: int, key: int = 0, chunk_index: int = 0, dtype=torch.float32, shape=(), device=None):
    values = [kind, key, chunk_index, DTYPES.index(dtype), len(shape), *shape]
    values += [0] * (HEADER_LEN - len(values))
    return torch.tensor(values, dtype=torch.int64, device=device)


class LatentReceiver:
    """The decoder side of a link: a thread receives everything the sender sends and keeps it for `take`."""

    def __init__(self, name: str, backend: str, device: str | torch.device, loop: asyncio.AbstractEventLoop,
                 forget_after: int = 4096):
        self.name, self.backend, self.device, self.loop = name, backend, torch.device(device), loop
        self.kept: dict[tuple[int, int], torch.Tensor] = {}
        self.waiters: dict[tuple[int, int], asyncio.Future] = {}
        self.closed_sessions: deque = deque(maxlen=forget_after)   # keys whose late arrivals are dropped
        self.error: BaseException | None = None
        self.received = 0
        self.received_bytes = 0
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def join(self) -> None:
        """Blocking: join the group (the sender joins at the same time), then start the receiver thread."""
        _join(self.name, RECEIVER_RANK, self.backend)
        self.thread = threading.Thread(target=self._run, name=f"{self.name}-recv", daemon=True)
        self.thread.start()

    async def take(self, ticket: LatentTicket, timeout_s: float = 120.0) -> torch.Tensor:
        """The latents of the ticket's chunk, once they have arrived (they are handed out once)."""
        key = (session_key(ticket.session_id), ticket.chunk_index)
        with self.lock:
            if key in self.kept:
                return self.kept.pop(key)
            if self.error is not None:
                raise LinkError(f"latent link {self.name!r} is broken: {self.error}") from self.error
            future = self.waiters.setdefault(key, self.loop.create_future())
        try:
            latents = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            raise LinkError(f"latent link {self.name!r}: chunk {ticket.chunk_index} of session "
                            f"{ticket.session_id!r} did not arrive within {timeout_s:.0f} s") from None
        finally:
            with self.lock:
                if self.waiters.get(key) is future:
                    del self.waiters[key]
        if tuple(latents.shape) != tuple(ticket.shape) or str(latents.dtype) != ticket.dtype:
            raise LinkError(f"latent link {self.name!r}: chunk {ticket.chunk_index} of session "
                            f"{ticket.session_id!r} arrived as {latents.dtype} {tuple(latents.shape)}, the ticket "
                            f"says {ticket.dtype} {ticket.shape}")
        return latents

    def forget(self, session_id: str) -> None:
        """Drop what is kept for a closed session, and whatever of it arrives later."""
        key = session_key(session_id)
        with self.lock:
            self.closed_sessions.append(key)
            for kept in [k for k in self.kept if k[0] == key]:
                del self.kept[kept]

    def held_bytes(self) -> int:
        with self.lock:
            return sum(tensor.nbytes for tensor in self.kept.values())

    def stats(self) -> dict:
        return {"link": self.name, "backend": self.backend, "received": self.received,
                "received_bytes": self.received_bytes, "kept": len(self.kept),
                "broken": None if self.error is None else str(self.error)}

    def _run(self) -> None:
        from ray.util import collective

        while True:
            try:
                header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
                collective.recv(header, SENDER_RANK, self.name)
                self._settle()
                kind, key, chunk_index, dtype, ndim, *shape = header.tolist()
                if kind == KIND_KEEPALIVE:
                    continue
                if kind == KIND_CLOSE:
                    raise LinkError("the sender closed the link")
                payload = torch.empty(shape[:ndim], dtype=DTYPES[dtype], device=self.device)
                collective.recv(payload, SENDER_RANK, self.name)
                self._settle()
            except BaseException as error:
                self._fail(error)
                return
            self._arrived((key, chunk_index), payload)

    def _settle(self) -> None:
        """On CUDA, a receive is queued on the group's own stream: wait for it before the tensor is read or handed
        out (this thread only; the decode stream never waits here)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _arrived(self, key: tuple[int, int], payload: torch.Tensor) -> None:
        with self.lock:
            self.received += 1
            self.received_bytes += payload.nbytes
            if key[0] in self.closed_sessions:
                return
            future = self.waiters.get(key)
            if future is None:
                self.kept[key] = payload
                return
        self.loop.call_soon_threadsafe(_resolve, future, payload)

    def _fail(self, error: BaseException) -> None:
        with self.lock:
            self.error = error
            waiting = list(self.waiters.values())
        failure = LinkError(f"latent link {self.name!r} is broken: {error}")
        for future in waiting:
            self.loop.call_soon_threadsafe(_reject, future, failure)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


async def connect(sender_join, receiver_accept, timeout_s: float = 60.0) -> None:
    """Join both ends at once: `sender_join` a blocking callable (run in a thread) or an awaitable, and
    `receiver_accept` an awaitable (the decoder's accept call). A clear error when either end does not join."""
    started = time.monotonic()
    sender = asyncio.to_thread(sender_join) if callable(sender_join) else sender_join
    try:
        await asyncio.wait_for(asyncio.gather(sender, receiver_accept), timeout_s)
    except TimeoutError:
        raise LinkError(f"the latent link's two ends did not join within {time.monotonic() - started:.0f} s") from None
