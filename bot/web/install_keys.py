"""Atlassian's install public keys, fetched by `kid` with bounds on everything.

A `kid` comes from a token nobody has verified yet (verifying needs the key), so each
fetch costs us before we know who asks. Hence: a strict `kid` (bot.core.verify.install_key_id),
a bounded cache whose entries expire, misses remembered briefly, one fetch per `kid` at
a time, and a small connection pool of its own with a short timeout, so that a slow key
server cannot take the connections UbiOps, Genesys and Jira calls need.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

import aiohttp

from bot.errors import VerificationError

MAX_KEYS = 64  # Atlassian rotates a handful of install keys
KEY_TTL_S = 3600.0
MISS_TTL_S = 60.0
FETCH_TIMEOUT_S = 5.0
FETCH_CONNECTIONS = 4
MAX_KEY_BYTES = 16 * 1024  # a PEM public key is well under 1 KiB
# Fetches (of kids not cached) per minute: well-formed kids are free to invent, and each
# costs a request to Atlassian; past this, installs get 503 and Jira retries them.
FETCHES_PER_MINUTE = 30


class KeyServiceUnavailable(Exception):
    """The key server did not answer: not the caller's fault, Jira retries the install."""


class InstallKeys:
    """Public keys by `kid`: an LRU of at most MAX_KEYS, misses kept MISS_TTL_S."""

    def __init__(
        self,
        base_url: str,
        *,
        max_keys: int = MAX_KEYS,
        key_ttl_s: float = KEY_TTL_S,
        miss_ttl_s: float = MISS_TTL_S,
        timeout_s: float = FETCH_TIMEOUT_S,
        connections: int = FETCH_CONNECTIONS,
        fetches_per_minute: int = FETCHES_PER_MINUTE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_keys, self.key_ttl_s, self.miss_ttl_s = max_keys, key_ttl_s, miss_ttl_s
        self.timeout_s, self.connections = timeout_s, connections
        self.clock = clock
        self.fetches_per_minute = fetches_per_minute
        self._allowance, self._allowance_at = float(fetches_per_minute), clock()
        # kid -> (pem, or None for a miss; monotonic time it expires)
        self._entries: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        self._fetching: dict[str, asyncio.Future[str | None]] = {}
        self._session: aiohttp.ClientSession | None = None

    def __len__(self) -> int:
        return len(self._entries)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.connections),
                # the pool wait counts too: a queue behind a slow server ends as well
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            )
        return self._session

    async def get(self, kid: str) -> str:
        """Return the PEM of `kid` (already checked by verify.install_key_id)."""
        now = self.clock()
        cached = self._entries.get(kid)
        if cached is not None and cached[1] > now:
            self._entries.move_to_end(kid)
            pem = cached[0]
        else:
            pending = self._fetching.get(kid)
            if pending is None:  # one fetch per kid; concurrent callers share it
                self._spend_fetch(now)
                pending = asyncio.ensure_future(self._fetch_and_keep(kid))
                self._fetching[kid] = pending
                pending.add_done_callback(self._fetched)
            pem = await asyncio.shield(pending)
        if pem is None:
            raise VerificationError(f"install key {kid!r} not found")
        return pem

    def _spend_fetch(self, now: float) -> None:
        """Take one fetch from the per-minute allowance (a token bucket), or refuse."""
        rate_s = self.fetches_per_minute / 60.0
        allowance = min(
            float(self.fetches_per_minute), self._allowance + (now - self._allowance_at) * rate_s
        )
        if allowance < 1:
            raise KeyServiceUnavailable("too many install key fetches; try again later")
        self._allowance, self._allowance_at = allowance - 1, now

    def _fetched(self, done: asyncio.Future[str | None]) -> None:
        for kid, pending in list(self._fetching.items()):
            if pending is done:
                del self._fetching[kid]
        if not done.cancelled():
            done.exception()  # retrieved: its callers (if any are left) have it too

    async def _fetch_and_keep(self, kid: str) -> str | None:
        pem = await self._fetch(kid)
        ttl_s = self.key_ttl_s if pem is not None else self.miss_ttl_s
        self._entries[kid] = (pem, self.clock() + ttl_s)
        self._entries.move_to_end(kid)
        while len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)
        return pem

    async def _fetch(self, kid: str) -> str | None:
        try:
            async with self._http().get(f"{self.base_url}/{kid}", allow_redirects=False) as resp:
                if resp.status != 200:
                    return None
                body = await resp.content.read(MAX_KEY_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KeyServiceUnavailable(f"install key service: {type(exc).__name__}") from exc
        if len(body) > MAX_KEY_BYTES:
            return None
        return body.decode("ascii", errors="replace")
