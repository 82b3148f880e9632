"""Read-side queries shared by the CLI and the admin API."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, func, not_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.models import (
    ACTION_STATUSES,
    EVENT_STATUSES,
    action_attempts,
    action_runs,
    events,
    rule_matches,
)
from bot.errors import RetryRefused
from bot.rules.workflow import IF_SKIPPED, ON_FAILURE_BASE


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def event_summary(row: Row[Any]) -> dict[str, Any]:
    """Describe an event row without its body."""
    return {
        "id": row.id,
        "delivery_id": row.delivery_id,
        "tenant": row.tenant,
        "webhook_event": row.webhook_event,
        "issue_key": row.issue_key,
        "status": row.status,
        "outcome": row.outcome,
        "source": row.source,
        "retry_count": row.retry_count,
        "received_at": _iso(row.received_at),
        "processed_at": _iso(row.processed_at),
        "attempts": row.attempts,
        "error": row.error,
        "ruleset_version": row.ruleset_version,
    }


async def list_events(
    engine: AsyncEngine,
    *,
    status: str | None = None,
    limit: int | None = None,
    outcome: str | None = None,
) -> list[dict[str, Any]]:
    """Return stored events, newest first (by the (outcome, id) index when filtered on it)."""
    query = select(*(c for c in events.c if c.name not in ("body", "rule_misses"))).order_by(
        events.c.id.desc()
    )
    if status:
        query = query.where(events.c.status == status)
    if outcome:
        query = query.where(events.c.outcome == outcome)
    if limit is not None:
        query = query.limit(limit)
    async with engine.connect() as conn:
        return [event_summary(row) for row in await conn.execute(query)]


async def get_event(engine: AsyncEngine, event_id: int) -> dict[str, Any] | None:
    """Return one event with its payload, rule matches and action runs (with attempts)."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(events).where(events.c.id == event_id))).first()
        if row is None:
            return None
        matches = await conn.execute(
            select(rule_matches)
            .where(rule_matches.c.event_id == event_id)
            .order_by(rule_matches.c.id)
        )
        runs = (
            await conn.execute(
                select(action_runs)
                .where(action_runs.c.event_id == event_id)
                .order_by(action_runs.c.rule_name, action_runs.c.step_index)
            )
        ).all()
        blockers = await _key_holders(conn, runs)
        attempts = await conn.execute(
            select(action_attempts)
            .where(action_attempts.c.action_run_id.in_([r.id for r in runs]))
            .order_by(action_attempts.c.id)
        )
    by_run: dict[int, list[dict[str, Any]]] = {}
    for a in attempts:
        by_run.setdefault(a.action_run_id, []).append(
            {
                "attempt": a.attempt,
                "outcome": a.outcome,
                "status_code": a.status_code,
                "error": a.error,
                "started_at": _iso(a.started_at),
                "finished_at": _iso(a.finished_at),
            }
        )
    return {
        **event_summary(row),
        "payload": row.body.decode("utf-8", errors="replace"),
        "matches": [
            {"rule": m.rule_name, "matched": m.matched, "reason": m.reason} for m in matches
        ]
        + [
            {"rule": m["rule"], "matched": False, "reason": m["reason"]}
            for m in row.rule_misses or ()
        ],
        "action_runs": [
            {
                "id": r.id,
                "rule": r.rule_name,
                "step": r.step_index,
                "step_id": r.step_id,
                "action": r.action,
                "status": r.status,
                "attempts": r.attempts,
                "next_attempt_at": _iso(r.next_attempt_at),
                "last_error": r.last_error,
                "result": r.result,
                "params": r.params,
                "failure": r.failure,
                "updated_at": _iso(r.updated_at),
                "concurrency_key": r.concurrency_key,
                "waiting_for": _waiting_for(r, blockers),
                "attempt_log": by_run.get(r.id, []),
            }
            for r in runs
        ],
    }


_ACTIVE = ("pending", "running", "retrying", "waiting")


async def _key_holders(
    conn: Any, runs: Sequence[Row[Any]]
) -> dict[str, list[tuple[int, str, bool]]]:
    """For the concurrency keys of runs not started yet: the other active runs of each."""
    keys = {
        r.concurrency_key
        for r in runs
        if r.concurrency_key is not None and r.step_index == 0 and r.status == "pending"
    }
    if not keys:
        return {}
    c = action_runs.c
    first = action_runs.alias("first")
    # The runs of each key still in progress (by the (concurrency_key, status) index, not
    # the key's whole history), each with its first step's status: claimed once, started.
    rows = await conn.execute(
        select(c.event_id, c.rule_name, c.concurrency_key, first.c.status)
        .join(
            first,
            (first.c.event_id == c.event_id)
            & (first.c.rule_name == c.rule_name)
            & (first.c.step_index == 0),
        )
        .where(c.concurrency_key.in_(keys), c.status.in_(_ACTIVE))
        .distinct()
        .order_by(c.event_id, c.rule_name)
    )
    found: dict[str, list[tuple[int, str, bool]]] = {}
    for row in rows:
        found.setdefault(row.concurrency_key, []).append(
            (row.event_id, row.rule_name, row.status != "pending")
        )
    return found


