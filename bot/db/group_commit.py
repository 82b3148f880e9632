"""Group commit: concurrent writers share one transaction, and so one fsync.

No background task: the first caller that finds no write under way becomes the writer and
writes everything queued meanwhile, batch after batch, until the queue is empty; everyone
else awaits the result for their own item.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Submit items; `write(batch)` stores a whole batch in one transaction."""

    def __init__(self, write: Callable[[list[T]], Awaitable[list[R]]], *, max_batch: int = 1000):
        self._write = write
        self._max_batch = max_batch
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._writing = False

    async def submit(self, item: T) -> R:
        """Return `item`'s result once the transaction holding it has committed."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, done))
        if not self._writing:
            await self._write_all()
        return await done

    async def _write_all(self) -> None:
        self._writing = True
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._queue:
                batch, self._queue = (
                    self._queue[: self._max_batch],
                    self._queue[self._max_batch :],
                )
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
        finally:
            self._writing = False
            # Cancelled mid-write: nobody else is writing, so end what would otherwise hang.
            for _, done in batch + self._queue:
                done.cancel()
            self._queue = []
