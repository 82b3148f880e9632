"""The workers' statements cost the same whatever history the database holds.

A service runs for months: millions of processed events and succeeded action runs. A claim
that walks them (a status index chosen over the event index, say) slows every claim as the
database grows. SQLite counts the virtual-machine instructions it runs (a progress handler);
the same claims are counted over an empty history and over a large one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, insert
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import sqlite

from bot.db.claims import claim_statement
from bot.db.engine import create_engine, upgrade
from bot.db.models import UTCDateTime, action_runs, events, utcnow
from bot.db.writers import SqliteWriter, writer_for
from bot.pipeline.executor import ActionExecutor, due_conditions
from bot.pipeline.processor import EventProcessor
from bot.rules.loader import load_rules
from bot.services.runner import ActionRunner
from tests.helpers import issue_updated

RULE = """\
rules:
  - name: two-steps
    on:
      events: [jira:issue_updated]
    do:
      - id: first
        action: ubiops.deployments_get
        with: {project_name: p, deployment_name: d}
      - action: ubiops.deployments_get
        with: {project_name: p, deployment_name: "{{ steps.first.name }}"}
"""
HISTORY = 4000


def _event_row(n: int, status: str) -> dict[str, Any]:
    now = utcnow()
    body = json.dumps(issue_updated(f"OPS-{n}")).encode()
    return {
        "tenant": "",
        "delivery_id": f"d-{n}",
        "webhook_event": "jira:issue_updated",
        "issue_key": f"OPS-{n}",
        "body": body,
        "status": status,
        "received_at": now,
        "attempts": 1 if status == "processed" else 0,
    }


def _run_row(event_id: int, step: int, status: str) -> dict[str, Any]:
    now = utcnow()
    return {
        "event_id": event_id,
        "rule_name": "two-steps",
        "step_index": step,
        "step_id": "first" if step == 0 else None,
        "action": "ubiops.deployments_get",
        "idempotency_key": f"{event_id}:two-steps:{step}",
        "status": status,
        "attempts": 1 if status == "succeeded" else 0,
        "params": {},
        "result": {"name": f"d-{event_id}"} if status == "succeeded" else None,
        "created_at": now,
        "updated_at": now,
    }


async def _claim_costs(tmp_path: Path, history: int) -> tuple[int, int, dict[str, Any]]:
    """VM instructions (in hundreds) of one event claim + finish and one action claim."""
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir(parents=True)
    (rules_dir / "two-steps.yaml").write_text(RULE)
    ruleset = load_rules(rules_dir)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    await upgrade(engine)
    writes = writer_for(engine)
    assert isinstance(writes, SqliteWriter)
    try:
        async with engine.begin() as conn:
            if history:  # done events, each with both steps succeeded
                await conn.execute(
                    insert(events), [_event_row(n, "processed") for n in range(history)]
                )
                await conn.execute(
                    insert(action_runs),
                    [_run_row(e, s, "succeeded") for e in range(1, history + 1) for s in (0, 1)],
                )
            # Due now: an event to evaluate; an event whose second step waits for its turn.
            await conn.execute(insert(events), [_event_row(history, "received")])
            await conn.execute(insert(events), [_event_row(history + 1, "processed")])
            waiting = history + 2
            steps = [_run_row(waiting, 0, "succeeded"), _run_row(waiting, 1, "pending")]
            await conn.execute(insert(action_runs), steps)
        counted = [0]

        def count() -> int:
            counted[0] += 1
            return 0  # go on

        def on_connect(dbapi: Any, _record: Any) -> None:
            dbapi.set_progress_handler(count, 100)

        sa_event.listen(writes.sync_engine, "connect", on_connect)
        processor = EventProcessor(engine, lambda: ruleset)
        assert await processor.run_once() == 1
        events_cost, counted[0] = counted[0], 0
        executor = ActionExecutor(engine, ActionRunner({}), rules_dir=rules_dir)
        runs = await executor.claim(4)
        due = [r for r in runs if r.event_id == waiting]
        assert len(due) == 1 and due[0].step_index == 1
        return events_cost, counted[0], due[0].context
    finally:
        await engine.dispose()


async def test_claims_cost_the_same_over_a_long_history(tmp_path: Path) -> None:
    fresh = await _claim_costs(tmp_path / "fresh", 0)
    old = await _claim_costs(tmp_path / "old", HISTORY)
    # The claimed run sees the result of its rule's earlier step, whatever the history.
    assert fresh[2]["steps"] == {"first": {"name": "d-2"}}
    assert old[2]["steps"] == {"first": {"name": f"d-{HISTORY + 2}"}}
    # Walking the history would cost thousands of rows' instructions; an index, a few.
    assert old[0] < 2 * fresh[0] + 50, (fresh, old)
    assert old[1] < 2 * fresh[1] + 50, (fresh, old)


def test_the_claims_hold_no_like_pattern() -> None:
    """SQLite prepares a statement again whenever a LIKE pattern is bound to it (the LIKE
    optimisation); the action claim is thousands of characters, four times over (one
    branch per status): that cost four times the claim's own work on every claim."""
    at = bindparam("b_now", type_=UTCDateTime())
    statement = claim_statement(
        action_runs,
        "sqlite",
        due_conditions(at),
        owner="o",
        lease_until=at,
        limit=4,
        values={"status": "running"},
        returning=(action_runs.c.id,),
    )
    compiled = str(statement.compile(dialect=sqlite.dialect()))
    assert "substr(" in compiled  # the skipped-by-`if` test is there, as a prefix compare
    assert " LIKE " not in compiled.upper()
