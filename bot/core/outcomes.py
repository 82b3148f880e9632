"""An event's outcome as an operator sees it, from its action runs. Pure.

`ignored` (no rule matched), `running`, `waiting` (every unfinished rule waits: its
current step waits on `until`, or is pending until a later time), `succeeded`, `failed`
(a run is dead). `held` clean-up steps that were never needed and `superseded` runs are
finished. Stored in `events.outcome`, so filtering on it is cheap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

UNFINISHED = frozenset({"pending", "running", "retrying", "waiting"})


@dataclass(frozen=True, slots=True)
class RunState:
    """What the outcome needs of one action run."""

    rule: str
    step_index: int
    status: str
    next_attempt_at: datetime | None


def event_outcome(runs: Iterable[RunState], now: datetime) -> str:
    """Return the outcome of an event whose matched rules planned these runs."""
    runs = list(runs)
    if not runs:
        return "ignored"
    if any(r.status == "dead" for r in runs):
        return "failed"
    current: dict[str, RunState] = {}  # each rule's first unfinished step
    for r in runs:
        if r.status in UNFINISHED and (
            r.rule not in current or r.step_index < current[r.rule].step_index
        ):
            current[r.rule] = r
    if not current:
        return "succeeded"
    waiting = all(
        r.status == "waiting"
        or (r.status == "pending" and r.next_attempt_at is not None and r.next_attempt_at > now)
        for r in current.values()
    )
    return "waiting" if waiting else "running"
