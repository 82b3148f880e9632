"""The scheduler's jobs against the fake Jira and a real database, driven with a fake `now`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.delivery import parse_delivery
from bot.db.engine import create_engine, upgrade
from bot.db.models import action_runs, events
from bot.db.oauth_tokens import OAuthTokenStore
from bot.db.queries import get_event
from bot.db.registrations import (
    Registrations,
    failed_cursor_key,
    kv_get,
)
from bot.db.tenants import Tenants
from bot.errors import ServiceDisabled
from bot.jira_app.access import JiraActionClients
from bot.jira_app.jobs import WebhookMaintenance, poll_all_failed, prune
from bot.pipeline.executor import ActionExecutor
from bot.pipeline.processor import EventProcessor
from bot.rules.loader import load_rules
from bot.rules.model import Rule, RuleSet
from bot.services.runner import ActionRunner
from tests.fakes.jira import FakeWebhook, issue_updated_payload
from tests.helpers import World, make_world, start_store, tenant_of

PUBLIC_URL = "https://deploybot.example.com"
DAY = 86400


def rule(name: str, jql: str | None, events: tuple[str, ...] = ("jira:issue_updated",)) -> Rule:
    return Rule(name, "", True, events, jql, (), (), (), "r.yaml", 1)


def ruleset(*rules: Rule, version: str = "v1") -> RuleSet:
    return RuleSet.build(rules, version, Path("."))


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@pytest.fixture(params=["connect", "oauth"])
async def world(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[World]:
    async for w in make_world(request.param, database_url):
        yield w


@pytest.fixture
async def connect(database_url: str) -> AsyncIterator[World]:
    async for w in make_world("connect", database_url):
        yield w


async def test_ninety_days_of_ticks_never_let_a_webhook_lapse(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bot")
    fake, rules = world.fake, ruleset(rule("a", "project = OPS"), rule("b", "project = WEB"))
    job = world.maintenance(rules)
    start = fake.now
    ids: set[int] | None = None
    while fake.now < start + 90 * DAY:
        await job(at(fake.now))
        live = {h.id for h in fake.live()}
        assert len(live) == 2, f"a webhook lapsed on day {(fake.now - start) / DAY:.1f}"
        ids = ids or live
        assert live == ids  # never re-registered: refreshed in time, every time
        stored = await Registrations(world.engine).list(tenant_of(world))
        assert {(r.webhook_id, r.expires_at) for r in stored} == {
            (h.id, at(h.expires_at)) for h in fake.live()
        }
        # ticks every 6 hours, with an 11-day outage after day 40
        outage = 11 * DAY if 40 * DAY <= fake.now - start < 40.25 * DAY else 0
        fake.now += DAY / 4 + outage
    refreshes = [r for r in fake.api_requests() if r.path.endswith("/refresh")]
    assert 9 <= len(refreshes) <= 11  # once at registration, then about every 10 days
    assert [r for r in fake.api_requests() if r.auth_error] == []
    if fake.mode == "oauth":
        # Every tick's grant rotated the refresh token; the newest one is the stored one.
        assert fake.token_grants > 50
        token_row = await OAuthTokenStore(
            world.engine, world.settings.jira_client_secret or ""
        ).current()
        assert token_row is not None and token_row.refresh_token == fake.refresh_token
        assert fake.refused_grants == 0
        assert fake.refresh_token not in caplog.text


async def test_a_webhook_deleted_in_jira_is_registered_again(world: World) -> None:
    fake, rules = world.fake, ruleset(rule("a", "project = OPS"))
    job = world.maintenance(rules)
    (first,) = (await job(at(fake.now)))[0].registered
    fake.drop_webhook(first)
    fake.now += DAY  # the next due sync
    (report,) = await job(at(fake.now))
    (second,) = report.registered
    assert second != first and [h.id for h in fake.live()] == [second]
    stored = await Registrations(world.engine).list(tenant_of(world))
    assert [(r.webhook_id, r.spec.jql) for r in stored] == [(second, "project = OPS")]
    assert stored[0].expires_at == at(fake.now + 30 * DAY)


async def test_a_rule_reload_syncs_at_the_next_tick_not_the_next_interval(world: World) -> None:
    fake = world.fake
    current = ruleset(rule("a", "project = OPS"), version="v1")
    job = WebhookMaintenance(world.access(), lambda: current, timedelta(days=1))
    (old,) = (await job(at(fake.now)))[0].registered
    assert await job(at(fake.now + 60)) == []  # nothing changed, not due: no Jira call
    current = ruleset(rule("a", "project = OPS"), rule("b", "status = Done"), version="v2")
    (report,) = await job(at(fake.now + 120))
    assert report.kept == (old,) and len(report.registered) == 1 and report.deleted == ()
    current = ruleset(rule("b", "status = Done"), version="v3")
    (report,) = await job(at(fake.now + 180))
    assert report.deleted == (old,)
    assert [h.jql for h in fake.live()] == ["status = Done"]


async def test_no_rule_set_loaded_touches_nothing(world: World) -> None:
    job = WebhookMaintenance(world.access(), lambda: None, timedelta(days=1))
    assert await job(at(world.fake.now)) == []
    assert world.fake.api_requests() == []


async def test_sync_reports_what_jira_refused_and_keeps_the_rest(world: World) -> None:
    rules = ruleset(rule("good", "project = OPS"), rule("odd", "issue.property[deploy:env] = x"))
    (report,) = await world.maintenance(rules)(at(world.fake.now))
    assert len(report.registered) == 1
    assert report.errors[0] == "Jira refused the webhook for rules odd"
    assert "not supported in webhook JQL" in report.errors[1]
    assert [r.spec.jql for r in await Registrations(world.engine).list()] == ["project = OPS"]


async def stored_events(engine: AsyncEngine) -> list[tuple[str, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(events.c.delivery_id, events.c.source).order_by("id"))
        return [(r.delivery_id, r.source) for r in rows]


async def test_failed_deliveries_are_replayed_once_each_across_restarts(
    connect: World, database_url: str
) -> None:
    fake = connect.fake
    fake.page_size_cap = 2  # three pages: `next` is followed
    body = json.dumps(issue_updated_payload())
    ms = int(fake.now * 1000)
    fake.add_failure(body, "u", id="too-old", failure_time_ms=ms - 73 * 3600 * 1000)
    ids = [fake.add_failure(body, "u", failure_time_ms=ms - 1000 * n).id for n in (50, 40, 30)]
    fake.add_failure("", "u", failure_time_ms=ms - 20_000, id="no-body")
    fake.add_failure(body, "u", failure_time_ms=ms - 10_000, id="live-too")
    store = await start_store(connect.engine)
    headers = {"Content-Type": "application/json"}
    await store.add(fake.client_key, parse_delivery(headers, body.encode(), delivery_id="live-too"))
    try:
        assert await poll_all_failed(connect.access(), store, at(fake.now)) == 3
    finally:
        await store.close()
    expected = [("live-too", "live")] + [(i, "failed-poll") for i in ids]
    assert await stored_events(connect.engine) == expected
    cursor = await kv_get(connect.engine, failed_cursor_key(fake.client_key))
    assert cursor == str(ms - 10_000)

    # A restart: new engine, store and clients; only the cursor carries over.
    fake.now += 600
    late = fake.add_failure(body, "u").id
    engine = create_engine(database_url)
    store = await start_store(engine)
    before = len(fake.requests)
    try:
        assert await poll_all_failed(connect.access(engine), store, at(fake.now)) == 1
        assert await poll_all_failed(connect.access(engine), store, at(fake.now)) == 0
    finally:
        await store.close()
        await engine.dispose()
    first_after = fake.requests[before]
    assert ("after", str(ms - 10_000)) in first_after.query
    assert await stored_events(connect.engine) == [*expected, (late, "failed-poll")]
    assert [r for r in fake.api_requests() if r.auth_error] == []


async def test_oauth_mode_does_not_poll_failed_deliveries(world: World) -> None:
    store = await start_store(world.engine)
    try:
        world.fake.add_failure(json.dumps(issue_updated_payload()), "u")
        created = await poll_all_failed(world.access(), store, at(world.fake.now))
    finally:
        await store.close()
    assert created == (1 if world.fake.mode == "connect" else 0)
    assert world.fake.mode == "connect" or world.fake.api_requests() == []


async def test_prune_keeps_what_is_recent_unfinished_or_dead(database_url: str) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    now = datetime(2024, 6, 1, tzinfo=UTC)
    old, recent = now - timedelta(days=40), now - timedelta(days=2)
    event_rows = {  # delivery id -> (status, processed_at, run statuses)
        "old-no-runs": ("processed", old, ()),
        "old-done-runs": ("processed", old, ("succeeded", "skipped")),
        "old-dead-run": ("processed", old, ("succeeded", "dead")),
        "old-retrying": ("processed", old, ("retrying",)),
        "old-failed": ("failed", old, ()),
        "in-redelivery-window": ("processed", recent, ()),
    }
    try:
        async with engine.begin() as conn:
            for n, (delivery, (status, at_, runs)) in enumerate(event_rows.items()):
                event_id = (
                    await conn.execute(
                        insert(events).returning(events.c.id),
                        {
                            "tenant": "",
                            "delivery_id": delivery,
                            "webhook_event": "jira:issue_updated",
                            "source": "live",
                            "body": b"{}",
                            "status": status,
                            "received_at": at_,
                            "processed_at": at_,
                            "attempts": 1,
                        },
                    )
                ).scalar_one()
                for step, run_status in enumerate(runs):
                    await conn.execute(
                        insert(action_runs),
                        {
                            "event_id": event_id,
                            "rule_name": "r",
                            "step_index": step,
                            "action": "ubiops.x",
                            "idempotency_key": f"{n}:{step}",
                            "status": run_status,
                            "attempts": 1,
                            "created_at": at_,
                            "updated_at": at_,
                        },
                    )
        # A 1-day retention is raised to Jira's redelivery window plus a day.
        assert await prune(engine, now, timedelta(days=1)) == (3, 2)
        async with engine.connect() as conn:
            left = {r.delivery_id for r in await conn.execute(select(events.c.delivery_id))}
            runs_left = sorted(r.status for r in await conn.execute(select(action_runs.c.status)))
        assert left == {"old-dead-run", "old-retrying", "old-failed", "in-redelivery-window"}
        assert runs_left == ["dead", "retrying"]
    finally:
        await engine.dispose()


async def test_a_new_configured_refresh_token_wins_over_one_rotated_from_the_old(
    world: World,
) -> None:
    if world.fake.mode != "oauth":
        pytest.skip("OAuth only")
    access = world.access()
    await world.maintenance(ruleset(rule("a", "project = OPS")))(at(world.fake.now))
    assert await access.refresh_token() == world.fake.refresh_token  # the rotated one
    reconsented = replace(world.settings, jira_refresh_token="new-consent")
    assert await replace(access, settings=reconsented).refresh_token() == "new-consent"


JIRA_RULE = """
rules:
  - name: list-webhooks
    on:
      events: [jira:issue_updated]
    do:
      - action: jira.get_dynamic_webhooks_for_app
        with: {max_results: 50}
