"""Connect tenants: stored at install, their shared secrets cached for the hot path."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.models import kv, tenants, upsert, utcnow

CACHE_TTL_S = 30.0  # how long another replica's install/uninstall may go unseen here
CACHE_MAX_ENTRIES = 4096  # unknown issuers are cached too: bound what a flood of them costs
LIFECYCLE_TOKEN_PREFIX = "lifecycle-token:"  # kv keys of used install/uninstall tokens
LIFECYCLE_TOKEN_GRACE_S = 60  # kept past the token's expiry: its leeway, and clock skew


@dataclass(frozen=True, slots=True)
class Tenant:
    client_key: str
    shared_secret: str
    base_url: str
    enabled: bool


class Tenants:
    """Read and write tenants; lookups are cached for `CACHE_TTL_S`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._cache: dict[str, tuple[float, Tenant | None]] = {}

    async def get(self, client_key: str) -> Tenant | None:
        """Return the tenant (enabled or not), or None if it never installed."""
        hit = self._cache.get(client_key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(select(tenants).where(tenants.c.client_key == client_key))
            ).first()
        tenant = (
            Tenant(row.client_key, row.shared_secret, row.base_url, bool(row.enabled))
            if row is not None
            else None
        )
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            now = time.monotonic()
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now and v[1]}
        self._cache[client_key] = (time.monotonic() + CACHE_TTL_S, tenant)
        return tenant

    async def active_secret(self, client_key: str) -> str | None:
        """Return the shared secret of an enabled tenant, else None."""
        tenant = await self.get(client_key)
        return tenant.shared_secret if tenant is not None and tenant.enabled else None

    async def install(self, client_key: str, shared_secret: str, base_url: str) -> None:
        """Create or update a tenant from its `installed` callback and enable it."""
        now = utcnow()
        stmt = upsert(tenants, self._engine.dialect.name).values(
            client_key=client_key,
            shared_secret=shared_secret,
            base_url=base_url,
            enabled=True,
            installed_at=now,
            updated_at=now,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["client_key"],
            set_={
                "shared_secret": shared_secret,
                "base_url": base_url,
                "enabled": True,
                "updated_at": now,
            },
        )
        async with self._engine.begin() as conn:
            await conn.execute(stmt)
        self._cache.pop(client_key, None)

    async def claim_lifecycle_token(self, token_id: str, expires_at: float) -> bool:
        """Record a lifecycle token as used; False when it was used before (a replay).

        Kept in the database, so that every replica sees it, until the token expires:
        older ones are refused by their age anyway. Only verified tokens get here, so
        the rows grow with genuine installs, not with what anyone sends.
        """
        now = utcnow()
        key = f"{LIFECYCLE_TOKEN_PREFIX}{token_id}"
        # Fixed-width epoch seconds: the text compares as the number does.
        expiry = f"{int(expires_at) + LIFECYCLE_TOKEN_GRACE_S:012d}"
        insert = (
            upsert(kv, self._engine.dialect.name)
            .values(key=key, value=expiry, updated_at=now)
            .on_conflict_do_nothing(index_elements=["key"])
        )
        async with self._engine.begin() as conn:
            await conn.execute(
                delete(kv).where(
                    kv.c.key.startswith(LIFECYCLE_TOKEN_PREFIX, autoescape=True),
                    kv.c.value < f"{int(now.timestamp()):012d}",
                )
            )
            return (await conn.execute(insert)).rowcount == 1

    async def disable(self, client_key: str) -> None:
        """Mark a tenant uninstalled: its deliveries are refused from now on."""
        async with self._engine.begin() as conn:
            await conn.execute(
                update(tenants)
                .where(tenants.c.client_key == client_key)
                .values(enabled=False, updated_at=utcnow())
            )
        self._cache.pop(client_key, None)

    async def all_enabled(self) -> list[Tenant]:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(tenants).where(tenants.c.enabled))).all()
        return [Tenant(r.client_key, r.shared_secret, r.base_url, True) for r in rows]
