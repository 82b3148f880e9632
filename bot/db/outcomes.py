"""Store events' outcomes (bot/core/outcomes.py) where their runs change state."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.outcomes import RunState, event_outcome
from bot.db.models import action_runs, events

# The events' stored outcomes with their runs, in one statement (an event without runs
# comes once, with NULL run columns).
_OUTCOME_RUNS = (
    select(
        events.c.id,
        events.c.outcome,
        action_runs.c.rule_name,
        action_runs.c.step_index,
        action_runs.c.status,
        action_runs.c.next_attempt_at,
    )
    .select_from(events.outerjoin(action_runs, action_runs.c.event_id == events.c.id))
    .where(events.c.id.in_(bindparam("b_ids", expanding=True)))
)
_SET_OUTCOME = (
    update(events).where(events.c.id == bindparam("b_id")).values(outcome=bindparam("b_outcome"))
)


def update_outcomes(conn: Connection, event_ids: list[int], now: datetime) -> list[int]:
    """Store the outcome of these events from their runs; return those newly failed."""
    if not event_ids:
        return []
    runs: dict[int, list[RunState]] = {}
    old: dict[int, str | None] = {}
    for row in conn.execute(_OUTCOME_RUNS, {"b_ids": event_ids}):
        old[row.id] = row.outcome
        found = runs.setdefault(row.id, [])
        if row.status is not None:
            found.append(RunState(row.rule_name, row.step_index, row.status, row.next_attempt_at))
    changed = {
        event_id: outcome
        for event_id, found in runs.items()
        if old[event_id] != (outcome := event_outcome(found, now))
    }
    if changed:
        conn.execute(_SET_OUTCOME, [{"b_id": k, "b_outcome": v} for k, v in changed.items()])
    return [event_id for event_id, outcome in changed.items() if outcome == "failed"]


async def set_outcomes(engine: AsyncEngine, run_ids: list[int], now: datetime) -> None:
    """Bring the outcomes of these runs' events up to date (after a retry or replay)."""

    def work(conn: Connection) -> None:
        found = conn.execute(
            select(action_runs.c.event_id).where(action_runs.c.id.in_(run_ids)).distinct()
        )
        update_outcomes(conn, sorted(found.scalars()), now)

    async with engine.begin() as conn:
        await conn.run_sync(work)