def _waiting_for(run: Row[Any], holders: dict[str, list[tuple[int, str, bool]]]) -> str | None:
    """What a run waits for: its next check (`until`), or the run holding its key."""
    if run.status == "waiting":
        return f"until: next check at {_iso(run.next_attempt_at)}"
    if run.concurrency_key is None or run.step_index != 0 or run.status != "pending":
        return None
    for event_id, rule, started in holders.get(run.concurrency_key, ()):
        if (event_id, rule) == (run.event_id, run.rule_name):
            continue
        if started or (event_id, rule) < (run.event_id, run.rule_name):
            return (
                f"concurrency key {run.concurrency_key!r}: "
                f"{'held by' if started else 'queued behind'} event {event_id} (rule {rule})"
            )
    return None


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events to list; None means any. `since` is inclusive, `until` exclusive."""

    status: str | None = None
    outcome: str | None = None
    webhook_event: str | None = None
    issue_key: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    rule: str | None = None  # events this rule matched


async def search_events(
    engine: AsyncEngine,
    where: EventFilter,
    *,
    limit: int,
    before_id: int | None = None,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Return one page of matching events, newest first (`before_id` is the cursor)."""
    c = events.c
    wanted = (
        (c.status, operator.eq, where.status),
        (c.outcome, operator.eq, where.outcome),
        (c.webhook_event, operator.eq, where.webhook_event),
        (c.issue_key, operator.eq, where.issue_key),
        (c.received_at, operator.ge, where.since),
        (c.received_at, operator.lt, where.until),
        (c.id, operator.lt, before_id),
    )
    matched = (
        [
            select(rule_matches.c.id)
            .where(
                rule_matches.c.event_id == c.id,
                rule_matches.c.rule_name == where.rule,
                rule_matches.c.matched,
            )
            .exists()
        ]
        if where.rule is not None
        else []
    )
    query = (
        select(*(col for col in c if col.name != "body"))
        .where(*(op(column, value) for column, op, value in wanted if value is not None))
        .where(*matched)
        .order_by(c.id.desc())
        .limit(limit)
        .offset(offset)
    )
    async with engine.connect() as conn:
        return [event_summary(row) for row in await conn.execute(query)]


async def status_counts(engine: AsyncEngine) -> dict[str, dict[str, int]]:
    """Count events and action runs by status (every known status, zeros included)."""
    tables = (("events", events, EVENT_STATUSES), ("action_runs", action_runs, ACTION_STATUSES))
    counts: dict[str, dict[str, int]] = {}
    async with engine.connect() as conn:
        for name, table, statuses in tables:
            rows = await conn.execute(select(table.c.status, func.count()).group_by(table.c.status))
            counts[name] = dict.fromkeys(statuses, 0) | {s: int(n) for s, n in rows.tuples()}
    return counts


async def run_summaries(engine: AsyncEngine, event_ids: Sequence[int]) -> dict[int, list[str]]:
    """Per event: each rule's action runs in words, e.g. `deploy: 3 succeeded, 1 dead`."""
    if not event_ids:
        return {}
    c = action_runs.c
    query = (
        select(c.event_id, c.rule_name, c.status, func.count())
        .where(c.event_id.in_(list(event_ids)))
        .group_by(c.event_id, c.rule_name, c.status)
        .order_by(c.event_id, c.rule_name, c.status)
    )
    counts: dict[int, dict[str, list[str]]] = {}
    async with engine.connect() as conn:
        for event_id, rule, status, n in (await conn.execute(query)).tuples():
            counts.setdefault(event_id, {}).setdefault(rule, []).append(f"{n} {status}")
    return {
        event_id: [f"{rule}: {', '.join(parts)}" for rule, parts in rules.items()]
        for event_id, rules in counts.items()
    }


async def list_action_runs(
    engine: AsyncEngine, *, status: str | None, limit: int | None = 100
) -> list[dict[str, Any]]:
    """Return action runs (in `status`, or all) with their event's issue key, most recent
    first."""
    r, e = action_runs.c, events.c
    query = (
        select(
            r.id,
            r.event_id,
            r.rule_name,
            r.step_index,
            r.action,
            r.status,
            r.attempts,
            r.last_error,
            r.updated_at,
            r.next_attempt_at,
            r.concurrency_key,
            e.issue_key,
            e.webhook_event,
        )
        .join(events, e.id == r.event_id)
        .where(*([r.status == status] if status else []))
        .order_by(r.updated_at.desc(), r.id.desc())
        .limit(limit)
    )
    async with engine.connect() as conn:
        rows = await conn.execute(query)
        return [
            {
                "id": row.id,
                "event_id": row.event_id,
                "issue_key": row.issue_key,
                "webhook_event": row.webhook_event,
                "rule": row.rule_name,
                "step": row.step_index,
                "action": row.action,
                "status": row.status,
                "attempts": row.attempts,
                "last_error": row.last_error,
                "updated_at": _iso(row.updated_at),
                "next_attempt_at": _iso(row.next_attempt_at),
                "concurrency_key": row.concurrency_key,
            }
            for row in rows
        ]


