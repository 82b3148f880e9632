"""No secret leaks: every credential configured, a real service driven, everything searched.

`python -m bot serve` runs as a subprocess (tests/system/harness.py) with every credential
set, against the fake Jira, UbiOps and Genesys. It gets signed deliveries; actions succeed,
and fail against fakes that echo the request's Authorization header back in their error
body. Then everything it shows or keeps is searched for every secret and every bearer
token that crossed the wire: its JSON logs, every row of every table, the status page
HTML, the admin API JSON and /metrics.

Two stored values are credentials by design and are left out of the database search: a
Connect tenant's `tenants.shared_secret` (needed to verify its deliveries) and the rotated
Jira refresh token in the key-value table (the configured one is spent once used).

Both engines run: the stored rows, errors included, are what is searched.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy import select

from bot.db.engine import create_engine
from bot.db.models import metadata
from tests.conftest import CLIENT_SECRET
from tests.fakes.genesys import FakeGenesys
from tests.fakes.jira import FakeJira
from tests.fakes.ubiops import FakeUbiOps, Fault
from tests.helpers import KeyServer, issue_updated, wait_for
from tests.signing import InstallKeys, connect_token, oauth_token
from tests.system.harness import (
    VERSION_PER_ISSUE_RULE,
    Service,
    create_churn_deployment,
    service_env,
)

ADMIN_TOKEN = "admin-token-" + "A7" * 20
REFRESH_TOKEN = "jira-refresh-" + "R5" * 20
UBIOPS_TOKEN = "ubiops-token-" + "U3" * 20
GENESYS_ID, GENESYS_SECRET = "genesys-client", "genesys-secret-" + "G9" * 20
JIRA_CLIENT_ID = "jira-oauth-client"
SHARED_SECRET = "connect-shared-" + "S1" * 24
CLIENT_KEY = "jira:leak-tenant"

GENESYS_RULE = """
  - name: genesys-config
    on: {events: [jira:issue_updated]}
    when: [{field: issue.fields.summary, matches: "(?i)genesys"}]
    do:
      - action: genesys.post_webdeployments_configurations
        with:
          configuration_version:
            name: "{{ issue.key }}"
            defaultLanguage: en-us
            languages: [en-us]
