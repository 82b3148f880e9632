"""`deploybot events replay`: put stored events back to `received` so they run again.

The processor re-evaluates a replayed event with the rules in force. Its action runs
are keyed by event id + rule + step, so a step that already succeeded is not run again;
the event's dead runs (and the steps skipped behind them) go back to `pending`.
Events being processed right now are left alone.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.models import action_runs, events, utcnow
from bot.db.outcomes import update_outcomes
from bot.db.queries import rearm_on_failure
from bot.rules.workflow import ON_FAILURE_BASE

CHUNK = 500  # events per transaction: short write locks, steady progress
PROGRESS_MIN_EVENTS = 20  # below this a bar is noise
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_AGO = re.compile(r"(\d+)([smhd])")


def parse_since(text: str, now: datetime) -> datetime:
    """Parse `--since`: an ISO 8601 date or time (UTC unless zoned), or an age like `2h`."""
    ago = _AGO.fullmatch(text.strip())
    if ago:
        return now - timedelta(seconds=int(ago.group(1)) * _UNITS_S[ago.group(2)])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r}: give an ISO 8601 time (2024-05-01T12:00) or an age (30m, 2h, 7d)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def render_bar(done: int, total: int, width: int = 30) -> str:
    """Render `[#####.....]  50/100 events`."""
    filled = width if total == 0 else width * done // total
    return f"[{'#' * filled}{'.' * (width - filled)}] {done:>{len(str(total))}}/{total} events"


class ProgressBar:
    """A one-line text bar on a stream, redrawn in place."""

    def __init__(self, total: int, stream: IO[str]) -> None:
        self._total = total
        self._stream = stream
        self._shown = total >= PROGRESS_MIN_EVENTS

    def update(self, done: int) -> None:
        if self._shown:
            self._stream.write("\r" + render_bar(done, self._total))
            self._stream.flush()

    def close(self) -> None:
        if self._shown:
            self._stream.write("\n")
            self._stream.flush()


@dataclass(frozen=True, slots=True)
class Selection:
    """Which events to replay: the conditions given all hold."""

    ids: Sequence[int] = ()
    status: str | None = None
    since: datetime | None = None

    def __post_init__(self) -> None:
        if not (self.ids or self.status or self.since):
            raise ValueError("choose events: IDs, --status or --since")


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What a replay did."""

    replayed: list[int]
    runs_reset: int
    missing: list[int]  # requested ids with no such event
    busy: list[int]  # being processed now: left alone


async def select_events(engine: AsyncEngine, selection: Selection) -> list[tuple[int, str]]:
    """Return (id, status) of the selected events, oldest first."""
    stmt = select(events.c.id, events.c.status).order_by(events.c.id)
    if selection.ids:
        stmt = stmt.where(events.c.id.in_(list(selection.ids)))
    if selection.status:
        stmt = stmt.where(events.c.status == selection.status)
    if selection.since:
        stmt = stmt.where(events.c.received_at >= selection.since)
    async with engine.connect() as conn:
        return [(row.id, row.status) for row in await conn.execute(stmt)]


async def reset_events(engine: AsyncEngine, ids: Sequence[int]) -> tuple[int, list[int]]:
    """Reset these events and their dead or skipped runs in one transaction.

    Return how many runs were reset and which events were in fact replayed.
    """
    now = utcnow()
    async with engine.begin() as conn:
        replayed = await conn.execute(
            update(events)
            .where(events.c.id.in_(list(ids)), events.c.status != "processing")
            .values(
                status="received",
                attempts=0,
                error=None,
                processed_at=None,
                lease_owner=None,
                lease_until=None,
            )
            .returning(events.c.id)
        )
        replayed_ids = sorted(int(row.id) for row in replayed)
        # A run going again has its `on_failure` steps held again (first, while its dead
        # steps still say which runs go again): they run only if it dies once more.
        await conn.execute(rearm_on_failure(replayed_ids).values(updated_at=now))
        runs = await conn.execute(
            update(action_runs)
            .where(
                action_runs.c.event_id.in_(replayed_ids),
                action_runs.c.status.in_(("dead", "skipped")),
                action_runs.c.step_index < ON_FAILURE_BASE,
            )
            .values(
                status="pending",
                attempts=0,
                next_attempt_at=None,
                last_error=None,
                waiting_since=None,
                lease_owner=None,
                lease_until=None,
                updated_at=now,
            )
        )
        # The outcome from the runs as they are now; processing keeps it (or says failed).
        await conn.run_sync(lambda sync: update_outcomes(sync, replayed_ids, now))
    return runs.rowcount, replayed_ids


async def replay(
    engine: AsyncEngine, selection: Selection, *, progress: IO[str] | None = None
) -> ReplayReport:
    """Replay the selected events in chunks, drawing a bar on `progress` for many."""
    found = await select_events(engine, selection)
    missing = sorted(set(selection.ids) - {event_id for event_id, _ in found})
    ready = [event_id for event_id, status in found if status != "processing"]
    bar = ProgressBar(len(ready), progress or sys.stderr)
    replayed: list[int] = []
    runs_reset = 0
    bar.update(0)
    for start in range(0, len(ready), CHUNK):
        reset, done = await reset_events(engine, ready[start : start + CHUNK])
        runs_reset += reset
        replayed += done
        bar.update(min(start + CHUNK, len(ready)))
    bar.close()
    busy = sorted({event_id for event_id, _ in found} - set(replayed))
    return ReplayReport(replayed=replayed, runs_reset=runs_reset, missing=missing, busy=busy)
