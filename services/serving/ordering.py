"""Ordering and batching helpers shared by the worker deployments (plain asyncio; no Ray, no torch).

    ChunkTurns     per-session turnstile: chunk n of a session enters a stage only after chunk n-1 left it
    MicroBatcher   cross-session batching: requests arriving within a few ms with equal keys run as one group;
                   each member gets its own result or its own exception
    run_on         run a blocking call on a worker's device thread without blocking its event loop
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor


class ChunkTurns:
    """Per-session turnstile: chunk n of a session may enter only after chunk n-1 left."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}
        self._changed = asyncio.Condition()

    async def wait(self, session_id: str, chunk_index: int, timeout_s: float = 600.0) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that arrives as the
        # condition comes true, and the caller then runs on into a batcher that was cancelled with it (a hang)
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: self._next.get(session_id, 0) == chunk_index)

    async def wait_past(self, session_id: str, chunk_index: int, timeout_s: float = 600.0) -> None:
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: self._next.get(session_id, 0) > chunk_index)

    async def done(self, session_id: str, chunk_index: int) -> None:
        async with self._changed:
            self._next[session_id] = chunk_index + 1
            self._changed.notify_all()

    def next_index(self, session_id: str) -> int:
        return self._next.get(session_id, 0)

    def forget(self, session_id: str) -> None:
        self._next.pop(session_id, None)


class MicroBatcher:
    """Cross-session batching: calls arriving within `wait_s` of each other (up to `max_batch_size`) whose keys are
    equal run as one group through `run_group(payloads) -> results`.

    `results` has one entry per payload: a value, or an exception instance for a member that failed alone (e.g. its
    session was closed while its chunk waited). Only that member's caller sees it; the others get their results.
    An exception raised by `run_group` itself (the shared forward failed) reaches every member of the group.
    """

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
                except asyncio.CancelledError:      # the batcher itself is stopping: its callers are told, it stops
                    for _, future in (member for members in groups.values() for member in members):
                        future.cancel()
                    raise
                except BaseException as error:
                    results = [error] * len(group)
                for (_, future), result in zip(group, results):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    def stats(self) -> dict:
        sizes = list(self.batch_sizes)
        return {"batches": len(sizes), "max_batch_size": max(sizes, default=0),
                "mean_batch_size": sum(sizes) / len(sizes) if sizes else 0.0}


async def run_on(executor: ThreadPoolExecutor, fn, *args):
    """Run blocking `fn(*args)` on a worker's device thread without blocking its event loop."""
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
