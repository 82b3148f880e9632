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

from sqlalchemy import Connection
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.delivery import Delivery
from bot.db.engine import ThreadWrites, Writes
from bot.db.group_commit import GroupCommit, ThreadGroupCommit
from bot.db.models import events, utcnow
from bot.errors import StoreUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stored:
    """The outcome of storing one delivery."""

    event_id: int | None  # None when it was a redelivery of a stored event
    created: bool


Key = tuple[str, str]  # (tenant, delivery_id): what makes a delivery unique

# The write path is loaded (`EventStore.busy`) when commits take this many deliveries at
# once, lately or waiting now: at full ingest a batch holds ~16, at a steady 300/s 1-2.
# (With 4, a processor transaction that held a few deliveries back counted as load, and
# the processor fell behind a steady 300/s: `bench/pipeline.py --rate 300 --duration 12
# --timeline`, 530 events open at the end; with 8, under 100.)
LOADED_BATCH = 8
LOADED_WITHIN_S = 0.05


@dataclass(frozen=True, slots=True)
class _Pending:
    tenant: str
    delivery: Delivery
    source: str


# INSERT ... ON CONFLICT (tenant, delivery_id) DO NOTHING RETURNING the new rows, for any
# number of rows with one fixed text: a column of the batch per array parameter. (SQLAlchemy
# compiled a dialect INSERT with ON CONFLICT anew at every execution, a multi-row VALUES
# is a new text, and a prepared statement, per batch size: 8% of the event loop's time on
# PostgreSQL under load.) It runs on the asyncpg connection itself (`Writes.run_driver`):
# through SQLAlchemy's execute, result rows and run_sync, the same statement held
# deliveries to 3,800-4,000 req/s against 4,500-5,000 (bench/ingest.py, 2 runs each,
# alternated; the event loop's CPU per delivery 160-170 us against 130-138 us).
_POSTGRES_INSERT = (
    "INSERT INTO events (tenant, delivery_id, retry_count, webhook_event, issue_key, source,"
    " body, status, received_at, attempts)"
    " SELECT tenant, delivery_id, retry_count, webhook_event, issue_key, source, body,"
    " 'received', $1::timestamptz, 0"
    " FROM unnest($2::text[], $3::text[], $4::integer[], $5::text[], $6::text[],"
    " $7::text[], $8::bytea[])"
    " AS batch(tenant, delivery_id, retry_count, webhook_event, issue_key, source, body)"
    " ON CONFLICT (tenant, delivery_id) DO NOTHING"
    " RETURNING id, tenant, delivery_id"
)


async def _insert_postgres(driver: Any, rows: dict[Key, _Pending]) -> dict[Key, int]:
    """Insert on an asyncpg connection, one statement in autocommit (a transaction of its
    own, committed when it returns); the new rows' ids by key."""
    pending = list(rows.values())
    found = await driver.fetch(
        _POSTGRES_INSERT,
        utcnow(),
        [p.tenant for p in pending],
        [p.delivery.delivery_id for p in pending],
        [p.delivery.retry_count for p in pending],
        [p.delivery.webhook_event for p in pending],
        [p.delivery.issue_key for p in pending],
        [p.source for p in pending],
        [p.delivery.body for p in pending],
    )
    return {(row["tenant"], row["delivery_id"]): int(row["id"]) for row in found}


# The insert through SQLAlchemy, for a SQLite database outside the write thread (in memory).
_SQLITE_INSERT_ROWS = (
    sqlite.insert(events)
    .on_conflict_do_nothing(index_elements=["tenant", "delivery_id"])
    .returning(events.c.id, events.c.tenant, events.c.delivery_id)
)


