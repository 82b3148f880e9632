"""Catch-up: a one-hour outage window of a fake Jira, every change stored and acted on once."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core import catch_up as core
from bot.core.backoff import RetryPolicy
from bot.core.delivery import parse_delivery
from bot.db.engine import create_engine, upgrade
from bot.db.models import action_runs, events
from bot.db.registrations import kv_set
from bot.db.store import EventStore
from bot.jira_app.access import JiraAccess
from bot.jira_app.catch_up import CatchUp, cursor_key, read_stats
from bot.jira_app.scheduler import scheduled_jobs
from bot.pipeline.processor import EventProcessor
from bot.rules.loader import load_rules
from bot.rules.model import RuleSet
from bot.settings import Settings
from bot.web.metrics import read_snapshot, snapshot_families
from tests.conftest import ClientFactory
from tests.fakes.jira import FakeJira
from tests.helpers import wait_for, write_rules

QUICK = RetryPolicy(max_attempts=2, base_delay_s=0.0, max_delay_s=0.0, timeout_s=5.0)
MIN = 60.0
RULES = """
rules:
  - name: on-status
    on:
      events: [jira:issue_updated]
      jql: project = OPS
    when:
      - changed: status
    do:
      - action: ubiops.deployments_get
        with: {project_name: ml-prod, deployment_name: "{{ issue.key | lower }}"}
"""


@dataclass
class World:
    fake: FakeJira
    engine: AsyncEngine
    store: EventStore
    session: aiohttp.ClientSession
    settings: Settings
    rules: RuleSet

    def job(self, max_changes: int = 500) -> CatchUp:
        access = JiraAccess(
            self.settings, self.engine, self.session, clock=lambda: self.fake.now, policy=QUICK
        )
        return CatchUp(
            access, self.store, lambda: self.rules, margin_s=5 * MIN, max_changes=max_changes
        )

    async def live(self, payload: dict[str, object], delivery_id: str) -> bool:
        headers = {
            "Content-Type": "application/json",
            "X-Atlassian-Webhook-Identifier": delivery_id,
        }
        delivery = parse_delivery(headers, json.dumps(payload).encode())
        return (await self.store.add("", delivery)).created

    async def tick(self, max_changes: int = 500) -> int:
        client = await self.job(max_changes)._access.oauth_client()
        assert client is not None
        return await self.job(max_changes).run(client, self.rules, self.fake.now)


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def oauth_settings(database_url: str, fake: FakeJira, rules_dir: Path) -> Settings:
    return Settings(
        database_url=database_url,
        rules_dir=rules_dir,
        jira_base_url=fake.base_url,
        jira_client_id=fake.client_id,
        jira_client_secret=fake.client_secret,
        jira_refresh_token=fake.refresh_token,
        jira_token_url=fake.token_url,
    )


@pytest.fixture
async def world(database_url: str, tmp_path: Path) -> AsyncIterator[World]:
    fake = FakeJira(mode="oauth")
    await fake.start()
    engine = create_engine(database_url)
    await upgrade(engine)
    store = EventStore(engine)
    await store.start()
    rules_dir = write_rules(tmp_path / "rules", {"r.yaml": RULES})
    try:
        async with aiohttp.ClientSession() as session:
            yield World(
                fake,
                engine,
                store,
                session,
                oauth_settings(database_url, fake, rules_dir),
                load_rules(rules_dir),
            )
    finally:
        await store.close()
        await engine.dispose()
        await fake.close()


def outage_history(fake: FakeJira) -> dict[str, dict[str, object]]:
    """Changes around a one-hour outage (T-65 .. T-5 min); returns each one's payload."""
    t = fake.now
    fake.add_issue("OPS-1", status="Ready to deploy")
    fake.add_issue("OPS-2", status="Ready to deploy")
    fake.add_issue("WEB-1", status="Ready to deploy")  # no rule filter matches it
    return {
        "A": fake.change_status("OPS-1", "Deploying", at=t - 68 * MIN),  # live, before
        "B": fake.change_status("OPS-1", "Failed", at=t - 60 * MIN),  # in the outage
        "C": fake.change_status("OPS-2", "Deploying", at=t - 40 * MIN),  # in the outage
        "W": fake.change_status("WEB-1", "Deploying", at=t - 30 * MIN),  # not the rules'
        "D": fake.change_status("OPS-1", "Ready to deploy", at=t - 20 * MIN),  # in the outage
        "E": fake.change_status("OPS-2", "Done", at=t - 2 * MIN),  # live, after
    }


