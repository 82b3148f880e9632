"""The operator's console: a failed roll-out with an `on_failure` step, walked in a real
browser (login -> events filtered by outcome -> event page -> Retry -> banner -> Replay),
and the same pages over plain HTTP: filters, paging, issue search, the runs view, masking,
what a waiting run waits for, and the Retry a run skipped behind a dead one must not offer.

Screenshots are kept in test-artifacts/console-*.png (gitignored) for a person to look at.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from bot.db.engine import create_engine
from bot.db.queries import get_event
from bot.settings import Settings
from bot.web.status import csrf_token, flash, safe_back
from tests.conftest import ClientFactory
from tests.fakes.ubiops import FakeUbiOps
from tests.helpers import (
    ADMIN_TOKEN,
    BEARER,
    CHROMIUM,
    CHROMIUM_ARGS,
    create_deployment,
    deliver,
    start,
    start_ubiops,
    wait_for,
)
from tests.workflow_world import ROLLOUT, issue_updated

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
Client = TestClient[Any, Any]
# The workflow tests' roll-out, checking the build every second (a real clock here).
FAST_ROLLOUT = ROLLOUT.replace("every: 10m", "every: 1s")
SECRET_VALUE = "s3cr3t-value-that-must-not-show"
SECRET_RULE = f"""
  - name: set-secret
    on: {{events: [jira:issue_updated]}}
    when: [{{field: issue.key, equals: OPS-9}}]
    do:
      - action: ubiops.deployment_environment_variables_create
        with:
          project_name: ml-prod
          deployment_name: churn
          data: {{name: API_KEY, value: {SECRET_VALUE}, secret: true}}