"""


async def test_a_jira_action_calls_the_jira_of_its_events_tenant(
    world: World, tmp_path: Path
) -> None:
    fake = world.fake
    fake.webhooks[7] = FakeWebhook(7, ["jira:issue_updated"], "project = OPS", None, "u", 1e12)
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "hooks.yaml").write_text(JIRA_RULE)
    ruleset = load_rules(rules_dir)
    store = await start_store(world.engine)
    body = json.dumps(issue_updated_payload()).encode()
    headers = {"Content-Type": "application/json"}
    try:
        stored = await store.add(tenant_of(world), parse_delivery(headers, body, delivery_id="d-1"))
    finally:
        await store.close()
    assert stored.event_id is not None
    assert await EventProcessor(world.engine, lambda: ruleset).run_once() == 1
    runner = ActionRunner({}, per_tenant={"jira": JiraActionClients(world.access())})
    assert await ActionExecutor(world.engine, runner, rules_dir=rules_dir).run_once() == 1

    shown = await get_event(world.engine, stored.event_id)
    assert shown is not None
    [run] = shown["action_runs"]
    if fake.mode == "connect":
        # Signed with the tenant's secret (the fake checks the JWT and its qsh).
        assert run["status"] == "succeeded", run["last_error"]
        assert [h["id"] for h in run["result"]["values"]] == [7]
        [call] = fake.api_requests()
        assert call.auth_error is None and ("maxResults", "50") in call.query
    else:  # the OAuth app's token, shared with the scheduler through the database
        assert run["status"] == "succeeded", run["last_error"]
        assert [h["id"] for h in run["result"]["values"]] == [7]
        [call] = fake.api_requests()
        assert call.auth_error is None and call.headers["Authorization"].startswith("Bearer ")


async def test_a_jira_action_of_an_unknown_or_disabled_tenant_is_refused(connect: World) -> None:
    def runner() -> ActionRunner:  # a new tenant cache each time
        return ActionRunner({}, per_tenant={"jira": JiraActionClients(connect.access())})

    action = "jira.get_dynamic_webhooks_for_app"
    with pytest.raises(ServiceDisabled, match="'someone-else'"):
        await runner().run(action, {}, tenant="someone-else")
    await Tenants(connect.engine).disable(connect.fake.client_key)
    with pytest.raises(ServiceDisabled, match="disabled"):
        await runner().run(action, {}, tenant=connect.fake.client_key)
    assert connect.fake.api_requests() == []