# The same insert for the write thread's plain sqlite3 connection, in as few C calls as
# can be (see ThreadWrites): each call releases the GIL, and taking it back from a busy
# event loop costs up to the switch interval. So one multi-row INSERT in autocommit mode:
# one statement that inserts, commits and fsyncs in a single step, no BEGIN, no COMMIT,
# no RETURNING (a step per row). Per-row statements made the transaction 5x slower.
_SQLITE_INSERT = (
    "INSERT INTO events (tenant, delivery_id, retry_count, webhook_event, issue_key, source,"
    " body, status, received_at, attempts) VALUES {rows}"
    " ON CONFLICT (tenant, delivery_id) DO NOTHING"
)
_SQLITE_ROW = "(?, ?, ?, ?, ?, ?, ?, 'received', ?, 0)"
_SQLITE_ROWS_PER_INSERT = 500  # 8 parameters each, well under SQLite's 32,766
# The rows one INSERT added: it holds the write lock throughout and each new row gets the
# largest id plus one, so they are the ids up to its last one, one per row it inserted.
_SQLITE_NEW_ROWS = "SELECT id, tenant, delivery_id FROM events WHERE id > ? AND id <= ?"
# How SQLAlchemy's SQLite dialect stores a DateTime (UTCDateTime stores it naive, in UTC).
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"


@dataclass(frozen=True, slots=True)
class _SqliteInsert:
    """A batch's statements, built on the event loop so the write thread only runs them.

    Each statement is a transaction of its own (autocommit): a batch of more than
    `_SQLITE_ROWS_PER_INSERT` deliveries is committed in parts, and a failure of one part
    fails the whole batch (the parts before it stay stored: Jira's retries of them are
    then redeliveries, answered 200).
    """

    statements: list[tuple[str, list[Any], list[Key]]]

    @classmethod
    def of(cls, rows: dict[Key, _Pending], now: datetime) -> _SqliteInsert:
        stamp = now.astimezone(UTC).replace(tzinfo=None).strftime(_SQLITE_TIME)
        values = [
            (tenant, key, p.delivery.retry_count, p.delivery.webhook_event,
             p.delivery.issue_key, p.source, p.delivery.body, stamp)
            for (tenant, key), p in rows.items()
        ]  # fmt: skip
        keys = list(rows)
        statements = []
        for start in range(0, len(values), _SQLITE_ROWS_PER_INSERT):
            chunk = values[start : start + _SQLITE_ROWS_PER_INSERT]
            sql = _SQLITE_INSERT.format(rows=", ".join([_SQLITE_ROW] * len(chunk)))
            params = [value for row in chunk for value in row]
            statements.append((sql, params, keys[start : start + len(chunk)]))
        return cls(statements)

    def __call__(self, conn: sqlite3.Connection) -> dict[Key, int]:
        """Insert and commit on `conn` (autocommit); return the new rows' ids by key."""
        created: dict[Key, int] = {}
        for sql, params, keys in self.statements:
            cursor = conn.execute(sql, params)
            inserted, last = cursor.rowcount, cursor.lastrowid or 0
            if inserted == len(keys):  # the common case: ids in the order of the rows
                created.update(zip(keys, range(last - inserted + 1, last + 1), strict=True))
            elif inserted > 0:  # some were redeliveries: read which rows are new
                found = conn.execute(_SQLITE_NEW_ROWS, (last - inserted, last)).fetchall()
                if len(found) != inserted:
                    raise sqlite3.DatabaseError(f"{inserted} rows inserted but {len(found)} found")
                created.update(((tenant, key), event_id) for event_id, tenant, key in found)
        return created


