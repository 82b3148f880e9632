"""The event store: concurrent deliveries share one commit (group commit).

Each delivery is answered only once its row is committed, through the engine's writer
(`bot.db.writers`), which commits deliveries each engine's fastest way.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.delivery import Delivery
from bot.db.writers import Key, PendingEvent, writer_for
from bot.errors import StoreUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stored:
    """The outcome of storing one delivery."""

    event_id: int | None  # None when it was a redelivery of a stored event
    created: bool


# The write path is loaded (`EventStore.busy`) when commits take this many deliveries at
# once, lately or waiting now (at full ingest a batch holds ~16, at a steady 300/s 1-2).
LOADED_BATCH = 8
LOADED_WITHIN_S = 0.05


def database_error(exc: BaseException) -> str:
    """A database error's driver message, without SQLAlchemy's statement and parameters
    (which hold delivery bodies)."""
    orig = getattr(exc, "orig", None)
    found = orig if isinstance(orig, BaseException) else exc
    return f"{type(found).__name__}: {found}"[:300]


class EventStore:
    """Stores deliveries; `add` returns only after the row is committed."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_batch: int = 1000,
        on_commit: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._writes = writer_for(engine)
        self._clock = clock
        self.on_commit = on_commit
        self._commits = self._writes.event_commits(self._stored, self._failed, max_batch=max_batch)
        self._running = False
        self.commits = 0  # transactions written (deliveries share them)
        self._failing: tuple[float, str] | None = None  # since when, why (no commit since)
        self._loaded_at = -1e9  # when the latest batch of at least LOADED_BATCH was written

    def busy(self) -> bool:
        """Whether deliveries come faster than the write path takes them one at a time.

        Then they queue behind each other's commits, and a commit takes several: one in
        the last LOADED_WITHIN_S, or those waiting now, number at least LOADED_BATCH.
        Not the latest commit alone (under full load one in five takes fewer), and not
        "a delivery came lately" (at a steady few hundred a second the workers must not
        step aside).
        """
        if self._clock() - self._loaded_at < LOADED_WITHIN_S:
            return True
        return self._commits.waiting() >= LOADED_BATCH

    def write_trouble(self, within_s: float = 10.0) -> str | None:
        """Why the latest write failed, if it did within `within_s` seconds and none
        has committed since (readiness). Older failures are forgotten, so that a
        replica taken out of rotation gets deliveries again and finds out."""
        if self._failing is None or self._clock() - self._failing[0] > within_s:
            return None
        return self._failing[1]

    async def start(self) -> None:
        self._running = True

    async def close(self) -> None:
        """Stop taking deliveries once what was submitted has been written."""
        self._running = False
        await self._commits.idle()
        await self._writes.release()

    async def add(self, tenant: str, delivery: Delivery, *, source: str = "live") -> Stored:
        """Store a delivery (a redelivery of a stored one is not stored again)."""
        if not self._running:
            raise StoreUnavailable("event store is not running")
        return await self._commits.submit(PendingEvent(tenant, delivery, source))

    def _failed(self, batch: list[PendingEvent], exc: Exception) -> Exception:
        """What a failed batch's deliveries get: StoreUnavailable for a database error."""
        if not isinstance(exc, SQLAlchemyError | sqlite3.Error | OSError):
            return exc
        log.warning("event store write failed (%d deliveries): %s", len(batch), exc)
        self._failing = (self._clock(), database_error(exc))
        unavailable = StoreUnavailable("database unavailable")
        unavailable.__cause__ = exc  # as `raise ... from exc` would (the write thread's case)
        return unavailable

    def _stored(self, batch: list[PendingEvent], created: dict[Key, int]) -> list[Stored]:
        """A committed batch's outcomes, in its order (the rest were redeliveries)."""
        self._failing = None
        if len(batch) >= LOADED_BATCH:
            self._loaded_at = self._clock()
        self.commits += 1
        if self.on_commit is not None:
            self.on_commit()
        ids = [created.pop((item.tenant, item.delivery.delivery_id), None) for item in batch]
        return [Stored(event_id=i, created=i is not None) for i in ids]
