"""The OAuth app's token row: one access token for every worker and replica, one refresher.

Atlassian rotates refresh tokens: a grant answers with a new one and the old one is spent,
so two holders refreshing with one token means one of them is refused (invalid_grant)
and, worse, may lose the chain. Whoever refreshes holds the row exclusively:
- PostgreSQL: a transaction-scoped advisory lock, held across the token call, released
  by the commit that stores the rotated refresh token (persisted before anyone uses it).
- SQLite (one process, one shared connection): a process-wide asyncio lock, and a
  conditional UPDATE on `generation` that refuses to overwrite a row another process
  (say `deploybot webhooks sync`) changed meanwhile.

Both tokens are stored sealed (AES-GCM, the key derived from JIRA_CLIENT_SECRET, which
every replica has): a database dump or a row on a page gives no usable token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
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


class Sealer:
    """Seal token values for the table with a key derived from the app's client secret."""

    PREFIX = "v1:"

    def __init__(self, secret: str) -> None:
        key = hashlib.sha256(b"deploybot oauth_tokens v1\0" + secret.encode()).digest()
        self._aead = AESGCM(key)

    def seal(self, value: str, column: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, value.encode(), column.encode())
        return self.PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, stored: str, column: str) -> str | None:
        """The value, or None when it was sealed with another secret (or is damaged)."""
        if not stored.startswith(self.PREFIX):
            return None
        try:
            raw = base64.urlsafe_b64decode(stored[len(self.PREFIX) :])
            return self._aead.decrypt(raw[:12], raw[12:], column.encode()).decode()
        except (InvalidTag, ValueError):
            return None


def _state(row: Any, sealer: Sealer) -> TokenState | None:
    """The row's tokens; None when absent or unreadable (sealed under an old secret)."""
    if row is None:
        return None
    refresh = sealer.open(row.refresh_token, "refresh_token")
    if refresh is None:
        return None
    access = sealer.open(row.access_token, "access_token") if row.access_token else None
    return TokenState(row.seed, refresh, access, int(row.refresh_at_ms), int(row.generation))


_READ = select(oauth_tokens).where(oauth_tokens.c.name == JIRA)


class Slot:
    """The row as the refresher found it, and the one way to replace it."""

    def __init__(
        self,
        engine: AsyncEngine,
        conn: AsyncConnection | None,
        row: Any,
        sealer: Sealer,
    ) -> None:
        self._engine = engine
        self._conn = conn  # PostgreSQL: the locked transaction; SQLite: None
        self._sealer = sealer
        self.state = _state(row, sealer)
        self._generation: int | None = None if row is None else int(row.generation)

    @property
    def next_generation(self) -> int:
        return (self._generation or 0) + 1

    async def save(self, new: TokenState) -> bool:
        """Store the new tokens; False if another holder changed the row meanwhile."""
        seal = self._sealer.seal
        values = {
            "seed": new.seed,
            "refresh_token": seal(new.refresh_token, "refresh_token"),
            "access_token": None
            if new.access_token is None
            else seal(new.access_token, "access_token"),
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
        if self._generation is None:
            await conn.execute(insert(oauth_tokens).values(name=JIRA, **values))
            return True
        done = await conn.execute(
            update(oauth_tokens)
            .where(
                oauth_tokens.c.name == JIRA,
                oauth_tokens.c.generation == self._generation,
            )
            .values(**values)
        )
        return done.rowcount == 1


class OAuthTokenStore:
    """Read the shared token row, or hold it exclusively to refresh it."""

    def __init__(self, engine: AsyncEngine, secret: str) -> None:
        self._engine = engine
        self._sealer = Sealer(secret)

    async def _row(self) -> Any:
        async with self._engine.connect() as conn:
            return (await conn.execute(_READ)).first()

    async def current(self) -> TokenState | None:
        """Return the stored tokens without waiting for a refresher."""
        return _state(await self._row(), self._sealer)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[Slot]:
        """Hold the row for one refresh; on PostgreSQL the exit commits what was saved."""
        async with process_lock(self._engine):
            if self._engine.dialect.name != "postgresql":
                yield Slot(self._engine, None, await self._row(), self._sealer)
                return
            async with self._engine.begin() as conn:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_KEY})
                row = (await conn.execute(_READ)).first()
                yield Slot(self._engine, conn, row, self._sealer)
