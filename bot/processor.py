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
        return await self.process_batch([claimed]) == 1

    async def process_batch(self, claimed: list[Claimed]) -> int:
        """Evaluate claimed events and store their outcomes in one transaction.

        Return how many were stored (an event whose lease was lost, or whose evaluation
        failed and will be tried again, is not). One commit per batch instead of one per
        event keeps the write lock free for deliveries.
        """
        ruleset = self._rules()
        outcomes: list[tuple[int, Evaluation, str | None]] = []
        for item in claimed:
            try:
                payload = orjson.loads(item.body)
                evaluation = evaluate(ruleset, payload)
                failure = None
            except Exception as exc:  # a payload the engine cannot read fails this event only
                log.exception("event %s could not be evaluated", item.id)
                evaluation, failure = Evaluation(matched=[], missed=[]), f"evaluation failed: {exc}"
            if failure is not None and item.attempts < MAX_EVENT_ATTEMPTS:
                continue  # leave the lease to expire: it is tried again later
            outcomes.append((item.id, evaluation, failure))
        if not outcomes:
            return 0
        async with self._engine.begin() as conn:
            stored, planned = await self._finish(conn, ruleset, outcomes)
        if planned and self._on_planned is not None:
            self._on_planned()  # only new action runs are news to the executor
        for event_id, evaluation, _ in outcomes:
            for rule in evaluation.matched if event_id in stored else ():
                log.info(
                    "rule matched",
                    extra={
                        "event_id": event_id,
                        "rule": rule.name,
                        "ruleset": ruleset.version[:12],
                    },
                )
        return len(stored)

    async def _finish(
        self,
        conn: AsyncConnection,
        ruleset: RuleSet,
        outcomes: list[tuple[int, Evaluation, str | None]],
    ) -> tuple[set[int], int]:
        """Mark the events still leased to us done, with their matches and action runs.

        A handful of statements per batch, whatever its size; returns the ids stored and
        how many action runs were planned.
        """
        now = self._clock()
        by_failure: dict[str | None, list[int]] = {}
        for event_id, _, failure in outcomes:
            by_failure.setdefault(failure, []).append(event_id)
        stored: set[int] = set()
        for failure, ids in by_failure.items():
            marked = await conn.execute(
                update(events)
                .where(events.c.id.in_(ids), events.c.lease_owner == self.owner)
                .values(
                    status="failed" if failure else "processed",
                    processed_at=now,
                    lease_owner=None,
                    lease_until=None,
                    error=failure,
                    ruleset_version=ruleset.version,
                )
                .returning(events.c.id)
            )
            # An event another worker took over is not ours to finish: its outcome stands.
            stored.update(marked.scalars())
        if not stored:
            return stored, 0
        await conn.execute(delete(rule_matches).where(rule_matches.c.event_id.in_(stored)))
        ours = [(event_id, ev) for event_id, ev, _ in outcomes if event_id in stored]
        match_rows = [
            {"event_id": event_id, "rule_name": rule.name, "matched": True, "reason": None}
            for event_id, ev in ours
            for rule in ev.matched
        ] + [
            {
                "event_id": event_id,
                "rule_name": miss.rule_name,
                "matched": False,
                "reason": miss.reason,
            }
            for event_id, ev in ours
            for miss in ev.missed
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
            for event_id, ev in ours
            for rule in ev.matched
            for step in rule.steps
        ]
        if run_rows:
            await conn.execute(self._insert_runs, run_rows)
        return stored, len(run_rows)

    async def run_once(self) -> int:
        """Claim and process one batch; return how many events were processed."""
        return await self.process_batch(await self.claim())

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