"""


def unmatched_update(key: str) -> dict[str, Any]:
    """An update that moves the status elsewhere: no rule matches it (outcome ignored)."""
    payload = issue_updated(key)
    payload["changelog"]["items"][0]["toString"] = "In progress"
    return payload


def rollout_rules(tmp_path: Path, extra: str = "") -> Path:
    folder = tmp_path / "console-rules"
    (folder / "artifacts").mkdir(parents=True, exist_ok=True)
    (folder / "rollout.yaml").write_text(FAST_ROLLOUT + extra)
    (folder / "artifacts" / "model.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    return folder


async def shown(client: Client, event_id: int) -> dict[str, Any]:
    found: dict[str, Any] = await (
        await client.get(f"/api/events/{event_id}", headers=BEARER)
    ).json()
    return found


async def failed_rollout(
    make_client: ClientFactory,
    settings: Settings,
    tmp_path: Path,
    aiohttp_server: Callable[..., Any],
    extra_rules: str = "",
) -> tuple[Client, FakeUbiOps, int, int]:
    """A roll-out whose build fails (its on_failure steps ran), and an ignored event."""
    fake, base_url = await start_ubiops(aiohttp_server)
    fake.build_steps = ("queued", "failed")
    await create_deployment(base_url)
    client = await start(make_client, settings, rollout_rules(tmp_path, extra_rules), base_url)
    failed = await deliver(client, "d-ops-5", issue_updated("OPS-5"))
    ignored = await deliver(client, "d-ops-6", unmatched_update("OPS-6"))

    async def settled() -> bool:
        event = await shown(client, failed)
        runs = [r["status"] for r in event["action_runs"]]
        return event["outcome"] == "failed" and runs[-2:] == ["succeeded", "succeeded"]

    await wait_for(settled)
    return client, fake, failed, ignored


async def login(client: Client) -> None:
    answer = await client.post("/login", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    assert answer.status == 303


def run_ids(event: dict[str, Any]) -> dict[str, int]:
    """Runs by label: step ids, `promote` for the unnamed 5th, `cleanup` for on_failure 1."""
    named = {}
    for run in event["action_runs"]:
        label = run["step_id"] or {4: "promote", 1000: "cleanup"}[run["step"]]
        named[label] = run["id"]
    return named


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium (/usr/bin/chromium) is absent")
async def test_browser_walks_a_failed_rollout(
    make_client: ClientFactory,
    settings: Settings,
    tmp_path: Path,
    aiohttp_server: Callable[..., Any],
) -> None:
    from playwright.async_api import async_playwright

    client, fake, event_id, ignored_id = await failed_rollout(
        make_client, settings, tmp_path, aiohttp_server
    )
    runs = run_ids(await shown(client, event_id))
    ARTIFACTS.mkdir(exist_ok=True)
    url = client.make_url
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(str(url("/")))  # not logged in: the login form, neutral words
            invitation = page.locator("p", has_text="Log in with the admin token.")
            assert await invitation.get_attribute("class") == "muted"
            await page.screenshot(path=str(ARTIFACTS / "console-1-login.png"))
            await page.fill("input[name=token]", ADMIN_TOKEN)
            async with page.expect_navigation():
                await page.click("button[type=submit]")

            # The events list, filtered by outcome through its form.
            await page.goto(str(url("/events")))
            await page.select_option("select[name=outcome]", "failed")
            async with page.expect_navigation():
                await page.click("form.filters button[type=submit]")
            assert "outcome=failed" in page.url
            listed = await page.inner_text("table")
            assert "OPS-5" in listed and "OPS-6" not in listed
            assert "rollout: " in listed and "1 dead" in listed  # what the runs did
            await page.screenshot(path=str(ARTIFACTS / "console-2-failed-events.png"))

            # The event page: rule decisions, each step, the failed build, the clean-up.
            async with page.expect_navigation():
                await page.click(f"a[href='/events/{event_id}']")
            body = await page.inner_text("body")
            assert f"Event {event_id}: jira:issue_updated on OPS-5" in body
            assert "fail_if: result.status equals 'failed' held" in body
            assert "on_failure step 1" in body and "on_failure step 2 (note)" in body
            assert '"version": "ops-5"' in body  # the rendered request, not the template
            assert "X-Atlassian-Webhook-Identifier" in body and "d-ops-5" in body
            # The skipped smoke test waits behind the dead build: no Retry of its own.
            assert (
                await page.locator(f"[aria-label='Retry action run {runs['smoke']}']").count() == 0
            )
            assert f"skipped behind run {runs['build']}" in body
            await page.screenshot(path=str(ARTIFACTS / "console-3-event.png"), full_page=True)

            # Retry the dead build: back on the event page with a banner.
            async with page.expect_navigation():
                await page.click(f"button[aria-label='Retry action run {runs['build']}']")
            assert page.url.startswith(str(url(f"/events/{event_id}?flash=retried")))
            banner = await page.inner_text("[role=status]")
            assert banner == f"Action run {runs['build']} is queued again (3 run(s) queued)."
            await page.screenshot(path=str(ARTIFACTS / "console-4-retried.png"))

            # The clean-up removed the version: the build dies again (404), and the
            # re-armed clean-up runs again (and finds nothing left to delete).
            async def died_again() -> bool:
                event = await shown(client, event_id)
                status = {r["id"]: r["status"] for r in event["action_runs"]}
                return event["outcome"] == "failed" and status[runs["cleanup"]] not in {
                    "held",
                    "pending",
                    "running",
                    "retrying",
                }

            await wait_for(died_again)
            assert len(fake.calls("DELETE", r".*/versions/ops-5")) == 2

            # Replay: the event is evaluated again; banner says so.
            await page.goto(str(url(f"/events/{event_id}")))
            async with page.expect_navigation():
                await page.click(f"button[aria-label='Replay event {event_id}']")
            banner = await page.inner_text("[role=status]")
            assert banner.startswith(f"Event {event_id} is queued to be evaluated again")
            await page.screenshot(path=str(ARTIFACTS / "console-5-replayed.png"))

            # A phone in dark mode: the event page still reads.
            phone = await browser.new_page(
                viewport={"width": 390, "height": 844}, color_scheme="dark"
            )
            cookies = await page.context.cookies()
            await phone.context.add_cookies(
                [{"name": c["name"], "value": c["value"], "url": str(url("/"))} for c in cookies]
            )
            await phone.goto(str(url(f"/events/{event_id}")))
            width = await phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 390  # nothing forces a sideways scroll of the whole page
            await phone.screenshot(
                path=str(ARTIFACTS / "console-6-event-phone-dark.png"), full_page=True
            )
        finally:
            await browser.close()
    assert ignored_id != event_id


async def test_event_page_lists_and_search_without_javascript(
    make_client: ClientFactory,
    settings: Settings,
    tmp_path: Path,
    aiohttp_server: Callable[..., Any],
) -> None:
    client, _fake, event_id, ignored_id = await failed_rollout(
        make_client, settings, tmp_path, aiohttp_server, SECRET_RULE
    )
    secret_id = await deliver(client, "d-ops-9", issue_updated("OPS-9"))

    async def secret_done() -> bool:
        return (await shown(client, secret_id))["outcome"] in {"succeeded", "failed"}

    await wait_for(secret_done)
    await login(client)
    runs = run_ids(await shown(client, event_id))

    page = await (await client.get(f"/events/{event_id}")).text()
    assert page.count("<details") >= 3 and "Payload (" in page
    assert "missed" in page and "matched" in page  # every rule's decision
    assert f'action="/api/action-runs/{runs["build"]}/retry"' in page
    assert f'action="/api/action-runs/{runs["smoke"]}/retry"' not in page
    assert f'action="/api/events/{event_id}/replay"' in page
    assert re.search(r"\d+ ms|\d\.\d s", page)  # attempt durations
    assert "&#34;status&#34;: &#34;failed&#34;" in page  # the build's answer, escaped JSON
    # A secret written in a rule is masked on the page, rendered or not.
    secret_page = await (await client.get(f"/events/{secret_id}")).text()
    assert "set-secret" in secret_page and "********" in secret_page
    assert SECRET_VALUE not in secret_page

    # Lists: by outcome, by matched rule, by issue key (the one-step search), paged.
    failed = await (await client.get("/events", params={"outcome": "failed"})).text()
    assert f'href="/events/{event_id}"' in failed and f'href="/events/{ignored_id}"' not in failed
    by_rule = await (await client.get("/events", params={"rule": "set-secret"})).text()
    assert f'href="/events/{secret_id}"' in by_rule and f'href="/events/{event_id}"' not in by_rule
    search = await (await client.get("/events", params={"issue": "ops-5"})).text()
    assert "Events for OPS-5" in search and f'the newest is\n<a href="/events/{event_id}"' in search
    assert f'href="/events/{ignored_id}"' not in search
    later = await (await client.get("/events", params={"since": "2999-01-01T00:00"})).text()
    assert "no events match these filters" in later
    bad = await (await client.get("/events", params={"since": "yesterday"})).text()
    assert "is not a time" in bad
    for n in range(60):
        await deliver(client, f"d-bulk-{n}", unmatched_update(f"OPS-{100 + n}"))
    first = await (await client.get("/events")).text()
    older = re.search(r'<a href="(/events\?before=(\d+))" rel="next">', first)
    assert older is not None
    second = await (await client.get(older.group(1).replace("&amp;", "&"))).text()
    first_ids = set(re.findall(r'<a href="/events/(\d+)">', first))
    second_ids = set(re.findall(r'<a href="/events/(\d+)">', second))
    assert len(first_ids) == 50 and second_ids and not first_ids & second_ids
    assert max(map(int, second_ids)) < int(older.group(2)) + 1

    # The runs view lists the dead build with a Retry.
    runs_page = await (await client.get("/runs")).text()
    assert f'action="/api/action-runs/{runs["build"]}/retry"' in runs_page

    # A form asking to retry the skipped smoke test is refused with the run to retry.
    csrf = csrf_token(ADMIN_TOKEN)
    refused = await client.post(
        f"/api/action-runs/{runs['smoke']}/retry",
        data={"csrf": csrf, "next": f"/events/{event_id}"},
        allow_redirects=False,
    )
    assert refused.status == 303
    location = refused.headers["Location"]
    assert location == (
        f"/events/{event_id}?flash=refused&run={runs['smoke']}&instead={runs['build']}"
    )
    banner = await (await client.get(location)).text()
    assert f"retry action run {runs['build']} first" in banner
    # API clients still get JSON, with the run to retry instead.
    api = await client.post(f"/api/action-runs/{runs['smoke']}/retry", headers=BEARER)
    assert api.status == 409 and (await api.json())["retry_instead"] == runs["build"]
    # A `next` that is not one of our pages is not followed.
    elsewhere = await client.post(
        f"/api/events/{event_id}/replay",
        data={"csrf": csrf, "next": "//evil.example/x"},
        allow_redirects=False,
    )
    assert elsewhere.headers["Location"].startswith("/?flash=replayed")


async def test_waiting_run_says_what_it_waits_for(
    make_client: ClientFactory,
    settings: Settings,
    tmp_path: Path,
    aiohttp_server: Callable[..., Any],
) -> None:
    fake, base_url = await start_ubiops(aiohttp_server)
    fake.build_steps = ("queued", "building")  # never finishes: the build step waits
    await create_deployment(base_url)
    client = await start(make_client, settings, rollout_rules(tmp_path), base_url)
    first = await deliver(client, "d-ops-7", issue_updated("OPS-7"))
    second = await deliver(client, "d-ops-8", issue_updated("OPS-8"))

    async def waiting() -> bool:
        return bool((await shown(client, first))["outcome"] == "waiting")

    await wait_for(waiting)
    await login(client)
    page = await (await client.get(f"/events/{first}")).text()
    assert "waits: until: next check at" in page and "Last answer" in page
    assert "&#34;status&#34;: &#34;building&#34;" in page or "&#34;status&#34;: &#34;queued" in page
    behind = await (await client.get(f"/events/{second}")).text()
    assert f"concurrency key &#39;ubiops/ml-prod/churn&#39;: held by event {first}" in behind
    runs_page = await (await client.get("/runs")).text()
    assert "Waiting (" in runs_page and "waiting for result.status" in runs_page
    engine = create_engine(settings.database_url)
    try:
        event = await get_event(engine, first)
        assert event is not None and event["outcome"] == "waiting"
    finally:
        await engine.dispose()


def test_banner_and_back_address_take_only_known_values() -> None:
    assert flash({"flash": "retried", "run": "7", "n": "2"}) == {
        "tone": "ok",
        "text": "Action run 7 is queued again (2 run(s) queued).",
    }
    assert flash({"flash": "<b>hi</b>"}) is None
    assert flash({"flash": "retried", "run": "<script>"})["text"].startswith(  # type: ignore[index]
        "Action run None"
    )
    assert safe_back("/events/12") == "/events/12"
    for hostile in ("//evil.example", "https://evil.example/", "/events/1/../x", "/runs?x", None):
        assert safe_back(hostile) == "/"
    assert json.dumps(safe_back("/runs")) == '"/runs"'
