"""The event store's write path: concurrent deliveries share one commit (group commit)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.group_commit import GroupCommit
from bot.db.models import events, utcnow
from bot.delivery import Delivery
from bot.errors import StoreUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stored:
    """The outcome of storing one delivery."""

    event_id: int | None  # None when it was a redelivery of a stored event
    created: bool


@dataclass(frozen=True, slots=True)
class _Pending:
    tenant: str
    delivery: Delivery
    source: str


def upsert_ignoring_duplicates(engine: AsyncEngine) -> Insert:
    """INSERT ... ON CONFLICT (tenant, delivery_id) DO NOTHING RETURNING the new rows."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    stmt: Insert = (
        dialect.insert(events)
        .on_conflict_do_nothing(index_elements=["tenant", "delivery_id"])
        .returning(events.c.id, events.c.tenant, events.c.delivery_id)
    )
    return stmt


class EventStore:
    """Stores deliveries; `add` returns only after the row is committed."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_batch: int = 1000,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self._engine = engine
        self.on_commit = on_commit
        self._insert = upsert_ignoring_duplicates(engine)
        self._commits: GroupCommit[_Pending, Stored] = GroupCommit(self._write, max_batch=max_batch)
        self._running = False

    async def start(self) -> None:
        self._running = True

    async def close(self) -> None:
        """Stop taking deliveries once what was submitted has been written."""
        self._running = False
        await self._commits.idle()

    async def add(self, tenant: str, delivery: Delivery, *, source: str = "live") -> Stored:
        """Store a delivery (a redelivery of a stored one is not stored again)."""
        if not self._running:
            raise StoreUnavailable("event store is not running")
        return await self._commits.submit(_Pending(tenant, delivery, source))

    async def _write(self, batch: list[_Pending]) -> list[Stored]:
        """Insert a batch in one transaction; duplicates (redeliveries) are not stored."""
        now = utcnow()
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for item in batch:
            key = (item.tenant, item.delivery.delivery_id)
            rows.setdefault(
                key,
                {
                    "tenant": item.tenant,
                    "delivery_id": item.delivery.delivery_id,
                    "retry_count": item.delivery.retry_count,
                    "webhook_event": item.delivery.webhook_event,
                    "issue_key": item.delivery.issue_key,
                    "source": item.source,
                    "body": item.delivery.body,
                    "status": "received",
                    "received_at": now,
                    "attempts": 0,
                },
            )
        try:
            async with self._engine.begin() as conn:
                result = await conn.execute(self._insert, list(rows.values()))
                created = {(row.tenant, row.delivery_id): int(row.id) for row in result}
        except (SQLAlchemyError, OSError) as exc:
            log.warning("event store write failed (%d deliveries): %s", len(batch), exc)
            raise StoreUnavailable("database unavailable") from exc
        if self.on_commit is not None:
            self.on_commit()
        # Within one batch the first of several identical deliveries is the new one.
        results: list[Stored] = []
        for item in batch:
            event_id = created.pop((item.tenant, item.delivery.delivery_id), None)
            results.append(Stored(event_id=event_id, created=event_id is not None))
        return results
