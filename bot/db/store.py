"""The event store's write path: concurrent deliveries share one commit (group commit).

Writes go through a `Writes`: on a SQLite file that is the process's write thread with
its own connection, so an acknowledgement never waits for the event loop to drive
aiosqlite's per-statement hops; elsewhere, the engine's pool.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.engine import Writes
from bot.db.group_commit import GroupCommit
from bot.db.models import events, utcnow
from bot.delivery import Delivery
from bot.errors import StoreUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stored:
    """The outcome of storing one delivery."""

    event_id: int | None  # None when it was a redelivery of a stored event
    created: bool


@dataclass(frozen=True, slots=True)
class _Pending:
    tenant: str
    delivery: Delivery
    source: str


def upsert_ignoring_duplicates(engine: AsyncEngine) -> Insert:
    """INSERT ... ON CONFLICT (tenant, delivery_id) DO NOTHING RETURNING the new rows."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    stmt: Insert = (
        dialect.insert(events)
        .on_conflict_do_nothing(index_elements=["tenant", "delivery_id"])
        .returning(events.c.id, events.c.tenant, events.c.delivery_id)
    )
    return stmt


# The same statement for a plain sqlite3 connection (the write thread's): a row at a
# time in C is cheaper than binding a multi-row statement's parameters in Python.
_SQLITE_INSERT = (
    "INSERT INTO events (tenant, delivery_id, retry_count, webhook_event, issue_key, source,"
    " body, status, received_at, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, 'received', ?, 0)"
    " ON CONFLICT (tenant, delivery_id) DO NOTHING RETURNING id"
)
# How SQLAlchemy's SQLite dialect stores a DateTime (UTCDateTime stores it naive, in UTC).
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"


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
        writes: Writes | None = None,
        max_batch: int = 1000,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self._writes = writes or Writes(engine)
        self.on_commit = on_commit
        self._insert = upsert_ignoring_duplicates(engine)
        self._commits: GroupCommit[_Pending, Stored] = GroupCommit(self._write, max_batch=max_batch)
        self._running = False
        self.commits = 0  # transactions written (deliveries share them)
        self._last_add = -1e9  # monotonic time of the latest delivery
        self._failing: tuple[float, str] | None = None  # since when, why (no commit since)

    def busy(self, within_s: float = 0.05) -> bool:
        """Whether a delivery arrived in the last `within_s` seconds (ingest is active)."""
        return time.monotonic() - self._last_add < within_s

    def write_trouble(self, within_s: float = 10.0) -> str | None:
        """Why the latest write failed, if it did within `within_s` seconds and none
        has committed since (readiness). Older failures are forgotten, so that a
        replica taken out of rotation gets deliveries again and finds out."""
        if self._failing is None or time.monotonic() - self._failing[0] > within_s:
            return None
        return self._failing[1]

    async def start(self) -> None:
        self._running = True

    async def close(self) -> None:
        """Stop taking deliveries once what was submitted has been written."""
        self._running = False
        await self._commits.idle()

    async def add(self, tenant: str, delivery: Delivery, *, source: str = "live") -> Stored:
        """Store a delivery (a redelivery of a stored one is not stored again)."""
        if not self._running:
            raise StoreUnavailable("event store is not running")
        self._last_add = time.monotonic()
        return await self._commits.submit(_Pending(tenant, delivery, source))

    async def _write(self, batch: list[_Pending]) -> list[Stored]:
        """Insert a batch in one transaction; duplicates (redeliveries) are not stored."""
        try:
            ids = await self._writes.run(self._insert_rows, batch)
        except (SQLAlchemyError, sqlite3.Error, OSError) as exc:
            log.warning("event store write failed (%d deliveries): %s", len(batch), exc)
            self._failing = (time.monotonic(), database_error(exc))
            raise StoreUnavailable("database unavailable") from exc
        self._failing = None
        self.commits += 1
        if self.on_commit is not None:
            self.on_commit()
        return [Stored(event_id=i, created=i is not None) for i in ids]

    def _insert_rows(self, conn: Connection, batch: list[_Pending]) -> list[int | None]:
        """Insert in `conn`'s transaction; return each item's new id (None: known already).

        Within one batch the first of several identical deliveries is the new one.
        """
        now = utcnow()
        driver = conn.connection.driver_connection
        if isinstance(driver, sqlite3.Connection):
            stamp = now.astimezone(UTC).replace(tzinfo=None).strftime(_SQLITE_TIME)
            ids: list[int | None] = []
            for item in batch:
                d = item.delivery
                found = driver.execute(
                    _SQLITE_INSERT,
                    (
                        item.tenant,
                        d.delivery_id,
                        d.retry_count,
                        d.webhook_event,
                        d.issue_key,
                        item.source,
                        d.body,
                        stamp,
                    ),
                ).fetchone()
                ids.append(None if found is None else int(found[0]))
            return ids
        return self._insert_many(conn, batch, now)

    def _insert_many(
        self, conn: Connection, batch: list[_Pending], now: datetime
    ) -> list[int | None]:
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for item in batch:
            key = (item.tenant, item.delivery.delivery_id)
            rows.setdefault(
                key,
                {
                    "tenant": item.tenant,
                    "delivery_id": item.delivery.delivery_id,
                    "retry_count": item.delivery.retry_count,
                    "webhook_event": item.delivery.webhook_event,
                    "issue_key": item.delivery.issue_key,
                    "source": item.source,
                    "body": item.delivery.body,
                    "status": "received",
                    "received_at": now,
                    "attempts": 0,
                },
            )
        result = conn.execute(self._insert, list(rows.values()))
        created = {(row.tenant, row.delivery_id): int(row.id) for row in result}
        return [created.pop((item.tenant, item.delivery.delivery_id), None) for item in batch]
