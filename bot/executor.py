"""Action execution: claim due action runs from the outbox, call the service, record it.

A run moves `pending -> running -> succeeded | retrying -> ... | dead`. Steps of one rule
run in order: a run is due only when the step before it succeeded; when a step is dead
the later steps of that rule are `skipped`. A run found `running` with an expired lease
(its worker died mid-call) is claimed again with `lookup_first`, so a create whose
outcome is unknown looks for its object before creating it a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import and_, exists, insert, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import ColumnElement

from bot.db.models import action_attempts, action_runs, events, utcnow
from bot.due import next_attempt_at
from bot.errors import ActionError, ServiceDisabled, TemplateRenderError
from bot.processor import claim_statement
from bot.rules import Step, build_context, render_params
from bot.services.actions import ActionRunner, Done, Wait, action_params

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """How often and how patiently a failing action run is retried before it is dead."""

    max_attempts: int = 8
    base_delay_s: float = 5.0
    max_delay_s: float = 900.0


@dataclass(frozen=True, slots=True)
class _Run:
    id: int
    event_id: int
    rule_name: str
    step_index: int
    step_id: str | None
    action: str
    params: dict[str, Any]
    state: dict[str, Any] | None
    attempts: int
    resumed: bool  # claimed back from a worker whose lease ran out: outcome unknown


def due_condition(now: datetime) -> ColumnElement[bool]:
    """Runs that may start now: waiting and due with their previous step succeeded, or stale."""
    previous = action_runs.alias("previous")
    previous_succeeded = exists().where(
        previous.c.event_id == action_runs.c.event_id,
        previous.c.rule_name == action_runs.c.rule_name,
        previous.c.step_index == action_runs.c.step_index - 1,
        previous.c.status == "succeeded",
    )
    waiting = and_(
        action_runs.c.status.in_(("pending", "retrying")),
        or_(action_runs.c.next_attempt_at.is_(None), action_runs.c.next_attempt_at <= now),
        or_(action_runs.c.step_index == 0, previous_succeeded),
    )
    stale = and_(action_runs.c.status == "running", action_runs.c.lease_until < now)
    return or_(waiting, stale)


class ActionExecutor:
    """Run due action runs through an `ActionRunner` and persist every attempt."""

    def __init__(
        self,
        engine: AsyncEngine,
        runner: ActionRunner,
        *,
        rules_dir: Path,
        lease_s: float = 120.0,
        concurrency: int = 4,
        budget: RetryBudget | None = None,
        owner: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self._engine = engine
        self._runner = runner
        self._rules_dir = rules_dir
        self._lease_s = lease_s
        self._concurrency = concurrency
        self._budget = budget or RetryBudget()
        self.owner = owner or f"actions-{uuid.uuid4().hex[:12]}"
        self._clock = clock
        self._rng = rng or random.Random()
        self.wakeup = asyncio.Event()

    async def claim(self, limit: int) -> list[_Run]:
        """Lease up to `limit` due runs."""
        now = self._clock()
        stmt = claim_statement(
            action_runs,
            self._engine.dialect.name,
            due_condition(now),
            owner=self.owner,
            now=now,
            lease_s=self._lease_s,
            limit=limit,
            values={"status": "running", "updated_at": now},
            returning=tuple(action_runs.c),
        )
        async with self._engine.begin() as conn:
            rows = (await conn.execute(stmt)).all()
        # Any second or later attempt may follow one whose outcome is unknown (a timeout,
        # a worker killed mid-call): it runs with `lookup_first`, so creates look first.
        return [
            _Run(
                id=r.id,
                event_id=r.event_id,
                rule_name=r.rule_name,
                step_index=r.step_index,
                step_id=r.step_id,
                action=r.action,
                params=r.params or {},
                state=r.state,
                attempts=r.attempts,
                resumed=r.attempts > 1,
            )
            for r in sorted(rows, key=lambda r: r.id)
        ]

    async def _context(self, run: _Run) -> dict[str, Any]:
        """Template context: the event payload, `event`, and earlier steps' results."""
        async with self._engine.connect() as conn:
            event = (
                await conn.execute(
                    select(events.c.body, events.c.received_at).where(events.c.id == run.event_id)
                )
            ).one()
            earlier = await conn.execute(
                select(action_runs.c.step_id, action_runs.c.result).where(
                    action_runs.c.event_id == run.event_id,
                    action_runs.c.rule_name == run.rule_name,
                    action_runs.c.step_index < run.step_index,
                    action_runs.c.status == "succeeded",
                    action_runs.c.step_id.is_not(None),
                )
            )
            steps = {row.step_id: row.result for row in earlier}
        return build_context(
            orjson.loads(event.body),
            event_id=str(run.event_id),
            received_at=event.received_at.isoformat(),
            steps=steps,
        )

    def _step(self, run: _Run) -> Step:
        spec = action_params(run.action) or ()
        return Step(
            id=run.step_id,
            action=run.action,
            with_=run.params,
            index=run.step_index,
            base_dir=self._rules_dir,
            file_params=frozenset(p.name for p in spec if p.location == "file"),
        )

    async def execute(self, run: _Run) -> str:
        """Run one claimed action run; return its new status."""
        started = self._clock()
        status_code: int | None = None
        try:
            params = render_params(self._step(run), await self._context(run))
            outcome = await self._runner.run(
                run.action, params, state=run.state, lookup_first=run.resumed
            )
        except TemplateRenderError as exc:
            return await self._failed(run, started, str(exc), None, retryable=False)
        except ServiceDisabled as exc:
            return await self._failed(run, started, str(exc), None, retryable=False)
        except ActionError as exc:
            status_code = exc.status
            delay = exc.retry_after_s
            return await self._failed(
                run, started, str(exc), status_code, retryable=exc.retryable, retry_after_s=delay
            )
        except Exception as exc:  # a bug or an unexpected failure: retried within the budget
            log.exception("action run %s failed unexpectedly", run.id)
            return await self._failed(run, started, f"{type(exc).__name__}: {exc}", None, True)
        if isinstance(outcome, Wait):
            return await self._record(
                run,
                started,
                outcome="waiting",
                status="pending",
                # A wait is progress, not a failed attempt: it does not use the budget.
                attempts=run.attempts - 1,
                next_attempt_at=started + timedelta(seconds=outcome.after_s),
                state=outcome.state,
            )
        assert isinstance(outcome, Done)
        return await self._record(
            run, started, outcome="succeeded", status="succeeded", result=outcome.result
        )

    async def _failed(
        self,
        run: _Run,
        started: datetime,
        error: str,
        status_code: int | None,
        retryable: bool,
        retry_after_s: float | None = None,
    ) -> str:
        if retryable and run.attempts < self._budget.max_attempts:
            when = next_attempt_at(
                run.attempts,
                started,
                self._budget.base_delay_s,
                self._budget.max_delay_s,
                self._rng,
                retry_after_s,
            )
            return await self._record(
                run,
                started,
                outcome="failed",
                status="retrying",
                error=error,
                status_code=status_code,
                next_attempt_at=when,
            )
        return await self._record(
            run, started, outcome="failed", status="dead", error=error, status_code=status_code
        )

    async def _record(
        self,
        run: _Run,
        started: datetime,
        *,
        outcome: str,
        status: str,
        error: str | None = None,
        status_code: int | None = None,
        result: Any = None,
        attempts: int | None = None,
        next_attempt_at: datetime | None = None,
        state: dict[str, Any] | None = None,
    ) -> str:
        finished = self._clock()
        values: dict[str, Any] = {
            "status": status,
            "lease_owner": None,
            "lease_until": None,
            "next_attempt_at": next_attempt_at,
            "last_error": error,
            "updated_at": finished,
        }
        if result is not None or status == "succeeded":
            values["result"] = result
        if attempts is not None:
            values["attempts"] = attempts
        if state is not None:
            values["state"] = state
        async with self._engine.begin() as conn:
            updated = await conn.execute(
                update(action_runs)
                .where(action_runs.c.id == run.id, action_runs.c.lease_owner == self.owner)
                .values(**values)
            )
            if updated.rowcount != 1:
                return "lost"  # the lease ran out and another worker owns the run now
            await conn.execute(
                insert(action_attempts).values(
                    action_run_id=run.id,
                    attempt=run.attempts,
                    started_at=started,
                    finished_at=finished,
                    outcome=outcome,
                    status_code=status_code,
                    error=error,
                )
            )
            if status == "dead":
                await conn.execute(
                    update(action_runs)
                    .where(
                        action_runs.c.event_id == run.event_id,
                        action_runs.c.rule_name == run.rule_name,
                        action_runs.c.step_index > run.step_index,
                        action_runs.c.status.in_(("pending", "retrying")),
                    )
                    .values(
                        status="skipped",
                        last_error=f"step {run.step_index + 1} ({run.action}) is dead",
                        updated_at=finished,
                    )
                )
        log.info(
            "action %s",
            outcome,
            extra={
                "event_id": run.event_id,
                "rule": run.rule_name,
                "action": run.action,
                "action_run_id": run.id,
                "attempt": run.attempts,
                "status": status,
                "status_code": status_code,
                "error": error,
            },
        )
        return status

    async def run_once(self) -> int:
        """Claim and execute one batch concurrently; return how many runs were executed."""
        runs = await self.claim(self._concurrency)
        if runs:
            await asyncio.gather(*(self.execute(run) for run in runs))
        return len(runs)

    async def run(self, poll_s: float = 1.0) -> None:
        """Execute due runs until cancelled; wake on `wakeup` or every `poll_s` seconds."""
        while True:
            try:
                busy = await self.run_once()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("action execution paused: database error: %s", exc)
                busy = 0
            if busy:
                continue
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout=poll_s)

    async def release(self) -> None:
        """Give back leases of runs not started (graceful shutdown)."""
        async with self._engine.begin() as conn:
            await conn.execute(
                update(action_runs)
                .where(action_runs.c.lease_owner == self.owner, action_runs.c.status == "running")
                .values(lease_until=self._clock())
            )
