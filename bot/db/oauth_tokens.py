"""The OAuth app's token row: one access token for every worker and replica, one refresher.

Atlassian rotates refresh tokens: a grant answers with a new one and the old one is spent,
so two holders refreshing with one token means one of them is refused (invalid_grant)
and, worse, may lose the chain. Whoever refreshes holds the row exclusively:
- PostgreSQL: a transaction-scoped advisory lock, held across the token call, released
  by the commit that stores the rotated refresh token (persisted before anyone uses it).
- SQLite (one process, one shared connection): a process-wide asyncio lock, and a
  conditional UPDATE on `generation` that refuses to overwrite a row another process
  (say `deploybot webhooks sync`) changed meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.db.models import oauth_tokens, utcnow

JIRA = "jira"
# pg_advisory_xact_lock key of the token row ("dbjo" as an integer; the leader lock differs).
ADVISORY_KEY = 0x64626A6F

_LOCKS: weakref.WeakKeyDictionary[AsyncEngine, asyncio.Lock] = weakref.WeakKeyDictionary()


def process_lock(engine: AsyncEngine) -> asyncio.Lock:
    """The lock every token holder of this process (actions, scheduler) shares."""
    lock = _LOCKS.get(engine)
    if lock is None:
        lock = _LOCKS[engine] = asyncio.Lock()
    return lock


@dataclass(frozen=True, slots=True)
class TokenState:
    """The stored tokens; `refresh_at_ms` is when the access token must be replaced."""

    seed: str
    refresh_token: str = field(repr=False)
    access_token: str | None = field(repr=False)
    refresh_at_ms: int
    generation: int


def _state(row: object | None) -> TokenState | None:
    if row is None:
        return None
    return TokenState(
        row.seed,  # type: ignore[attr-defined]
        row.refresh_token,  # type: ignore[attr-defined]
        row.access_token,  # type: ignore[attr-defined]
        int(row.refresh_at_ms),  # type: ignore[attr-defined]
        int(row.generation),  # type: ignore[attr-defined]
    )


_READ = select(oauth_tokens).where(oauth_tokens.c.name == JIRA)


class Slot:
    """The row as the refresher found it, and the one way to replace it."""

    def __init__(self, engine: AsyncEngine, conn: AsyncConnection | None, state: TokenState | None):
        self._engine = engine
        self._conn = conn  # PostgreSQL: the locked transaction; SQLite: None
        self.state = state

    async def save(self, new: TokenState) -> bool:
        """Store the new tokens; False if another holder changed the row meanwhile."""
        values = {
            "seed": new.seed,
            "refresh_token": new.refresh_token,
            "access_token": new.access_token,
            "refresh_at_ms": new.refresh_at_ms,
            "generation": new.generation,
            "updated_at": utcnow(),
        }
        if self._conn is not None:
            await self._write(self._conn, values)
            return True
        try:
            async with self._engine.begin() as conn:
                return await self._write(conn, values)
        except IntegrityError:
            return False  # another process inserted the first row meanwhile

    async def _write(self, conn: AsyncConnection, values: Mapping[str, object]) -> bool:
        if self.state is None:
            await conn.execute(insert(oauth_tokens).values(name=JIRA, **values))
            return True
        done = await conn.execute(
            update(oauth_tokens)
            .where(
                oauth_tokens.c.name == JIRA,
                oauth_tokens.c.generation == self.state.generation,
            )
            .values(**values)
        )
        return done.rowcount == 1


class OAuthTokenStore:
    """Read the shared token row, or hold it exclusively to refresh it."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def current(self) -> TokenState | None:
        """Return the stored tokens without waiting for a refresher."""
        async with self._engine.connect() as conn:
            return _state((await conn.execute(_READ)).first())

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[Slot]:
        """Hold the row for one refresh; on PostgreSQL the exit commits what was saved."""
        async with process_lock(self._engine):
            if self._engine.dialect.name != "postgresql":
                yield Slot(self._engine, None, await self.current())
                return
            async with self._engine.begin() as conn:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_KEY})
                state = _state((await conn.execute(_READ)).first())
                yield Slot(self._engine, conn, state)