def _rows(batch: list[_Pending]) -> dict[Key, _Pending]:
    """A batch's deliveries by key: within one batch the first of several identical
    deliveries is the new one, the rest are redeliveries (not stored again)."""
    rows: dict[Key, _Pending] = {}
    for item in batch:
        rows.setdefault((item.tenant, item.delivery.delivery_id), item)
    return rows


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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._writes = writes or Writes(engine)
        self._clock = clock
        self.on_commit = on_commit
        self._postgres = engine.dialect.name == "postgresql"
        self._commits: (
            GroupCommit[_Pending, Stored] | ThreadGroupCommit[_Pending, dict[Key, int], Stored]
        )
        if isinstance(self._writes, ThreadWrites):
            self._commits = ThreadGroupCommit(
                self._writes.start,
                self._write_here,
                self._stored,
                self._failed,
                max_batch=max_batch,
            )
        else:
            self._commits = GroupCommit(self._write, max_batch=max_batch)
        self._running = False
        self.commits = 0  # transactions written (deliveries share them)
        self._failing: tuple[float, str] | None = None  # since when, why (no commit since)
        self._loaded_at = -1e9  # when the latest batch of at least LOADED_BATCH was written

    def busy(self) -> bool:
        """Whether deliveries come faster than the write path takes them one at a time.

        Then they queue behind each other's commits, and a commit takes several: one in
        the last LOADED_WITHIN_S, or those waiting now, number at least LOADED_BATCH.
        (Not the latest commit alone: under full load one in five takes fewer, and a
        processor that took that for the end of the load claimed a full batch each time;
        with 1,000 rules, 0-4% more CPU per delivery than with 10 in bench/ingest.py, once
        16%; now 0. Not "a delivery came lately": at a few hundred a second each still
        has a commit of its own, and the workers that step aside for ingest must not step
        aside then, or they fall behind a load the service can carry.)
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
        await self._writes.release_driver()

    async def add(self, tenant: str, delivery: Delivery, *, source: str = "live") -> Stored:
        """Store a delivery (a redelivery of a stored one is not stored again)."""
        if not self._running:
            raise StoreUnavailable("event store is not running")
        return await self._commits.submit(_Pending(tenant, delivery, source))

    async def _write(self, batch: list[_Pending]) -> list[Stored]:
        """Insert a batch in one transaction (on the engine); see `_rows`."""
        rows = _rows(batch)
        try:
            if self._postgres:
                created = await self._writes.run_driver(
                    lambda driver: _insert_postgres(driver, rows)
                )
            else:
                created = await self._writes.run(_insert_sqlite_rows, rows)
        except Exception as exc:
            failure = self._failed(batch, exc)
            if failure is exc:
                raise
            raise failure from exc
        return self._stored(batch, created)

    def _write_here(self, batch: list[_Pending]) -> dict[Key, int]:
        """On the SQLite write thread: insert a batch, committed; the new rows' ids."""
        assert isinstance(self._writes, ThreadWrites)
        return self._writes.run_sqlite(_SqliteInsert.of(_rows(batch), utcnow()))

    def _failed(self, batch: list[_Pending], exc: Exception) -> Exception:
        """What a failed batch's deliveries get: StoreUnavailable for a database error."""
        if not isinstance(exc, SQLAlchemyError | sqlite3.Error | OSError):
            return exc
        log.warning("event store write failed (%d deliveries): %s", len(batch), exc)
        self._failing = (self._clock(), database_error(exc))
        unavailable = StoreUnavailable("database unavailable")
        unavailable.__cause__ = exc  # as `raise ... from exc` would (the write thread's case)
        return unavailable

    def _stored(self, batch: list[_Pending], created: dict[Key, int]) -> list[Stored]:
        """A committed batch's outcomes, in its order (the rest were redeliveries)."""
        self._failing = None
        if len(batch) >= LOADED_BATCH:
            self._loaded_at = self._clock()
        self.commits += 1
        if self.on_commit is not None:
            self.on_commit()
        ids = [created.pop((item.tenant, item.delivery.delivery_id), None) for item in batch]
        return [Stored(event_id=i, created=i is not None) for i in ids]


def _insert_sqlite_rows(conn: Connection, rows: dict[Key, _Pending]) -> dict[Key, int]:
    """Insert in `conn`'s transaction (SQLAlchemy, SQLite); the new rows' ids by key."""
    now = utcnow()
    params = [
        {
            "tenant": tenant,
            "delivery_id": key,
            "retry_count": p.delivery.retry_count,
            "webhook_event": p.delivery.webhook_event,
            "issue_key": p.delivery.issue_key,
            "source": p.source,
            "body": p.delivery.body,
            "status": "received",
            "received_at": now,
            "attempts": 0,
        }
        for (tenant, key), p in rows.items()
    ]
    result = conn.execute(_SQLITE_INSERT_ROWS, params)
    return {(row.tenant, row.delivery_id): int(row.id) for row in result}
