"""A worker loop waiting for its wake-up event stops when cancelled, whatever the timing."""

from __future__ import annotations

import asyncio

import pytest

from bot.pipeline.wakeup import wait_until_set


async def test_returns_when_set_or_after_the_timeout() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, event.set)
    await wait_until_set(event, 5)
    assert event.is_set()
    await wait_until_set(asyncio.Event(), 0.01)  # times out quietly


async def test_a_cancel_arriving_as_the_event_is_set_stops_the_loop() -> None:
    # asyncio.wait_for on Python 3.11 returns the event's result here and drops the
    # cancellation: the loop below would then run forever and a shutdown wait on it.
    event = asyncio.Event()
    rounds = 0

    async def worker() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            event.clear()
            await wait_until_set(event, 30)

    task = asyncio.create_task(worker())
    await asyncio.sleep(0)  # the worker is waiting now
    event.set()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done, f"worker still running after cancel ({rounds} rounds)"
    with pytest.raises(asyncio.CancelledError):
        task.result()
