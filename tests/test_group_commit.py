"""GroupCommit: shared transactions, and no submitter can cancel another's write."""

from __future__ import annotations

import asyncio

import pytest

from bot.db.group_commit import GroupCommit
from bot.errors import StoreUnavailable


class Recorder:
    def __init__(self, delay_s: float = 0.05, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.fail = fail

    async def write(self, batch: list[int]) -> list[int]:
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("disk full")
        self.batches.append(batch)
        return [item * 10 for item in batch]


async def test_concurrent_items_share_batches() -> None:
    rec = Recorder()
    commits: GroupCommit[int, int] = GroupCommit(rec.write)
    results = await asyncio.gather(*(commits.submit(i) for i in range(50)))
    assert results == [i * 10 for i in range(50)]
    assert len(rec.batches) <= 2  # the first item alone, then everything that queued


async def test_a_cancelled_submitter_does_not_cancel_the_shared_write() -> None:
    rec = Recorder()
    commits: GroupCommit[int, int] = GroupCommit(rec.write)
    first = asyncio.create_task(commits.submit(1))  # starts the drain
    await asyncio.sleep(0)
    others = [asyncio.create_task(commits.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    first.cancel()  # e.g. the client behind it went away
    assert await asyncio.gather(*others) == [20, 30]
    await commits.idle()
    assert sorted(i for batch in rec.batches for i in batch) == [1, 2, 3]


async def test_a_failed_transaction_fails_its_items() -> None:
    commits: GroupCommit[int, int] = GroupCommit(Recorder(fail=True).write)
    results = await asyncio.gather(*(commits.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_a_stopped_writer_says_so() -> None:
    commits: GroupCommit[int, int] = GroupCommit(Recorder(delay_s=10).write)
    pending = asyncio.create_task(commits.submit(1))
    await asyncio.sleep(0.01)
    assert commits._drainer is not None
    commits._drainer.cancel()
    with pytest.raises(StoreUnavailable, match="writer stopped"):
        await pending


async def test_idle_passes_on_its_callers_cancellation_and_the_write_goes_on() -> None:
    rec = Recorder(delay_s=0.2)
    commits: GroupCommit[int, int] = GroupCommit(rec.write)
    submitted = asyncio.create_task(commits.submit(1))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(commits.idle())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await submitted == 10  # the write itself was not stopped
    await commits.idle()  # nothing pending: returns at once


async def test_waiting_counts_the_items_behind_the_transaction_being_written() -> None:
    rec = Recorder(delay_s=0.02)
    commits: GroupCommit[int, int] = GroupCommit(rec.write)
    first = asyncio.create_task(commits.submit(1))
    await asyncio.sleep(0.005)  # the drain task has taken 1 and is writing it
    assert commits.waiting() == 0
    later = [asyncio.create_task(commits.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    assert commits.waiting() == 2
    assert list(await asyncio.gather(first, *later)) == [10, 20, 30]
    assert commits.waiting() == 0 and rec.batches == [[1], [2, 3]]
