"""Event processing: claim stored events, evaluate the rules, store matches and the outbox.

Claims carry a lease (`lease_until`); an event whose worker died is claimed again once
the lease has passed. Everything an event produces (its rule matches, one action run per
step of each matching rule, its new status) is written in one transaction, guarded by
the lease, and action runs are keyed by event id + rule name + step index, so a reclaimed
event never yields a second set of action runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.db.models import action_runs, events, rule_matches, utcnow
from bot.rules import Evaluation, RuleSet, evaluate

log = logging.getLogger(__name__)

MAX_EVENT_ATTEMPTS = 5  # an event that crashes its worker this often is marked failed


def idempotency_key(event_id: int, rule_name: str, step_index: int) -> str:
    """Return the key that makes one action run per event, rule and step."""
    return f"{event_id}:{rule_name}:{step_index}"


@dataclass(frozen=True, slots=True)
class Claimed:
    """An event this worker holds the lease of."""

    id: int
    body: bytes
    attempts: int


def claim_statement(
    table: Any,
    dialect_name: str,
    ready: Any,
    *,
    owner: str,
    now: datetime,
    lease_s: float,
    limit: int,
    values: dict[str, Any],
    returning: tuple[Any, ...],
) -> Any:
    """UPDATE ... WHERE id IN (SELECT ... LIMIT n [FOR UPDATE SKIP LOCKED]) RETURNING ...

    One statement, so that on SQLite it takes the write lock at once (no read-then-write
    upgrade that could deadlock), and on PostgreSQL replicas skip each other's rows.
    """
    candidates = select(table.c.id).where(ready).order_by(table.c.id).limit(limit)
    if dialect_name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    return (
        update(table)
        .where(table.c.id.in_(candidates.scalar_subquery()))
        .values(
            lease_owner=owner,
            lease_until=now + timedelta(seconds=lease_s),
            attempts=table.c.attempts + 1,
            **values,
        )
        .returning(*returning)
    )


class EventProcessor:
    """Turn received events into rule matches and pending action runs."""

    def __init__(
        self,
        engine: AsyncEngine,
        rules: Callable[[], RuleSet],
        *,
        lease_s: float = 60.0,
        batch: int = 100,
        owner: str | None = None,
        on_planned: Callable[[], None] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self._rules = rules
        self._lease_s = lease_s
        self._batch = batch
        self.owner = owner or f"events-{uuid.uuid4().hex[:12]}"
        self._on_planned = on_planned
        self._clock = clock
        self._insert_runs = (
            postgresql.insert(action_runs)
            if engine.dialect.name == "postgresql"
            else sqlite.insert(action_runs)
        ).on_conflict_do_nothing(index_elements=["idempotency_key"])
        self.wakeup = asyncio.Event()

    async def claim(self) -> list[Claimed]:
        """Lease up to `batch` events that are received, or whose lease has run out."""
        now = self._clock()
        ready = or_(
            events.c.status == "received",
            and_(events.c.status == "processing", events.c.lease_until < now),
        )
        stmt = claim_statement(
            events,
            self._engine.dialect.name,
            ready,
            owner=self.owner,
            now=now,
            lease_s=self._lease_s,
            limit=self._batch,
            values={"status": "processing"},
            returning=(events.c.id, events.c.body, events.c.attempts),
        )
        async with self._engine.begin() as conn:
            rows = (await conn.execute(stmt)).all()
        return sorted((Claimed(r.id, r.body, r.attempts) for r in rows), key=lambda c: c.id)

    async def process(self, claimed: Claimed) -> bool:
        """Evaluate one claimed event and store the outcome; False if the lease was lost."""
        ruleset = self._rules()
        try:
            payload = orjson.loads(claimed.body)
            evaluation = evaluate(ruleset, payload)
            failure = None
        except Exception as exc:  # a payload the engine cannot read fails this event only
            log.exception("event %s could not be evaluated", claimed.id)
            evaluation, failure = Evaluation(matched=[], missed=[]), f"evaluation failed: {exc}"
        if failure is not None and claimed.attempts < MAX_EVENT_ATTEMPTS:
            return False  # leave the lease to expire: it is tried again later
        async with self._engine.begin() as conn:
            done = await self._finish(conn, claimed.id, ruleset, evaluation, failure)
        for rule in evaluation.matched:
            log.info(
                "rule matched",
                extra={"event_id": claimed.id, "rule": rule.name, "ruleset": ruleset.version[:12]},
            )
        return done

    async def _finish(
        self,
        conn: AsyncConnection,
        event_id: int,
        ruleset: RuleSet,
        evaluation: Evaluation,
        failure: str | None,
    ) -> bool:
        now = self._clock()
        marked = await conn.execute(
            update(events)
            .where(events.c.id == event_id, events.c.lease_owner == self.owner)
            .values(
                status="failed" if failure else "processed",
                processed_at=now,
                lease_owner=None,
                lease_until=None,
                error=failure,
                ruleset_version=ruleset.version,
            )
        )
        if marked.rowcount != 1:
            return False  # another worker took the event over; its outcome stands
        await conn.execute(delete(rule_matches).where(rule_matches.c.event_id == event_id))
        match_rows = [
            {"event_id": event_id, "rule_name": rule.name, "matched": True, "reason": None}
            for rule in evaluation.matched
        ] + [
            {
                "event_id": event_id,
                "rule_name": miss.rule_name,
                "matched": False,
                "reason": miss.reason,
            }
            for miss in evaluation.missed
        ]
        if match_rows:
            await conn.execute(
                insert(rule_matches),
                [{**row, "ruleset_version": ruleset.version} for row in match_rows],
            )
        run_rows = [
            {
                "event_id": event_id,
                "rule_name": rule.name,
                "step_index": step.index,
                "step_id": step.id,
                "action": step.action,
                "idempotency_key": idempotency_key(event_id, rule.name, step.index),
                "status": "pending",
                "attempts": 0,
                # The raw `with:` (templates unrendered): a run renders it when it executes,
                # so it is self-contained across restarts and rule reloads.
                "params": dict(step.with_),
                "created_at": now,
                "updated_at": now,
            }
            for rule in evaluation.matched
            for step in rule.steps
        ]
        if run_rows:
            await conn.execute(self._insert_runs, run_rows)
        return True

    async def run_once(self) -> int:
        """Claim and process one batch; return how many events were processed."""
        claimed = await self.claim()
        processed = 0
        for item in claimed:
            if await self.process(item):
                processed += 1
        if processed and self._on_planned is not None:
            self._on_planned()
        return processed

    async def run(self, poll_s: float = 1.0) -> None:
        """Process events until cancelled; wake on `wakeup` or every `poll_s` seconds."""
        while True:
            try:
                busy = await self.run_once()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("event processing paused: database error: %s", exc)
                busy = 0
            if busy:
                continue
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout=poll_s)

    async def release(self) -> None:
        """Give back this worker's leases (graceful shutdown) so others take them at once."""
        async with self._engine.begin() as conn:
            await conn.execute(
                update(events)
                .where(events.c.lease_owner == self.owner, events.c.status == "processing")
                .values(status="received", lease_owner=None, lease_until=None)
            )
