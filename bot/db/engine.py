"""Engine creation and schema migration (Alembic, run in-process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson
import sqlalchemy
from alembic import command
from alembic.config import Config
from sqlalchemy import event, exc, make_url, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

P = ParamSpec("P")
T = TypeVar("T")
log = logging.getLogger(__name__)

# Serialises `db upgrade` across replicas starting at once (any fixed 64-bit number).
MIGRATION_LOCK_ID = 0x6465706C6F79_01


def _stop_once(stop: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Make `aiosqlite.Connection.stop` idempotent.

    aiosqlite (0.22) stops a connection by queueing a sentinel after which its worker
    thread exits. A second stop (SQLAlchemy terminating a connection that a cancelled
    task was closing, then closing it again) queues behind that sentinel and its future
    is never answered: whoever awaits it (`close()`, engine disposal at shutdown) waits
    forever. The first stop already closes the connection, so a repeat has nothing to do.
    """

    def stop_once(self: Any) -> Any:
        if not self._running:
            return None
        return stop(self)

    stop_once.__wrapped__ = stop  # type: ignore[attr-defined]
    return stop_once


def _patch_aiosqlite() -> None:
    import aiosqlite

    if not hasattr(aiosqlite.Connection.stop, "__wrapped__"):
        aiosqlite.Connection.stop = _stop_once(aiosqlite.Connection.stop)  # type: ignore[method-assign,assignment]


def json_dumps(value: Any) -> str:
    """JSON columns' text: orjson, or the standard library for what orjson refuses
    (integers beyond 64 bits, non-string keys), so that no value fails to be saved."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(value)


# Every engine writes JSON columns the same way, and fast. (Read with the standard library:
# orjson reads integers beyond 64 bits as floats.)
_JSON = {"json_serializer": json_dumps}
DRIVER_IDLE_S = 30.0  # Writes.run_driver: a connection unused this long is pinged again


def create_engine(url: str, *, pool_size: int = 5) -> AsyncEngine:
    """Create the async engine; SQLite gets WAL, full fsync on commit and foreign keys."""
    if url.startswith("sqlite"):
        _patch_aiosqlite()
        engine = create_async_engine(
            url,
            connect_args={"timeout": 30},
            **_JSON,
            # One shared connection per process for a file: SQLite has a single writer
            # anyway, and two connections of one process contending for its lock meet
            # SQLite's busy handler, which sleeps whole milliseconds (p99 tails); queueing
            # for the pool is an asyncio wait instead. It also spares a thread and the
            # pragmas per transaction. (`:memory:` keeps SQLAlchemy's default.)
            **(
                {"poolclass": AsyncAdaptedQueuePool, "pool_size": 1, "max_overflow": 0}
                if ":memory:" not in url
                else {}
            ),
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        database = make_url(url).database
        if database and ":memory:" not in url:
            _create_private(Path(database))
            _watch_file(engine, Path(database))
        return engine
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, **_JSON
    )


def _create_private(path: Path) -> None:
    """Create a new SQLite file readable by its owner alone (0600): it holds tenants'
    shared secrets. SQLite gives its -wal and -shm files the database file's mode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if path.stat().st_mode & 0o077:
                log.warning("%s is readable by others; it holds tenants' shared secrets", path)
        return
    except OSError:
        return  # no folder, read-only, ...: connecting reports it
    os.close(fd)  # an empty file is an empty SQLite database


# SQLite copies the WAL into the database inside the commit that takes the WAL past this
# many pages; the transactions queued behind it wait. At SQLite's default, 1,000 pages
# (4 MB to write and fsync), that is 20-35 ms here every ~60 delivery batches at full
# ingest: the acknowledgements' p99. A quarter of it waits a quarter as long, four times
# as often (bench/ingest.py, 4 runs each: p99 25-32 ms instead of 30-39 ms, same
# req/s). A checkpoint in a thread of its own, beside the writes, was worse: its writes
# to the database file slowed the deliveries' fsyncs of the WAL (p99 32-108 ms).
WAL_AUTOCHECKPOINT_PAGES = 250


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the writer; synchronous=FULL makes every commit durable
    # before we acknowledge a delivery.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    cursor.close()


