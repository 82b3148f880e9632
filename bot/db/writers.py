"""The write seam: every transaction that changes state goes through the engine's writer.

One writer per engine, chosen once (`writer_for`): on a SQLite file a thread of its own
with its own connections (`SqliteWriter`), on PostgreSQL the engine's pool with
deliveries inserted on asyncpg itself (`PostgresWriter`). `serve`, the tests and the
benchmarks all write through it, so they run one path. Measured reasons for each choice
are in docs/performance.md.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import sqlalchemy
from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import QueuePool

from bot.core.delivery import Delivery
from bot.db.engine import _JSON, DRIVER_IDLE_S, _sqlite_pragmas, _watch_file, file_identity
from bot.db.group_commit import GroupCommit, ThreadGroupCommit
from bot.db.models import utcnow
from bot.errors import SettingsError

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
log = logging.getLogger(__name__)

Key = tuple[str, str]  # (tenant, delivery_id): what makes a delivery unique


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """A verified delivery waiting for its commit."""

    tenant: str
    delivery: Delivery
    source: str


def rows_by_key(batch: list[PendingEvent]) -> dict[Key, PendingEvent]:
    """A batch's deliveries by key: within one batch the first of several identical
    deliveries is the new one, the rest are redeliveries (not stored again)."""
    rows: dict[Key, PendingEvent] = {}
    for item in batch:
        rows.setdefault((item.tenant, item.delivery.delivery_id), item)
    return rows


Done = Callable[[list[PendingEvent], dict[Key, int]], list[R]]
Failed = Callable[[list[PendingEvent], Exception], Exception]


class EventCommits(Protocol[R_co]):
    """A group commit of deliveries (`GroupCommit` or `ThreadGroupCommit`)."""

    async def submit(self, item: PendingEvent) -> R_co: ...

    def waiting(self) -> int: ...

    async def idle(self) -> None: ...


# INSERT ... ON CONFLICT (tenant, delivery_id) DO NOTHING RETURNING the new rows, for any
# number of rows with one fixed text (a column of the batch per array parameter), run on
# the asyncpg connection itself: SQLAlchemy recompiled it per batch and its execute path
# cost a large share of the loop (docs/performance.md).
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


async def _insert_postgres(driver: Any, rows: dict[Key, PendingEvent]) -> dict[Key, int]:
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


# The same insert for the write thread's plain sqlite3 connection, in as few C calls as
# can be (see SqliteWriter): each call releases the GIL, and taking it back from a busy
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
    def of(cls, rows: dict[Key, PendingEvent], now: datetime) -> _SqliteInsert:
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


class Writer(ABC):
    """Run write transactions: `run(fn, *args)` calls `fn(connection, *args)` in one.

    `fn` is synchronous SQLAlchemy code. Here it runs on the async engine (through
    `run_sync`); `SqliteWriter` runs it in a thread of its own instead. Deliveries are
    committed in groups through `event_commits`, each engine's fastest way.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def run(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        async with self.engine.begin() as conn:
            return await conn.run_sync(fn, *args, **kwargs)

    async def run_relaxed(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Like `run`, for the workers' own state (leases, outcomes, plans), not deliveries.

        On a SQLite file this commits without its own fsync (synchronous=NORMAL in WAL):
        it survives a crash of the process, and the next delivery's commit, which is
        fsync'd, makes it durable with everything before it. A power cut may lose the
        last few such commits, which leases and idempotency keys already recover from
        (a run is claimed again and looks before it creates). Elsewhere it is `run`.
        """
        return await self.run(fn, *args, **kwargs)

    @abstractmethod
    def event_commits(self, done: Done[R], failed: Failed, *, max_batch: int) -> EventCommits[R]:
        """A group commit of deliveries: `done(batch, new ids)` answers a committed batch,
        `failed(batch, error)` says what its submitters get when the write failed."""

    async def release(self) -> None:
        """Give back a connection held between calls (the event store stops)."""
        return None  # only PostgresWriter holds one

    async def close(self) -> None:
        """Release what this writer holds (the engine is the caller's)."""
        await self.release()


class PostgresWriter(Writer):
    """PostgreSQL: the engine's pool; deliveries on one held asyncpg connection."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self._driver: tuple[AsyncConnection, Any] | None = None  # held for run_driver
        self._driver_used = 0.0  # monotonic time of its last statement
        self._driver_lock = asyncio.Lock()

    async def run_driver(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """`await fn(driver)` on an asyncpg connection of the pool's, outside SQLAlchemy
        (PostgreSQL only): each statement there is a transaction of its own. One call at
        a time (the event store's group commit).

        The connection stays checked out between calls: a checkout pings it, which
        SQLAlchemy makes three round trips (BEGIN, `;`, ROLLBACK), once per batch of
        deliveries otherwise. Unused for DRIVER_IDLE_S, it goes back to the pool and the
        next call's checkout pings it again. The driver's errors come out as SQLAlchemy's
        DBAPIError, as they do through `run`; a connection that failed (not the server
        refusing a statement), or a call cancelled midway, is invalidated.
        """
        import asyncpg  # the postgres extra's driver: this method serves PostgreSQL alone

        async with self._driver_lock:
            if self._driver is not None and time.monotonic() - self._driver_used > DRIVER_IDLE_S:
                await self._release_driver()
            if self._driver is None:
                conn = await self.engine.connect()
                self._driver = (conn, (await conn.get_raw_connection()).driver_connection)
            driver = self._driver[1]
            try:
                result = await fn(driver)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as failure:
                broken = driver.is_closed() or not isinstance(failure, asyncpg.PostgresError)
                broken = broken or isinstance(failure, asyncpg.PostgresConnectionError)
                if broken:
                    await self._release_driver(invalidate=True)
                raise exc.DBAPIError(
                    None, None, failure, connection_invalidated=broken
                ) from failure
            except BaseException:
                await self._release_driver(invalidate=True)
                raise
            self._driver_used = time.monotonic()
            return result

    async def _release_driver(self, *, invalidate: bool = False) -> None:
        if self._driver is None:
            return
        conn, self._driver = self._driver[0], None
        try:
            if invalidate:
                await conn.invalidate()
        finally:
            await conn.close()

    async def release(self) -> None:
        """Give `run_driver`'s connection back to the pool (its user stops: the store)."""
        async with self._driver_lock:
            await self._release_driver()

    def event_commits(self, done: Done[R], failed: Failed, *, max_batch: int) -> EventCommits[R]:
        async def write(batch: list[PendingEvent]) -> list[R]:
            rows = rows_by_key(batch)
            try:
                created = await self.run_driver(lambda driver: _insert_postgres(driver, rows))
            except Exception as exc:
                failure = failed(batch, exc)
                if failure is exc:
                    raise
                raise failure from exc
            return done(batch, created)

        return GroupCommit(write, max_batch=max_batch)


class SqliteWriter(Writer):
    """A SQLite file's writes, all in one thread with its own (synchronous) connections.

    The process's writers (event store, processor, executor) queue here and never meet
    SQLite's busy handler, which sleeps whole milliseconds; and a transaction holds the
    write lock only while its statements run, never while it waits for the event loop
    between them (an aiosqlite transaction does, once per statement, under load).

    Deliveries (`run_sqlite`) use a plain sqlite3 connection of their own: every C call
    gives up the GIL and, under load, waits for the event loop to hand it back, so the
    transaction acknowledging deliveries makes as few calls, and runs as little Python, as
    it can. The thread runs one transaction at a time, so its two connections never wait
    for each other.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        url = engine.url.set(drivername="sqlite")
        self.sync_engine = sqlalchemy.create_engine(
            url,
            poolclass=QueuePool,
            pool_size=1,
            max_overflow=0,
            connect_args={"timeout": 30, "check_same_thread": False},
            **_JSON,
        )
        event.listen(self.sync_engine, "connect", _sqlite_pragmas)
        self._path = Path(url.database or "").absolute()
        _watch_file(self.sync_engine, self._path)
        self._plain: tuple[sqlite3.Connection, tuple[int, int] | None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writes")
        self._closed = False

    async def run(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._thread, lambda: self._transaction(True, fn, *args, **kwargs)
        )

    async def run_relaxed(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._thread, lambda: self._transaction(False, fn, *args, **kwargs)
        )

    def start(self, job: Callable[[], None]) -> None:
        """Run `job` on the write thread after what is queued there (RuntimeError once
        closed). It must catch its own errors: nothing waits for it."""
        self._thread.submit(job)

    def run_sqlite(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """On the write thread (a `start` job): `fn(connection)` on a plain sqlite3
        connection in autocommit mode, where each statement is a durable transaction of its
        own (synchronous=FULL)."""
        conn = self._plain_connection()
        try:
            return fn(conn)
        except BaseException:
            self._close_plain()  # the next call opens afresh
            raise

    def _transaction(
        self,
        durable: bool,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        with self.sync_engine.begin() as conn:
            # Before the first statement: pysqlite has not begun the transaction yet.
            info = conn.connection.info
            if info.get("durable", True) != durable:
                conn.exec_driver_sql(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                info["durable"] = durable
            return fn(conn, *args, **kwargs)

    def _plain_connection(self) -> sqlite3.Connection:
        """The open plain connection, or a new one if there is none or the file changed."""
        identity = file_identity(self._path)
        if self._plain is not None and self._plain[1] == identity and identity is not None:
            return self._plain[0]
        self._close_plain()
        # mode=rw: a file moved away is not silently recreated empty.
        conn = sqlite3.connect(
            f"{self._path.as_uri()}?mode=rw",
            uri=True,
            timeout=30,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            _sqlite_pragmas(conn, None)
        except sqlite3.Error:
            conn.close()
            raise
        self._plain = (conn, identity)
        return conn

    def _close_plain(self) -> None:
        if self._plain is not None:
            conn, self._plain = self._plain[0], None
            try:
                conn.close()
            except sqlite3.Error as exc:
                log.warning("closing a SQLite connection failed: %s", exc)

    def event_commits(self, done: Done[R], failed: Failed, *, max_batch: int) -> EventCommits[R]:
        def write(batch: list[PendingEvent]) -> dict[Key, int]:
            return self.run_sqlite(_SqliteInsert.of(rows_by_key(batch), utcnow()))

        return ThreadGroupCommit(self.start, write, done, failed, max_batch=max_batch)

    def close_now(self) -> None:
        """Stop the write thread after what is queued there (blocking; idempotent)."""
        if self._closed:
            return
        self._closed = True

        def dispose() -> None:
            self._close_plain()
            self.sync_engine.dispose()

        self._thread.submit(dispose).result()
        self._thread.shutdown(wait=True)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close_now)


_WRITERS: weakref.WeakKeyDictionary[Engine, Writer] = weakref.WeakKeyDictionary()


def writer_for(engine: AsyncEngine) -> Writer:
    """The engine's one writer, made on first use and closed when the engine is disposed:
    a thread of its own for a SQLite file, the pool for PostgreSQL."""
    found = _WRITERS.get(engine.sync_engine)
    if found is not None:
        return found
    writer: Writer
    if engine.dialect.name == "postgresql":
        writer = PostgresWriter(engine)
    else:
        database = engine.url.database
        if not database or ":memory:" in database:
            raise SettingsError(
                "DEPLOYBOT_DATABASE_URL: an in-memory SQLite database cannot be shared by"
                " deploybot's connections; name a file"
            )
        writer = SqliteWriter(engine)
        event.listen(engine.sync_engine, "engine_disposed", lambda _e: _disposed(writer))
    _WRITERS[engine.sync_engine] = writer
    return writer


def _disposed(writer: SqliteWriter) -> None:
    _WRITERS.pop(writer.engine.sync_engine, None)
    writer.close_now()
