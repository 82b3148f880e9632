"""Group commit: concurrent writers share one transaction, and so one fsync.

A drain task exists only while there is something to write: the first submitter starts it,
and it writes everything queued meanwhile, batch after batch, until the queue is empty.
Each submitter awaits a future of its own: one that is cancelled (a client gone, a worker
stopped) cancels only that future, never the write that other submitters share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from bot.errors import StoreUnavailable

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Submit items; `write(batch)` stores a whole batch in one transaction."""

    def __init__(self, write: Callable[[list[T]], Awaitable[list[R]]], *, max_batch: int = 1000):
        self._write = write
        self._max_batch = max_batch
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
            while self._queue:
                batch = self._queue[: self._max_batch]
                self._queue = self._queue[self._max_batch :]
                try:
                    results = await self._write([item for item, _ in batch])
                except Exception as exc:  # every item of a failed transaction fails with it
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                for (_, done), result in zip(batch, results, strict=True):
                    if not done.done():
                        done.set_result(result)
                batch = []
        except asyncio.CancelledError:
            # Stopped mid-write (shutdown): nothing will write these; say so to their callers.
            for _, done in batch + self._queue:
                if not done.done():
                    done.set_exception(StoreUnavailable("writer stopped"))
            self._queue = []
            raise
