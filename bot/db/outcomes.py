"""Store events' outcomes (bot/core/outcomes.py) where their runs change state."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.outcomes import RunState, event_outcome
from bot.db.models import action_runs, events

# The operator's outcome of the events whose runs just changed (bot/core/outcomes.py).
_OUTCOME_RUNS = select(
    action_runs.c.event_id,
    action_runs.c.rule_name,
    action_runs.c.step_index,
    action_runs.c.status,
    action_runs.c.next_attempt_at,
).where(action_runs.c.event_id.in_(bindparam("b_ids", expanding=True)))
_OLD_OUTCOMES = select(events.c.id, events.c.outcome).where(
    events.c.id.in_(bindparam("b_ids", expanding=True))
)
_SET_OUTCOME = (
    update(events).where(events.c.id == bindparam("b_id")).values(outcome=bindparam("b_outcome"))
)


def update_outcomes(conn: Connection, event_ids: list[int], now: datetime) -> list[int]:
    """Store the outcome of these events from their runs; return those newly failed."""
    if not event_ids:
        return []
    ids = {"b_ids": event_ids}
    runs: dict[int, list[RunState]] = {event_id: [] for event_id in event_ids}
    for row in conn.execute(_OUTCOME_RUNS, ids):
        runs[row.event_id].append(
            RunState(row.rule_name, row.step_index, row.status, row.next_attempt_at)
        )
    old = {row.id: row.outcome for row in conn.execute(_OLD_OUTCOMES, ids)}
    new = {event_id: event_outcome(found, now) for event_id, found in runs.items()}
    changed = {
        event_id: outcome
        for event_id, outcome in new.items()
        if event_id in old and old[event_id] != outcome
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
