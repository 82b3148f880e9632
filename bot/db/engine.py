"""Engine creation and schema migration (Alembic, run in-process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import event, exc, make_url, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from bot.errors import SettingsError

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
# A connection unused this long is pinged before its next use (a held driver connection,
# a pooled one at checkout); in between, a statement on a dead one fails and is retried.
DRIVER_IDLE_S = 30.0


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
            # SQLite's busy handler, which sleeps whole milliseconds; queueing
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
    engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, **_JSON)
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: AsyncEngine) -> None:
    """Ping a pooled connection at checkout only when it sat unused DRIVER_IDLE_S.

    SQLAlchemy's pre-ping is three round trips (BEGIN, `;`, ROLLBACK) before every
    transaction: the processor's and executor's on PostgreSQL spent more time there
    than in their statements. A connection used moments ago is alive as likely as one
    just pinged; if it broke meanwhile, its transaction fails as a database error, the
    workers retry, and SQLAlchemy drops the connection.
    """
    sync = engine.sync_engine

    def used(_dbapi: Any, record: Any, *_args: Any) -> None:
        record.info["deploybot_used"] = time.monotonic()

    def checkout(dbapi: Any, record: Any, _proxy: Any) -> None:
        last = record.info.get("deploybot_used")
        if last is not None and time.monotonic() - last < DRIVER_IDLE_S:
            return
        try:
            sync.dialect.do_ping(dbapi)
        except Exception as error:  # the pool then connects anew (its retry)
            raise exc.DisconnectionError(f"pooled connection failed its ping: {error}") from error

    event.listen(sync, "connect", used)
    event.listen(sync, "checkin", used)
    event.listen(sync, "checkout", checkout)


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


# SQLite checkpoints inside the commit that takes the WAL past this many pages, and the
# commits queued behind it wait: smaller checkpoints are shorter stalls of the 202s' p99.
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


# Alembic says which dialect it talks to before every upgrade, even one with nothing to
# do: noise on every command. What it applies ("Running upgrade ...") is still logged.
_ALEMBIC_NOISE = ("Context impl ", "Will assume ")


def _not_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_ALEMBIC_NOISE)


logging.getLogger("alembic.runtime.migration").addFilter(_not_noise)


def alembic_config(connection: Connection | None = None) -> Config:
    """Return the Alembic config pointing at the migrations shipped with the package."""
    config = Config()
    config.set_main_option("script_location", str(files("bot.migrations")))
    config.attributes["connection"] = connection
    return config


def require_postgres(version: tuple[int, ...] | None) -> None:
    """Refuse a PostgreSQL server older than 12 (the processor sets `plan_cache_mode`)."""
    if version is not None and version < (12,):
        shown = ".".join(map(str, version))
        raise SettingsError(f"DEPLOYBOT_DATABASE_URL: PostgreSQL 12 or later is needed ({shown})")


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        require_postgres(connection.dialect.server_version_info)
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
