"""Stored Jira webhook registrations, and small persisted values (the `kv` table)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.webhook_plan import RegisteredWebhook, WebhookSpec
from bot.db.models import kv, upsert, utcnow, webhook_registrations

# kv keys. The refresh token is a secret: it is stored, never logged or printed.
OAUTH_REFRESH_TOKEN_KEY = "jira.oauth.refresh_token"


def failed_cursor_key(tenant: str) -> str:
    """Return the kv key of a tenant's failed-deliveries cursor (epoch ms)."""
    return f"jira.failed_after_ms:{tenant}"


@dataclass(frozen=True, slots=True)
class Registration:
    """A webhook deploybot registered, as last seen in Jira."""

    tenant: str
    webhook_id: int
    spec: WebhookSpec
    expires_at: datetime | None
    registered_at: datetime
    refreshed_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        """Return the row as JSON-ready values (`webhooks list --json`)."""
        return {
            "tenant": self.tenant,
            "webhook_id": self.webhook_id,
            "jql": self.spec.jql,
            "events": list(self.spec.events),
            "fields": None if self.spec.fields is None else list(self.spec.fields),
            "property_keys": _listed(self.spec.property_keys),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "registered_at": self.registered_at.isoformat(),
            "refreshed_at": self.refreshed_at.isoformat() if self.refreshed_at else None,
        }


def _listed(values: tuple[str, ...] | None) -> list[str] | None:
    return None if values is None else list(values)


class Registrations:
    """Read and write the `webhook_registrations` table."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def list(self, tenant: str | None = None) -> list[Registration]:
        """Return the registrations (of one tenant, or all), by tenant and id."""
        t = webhook_registrations.c
        stmt = select(webhook_registrations).order_by(t.tenant, t.webhook_id)
        if tenant is not None:
            stmt = stmt.where(t.tenant == tenant)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        return [
            Registration(
                r.tenant,
                int(r.webhook_id),
                WebhookSpec(
                    tuple(r.events),
                    r.jql,
                    None if r.fields is None else tuple(r.fields),
                    None if r.property_keys is None else tuple(r.property_keys),
                ),
                r.expires_at,
                r.registered_at,
                r.refreshed_at,
            )
            for r in rows
        ]

    async def replace(
        self, tenant: str, held: Iterable[RegisteredWebhook], refreshed: Iterable[int] = ()
    ) -> None:
        """Make a tenant's rows equal what Jira holds; mark `refreshed` ids refreshed now."""
        t = webhook_registrations.c
        hooks = {h.id: h for h in held}
        now = utcnow()
        refreshed = set(refreshed)
        async with self._engine.begin() as conn:
            known = {
                int(r.webhook_id)
                for r in await conn.execute(select(t.webhook_id).where(t.tenant == tenant))
            }
            gone = known - set(hooks)
            if gone:
                await conn.execute(
                    delete(webhook_registrations).where(
                        t.tenant == tenant, t.webhook_id.in_(sorted(gone))
                    )
                )
            for hook in hooks.values():
                values = {
                    "jql": hook.spec.jql,
                    "events": list(hook.spec.events),
                    "fields": None if hook.spec.fields is None else list(hook.spec.fields),
                    "property_keys": _listed(hook.spec.property_keys),
                    "expires_at": hook.expires_at,
                } | ({"refreshed_at": now} if hook.id in refreshed else {})
                if hook.id in known:
                    await conn.execute(
                        update(webhook_registrations)
                        .where(t.tenant == tenant, t.webhook_id == hook.id)
                        .values(**values)
                    )
                else:
                    await conn.execute(
                        webhook_registrations.insert().values(
                            tenant=tenant, webhook_id=hook.id, registered_at=now, **values
                        )
                    )


async def kv_get(engine: AsyncEngine, key: str) -> str | None:
    """Return the stored value of `key`, or None."""
    async with engine.connect() as conn:
        value = (await conn.execute(select(kv.c.value).where(kv.c.key == key))).scalar()
    return None if value is None else str(value)


async def kv_set(engine: AsyncEngine, key: str, value: str) -> None:
    """Store `value` under `key` (insert or overwrite), committed on return."""
    now = utcnow()
    stmt = upsert(kv, engine.dialect.name).values(key=key, value=value, updated_at=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=["key"], set_={"value": value, "updated_at": now}
    )
    async with engine.begin() as conn:
        await conn.execute(stmt)


class WebhookFilters:
    """The JQL of each registered webhook, by tenant and id, read from the table and kept.

    Read again when older than `max_age_s`, or, at most every `unknown_s`, when a delivery
    names a webhook id not seen yet (a webhook registered since the last read).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_age_s: float = 60.0,
        unknown_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registrations = Registrations(engine)
        self._max_age_s = max_age_s
        self._unknown_s = unknown_s
        self._clock = clock
        self._jql: dict[tuple[str, int], str] = {}
        self._read_at: float | None = None

    def _stale(self, tenant: str, ids: Iterable[int]) -> bool:
        if self._read_at is None:
            return True
        age = self._clock() - self._read_at
        unknown = any((tenant, i) not in self._jql for i in ids)
        return age > self._max_age_s or (unknown and age > self._unknown_s)

    async def matched_jql(self, tenant: str, ids: list[int]) -> frozenset[str] | None:
        """The (normalized) JQL of the webhooks Jira matched; None when it names none we
        know (JQL then cannot be checked)."""
        if not ids:
            return None
        if self._stale(tenant, ids):
            self._jql = {
                (r.tenant, r.webhook_id): r.spec.jql for r in await self._registrations.list()
            }
            self._read_at = self._clock()
        found = frozenset(self._jql[(tenant, i)] for i in ids if (tenant, i) in self._jql)
        return found or None