def file_identity(path: Path) -> tuple[int, int] | None:
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _watch_file(engine: AsyncEngine | Engine, path: Path) -> None:
    """Drop a pooled connection whose database file was moved or replaced.

    An open connection keeps writing to the file it opened wherever that went; a fresh
    one opens what is at the path now (or fails: the database is unavailable).
    """

    def connected(_dbapi: Any, record: Any) -> None:
        record.info["file_id"] = file_identity(path)

    def checkout(_dbapi: Any, record: Any, _proxy: Any) -> None:
        if record.info.get("file_id") != file_identity(path):
            raise exc.DisconnectionError(f"{path} was moved or replaced")

    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    event.listen(sync_engine, "connect", connected)
    event.listen(sync_engine, "checkout", checkout)


class Writes:
    """Run write transactions: `run(fn, *args)` calls `fn(connection, *args)` in one.

    `fn` is synchronous SQLAlchemy code. Here it runs on the async engine (through
    `run_sync`); `ThreadWrites` runs it in a thread of its own instead.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._driver: tuple[AsyncConnection, Any] | None = None  # held for run_driver
        self._driver_used = 0.0  # monotonic time of its last statement
        self._driver_lock = asyncio.Lock()

    async def run(
        self, fn: Callable[Concatenate[Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        async with self.engine.begin() as conn:
            return await conn.run_sync(fn, *args, **kwargs)

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

    async def release_driver(self) -> None:
        """Give `run_driver`'s connection back to the pool (its user stops: the store)."""
        async with self._driver_lock:
            await self._release_driver()

    async def close(self) -> None:
        """Release what this writer holds (the engine is the caller's)."""
        await self.release_driver()


class ThreadWrites(Writes):
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

    async def close(self) -> None:
        def dispose() -> None:
            self._close_plain()
            self.sync_engine.dispose()

        await asyncio.get_running_loop().run_in_executor(self._thread, dispose)
        self._thread.shutdown(wait=True)


def writes_for(engine: AsyncEngine) -> Writes:
    """The process's writer: a thread of its own for a SQLite file, else the engine's pool."""
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and ":memory:" not in database:
        return ThreadWrites(engine)
    return Writes(engine)


def alembic_config(connection: Connection | None = None) -> Config:
    """Return the Alembic config pointing at the migrations shipped with the package."""
    config = Config()
    config.set_main_option("script_location", str(files("bot.migrations")))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
    command.upgrade(alembic_config(connection), "head")


async def upgrade(engine: AsyncEngine) -> None:
    """Apply every pending migration."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


SAVE_RETRY_MAX_S = 2.0  # longest wait between tries of a write that must not be dropped


def never_succeeds(error: BaseException) -> bool:
    """Whether the database refused a write for what it holds, not for how it is now:
    a data exception or a constraint (SQLSTATE classes 22 and 23; asyncpg's come out as
    plain DBAPIErrors), or text no driver can encode. Trying it again cannot help."""
    if isinstance(error, exc.DataError | exc.IntegrityError | UnicodeError):
        return True
    if isinstance(error, exc.DBAPIError):
        code = getattr(error.orig, "sqlstate", None)
        return isinstance(code, str) and code[:2] in ("22", "23")
    return False


async def save_until_done(write: Callable[[], Awaitable[T]], what: str) -> T:
    """Run `write` until the database takes it, waiting out an outage.

    For results already paid for (an action carried out, an event evaluated): dropping
    them would leave their rows claimed until the lease ran out. A write the database
    refuses for good (`never_succeeds`) is raised at once: retried, it would hold its
    worker forever.
    """
    delay_s = 0.1
    while True:
        try:
            return await write()
        except (exc.SQLAlchemyError, OSError, UnicodeError) as error:
            if never_succeeds(error):
                raise
            log.warning("%s not saved (database error: %s); again in %.1fs", what, error, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, SAVE_RETRY_MAX_S)
