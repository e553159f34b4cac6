"""RedisStreamsPublisher.close() stops its sender and lease loop even when a cancellation is
lost: on Python 3.11, asyncio.wait_for (redis-py's socket writes) returns the result instead of
raising when the cancel lands in the tick its operation completes (CPython gh-86296). The lease
loop then ran on and close() waited for it forever."""

from __future__ import annotations

import asyncio
import sys

from callscribe.publish.redis_streams import _stop


async def test_stop_ends_a_loop_whose_first_cancellation_was_swallowed() -> None:
    rounds = 0
    pending: list[asyncio.Future[None]] = []

    async def loop() -> None:  # shaped like keep_lease: one "Redis round", then sleep
        nonlocal rounds
        while True:
            operation = asyncio.get_running_loop().create_future()
            pending.append(operation)
            await asyncio.wait_for(operation, 5)
            rounds += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)  # the loop now waits inside wait_for
    pending[0].set_result(None)
    task.cancel()  # in the same tick as the result: 3.11's wait_for drops this cancel
    if sys.version_info < (3, 12):
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert rounds == 1 and not task.done(), "the race this test is about did not happen"
    async with asyncio.timeout(5):
        await _stop(task)
    assert task.cancelled()


async def test_stop_of_a_finished_task_returns() -> None:
    async def nothing() -> None:
        return None

    task = asyncio.create_task(nothing())
    await task
    async with asyncio.timeout(1):
        await _stop(task)
    assert task.done() and not task.cancelled()
