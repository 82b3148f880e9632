"""The status page: login cookie, CSRF, escaping, and a real browser clicking Retry."""

from __future__ import annotations

import re
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
from bot.web.status import csrf_token, until
from tests.conftest import ClientFactory
from tests.fakes.ubiops import Fault
from tests.helpers import (
    ADMIN_TOKEN,
    BEARER,
    CHROMIUM,
    CHROMIUM_ARGS,
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

SCREENSHOT = Path(__file__).resolve().parent.parent / "test-artifacts" / "status-page.png"
HOSTILE = '<script>alert("x")</script>'


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    return write_rollout_rules(tmp_path)


async def register_webhook(settings: Settings, expires_in: timedelta) -> None:
    engine = create_engine(settings.database_url)
    try:
        spec = WebhookSpec(("jira:issue_updated",), "project = OPS")
        hook = RegisteredWebhook(10001, spec, datetime.now(UTC) + expires_in)
        await Registrations(engine).replace("", [hook])
    finally:
        await engine.dispose()


def test_time_to_expiry_words() -> None:
    assert until(None) == "never expires"
    assert until(2 * 86400 + 5 * 3600 + 59) == "2d 5h"
    assert until(3600 + 120) == "1h 2m"
    assert until(42) == "42s"
    assert until(-90) == "expired 1m ago"


async def test_login_cookie_csrf_and_escaping(
    make_client: ClientFactory,
    settings: Settings,
    rules_dir: Path,
    aiohttp_server: Callable[..., Any],
) -> None:
    _fake, base_url = await start_ubiops(aiohttp_server)
    client = await start(make_client, settings, rules_dir, base_url)
    event_id = await dead_event(client, "OPS-70")
    await deliver(client, "d-hostile", {**issue_updated("OPS-71"), "webhookEvent": HOSTILE})
    dead_id = (await get_event_api(client, event_id))["action_runs"][0]["id"]

    anonymous = await client.get("/")
    assert anonymous.status == 401
    assert "OPS-70" not in await anonymous.text() and 'action="/login"' in await anonymous.text()
    wrong = await client.post("/login", data={"token": "nope"}, allow_redirects=False)
    assert wrong.status == 401 and "OPS-70" not in await wrong.text()

    login = await client.post("/login", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    assert login.status == 303 and login.headers["Location"] == "/"
    cookie = login.headers["Set-Cookie"]
    assert re.search(r"(?i)httponly", cookie) and re.search(r"(?i)samesite=strict", cookie)
    assert ADMIN_TOKEN not in cookie  # the cookie holds a derived value
    page = await client.get("/")  # the client's cookie jar sends the cookie
    body = await page.text()
    assert page.status == 200 and page.content_type == "text/html"
    assert "OPS-70" in body and f'action="/api/action-runs/{dead_id}/retry"' in body
    assert HOSTILE not in body and "&lt;script&gt;" in body  # Jira's values are escaped
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert (await client.get("/", headers=BEARER, cookies={})).status == 200
    # Filtered by outcome: the hostile event matched no rule (ignored), OPS-70 failed.
    failed = await (await client.get("/?outcome=failed")).text()
    ignored = await (await client.get("/?outcome=ignored")).text()
    row_failed = '<td>failed</td><td class="err">'  # the outcome cell of an event row
    assert row_failed in failed and "&lt;script&gt;" not in failed
    assert "&lt;script&gt;" in ignored and row_failed not in ignored
    # The event page shows Jira's hostile values as text too (and the payload).
    hostile_id = await client.get("/api/events", headers=BEARER, params={"outcome": "ignored"})
    hostile_event = (await hostile_id.json())["events"][0]["id"]
    shown = await (await client.get(f"/events/{hostile_event}")).text()
    assert HOSTILE not in shown and shown.count("&lt;script&gt;") >= 2

    retry = f"/api/action-runs/{dead_id}/retry"
    for form in ({}, {"csrf": "0" * 64}):
        refused = await client.post(retry, data=form, allow_redirects=False)
        assert refused.status == 403
    assert await run_statuses(client, event_id) == ["dead", "skipped"]
    done = await client.post(retry, data={"csrf": csrf_token(ADMIN_TOKEN)}, allow_redirects=False)
    assert done.status == 303  # back to the page, with a banner naming what was queued
    assert done.headers["Location"] == f"/?flash=retried&run={dead_id}&n=2"

    out = await client.post("/logout", data={"csrf": csrf_token(ADMIN_TOKEN)})
    assert out.status == 200 and "Log in" in await out.text()  # redirected to the form
    assert (await client.get("/")).status == 401


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium (/usr/bin/chromium) is absent")
async def test_browser_logs_in_and_retries_a_dead_run(
    make_client: ClientFactory,
    settings: Settings,
    rules_dir: Path,
    aiohttp_server: Callable[..., Any],
) -> None:
    from playwright.async_api import async_playwright

    fake, base_url = await start_ubiops(aiohttp_server)
    client = await start(make_client, settings, rules_dir, base_url)
    event_id = await dead_event(client, "OPS-80")
    await deliver(client, "d-hostile", {**issue_updated("OPS-81"), "webhookEvent": HOSTILE})
    await register_webhook(settings, timedelta(days=27, hours=3, minutes=1))
    (rules_dir / "broken.yaml").write_text("rules:\n  - name: half-written\n    on: {}\n")

    async def rule_error_seen() -> bool:
        rules = await (await client.get("/api/rules", headers=BEARER)).json()
        return bool(rules["errors"])

    await wait_for(rule_error_seen)
    # Fix the cause, and hold the next create so that the queued state can be seen.
    await create_deployment(base_url)
    fake.fail_next(1, Fault(kind="slow", delay_s=1.5, method="POST", path_contains="/versions"))
    engine = create_engine(settings.database_url)
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 900})
                await page.goto(str(client.make_url("/login")))
                await page.fill("input[name=token]", ADMIN_TOKEN)
                await page.click("button[type=submit]")
                await page.wait_for_selector("text=Dead action runs")
                text = await page.inner_text("body")
                assert "OPS-80" in text and "27d 3h" in text and "a rule needs 'do'" in text
                assert HOSTILE in text  # shown as text, not run: the page has no script
                SCREENSHOT.parent.mkdir(exist_ok=True)
                await page.screenshot(path=str(SCREENSHOT), full_page=True)
                [dead, skipped] = (await get_event(engine, event_id) or {})["action_runs"]
                assert (dead["status"], skipped["status"]) == ("dead", "skipped")
                async with page.expect_navigation():
                    await page.click(f"button[aria-label='Retry action run {dead['id']}']")
                assert page.url.startswith(str(client.make_url("/?flash=retried")))
                assert f"Action run {dead['id']} is queued again" in await page.inner_text("body")
                queued = await get_event(engine, event_id)
                assert queued is not None
                first, second = queued["action_runs"]
                assert first["status"] in {"pending", "running"} and first["attempts"] <= 1
                assert second["status"] == "pending"
            finally:
                await browser.close()

        async def succeeded() -> bool:
            return await run_statuses(client, event_id) == ["succeeded", "succeeded"]

        await wait_for(succeeded)
    finally:
        await engine.dispose()
