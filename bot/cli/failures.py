"""Infrastructure failures said in one line naming the setting to fix, not a traceback.

A port in use, a database that is unreachable, missing or refuses us, a SQLite folder
that does not exist: the operator's next step is a setting, and 80 lines of asyncio and
driver frames hide it. Anything not recognised here still ends in a traceback (a bug).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from bot.errors import SettingsError
from bot.settings import Settings, redacted_url

# asyncpg's refusals (by name: asyncpg is an optional extra).
_POSTGRES_REFUSALS = {
    "InvalidCatalogNameError": "the database does not exist (create it, e.g. createdb)",
    "InvalidPasswordError": "the password was refused",
    "InvalidAuthorizationSpecificationError": "the user was refused",
    "CannotConnectNowError": "the server is starting up or shutting down",
    "TooManyConnectionsError": "the server has no connection slot left",
}
_BIND_ERRNOS = {errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL}


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _sqlite_problem(settings: Settings) -> str:
    database = make_url(settings.database_url).database or ""
    folder = Path(database).parent
    if database and not folder.is_dir():
        return f"the folder {folder} does not exist (create it, or change the path)"
    return "the file cannot be opened or created (check the path and its permissions)"


def check_sqlite_folder(settings: Settings) -> None:
    """Refuse a SQLite database in a folder that does not exist, before any thread or
    task starts (the driver's failure leaves its worker thread complaining at exit)."""
    if not settings.is_sqlite:
        return
    database = make_url(settings.database_url).database or ""
    if database and database != ":memory:" and not Path(database).parent.is_dir():
        raise SettingsError(
            f"cannot open the database {redacted_url(settings.database_url)}: "
            f"{_sqlite_problem(settings)} (DEPLOYBOT_DATABASE_URL)"
        )


def describe(error: BaseException, settings: Settings) -> str | None:
    """One line for an infrastructure failure, or None for anything else."""
    where = f"the database {redacted_url(settings.database_url)}"
    setting = "(DEPLOYBOT_DATABASE_URL)"
    for cause in _chain(error):
        if isinstance(cause, OSError) and "bind" in str(cause) and cause.errno in _BIND_ERRNOS:
            reason = (cause.strerror or str(cause)).lower().rpartition(": ")[2]
            return (
                f"cannot listen on {settings.host}:{settings.port}: {reason} "
                "(DEPLOYBOT_HOST, DEPLOYBOT_PORT)"
            )
        name = type(cause).__name__
        if name in _POSTGRES_REFUSALS:
            return f"cannot use {where}: {_POSTGRES_REFUSALS[name]} {setting}"
        if isinstance(cause, socket.gaierror):
            return f"cannot reach {where}: its host name does not resolve {setting}"
        if isinstance(cause, ConnectionError | TimeoutError):
            return f"cannot reach {where}: {cause} {setting}"
        unopened = "unable to open database file" in str(cause)
        if isinstance(cause, sa_exc.OperationalError) and settings.is_sqlite and unopened:
            return f"cannot open {where}: {_sqlite_problem(settings)} {setting}"
    return None
