"""The ordering helpers without Ray: the cross-session micro-batcher and the per-session chunk turnstile."""

import asyncio

from services.serving.ordering import ChunkTurns, MicroBatcher


def test_micro_batcher_groups_concurrent_calls_by_key_and_reports_errors():
    calls = []

    async def run_group(payloads):
        calls.append(list(payloads))
        if "boom" in payloads:
            raise RuntimeError("group failed")
        return [payload * 2 for payload in payloads]

    async def main():
        batcher = MicroBatcher(run_group, max_batch_size=8, wait_s=0.05)
        results = await asyncio.gather(batcher.submit("a", 1), batcher.submit("a", 2), batcher.submit("b", 10),
                                       batcher.submit("a", 3))
        failed = await asyncio.gather(batcher.submit("c", "boom"), return_exceptions=True)
        return results, failed, batcher.stats()

    results, failed, stats = asyncio.run(main())
    assert results == [2, 4, 20, 6]
    assert sorted(map(sorted, calls[:2]), key=len) == [[10], [1, 2, 3]], "one group per key"
    assert isinstance(failed[0], RuntimeError) and stats["max_batch_size"] == 3


def test_micro_batcher_fails_only_the_member_whose_result_is_an_exception():
    async def run_group(payloads):
        return [KeyError(f"{payload} is gone") if payload < 0 else payload * 2 for payload in payloads]

    async def outcome(call):
        try:
            return "returned", await call
        except KeyError as error:
            return "raised", error

    async def main():
        batcher = MicroBatcher(run_group, max_batch_size=8, wait_s=0.05)
        results = await asyncio.gather(*(outcome(batcher.submit("k", payload)) for payload in (1, -1, 3)))
        return results, batcher.stats()

    results, stats = asyncio.run(main())
    assert stats["max_batch_size"] == 3
    assert results[0] == ("returned", 2) and results[2] == ("returned", 6)
    assert results[1][0] == "raised" and isinstance(results[1][1], KeyError)   # raised to its caller, not returned


def test_chunk_turns_enforce_chunk_order_per_session():
    order = []

    async def main():
        turns = ChunkTurns()

        async def chunk(session, index):
            await turns.wait(session, index, timeout_s=5)
            order.append((session, index))
            await asyncio.sleep(0)
            await turns.done(session, index)

        await asyncio.gather(chunk("x", 2), chunk("y", 0), chunk("x", 1), chunk("x", 0), chunk("y", 1))

    asyncio.run(main())
    assert [i for s, i in order if s == "x"] == [0, 1, 2] and [i for s, i in order if s == "y"] == [0, 1]


def test_a_cancelled_micro_batcher_stops_and_cancels_its_waiting_callers():
    """It used to take its own cancellation for a failed group and wait for more work: asyncio.run never ended."""
    started = asyncio.Event()

    async def run_group(payloads):
        started.set()
        await asyncio.sleep(3600)

    async def main():
        batcher = MicroBatcher(run_group, max_batch_size=4)
        caller = asyncio.ensure_future(batcher.submit("k", 1))
        await started.wait()
        batcher.task.cancel()
        done, _ = await asyncio.wait({batcher.task, caller}, timeout=2)
        return batcher.task in done, caller in done and caller.cancelled()

    assert asyncio.run(main()) == (True, True)
