"""The latent link between two real Ray actors over Ray's collective API (gloo on CPU: the code path NCCL takes on
GPUs): what arrives is what was sent, whatever order the decoder asks in; a closed session's latents are not kept; a
sender going away fails the waiting decoder at once instead of at its timeout."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

pytestmark = pytest.mark.integration

SHAPES = {"a": ((1, 16, 3, 8, 8), torch.float32), "b": ((1, 16, 2, 4, 6), torch.bfloat16)}


def expected(session_id: str, chunk_index: int) -> torch.Tensor:
    """The latents the sender sends for (session, chunk), rebuilt independently from a seed."""
    shape, dtype = SHAPES[session_id]
    generator = torch.Generator().manual_seed(1000 * ord(session_id) + chunk_index)
    return torch.randn(shape, generator=generator).to(dtype)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    assert not ray.is_initialized(), "an earlier test leaked a Ray instance into this process"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def _actors(ray):
    @ray.remote(num_cpus=0)
    class Sender:
        def join(self, name):
            from services.serving.latent_link import LatentSender

            self.sender = LatentSender(name, "gloo", "cpu")
            self.sender.join()

        def send(self, items):
            tickets = [self.sender.send(session_id, index, expected(session_id, index)) for session_id, index in items]
            return tickets

        def close(self):
            self.sender.close()

    @ray.remote(num_cpus=0)
    class Receiver:
        async def join(self, name):
            from services.serving.latent_link import LatentReceiver

            self.receiver = LatentReceiver(name, "gloo", "cpu", asyncio.get_running_loop())
            await asyncio.to_thread(self.receiver.join)

        async def take(self, tickets, timeout_s=60.0):
            out = []
            for ticket in tickets:
                try:
                    out.append(await self.receiver.take(ticket, timeout_s))
                except Exception as error:   # noqa: BLE001 - the test reads the message
                    out.append(f"{type(error).__name__}: {error}")
            return out

        def forget(self, session_id):
            self.receiver.forget(session_id)

        def stats(self):
            return {**self.receiver.stats(), "held_bytes": self.receiver.held_bytes()}

    return Sender, Receiver


def _linked(ray, name):
    Sender, Receiver = _actors(ray)
    sender, receiver = Sender.remote(), Receiver.remote()
    ray.get([sender.join.remote(name), receiver.join.remote(name)], timeout=60)
    return sender, receiver


def test_latents_arrive_as_sent_in_any_order_the_decoder_asks(ray_local):
    ray = ray_local
    sender, receiver = _linked(ray, "test-link-order")
    items = [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2)]
    tickets = ray.get(sender.send.remote(items))
    assert [(t.session_id, t.chunk_index, t.shape, t.dtype) for t in tickets] == [
        (s, i, SHAPES[s][0], str(SHAPES[s][1])) for s, i in items]
    asked = [tickets[4], tickets[1], tickets[0], tickets[3], tickets[2]]   # another order than sent
    got = ray.get(receiver.take.remote(asked), timeout=60)
    for ticket, latents in zip(asked, got):
        assert isinstance(latents, torch.Tensor), latents
        want = expected(ticket.session_id, ticket.chunk_index)
        assert latents.dtype == want.dtype and torch.equal(latents, want), (ticket.session_id, ticket.chunk_index)
    stats = ray.get(receiver.stats.remote())
    assert stats["received"] == 5 and stats["kept"] == 0 and stats["held_bytes"] == 0
    assert stats["received_bytes"] == sum(expected(s, i).nbytes for s, i in items)


def test_a_closed_sessions_latents_are_dropped_and_the_link_goes_on(ray_local):
    ray = ray_local
    sender, receiver = _linked(ray, "test-link-forget")
    ray.get(sender.send.remote([("a", 0), ("b", 0)]))
    deadline = time.monotonic() + 30
    while ray.get(receiver.stats.remote())["kept"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ray.get(receiver.stats.remote())["held_bytes"] == expected("a", 0).nbytes + expected("b", 0).nbytes
    ray.get(receiver.forget.remote("a"))
    late = ray.get(sender.send.remote([("a", 1), ("b", 1)]))   # "a" closed while its next chunk was in flight
    (b1,) = ray.get(receiver.take.remote([late[1]]), timeout=60)
    assert torch.equal(b1, expected("b", 1))
    stats = ray.get(receiver.stats.remote())
    assert stats["received"] == 4 and stats["kept"] == 1, "only b's chunk 0 is kept; a's are gone"
    assert stats["held_bytes"] == expected("b", 0).nbytes


def test_the_decoder_fails_at_once_when_the_sender_goes_away(ray_local):
    ray = ray_local
    sender, receiver = _linked(ray, "test-link-close")
    (ticket,) = ray.get(sender.send.remote([("a", 0)]))
    missing = ticket.__class__(ticket.link, "a", 1, ticket.shape, ticket.dtype)   # never sent
    waiting = receiver.take.remote([missing], 120.0)
    time.sleep(0.5)
    ray.get(sender.close.remote())
    started = time.monotonic()
    (error,) = ray.get(waiting, timeout=60)
    assert time.monotonic() - started < 30
    assert isinstance(error, str) and "LinkError" in error and "test-link-close" in error and "closed" in error, error
    assert ray.get(receiver.stats.remote())["broken"]
