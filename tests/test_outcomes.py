"""Event outcomes an operator filters on, runs list/retry, the failed-events metric, and
a rule that tells Jira (comment and transition) beside a rollout that fails."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from sqlalchemy import select

from bot.cli.main import main
from bot.core.delivery import parse_delivery
from bot.core.outcomes import RunState, event_outcome
from bot.db.models import events
from bot.jira_app.access import JiraActionClients
from bot.pipeline.executor import ActionExecutor
from bot.pipeline.processor import EventProcessor
from bot.rules.loader import load_rules
from bot.services.runner import ActionRunner
from bot.web.metrics import Metrics
from tests.fakes.jira import issue_updated_payload
from tests.helpers import World, make_world, start_store, tenant_of

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(seconds=30)


def r(rule: str, step: int, status: str, at: datetime | None = None) -> RunState:
    return RunState(rule, step, status, at)


@pytest.mark.parametrize(
    ("runs", "outcome"),
    [
        ([], "ignored"),
        ([r("a", 0, "succeeded"), r("a", 1, "succeeded")], "succeeded"),
        ([r("a", 0, "succeeded"), r("a", 1, "skipped")], "succeeded"),
        ([r("a", 0, "running"), r("a", 1, "pending")], "running"),
        ([r("a", 0, "retrying", LATER)], "running"),  # failing and retried: not a wait
        ([r("a", 0, "pending", NOW)], "running"),  # due now
        ([r("a", 0, "pending", LATER), r("a", 1, "pending")], "waiting"),  # polling a build
        ([r("a", 0, "pending", LATER), r("b", 0, "running")], "running"),
        ([r("a", 0, "pending", LATER), r("b", 0, "succeeded")], "waiting"),
        ([r("a", 0, "dead"), r("a", 1, "skipped"), r("b", 0, "running")], "failed"),
        # Workflows: a step waiting on `until`, clean-up steps never needed, a replaced run.
        ([r("a", 0, "succeeded"), r("a", 1, "waiting", LATER)], "waiting"),
        ([r("a", 0, "waiting", LATER), r("b", 0, "running")], "running"),
        ([r("a", 0, "succeeded"), r("a", 1000, "held")], "succeeded"),
        ([r("a", 0, "dead"), r("a", 1000, "running")], "failed"),
        ([r("a", 0, "superseded"), r("a", 1, "superseded")], "succeeded"),
    ],
)
def test_event_outcome(runs: list[RunState], outcome: str) -> None:
    assert event_outcome(runs, NOW) == outcome


RULES = """
rules:
  - name: roll-out
    on: {events: [jira:issue_updated]}
    when: [{field: issue.key, equals: OPS-1}]
    do:
      - action: ubiops.deployments_get
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"   # not on the ticket
  - name: tell-jira
    on: {events: [jira:issue_updated]}
    when: [{field: issue.key, in: [OPS-1, OPS-2]}]
    do:
      - id: note
        action: jira.add_comment
        with: {issue: "{{ issue.key }}", body: "Rolling out **{{ issue.key }}**."}
      - action: jira.transition_issue
        with:
          issue: "{{ issue.key }}"
          transition: Start deploy
          comment: "See comment {{ steps.note.id }}"
