"""Read-side queries shared by the CLI and the admin API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.models import action_attempts, action_runs, events, rule_matches


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
        "source": row.source,
        "retry_count": row.retry_count,
        "received_at": _iso(row.received_at),
        "processed_at": _iso(row.processed_at),
        "attempts": row.attempts,
        "error": row.error,
        "ruleset_version": row.ruleset_version,
    }


async def list_events(
    engine: AsyncEngine, *, status: str | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Return stored events, newest first."""
    query = select(*(c for c in events.c if c.name != "body")).order_by(events.c.id.desc())
    if status:
        query = query.where(events.c.status == status)
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
                "attempt_log": by_run.get(r.id, []),
            }
            for r in runs
        ],
    }
