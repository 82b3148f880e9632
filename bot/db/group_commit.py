"""Group commit: concurrent writers share one transaction, and so one fsync.

A drain exists only while there is something to write: the first submitter starts it, and
it writes everything queued meanwhile, batch after batch, until the queue is empty. Each
submitter awaits a future of its own: one that is cancelled (a client gone, a worker
stopped) cancels only that future, never the write that other submitters share.

`GroupCommit` drains in a task of the event loop, around an async write. `ThreadGroupCommit`
drains in a write thread, which takes the next batch as soon as one is written, without a
round trip through the event loop between them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from bot.errors import StoreUnavailable

T = TypeVar("T")
R = TypeVar("R")
W = TypeVar("W")


def _succeed(batch: list[tuple[T, asyncio.Future[R]]], results: list[R]) -> None:
    """Answer a committed batch's submitters, each with its result (unless gone)."""
    for (_, done), result in zip(batch, results, strict=True):
        if not done.done():
            done.set_result(result)


def _fail(batch: list[tuple[T, asyncio.Future[R]]], exc: BaseException) -> None:
    """Answer a batch's submitters with `exc` (unless gone)."""
    for _, done in batch:
        if not done.done():
            done.set_exception(exc)


class GroupCommit(Generic[T, R]):
    """Submit items; `write(batch)` stores a whole batch in one transaction.

    `linger()` says how long the first submitter of a batch waits for others to join it
    (0: not at all): a batch written later, but one transaction for more items.
    """

    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_batch: int = 1000,
        linger: Callable[[], float] = lambda: 0.0,
    ):
        self._write = write
        self._max_batch = max_batch
        self._linger = linger
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Return `item`'s result once the transaction holding it has committed."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, done))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="group-commit")
        return await done

    def waiting(self) -> int:
        """How many items wait for a transaction (besides the one being written)."""
        return len(self._queue)

    async def idle(self) -> None:
        """Wait until everything submitted so far has been written."""
        if self._drainer is None:
            return
        try:
            await asyncio.shield(self._drainer)  # a waiter gone must not stop the write
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our caller is being cancelled: pass that on
            # else the drainer itself was cancelled (shutdown): nothing is left to wait for

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            linger = self._linger()
            if linger > 0:
                await asyncio.sleep(linger)
            while self._queue:
                batch = self._queue[: self._max_batch]
                self._queue = self._queue[self._max_batch :]
                try:
                    results = await self._write([item for item, _ in batch])
                except Exception as exc:  # every item of a failed transaction fails with it
                    _fail(batch, exc)
                    continue
                _succeed(batch, results)
                batch = []
        except asyncio.CancelledError:
            # Stopped mid-write (shutdown): nothing will write these; say so to their callers.
            _fail(batch + self._queue, StoreUnavailable("writer stopped"))
            self._queue = []
            raise


class ThreadGroupCommit(Generic[T, W, R]):
    """Group commit drained by a write thread: `write(batch)` runs there, and `finish(batch,
    written)` (or `failed(batch, exc)`, which returns what the submitters get) on the loop.

    With the drain on the event loop, the write thread sat idle from one commit's end until
    the loop handed over the next batch; here it goes on with what queued meanwhile while
    the loop answers the batch before.
    `start(job)` runs `job` on the thread, after what is queued there; the drain runs for at
    most `slice_s` before queuing itself again behind the thread's other work.
    """

    def __init__(
        self,
        start: Callable[[Callable[[], None]], None],
        write: Callable[[list[T]], W],
        finish: Callable[[list[T], W], list[R]],
        failed: Callable[[list[T], Exception], BaseException],
        *,
        max_batch: int = 1000,
        slice_s: float = 0.02,
    ) -> None:
        self._start, self._write, self._finish, self._failed = start, write, finish, failed
        self._max_batch = max_batch
        self._slice_s = slice_s
        self._lock = threading.Lock()  # guards _queue and _draining (loop and thread)
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsettled = 0  # submitted, not yet answered (the loop's alone)
        self._idle: list[asyncio.Future[None]] = []

    async def submit(self, item: T) -> R:
        """Return `item`'s result once the transaction holding it has committed."""
        self._loop = asyncio.get_running_loop()  # the loop to answer on (`_drain` reads it)
        done: asyncio.Future[R] = self._loop.create_future()
        with self._lock:
            self._queue.append((item, done))
            start, self._draining = not self._draining, True
        self._unsettled += 1
        if start:
            try:
                self._start(self._drain)
            except RuntimeError:  # the thread is shut down: nothing will write these
                with self._lock:
                    stranded, self._queue, self._draining = self._queue, [], False
                _fail(stranded, StoreUnavailable("writer stopped"))
                self._answered(len(stranded))
        return await done

    def waiting(self) -> int:
        """How many items wait for a transaction (besides those being written)."""
        return len(self._queue)

    async def idle(self) -> None:
        """Wait until everything submitted so far has been answered."""
        if self._unsettled == 0 or self._loop is None:
            return
        waiter = self._loop.create_future()
        self._idle.append(waiter)
        await asyncio.shield(waiter)  # our caller's cancellation is passed on, not the writes'

    def _drain(self) -> None:
        """On the write thread: write batch after batch until the queue is empty."""
        loop = self._loop
        assert loop is not None
        deadline = time.monotonic() + self._slice_s
        while True:
            with self._lock:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                if not batch:
                    self._draining = False
                    return
            try:
                written: W | Exception = self._write([item for item, _ in batch])
            except Exception as exc:  # every item of a failed transaction fails with it
                written = exc
            try:
                loop.call_soon_threadsafe(self._settle, batch, written)
            except RuntimeError:  # the loop is closed: no one is left to answer
                return
            if time.monotonic() > deadline:
                try:
                    self._start(self._drain)  # the thread's other work gets its turn
                    return
                except RuntimeError:  # shutting down: drain to the end here
                    deadline = float("inf")

    def _settle(self, batch: list[tuple[T, asyncio.Future[R]]], written: W | Exception) -> None:
        """On the loop: answer a written batch's submitters."""
        items = [item for item, _ in batch]
        try:
            if isinstance(written, Exception):
                raise self._failed(items, written)
            results = self._finish(items, written)
        except Exception as exc:
            _fail(batch, exc)
        else:
            _succeed(batch, results)
        self._answered(len(batch))

    def _answered(self, count: int) -> None:
        self._unsettled -= count
        if self._unsettled == 0:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