"""


def _dump_database_sync_rows(rows: list[tuple[str, dict[str, Any]]]) -> str:
    lines = []
    for table, row in rows:
        if table == "tenants":
            row = {**row, "shared_secret": "(a credential, stored by design)"}
        if table == "kv" and "refresh" in str(row.get("key", "")):
            row = {**row, "value": "(the rotated Jira refresh token, stored by design)"}
        lines.append(f"{table}: {row!r}")
    return "\n".join(lines)


async def dump_database(database_url: str) -> str:
    """Every row of every table, as text."""
    engine = create_engine(database_url)
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        async with engine.connect() as conn:
            for table in metadata.sorted_tables:
                for row in (await conn.execute(select(table))).mappings():
                    rows.append((table.name, dict(row)))
    finally:
        await engine.dispose()
    assert {t for t, _ in rows} >= {"events", "action_runs", "rule_matches"}
    return _dump_database_sync_rows(rows)


@pytest.mark.parametrize("mode", ["oauth", "connect"])
async def test_no_secret_in_logs_rows_pages_or_metrics(
    database_url: str,
    tmp_path: Path,
    aiohttp_server: Callable[..., Any],
    mode: str,
) -> None:
    ubiops = FakeUbiOps(token=UBIOPS_TOKEN)
    ubiops_url = str((await aiohttp_server(ubiops.app())).make_url(ubiops.prefix))
    genesys = FakeGenesys(client_id=GENESYS_ID, client_secret=GENESYS_SECRET)
    genesys_server: TestServer = await aiohttp_server(genesys.app)
    genesys_url = str(genesys_server.make_url("")).rstrip("/")
    jira = FakeJira(
        mode="oauth" if mode == "oauth" else "connect",
        client_id=JIRA_CLIENT_ID,
        client_secret=CLIENT_SECRET,
        refresh_token=REFRESH_TOKEN,
        client_key=CLIENT_KEY,
        shared_secret=SHARED_SECRET,
    )
    jira_url = await jira.start()
    key_server = KeyServer(InstallKeys())
    keys_url = str((await aiohttp_server(key_server.app())).make_url("")).rstrip("/")
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(VERSION_PER_ISSUE_RULE + GENESYS_RULE)
    public_url = "http://deploybot.invalid"
    env = service_env(
        database_url,
        rules,
        JIRA_AUTH_MODE=mode,
        DEPLOYBOT_PUBLIC_URL=public_url,
        DEPLOYBOT_ADMIN_TOKEN=ADMIN_TOKEN,
        JIRA_BASE_URL=jira_url,
        JIRA_CLIENT_ID=JIRA_CLIENT_ID,
        JIRA_REFRESH_TOKEN=REFRESH_TOKEN,
        JIRA_TOKEN_URL=jira.token_url,
        JIRA_CONNECT_KEYS_URL=keys_url,
        JIRA_ALLOWED_BASE_URL_HOSTS="http://127.0.0.1",  # the fake Jira's base URL
        JIRA_APP_KEY=jira.app_key,
        UBIOPS_API_URL=ubiops_url,
        UBIOPS_API_TOKEN=UBIOPS_TOKEN,
        GENESYS_API_URL=genesys_url,
        GENESYS_LOGIN_URL=genesys_url,
        GENESYS_CLIENT_ID=GENESYS_ID,
        GENESYS_CLIENT_SECRET=GENESYS_SECRET,
    )
    service = Service(env, tmp_path, tmp_path / "serve.log")
    sent: list[str] = []  # every Authorization value deploybot received
    event_ids: list[int] = []
    try:
        async with aiohttp.ClientSession() as session:
            await create_churn_deployment(session, ubiops_url, UBIOPS_TOKEN)
            ubiops.requests.clear()
            await service.start(session)
            if mode == "connect":
                token = key_server.keys.sign(
                    "POST", "/lifecycle/installed", client_key=CLIENT_KEY, audience=public_url
                )
                sent.append(f"JWT {token}")
                body = {
                    "key": jira.app_key,
                    "clientKey": CLIENT_KEY,
                    "sharedSecret": SHARED_SECRET,
                    "baseUrl": jira_url,
                    "eventType": "installed",
                }
                async with session.post(
                    service.url + "/lifecycle/installed",
                    json=body,
                    headers={"Authorization": f"JWT {token}"},
                ) as resp:
                    assert resp.status == 204, await resp.text()

            async def deliver(delivery_id: str, payload: dict[str, Any]) -> None:
                if mode == "oauth":
                    auth = f"Bearer {oauth_token(CLIENT_SECRET)}"
                else:
                    auth = (
                        f"JWT {connect_token('POST', '/webhooks/jira', CLIENT_KEY, SHARED_SECRET)}"
                    )
                sent.append(auth)
                async with session.post(
                    service.url + "/webhooks/jira",
                    data=json.dumps(payload),
                    headers={
                        "Authorization": auth,
                        "Content-Type": "application/json",
                        "X-Atlassian-Webhook-Identifier": delivery_id,
                    },
                ) as resp:
                    assert resp.status == 202, await resp.text()
                    event_ids.append(int((await resp.json())["event_id"]))

            async def runs_settled(count: int) -> bool:
                async with session.get(
                    service.url + "/api/events",
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                ) as resp:
                    listing = await resp.json()
                shown = []
                for event in listing["events"]:
                    async with session.get(
                        f"{service.url}/api/events/{event['id']}",
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                    ) as resp:
                        shown.append(await resp.json())
                runs = [r for e in shown for r in e["action_runs"]]
                return len(runs) >= count and all(
                    r["status"] == "succeeded" or r["last_error"] for r in runs
                )

            # 1. UbiOps succeeds; 2. UbiOps fails, echoing the token it was sent.
            await deliver("leak-1", issue_updated("OPS-1"))
            await wait_for(lambda: runs_settled(1), timeout_s=30)
            ubiops.fail_next(1, Fault(status=400, echo_authorization=True))
            await deliver("leak-2", issue_updated("OPS-2"))
            await wait_for(lambda: runs_settled(2), timeout_s=30)
            # 3. Genesys succeeds (a login with the client secret); 4. it fails, echoing.
            await deliver("leak-3", issue_updated("OPS-3", summary="genesys ok"))
            await wait_for(lambda: runs_settled(4), timeout_s=30)
            genesys.inject("500", count=None, echo_authorization=True)
            await deliver("leak-4", issue_updated("OPS-4", summary="genesys echo"))
            await wait_for(lambda: runs_settled(6), timeout_s=60)
            if mode == "oauth":
                await wait_for(lambda: _async(jira.token_grants > 0), timeout_s=30)

            # The admin login: the cookie is a credential too.
            async with session.post(
                service.url + "/login", data={"token": ADMIN_TOKEN}, allow_redirects=False
            ) as resp:
                assert resp.status == 303
                cookie = resp.cookies
            cookie_values = [c.value for c in cookie.values()]
            assert cookie_values
            pages: dict[str, str] = {}
            async with session.get(service.url + "/", cookies=cookie) as resp:
                assert resp.status == 200
                pages["status page"] = await resp.text()
            admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            for path in ["/api/events", "/api/rules", "/api/webhooks"] + [
                f"/api/events/{i}" for i in event_ids
            ]:
                async with session.get(service.url + path, headers=admin) as resp:
                    assert resp.status == 200, path
                    pages[path] = await resp.text()
            async with session.get(service.url + "/metrics") as resp:
                pages["/metrics"] = await resp.text()
    finally:
        if service.proc is not None and service.proc.returncode is None:
            await service.stop(timeout_s=20)
        await jira.close()

    database = await dump_database(database_url)
    logs = service.log.read_text()
    # The failures did happen and were recorded: the search below is not vacuous.
    assert "Invalid token" not in logs  # the configured tokens were accepted
    # Both fakes' echoes reached deploybot and were stored as errors (masked, we check).
    assert "HTTP 400: Internal error (Authorization: " in database
    assert "HTTP 500: Injected 500 (Authorization: " in database
    if mode == "oauth":
        assert jira.access_tokens, "the Jira refresh-token grant never happened"
    assert any(str(line.get("msg", "")).startswith("action ") for line in service.log_lines())

    bearer_values = [v.partition(" ")[2] for v in sent]
    secrets = {
        "JIRA_CLIENT_SECRET": CLIENT_SECRET,
        "JIRA_REFRESH_TOKEN": REFRESH_TOKEN,
        "connect shared secret": SHARED_SECRET,
        "UBIOPS_API_TOKEN": UBIOPS_TOKEN,
        "GENESYS_CLIENT_SECRET": GENESYS_SECRET,
        "Genesys basic credentials": base64.b64encode(
            f"{GENESYS_ID}:{GENESYS_SECRET}".encode()
        ).decode(),
        "DEPLOYBOT_ADMIN_TOKEN": ADMIN_TOKEN,
        **{f"admin cookie {i}": v for i, v in enumerate(cookie_values)},
        **{f"Genesys access token {i}": t for i, t in enumerate(genesys.tokens)},
        **{f"Jira access token {i}": t for i, t in enumerate(jira.access_tokens)},
        **{f"received bearer token {i}": t for i, t in enumerate(bearer_values)},
    }
    assert genesys.tokens, "Genesys was never logged in to"
    places = {"logs": logs, "database": database, **pages}
    leaks = [
        f"{name} in {place}"
        for name, secret in secrets.items()
        for place, text in places.items()
        if secret in text
    ]
    print(
        f"\n{mode}: searched {len(places)} places "
        f"({sum(len(t) for t in places.values())} chars) for {len(secrets)} secrets"
    )
    assert leaks == []


async def _async(value: bool) -> bool:
    return value
