"""The admin API against real flows: deliveries, the processor, the executor, fake UbiOps."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bot.core.webhook_plan import RegisteredWebhook, WebhookSpec
from bot.db.engine import create_engine
from bot.db.queries import get_event
from bot.db.registrations import Registrations
from bot.settings import Settings
from tests.conftest import ClientFactory
from tests.fakes.ubiops import Fault
from tests.helpers import (
    ADMIN_TOKEN,
    BEARER,
    RULES,
    create_deployment,
    dead_event,
    deliver,
    get_event_api,
    issue_updated,
    run_statuses,
    start,
    start_ubiops,
    wait_for,
    write_rollout_rules,
)

SECRET_KEY = "LEAK-7"  # an issue key that must never show up in a refused answer

ENDPOINTS = [
    ("GET", "/api/events"),
    ("GET", "/api/events/1"),
    ("GET", "/api/rules"),
    ("GET", "/api/webhooks"),
    ("POST", "/api/events/1/replay"),
    ("POST", "/api/action-runs/1/retry"),
    ("GET", "/"),
    ("GET", "/events"),
    ("GET", "/events/1"),
    ("GET", "/runs"),
]


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    return write_rollout_rules(tmp_path)


async def test_routes_do_not_exist_without_a_token(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client(settings)
    for method, path in [*ENDPOINTS, ("GET", "/login"), ("POST", "/login")]:
        resp = await client.request(method, path, headers=BEARER)
        assert resp.status == 404, (method, path)


@pytest.mark.parametrize(
    "auth",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        {"Cookie": f"token={ADMIN_TOKEN}"},  # the cookie holds a derived value, not the token
    ],
    ids=["none", "wrong", "scheme", "longer", "raw-cookie"],
)
async def test_every_endpoint_refuses_without_the_token(
    make_client: ClientFactory, settings: Settings, auth: dict[str, str]
) -> None:
    client = await make_client(settings, admin_token=ADMIN_TOKEN)
    event_id = await deliver(client, "d-leak", issue_updated(SECRET_KEY))
    assert event_id == 1
    for method, path in ENDPOINTS:
        resp = await client.request(method, path, headers=auth, allow_redirects=False)
        body = await resp.text()
        assert resp.status == 401, (method, path)
        assert SECRET_KEY not in body and "jira:issue_updated" not in body, (method, path)
        assert "received" not in body, (method, path)


async def test_every_endpoint_answers_with_the_token(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client(settings, admin_token=ADMIN_TOKEN)
    await deliver(client, "d-ok", issue_updated(SECRET_KEY))
    expected = {"/api/action-runs/1/retry": 404}  # there is no action run: no rules
    for method, path in ENDPOINTS:
        resp = await client.request(method, path, headers=BEARER)
        assert resp.status == expected.get(path, 200), (method, path, await resp.text())


async def test_filters_and_paging(make_client: ClientFactory, settings: Settings) -> None:
    client = await make_client(settings, admin_token=ADMIN_TOKEN)
    created = {**issue_updated("OPS-9"), "webhookEvent": "jira:issue_created"}
    ids = [await deliver(client, f"d-{n}", issue_updated(f"OPS-{n}")) for n in range(1, 6)]
    ids.append(await deliver(client, "d-created", created))

    async def listed(**query: str) -> dict[str, Any]:
        resp = await client.get("/api/events", params=query, headers=BEARER)
        assert resp.status == 200, await resp.text()
        page: dict[str, Any] = await resp.json()
        return page

    async def all_processed() -> bool:
        return len((await listed(status="processed"))["events"]) == 6

    await wait_for(all_processed)
    everything = (await listed())["events"]
    assert [e["id"] for e in everything] == ids[::-1]  # newest first
    assert [e["issue_key"] for e in (await listed(issue_key="OPS-3"))["events"]] == ["OPS-3"]
    by_kind = await listed(webhook_event="jira:issue_created")
    assert [e["id"] for e in by_kind["events"]] == [ids[-1]]
    assert (await listed(status="received"))["events"] == []
    # Time window: since is inclusive, until exclusive.
    third = everything[3]["received_at"]
    since = [e["id"] for e in (await listed(since=third))["events"]]
    until = [e["id"] for e in (await listed(until=third))["events"]]
    assert sorted(since + until) == sorted(ids)
    assert everything[3]["id"] in since and everything[3]["id"] not in until
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert (await listed(since=later))["events"] == []
    # Cursor paging walks every event exactly once, newest first.
    seen: list[int] = []
    page = await listed(limit="4")
    while True:
        seen += [e["id"] for e in page["events"]]
        if page["next_cursor"] is None:
            break
        page = await listed(limit="4", cursor=page["next_cursor"])
    assert seen == ids[::-1]
    assert [e["id"] for e in (await listed(limit="2", offset="2"))["events"]] == ids[::-1][2:4]
    for bad in (
        {"status": "bogus"},
        {"since": "yesterday"},
        {"limit": "-1"},
        {"cursor": "3", "offset": "1"},
    ):
        resp = await client.get("/api/events", params=bad, headers=BEARER)
        assert resp.status == 400, bad
        assert "error" in await resp.json()


async def test_details_rules_and_replay_do_not_repeat_succeeded_runs(
    make_client: ClientFactory,
    settings: Settings,
    rules_dir: Path,
    aiohttp_server: Callable[..., Any],
) -> None:
    fake, base_url = await start_ubiops(aiohttp_server)
    await create_deployment(base_url)
    client = await start(make_client, settings, rules_dir, base_url)
    event_id = await deliver(client, "d-ok", issue_updated("OPS-42"))

    async def succeeded() -> bool:
        return await run_statuses(client, event_id) == ["succeeded", "succeeded"]

    await wait_for(succeeded)
    shown = await get_event_api(client, event_id)
    miss = next(m for m in shown["matches"] if not m["matched"])
    assert miss["rule"] == "only-hotfixes" and "hotfix" in miss["reason"]
    assert [a["outcome"] for a in shown["action_runs"][0]["attempt_log"]] == ["succeeded"]
    rules = await (await client.get("/api/rules", headers=BEARER)).json()
    assert rules["errors"] == [] and len(rules["version"]) == 64
    lines = RULES.splitlines()
    sources = [
        f"{rules_dir / 'deploy.yaml'}:{lines.index(f'  - name: {n}') + 1}"
        for n in ("roll-out", "only-hotfixes")
    ]
    assert [(r["name"], r["source"], r["events"]) for r in rules["rules"]] == [
        ("roll-out", sources[0], ["jira:issue_updated"]),
        ("only-hotfixes", sources[1], ["jira:issue_updated"]),
    ]

    resp = await client.post(f"/api/events/{event_id}/replay", headers=BEARER)
    assert resp.status == 200
    answer = await resp.json()
    assert answer["previous_status"] == "processed" and "idempotency key" in answer["note"]
    assert answer["runs_reset"] == 0

    async def processed_again() -> bool:
        again = await get_event_api(client, event_id)
        return bool(
            again["status"] == "processed" and again["processed_at"] != shown["processed_at"]
        )

    await wait_for(processed_again)
    again = await get_event_api(client, event_id)
    assert [r["id"] for r in again["action_runs"]] == [r["id"] for r in shown["action_runs"]]
    assert len(fake.calls("POST", r".*/deployments/churn/versions")) == 1
    assert (await client.post("/api/events/999/replay", headers=BEARER)).status == 404
    assert (await client.get("/api/events/999", headers=BEARER)).status == 404


async def test_retry_queues_a_dead_run_and_the_steps_it_skipped(
    make_client: ClientFactory,
    settings: Settings,
    rules_dir: Path,
    aiohttp_server: Callable[..., Any],
) -> None:
    fake, base_url = await start_ubiops(aiohttp_server)
    client = await start(make_client, settings, rules_dir, base_url)
    event_id = await dead_event(client, "OPS-60")
    dead, skipped = (await get_event_api(client, event_id))["action_runs"]
    assert "Deployment" in dead["last_error"] and dead["attempts"] == 1

    async def by_outcome(outcome: str) -> list[int]:
        resp = await client.get(f"/api/events?outcome={outcome}", headers=BEARER)
        assert resp.status == 200, await resp.text()
        return [e["id"] for e in (await resp.json())["events"]]

    assert await by_outcome("failed") == [event_id]
    assert (await client.get("/api/events?outcome=broken", headers=BEARER)).status == 400
    assert (
        await client.post(f"/api/action-runs/{skipped['id'] + 99}/retry", headers=BEARER)
    ).status == 404

    # Fix the cause, and hold the next create so the queued state can be seen.
    await create_deployment(base_url)
    fake.fail_next(1, Fault(kind="slow", delay_s=1.5, method="POST", path_contains="/versions"))
    resp = await client.post(f"/api/action-runs/{dead['id']}/retry", headers=BEARER)
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert answer == {
        "action_run_id": dead["id"],
        "previous_status": "dead",
        "queued": [dead["id"], skipped["id"]],
        "status": "pending",
    }
    engine = create_engine(settings.database_url)
    try:
        queued = await get_event(engine, event_id)
    finally:
        await engine.dispose()
    assert queued is not None
    first, second = queued["action_runs"]
    # The retried run is queued or already taken by the executor with a fresh count; the
    # step it had skipped waits (pending) for it.
    assert first["status"] in {"pending", "running"} and first["attempts"] <= 1
    assert (second["status"], second["attempts"], second["last_error"]) == ("pending", 0, None)

    async def succeeded() -> bool:
        return await run_statuses(client, event_id) == ["succeeded", "succeeded"]

    await wait_for(succeeded)
    assert fake.version_names("ml-prod", "churn") == ["ops-60"]
    assert await by_outcome("failed") == [] and await by_outcome("succeeded") == [event_id]
    resp = await client.post(f"/api/action-runs/{dead['id']}/retry", headers=BEARER)
    assert resp.status == 409
    assert "succeeded" in (await resp.json())["error"]


async def test_webhooks_show_seconds_to_expiry(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client(settings, admin_token=ADMIN_TOKEN)
    engine = create_engine(settings.database_url)
    left = timedelta(days=2, hours=5, seconds=30)
    expires = datetime.now(UTC) + left
    try:
        hook = RegisteredWebhook(7, WebhookSpec(("jira:issue_updated",), "project = OPS"), expires)
        await Registrations(engine).replace("", [hook])
    finally:
        await engine.dispose()
    [row] = (await (await client.get("/api/webhooks", headers=BEARER)).json())["webhooks"]
    assert (row["webhook_id"], row["jql"], row["events"]) == (
        7,
        "project = OPS",
        ["jira:issue_updated"],
    )
    assert left.total_seconds() - 60 < row["expires_in_s"] <= left.total_seconds()
    assert row["expires_in"] == "2d 5h"


async def test_replay_queues_the_events_dead_runs_again(
    make_client: ClientFactory,
    settings: Settings,
    rules_dir: Path,
    aiohttp_server: Callable[..., Any],
) -> None:
    fake, base_url = await start_ubiops(aiohttp_server)
    client = await start(make_client, settings, rules_dir, base_url)
    event_id = await dead_event(client, "OPS-65")
    await create_deployment(base_url)
    resp = await client.post(f"/api/events/{event_id}/replay", headers=BEARER)
    assert resp.status == 200
    assert (await resp.json())["runs_reset"] == 2

    async def succeeded() -> bool:
        return await run_statuses(client, event_id) == ["succeeded", "succeeded"]

    await wait_for(succeeded)
    assert fake.version_names("ml-prod", "churn") == ["ops-65"]