async def stored_changes(engine: AsyncEngine) -> list[tuple[str, str, str]]:
    """(source, issue key, changelog id) of every stored event."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(events.c.source, events.c.body))).all()
    found = []
    for source, body in rows:
        payload = json.loads(body)
        found.append((source, payload["issue"]["key"], payload["changelog"]["id"]))
    return sorted(found)


async def runs_per_change(engine: AsyncEngine, rules: RuleSet) -> dict[str, int]:
    while await EventProcessor(engine, lambda: rules).run_once():
        pass
    async with engine.connect() as conn:
        rows = (await conn.execute(select(action_runs.c.idempotency_key))).scalars().all()
    counts: dict[str, int] = {}
    for key in rows:
        change = key.split("|")[-1].split(":")[1]  # change:|<issue>|changelog:<id>:rule:step
        counts[change] = counts.get(change, 0) + 1
    return counts


async def test_outage_window_is_caught_up_exactly_once(world: World) -> None:
    fake = world.fake
    await kv_set(world.engine, cursor_key(""), json.dumps({"covered_s": fake.now - 70 * MIN}))
    changes = outage_history(fake)
    ids = {name: str(p["changelog"]["id"]) for name, p in changes.items()}  # type: ignore[index]
    assert await world.live(changes["A"], "live-a")
    assert await world.live(changes["E"], "live-e")

    assert await world.tick() == 3
    assert await world.tick() == 0  # a second tick finds nothing new
    expected = sorted(
        [
            ("catch-up", "OPS-1", ids["B"]),
            ("catch-up", "OPS-1", ids["D"]),
            ("catch-up", "OPS-2", ids["C"]),
            ("live", "OPS-1", ids["A"]),
            ("live", "OPS-2", ids["E"]),
        ]
    )
    assert await stored_changes(world.engine) == expected

    # C is delivered live late (Jira's retry): stored as a delivery, acted on no twice.
    assert await world.live(changes["C"], "live-c-late")
    runs = await runs_per_change(world.engine, world.rules)
    assert runs == {ids[n]: 1 for n in "ABCDE"}

    stats = await read_stats(world.engine)
    assert stats.caught_up_total == 3
    assert stats.newest_change_s == pytest.approx(fake.now - 2 * MIN, abs=1)
    snapshot = await read_snapshot(world.engine, 0)
    shown = {f.name: f.samples[0].value for f in snapshot_families(snapshot, at(fake.now))}
    assert shown["deploybot_catch_up_changes"] == 3
    assert shown["deploybot_catch_up_newest_change_timestamp_seconds"] == pytest.approx(
        fake.now - 2 * MIN, abs=1
    )
    searches = [r for r in fake.requests if r.path == core.SEARCH_PATH]
    assert dict(searches[0].query)["jql"].startswith('(project = OPS) AND updated >= "-')


async def test_caught_up_once_when_the_live_delivery_comes_first_late(world: World) -> None:
    fake = world.fake
    await kv_set(world.engine, cursor_key(""), json.dumps({"covered_s": fake.now - 70 * MIN}))
    changes = outage_history(fake)
    # Jira's retry of C arrives before the tick: the catch-up does not store it again.
    assert await world.live(changes["C"], "live-c")
    assert await world.tick() == 4  # A, B, D, E (A and E were never delivered here)
    sources = {(s, c) for s, _k, c in await stored_changes(world.engine)}
    assert ("catch-up", str(changes["C"]["changelog"]["id"])) not in sources  # type: ignore[index]


async def test_a_bounded_tick_goes_on_at_the_next(world: World) -> None:
    fake = world.fake
    await kv_set(world.engine, cursor_key(""), json.dumps({"covered_s": fake.now - 70 * MIN}))
    outage_history(fake)
    assert await world.tick(max_changes=2) == 2
    assert await world.tick(max_changes=2) == 2
    assert await world.tick(max_changes=2) == 1
    assert await world.tick(max_changes=2) == 0
    assert len(await stored_changes(world.engine)) == 5  # A B C D E (W is not the rules')


async def test_first_tick_on_an_empty_database_replays_no_history(world: World) -> None:
    outage_history(world.fake)
    assert await world.tick() == 0
    assert [r for r in world.fake.requests if r.path == core.SEARCH_PATH] == []


async def test_two_replicas_catch_up_once_between_them(
    make_client: ClientFactory, database_url: str, tmp_path: Path
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("replicas share a PostgreSQL database (SQLite is one process's)")
    fakes = [FakeJira(mode="oauth"), FakeJira(mode="oauth")]
    for fake in fakes:
        await fake.start()
    try:
        for fake in fakes:  # the same site as seen through two base URLs
            fake.now = fakes[0].now
            outage_history(fake)
        engine = create_engine(database_url)
        await upgrade(engine)
        await kv_set(engine, cursor_key(""), json.dumps({"covered_s": fakes[0].now - 70 * MIN}))
        rules_dir = write_rules(tmp_path / "rules", {"r.yaml": RULES})
        for fake in fakes:
            base = oauth_settings(database_url, fake, rules_dir)
            await make_client(replace(base, scheduler_interval_s=3600.0, workers=0))

        async def caught_up() -> bool:
            async with engine.connect() as conn:
                count = (
                    await conn.execute(select(func.count()).where(events.c.source == "catch-up"))
                ).scalar_one()
            return int(count) >= 5

        await wait_for(caught_up)
        searched = [len([r for r in fake.requests if r.path == core.SEARCH_PATH]) for fake in fakes]
        assert sorted(searched) == [0, 1]  # the leader searched; the other replica did not
        assert len(await stored_changes(engine)) == 5
        await engine.dispose()
    finally:
        for fake in fakes:
            await fake.close()


def test_catch_up_is_scheduled_by_mode() -> None:
    def names(**changes: Any) -> set[str]:
        settings = replace(
            Settings(
                jira_base_url="https://x.atlassian.net",
                jira_client_id="id",
                jira_client_secret="secret",
            ),
            **changes,
        )
        jobs = scheduled_jobs(settings, None, None, None, lambda: None, None, lambda: 0.0)  # type: ignore[arg-type]
        return {j.name for j in jobs}

    assert "catch-up" in names()
    assert "catch-up" in names(jira_auth_mode="secret")
    assert "webhooks" not in names(jira_auth_mode="secret")
    assert "catch-up" not in names(jira_catch_up=False)
    assert "catch-up" not in names(jira_auth_mode="connect")
    assert "catch-up" not in names(jira_client_id=None)


async def test_status_page_shows_the_catch_up(
    make_client: ClientFactory, settings: Settings
) -> None:
    engine = create_engine(settings.database_url)
    await upgrade(engine)
    stats = {"newest_change_s": 1_764_900_000.0, "caught_up_total": 7, "covered_until_s": None}
    await kv_set(engine, "catch-up-stats", json.dumps(stats))
    await engine.dispose()
    client = await make_client(settings, admin_token="admin-" + "x" * 32, jira_catch_up=True)
    page = await client.get("/", headers={"Authorization": "Bearer admin-" + "x" * 32})
    body = await page.text()
    assert page.status == 200
    assert "Catch-up: 7 change(s)" in body and "2025-12-05 02:00:00 UTC" in body
    off = await make_client(settings, admin_token="admin-" + "x" * 32, jira_catch_up=False)
    page = await off.get("/", headers={"Authorization": "Bearer admin-" + "x" * 32})
    assert "Catch-up:" not in await page.text()