RETRYABLE_RUN_STATUSES = ("dead", "skipped")


def rearm_on_failure(event_ids: Sequence[int], rule_name: str | None = None) -> Any:
    """UPDATE: the `on_failure` steps of these events' runs (of `rule_name`, else of the
    runs with a dead step) are held again: a run going again cleans up only if it dies
    once more."""
    c = action_runs.c
    do = action_runs.alias("do")
    which = [do.c.rule_name == rule_name] if rule_name is not None else [do.c.status == "dead"]
    going_again = (
        select(do.c.id)
        .where(
            do.c.event_id == c.event_id,
            do.c.rule_name == c.rule_name,
            do.c.step_index < ON_FAILURE_BASE,
            *which,
        )
        .exists()
    )
    return (
        update(action_runs)
        .where(
            c.event_id.in_(list(event_ids)),
            c.step_index >= ON_FAILURE_BASE,
            c.status != "held",
            going_again,
        )
        .values(status="held", failure=None, attempts=0, last_error=None, result=None,
                next_attempt_at=None, lease_owner=None, lease_until=None)
    )  # fmt: skip


async def retry_action_run(
    engine: AsyncEngine, run_id: int, now: datetime
) -> tuple[str, list[int]] | None:
    """Queue a dead or skipped run again, with the skipped steps after it.

    Return the run's old status and the ids queued, or None when there is no such run.
    Raise RetryRefused when the run is in another status, or when an earlier step of its
    rule has not succeeded: a run is due only after the step before it succeeded, so it
    would stay pending forever; the earlier run to retry instead is named. (The one
    rule for every way to retry: admin API, status page, CLI.)
    """
    c = action_runs.c
    fresh = {
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": now,
        "lease_owner": None,
        "lease_until": None,
        "state": None,
        "last_error": None,
        "waiting_since": None,  # a step that timed out waits afresh
        "updated_at": now,
    }
    async with engine.begin() as conn:
        run = (
            await conn.execute(
                select(c.status, c.event_id, c.rule_name, c.step_index)
                .where(c.id == run_id)
                .with_for_update()
            )
        ).first()
        if run is None:
            return None
        if run.status not in RETRYABLE_RUN_STATUSES:
            raise RetryRefused(
                f"action run {run_id} is {run.status}; only dead or skipped runs can be retried"
            )
        in_do = run.step_index < ON_FAILURE_BASE
        if not in_do and run.status == "skipped":
            # A clean-up that was not needed, retried alone, would undo a rollout that
            # succeeded (its `do` steps are done): it runs only when a step of `do` dies.
            dead = (
                await conn.execute(
                    select(c.id).where(
                        c.event_id == run.event_id,
                        c.rule_name == run.rule_name,
                        c.step_index < ON_FAILURE_BASE,
                        c.status == "dead",
                    )
                )
            ).scalar()
            instead = (
                ""
                if dead is None
                else (
                    f"; retry the dead step, action run {dead}: if it dies again, its on_failure "
                    "steps run again"
                )
            )
            raise RetryRefused(
                f"action run {run_id} is an on_failure step that was skipped: it runs only "
                f"when a step of do dies{instead}",
                retry_instead=dead,
            )
        # A step of `do` runs only after the step before it succeeded or was skipped by its
        # own `if`; queued behind anything else it would stay pending forever.
        blocking = (
            await conn.execute(
                select(c.id, c.status, c.step_index)
                .where(
                    c.event_id == run.event_id,
                    c.rule_name == run.rule_name,
                    c.step_index < run.step_index,
                    c.status != "succeeded",
                    or_(c.status != "skipped", not_(c.last_error.like(f"{IF_SKIPPED}%"))),
                )
                .order_by(c.step_index)
                .limit(1)
            )
        ).first()
        if in_do and blocking is not None:
            raise RetryRefused(
                f"action run {run_id} waits for step {blocking.step_index + 1} of its rule, "
                f"action run {blocking.id}, which is {blocking.status}: "
                f"retry action run {blocking.id} instead",
                retry_instead=int(blocking.id),
            )
        if in_do:
            await conn.execute(
                rearm_on_failure([run.event_id], run.rule_name).values(updated_at=now)
            )
        later = (
            await conn.execute(
                update(action_runs)
                .where(
                    c.event_id == run.event_id,
                    c.rule_name == run.rule_name,
                    c.step_index > run.step_index,
                    c.step_index < (ON_FAILURE_BASE if in_do else ON_FAILURE_BASE * 2),
                    c.status == "skipped",
                )
                .values(**fresh)
                .returning(c.id)
            )
        ).scalars()
        queued = [run_id, *sorted(later)]
        await conn.execute(
            update(action_runs).where(c.id == run_id, c.status == run.status).values(**fresh)
        )
    return str(run.status), queued