"""


@pytest.fixture(params=["connect", "oauth"])
async def world(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[World]:
    async for w in make_world(request.param, database_url):
        yield w


def cli(monkeypatch: pytest.MonkeyPatch, url: str, *argv: str) -> tuple[int, str]:
    import contextlib
    import io

    monkeypatch.setenv("DEPLOYBOT_DATABASE_URL", url)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


async def test_a_failed_rollout_is_seen_and_jira_is_told(
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = world.fake
    for key in ("OPS-1", "OPS-2"):
        fake.add_issue(key)
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "r.yaml").write_text(RULES)
    ruleset = load_rules(rules_dir)
    store = await start_store(world.engine)
    ids: dict[str, int] = {}
    try:
        for key in ("OPS-1", "OPS-2", "OPS-3"):
            body = json.dumps(issue_updated_payload(key=key)).encode()
            delivery = parse_delivery({"Content-Type": "application/json"}, body, delivery_id=key)
            stored = await store.add(tenant_of(world), delivery)
            assert stored.event_id is not None
            ids[key] = stored.event_id
    finally:
        await store.close()
    assert await EventProcessor(world.engine, lambda: ruleset).run_once() == 3
    runner = ActionRunner({}, per_tenant={"jira": JiraActionClients(world.access())})
    executor = ActionExecutor(world.engine, runner, rules_dir=rules_dir)
    metrics = Metrics()
    executor.on_event_failed = lambda _event_id: metrics.events_failed.inc()
    caplog.set_level(logging.INFO, logger="bot")
    for _ in range(10):
        if not await executor.run_once():
            break

    # Jira was told: a comment, and the transition (with its own comment).
    for key in ("OPS-1", "OPS-2"):
        issue = fake.issues[key]
        assert issue.status == "Deploying"
        first, second = issue.comments
        assert first["body"]["content"][0]["content"][1]["text"] == key
        assert second["body"]["content"][0]["content"][0]["text"] == f"See comment {first['id']}"

    async with world.engine.connect() as conn:
        rows_now = await conn.execute(select(events.c.issue_key, events.c.outcome))
        found = {key: outcome for key, outcome in rows_now.tuples()}
    assert found == {"OPS-1": "failed", "OPS-2": "succeeded", "OPS-3": "ignored"}
    assert b"deploybot_events_failed_total 1.0" in generate_latest(metrics.registry)
    [warning] = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert f"event {ids['OPS-1']}, rule roll-out, step 1" in warning.getMessage()
    assert "customfield_10050" in warning.getMessage()

    url = world.settings.database_url

    async def run(*argv: str) -> tuple[int, str]:
        return await asyncio.to_thread(cli, monkeypatch, url, *argv)

    code, out = await run("events", "list", "--outcome", "failed", "--json")
    rows: list[dict[str, Any]] = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(e["id"], e["outcome"]) for e in rows] == [(ids["OPS-1"], "failed")]
    code, out = await run("runs", "list", "--status", "dead", "--json")
    [dead] = [json.loads(line) for line in out.splitlines()]
    assert dead["event_id"] == ids["OPS-1"] and dead["action"] == "ubiops.deployments_get"
    assert "customfield_10050" in dead["last_error"]
    code, out = await run("runs", "list", "--status", "dead")
    assert f"event {ids['OPS-1']}" in out and "roll-out#1" in out

    code, out = await run("runs", "retry", str(dead["id"]))
    assert code == 0 and "back to pending (was dead)" in out
    code, out = await run("events", "list", "--outcome", "running", "--json")
    assert [json.loads(line)["id"] for line in out.splitlines()] == [ids["OPS-1"]]
    code, out = await run("runs", "retry", str(dead["id"]))
    assert code == 1
    code, out = await run("runs", "retry", "999999")
    assert code == 1

    # A replay keeps what the runs say: succeeded runs are not repeated, so the event
    # stays succeeded (it is not left `running` with nothing to run).
    code, out = await run("events", "replay", str(ids["OPS-2"]), str(ids["OPS-3"]))
    assert code == 0
    assert await EventProcessor(world.engine, lambda: ruleset).run_once() == 2
    async with world.engine.connect() as conn:
        rows_now = await conn.execute(select(events.c.issue_key, events.c.outcome))
        found = {key: outcome for key, outcome in rows_now.tuples()}
    assert found == {"OPS-1": "running", "OPS-2": "succeeded", "OPS-3": "ignored"}


ON_FAILURE_RULES = """
rules:
  - name: roll-out
    on: {events: [jira:issue_updated]}
    do:
      - id: model
        action: ubiops.deployments_get
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"   # not on the ticket
    on_failure:
      - action: jira.add_comment
        with:
          issue: "{{ issue.key }}"
          body: "Failed at step {{ failure.step }} ({{ failure.action }}): {{ failure.error }}"
      - action: jira.transition_issue
        with: {issue: "{{ issue.key }}", transition: Deploy failed}
"""


async def test_a_failing_rollout_comments_its_error_and_transitions_the_ticket(
    world: World, tmp_path: Path
) -> None:
    world.fake.add_issue("OPS-9")
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "r.yaml").write_text(ON_FAILURE_RULES)
    ruleset = load_rules(rules_dir)
    store = await start_store(world.engine)
    try:
        body = json.dumps(issue_updated_payload(key="OPS-9")).encode()
        delivery = parse_delivery({"Content-Type": "application/json"}, body, delivery_id="f-9")
        stored = await store.add(tenant_of(world), delivery)
    finally:
        await store.close()
    assert await EventProcessor(world.engine, lambda: ruleset).run_once() == 1
    runner = ActionRunner({}, per_tenant={"jira": JiraActionClients(world.access())})
    executor = ActionExecutor(world.engine, runner, rules_dir=rules_dir)
    for _ in range(10):
        if not await executor.run_once():
            break

    issue = world.fake.issues["OPS-9"]
    assert issue.status == "Failed"  # the on_failure transition
    [comment] = issue.comments
    text = json.dumps(comment["body"])
    assert "Failed at step 1 (ubiops.deployments_get)" in text
    assert "customfield_10050" in text  # the step's error, told on the ticket
    async with world.engine.connect() as conn:
        outcome = (
            await conn.execute(select(events.c.outcome).where(events.c.id == stored.event_id))
        ).scalar_one()
    assert outcome == "failed"
