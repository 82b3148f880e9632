"""GroupCommit and ThreadGroupCommit: shared transactions, and no submitter can cancel
another's write. The semantics they share run against both."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from bot.db.group_commit import GroupCommit, ThreadGroupCommit
from bot.errors import StoreUnavailable

Commits = GroupCommit[int, int] | ThreadGroupCommit[int, list[int], int]


class Recorder:
    """Writes batches (each item times ten) in `delay_s`, on the loop or on a thread."""

    def __init__(self, delay_s: float = 0.05) -> None:
        self.delay_s = delay_s
        self.fail = False
        self.log: list[object] = []  # batches and other jobs, in the order they ran
        self.threads: set[str] = set()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writes")

    def batches(self) -> list[list[int]]:
        return [entry for entry in self.log if isinstance(entry, list)]

    def _written(self, batch: list[int]) -> list[int]:
        if self.fail:
            raise OSError("disk full")
        self.log.append(batch)
        return [item * 10 for item in batch]

    # GroupCommit: an async write on the loop.
    async def write(self, batch: list[int]) -> list[int]:
        await asyncio.sleep(self.delay_s)
        return self._written(batch)

    # ThreadGroupCommit: a write on the thread, its answers made on the loop.
    def start(self, job: object) -> None:
        assert callable(job)
        self.pool.submit(job)

    def write_here(self, batch: list[int]) -> list[int]:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        return self._written(batch)

    def finish(self, batch: list[int], written: list[int]) -> list[int]:
        assert threading.current_thread() is threading.main_thread()
        return written

    def failed(self, batch: list[int], exc: Exception) -> Exception:
        return StoreUnavailable(f"database unavailable: {exc}")

    def commits(self, kind: str, slice_s: float = 0.02) -> Commits:
        if kind == "loop":
            return GroupCommit(self.write)
        return ThreadGroupCommit(
            self.start, self.write_here, self.finish, self.failed, slice_s=slice_s
        )


@pytest.fixture
async def rec() -> AsyncIterator[Recorder]:
    recorder = Recorder()
    yield recorder
    recorder.pool.shutdown(wait=True)


both = pytest.mark.parametrize("kind", ["loop", "thread"])


@both
async def test_concurrent_items_share_batches(rec: Recorder, kind: str) -> None:
    commits = rec.commits(kind)
    results = await asyncio.gather(*(commits.submit(i) for i in range(50)))
    assert results == [i * 10 for i in range(50)]
    assert len(rec.batches()) <= 2  # the first item alone, then everything that queued
    assert rec.threads == ({"writes_0"} if kind == "thread" else set())


@both
async def test_a_cancelled_submitter_does_not_cancel_the_shared_write(
    rec: Recorder, kind: str
) -> None:
    commits = rec.commits(kind)
    first = asyncio.create_task(commits.submit(1))  # starts the drain
    await asyncio.sleep(0)
    others = [asyncio.create_task(commits.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    first.cancel()  # e.g. the client behind it went away
    assert await asyncio.gather(*others) == [20, 30]
    await commits.idle()
    assert sorted(i for batch in rec.batches() for i in batch) == [1, 2, 3]


@both
async def test_a_failed_transaction_fails_its_items_and_the_next_is_written(
    rec: Recorder, kind: str
) -> None:
    commits = rec.commits(kind)
    rec.fail = True
    results = await asyncio.gather(*(commits.submit(i) for i in range(3)), return_exceptions=True)
    expected = OSError if kind == "loop" else StoreUnavailable  # what `failed` made of it
    assert all(isinstance(r, expected) and "disk full" in str(r) for r in results)
    rec.fail = False
    assert await commits.submit(7) == 70


@both
async def test_idle_passes_on_its_callers_cancellation_and_the_write_goes_on(
    rec: Recorder, kind: str
) -> None:
    rec.delay_s = 0.2
    commits = rec.commits(kind)
    submitted = asyncio.create_task(commits.submit(1))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(commits.idle())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await submitted == 10  # the write itself was not stopped
    await commits.idle()  # nothing pending: returns at once


async def test_a_stopped_writer_says_so(rec: Recorder) -> None:
    rec.delay_s = 10
    commits = GroupCommit(rec.write)
    pending = asyncio.create_task(commits.submit(1))
    await asyncio.sleep(0.01)
    assert commits._drainer is not None
    commits._drainer.cancel()
    with pytest.raises(StoreUnavailable, match="writer stopped"):
        await pending


async def test_a_stopped_write_thread_says_so(rec: Recorder) -> None:
    commits = rec.commits("thread")
    rec.pool.shutdown(wait=True)
    with pytest.raises(StoreUnavailable, match="writer stopped"):
        await commits.submit(1)
    assert commits.waiting() == 0
    await commits.idle()  # nothing is left unanswered


async def test_waiting_counts_the_items_behind_the_transaction_being_written(
    rec: Recorder,
) -> None:
    rec.delay_s = 0.02
    commits = GroupCommit(rec.write)
    first = asyncio.create_task(commits.submit(1))
    await asyncio.sleep(0.005)  # the drain task has taken 1 and is writing it
    assert commits.waiting() == 0
    later = [asyncio.create_task(commits.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    assert commits.waiting() == 2
    assert list(await asyncio.gather(first, *later)) == [10, 20, 30]
    assert commits.waiting() == 0 and rec.batches() == [[1], [2, 3]]


async def test_the_thread_takes_the_next_batch_without_the_event_loop(rec: Recorder) -> None:
    rec.delay_s = 0.02
    commits = rec.commits("thread")
    first = asyncio.create_task(commits.submit(1))
    await asyncio.sleep(0.005)  # the thread is writing [1]
    later = [asyncio.create_task(commits.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    assert commits.waiting() == 2
    time.sleep(0.1)  # noqa: ASYNC251 (the loop is busy: a loop-driven drain would wait)
    assert rec.batches() == [[1], [2, 3]]
    assert list(await asyncio.gather(first, *later)) == [10, 20, 30]


async def test_a_thread_drain_lets_the_threads_other_work_in(rec: Recorder) -> None:
    rec.delay_s = 0.005
    commits = rec.commits("thread", slice_s=0.02)

    async def load() -> None:  # a batch always waiting, for 0.3 s
        pending = []
        for i in range(300):
            pending.append(asyncio.create_task(commits.submit(i)))
            await asyncio.sleep(0.001)
        await asyncio.gather(*pending)

    loading = asyncio.create_task(load())
    await asyncio.sleep(0.03)
    rec.start(lambda: rec.log.append("other"))
    await loading
    after = rec.log[rec.log.index("other") + 1 :]
    assert len(after) >= 5  # it ran within a slice, not once the load was over


async def test_a_lingering_batch_takes_the_items_submitted_meanwhile(rec: Recorder) -> None:
    """The executor's outcomes while ingest is busy: items submitted one by one within the
    linger share one transaction; without a linger each goes alone."""
    rec.delay_s = 0.0
    linger = [1.0]
    commits = GroupCommit(rec.write, linger=lambda: linger[0])

    async def one_by_one() -> list[int]:
        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(commits.submit(i)))
            await asyncio.sleep(0.01)  # each finishes a little after the one before
        return list(await asyncio.gather(*tasks))

    assert await one_by_one() == [0, 10, 20, 30, 40]
    assert rec.batches() == [[0, 1, 2, 3, 4]]
    linger[0] = 0.0
    rec.log.clear()
    assert await one_by_one() == [0, 10, 20, 30, 40]
    assert rec.batches() == [[0], [1], [2], [3], [4]]
