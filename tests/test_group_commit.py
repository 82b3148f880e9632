"""GroupCommit and ThreadGroupCommit: shared transactions, and no submitter can cancel
another's write."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from bot.db.group_commit import GroupCommit, ThreadGroupCommit
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


class ThreadRecorder:
    """A write thread's batches, written in `delay_s` each, and the thread's other jobs."""

    def __init__(self, delay_s: float = 0.02, fail: bool = False) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writes")
        self.delay_s = delay_s
        self.fail = fail
        self.log: list[object] = []  # batches and other jobs, in the order the thread ran them
        self.threads: set[str] = set()
        self.failures: list[tuple[list[int], Exception]] = []

    def start(self, job: object) -> None:
        assert callable(job)
        self.pool.submit(job)

    def write(self, batch: list[int]) -> list[int]:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        if self.fail:
            raise OSError("disk full")
        self.log.append(batch)
        return [item * 10 for item in batch]

    def finish(self, batch: list[int], written: list[int]) -> list[int]:
        assert threading.current_thread() is threading.main_thread()  # on the loop
        return written

    def failed(self, batch: list[int], exc: Exception) -> Exception:
        self.failures.append((batch, exc))
        return StoreUnavailable(f"database unavailable: {exc}")

    def commits(self, slice_s: float = 0.02) -> ThreadGroupCommit[int, list[int], int]:
        return ThreadGroupCommit(self.start, self.write, self.finish, self.failed, slice_s=slice_s)

    def batches(self) -> list[list[int]]:
        return [entry for entry in self.log if isinstance(entry, list)]


@pytest.fixture
async def thread_rec() -> AsyncIterator[ThreadRecorder]:
    rec = ThreadRecorder()
    yield rec
    rec.pool.shutdown(wait=True)


async def test_thread_batches_are_written_on_the_thread_and_answered_in_order(
    thread_rec: ThreadRecorder,
) -> None:
    commits = thread_rec.commits()
    results = await asyncio.gather(*(commits.submit(i) for i in range(50)))
    assert results == [i * 10 for i in range(50)]
    assert sorted(i for batch in thread_rec.batches() for i in batch) == list(range(50))
    assert len(thread_rec.batches()) <= 2 and thread_rec.threads == {"writes_0"}


async def test_the_thread_takes_the_next_batch_without_the_event_loop(
    thread_rec: ThreadRecorder,
) -> None:
    commits = thread_rec.commits()
    first = asyncio.create_task(commits.submit(1))
    await asyncio.sleep(0.005)  # the thread is writing [1]
    later = [asyncio.create_task(commits.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    assert commits.waiting() == 2
    time.sleep(0.1)  # noqa: ASYNC251 (the loop is busy: a loop-driven drain would wait)
    assert thread_rec.batches() == [[1], [2, 3]]
    assert list(await asyncio.gather(first, *later)) == [10, 20, 30]


async def test_a_thread_drain_lets_the_threads_other_work_in(thread_rec: ThreadRecorder) -> None:
    thread_rec.delay_s = 0.005
    commits = thread_rec.commits(slice_s=0.02)

    async def load() -> None:  # a batch always waiting, for 0.3 s
        pending = []
        for i in range(300):
            pending.append(asyncio.create_task(commits.submit(i)))
            await asyncio.sleep(0.001)
        await asyncio.gather(*pending)

    loading = asyncio.create_task(load())
    await asyncio.sleep(0.03)
    thread_rec.start(lambda: thread_rec.log.append("other"))
    await loading
    after = thread_rec.log[thread_rec.log.index("other") + 1 :]
    assert len(after) >= 5  # it ran within a slice, not once the load was over


async def test_a_cancelled_thread_submitter_does_not_cancel_the_shared_write(
    thread_rec: ThreadRecorder,
) -> None:
    commits = thread_rec.commits()
    first = asyncio.create_task(commits.submit(1))
    await asyncio.sleep(0)
    others = [asyncio.create_task(commits.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    first.cancel()
    assert await asyncio.gather(*others) == [20, 30]
    await commits.idle()
    assert sorted(i for batch in thread_rec.batches() for i in batch) == [1, 2, 3]


async def test_a_failed_thread_write_fails_its_items_with_what_failed_says() -> None:
    rec = ThreadRecorder(fail=True)
    commits = rec.commits()
    results = await asyncio.gather(*(commits.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) and "disk full" in str(r) for r in results)
    assert sorted(i for batch, _ in rec.failures for i in batch) == [0, 1, 2]
    rec.fail = False
    assert await commits.submit(7) == 70  # the next batch is written again
    rec.pool.shutdown(wait=True)


async def test_a_stopped_write_thread_says_so(thread_rec: ThreadRecorder) -> None:
    commits = thread_rec.commits()
    thread_rec.pool.shutdown(wait=True)
    with pytest.raises(StoreUnavailable, match="writer stopped"):
        await commits.submit(1)
    assert commits.waiting() == 0
    await commits.idle()  # nothing is left unanswered


async def test_thread_idle_waits_for_answers_and_passes_on_its_callers_cancellation(
    thread_rec: ThreadRecorder,
) -> None:
    thread_rec.delay_s = 0.1
    commits = thread_rec.commits()
    submitted = asyncio.create_task(commits.submit(1))
    await asyncio.sleep(0)
    waiting = asyncio.create_task(commits.idle())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await commits.idle()
    assert submitted.done() and submitted.result() == 10
