"""POST /webhooks/forge: a FIT verified against a local JWKS, events stored like deliveries."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select

from bot.core import forge
from bot.core.catalog import PlannedRequest
from bot.db.engine import create_engine
from bot.db.models import events
from bot.db.queries import get_event
from bot.errors import ActionError, PayloadError, RuleError
from bot.rules.loader import load_rules
from bot.settings import Settings
from tests.conftest import ClientFactory
from tests.fakes.forge import APP_ID, FakeForge, issue_updated_event
from tests.fakes.jira import FakeJira
from tests.helpers import stored_count, wait_for, write_rules

RULE = """
rules:
  - name: on-webhook-name
    on:
      events: [jira:issue_updated]
    when:
      - changed: status
        to: Ready to deploy
    do:
      - action: ubiops.deployments_get
        with: {project_name: ml-prod, deployment_name: churn}
  - name: on-forge-name
    on:
      events: ["avi:jira:updated:issue"]
    when:
      - field: issue.key
        equals: OPS-7
    do:
      - action: ubiops.deployments_get
        with: {project_name: ml-prod, deployment_name: churn}
"""


@pytest.fixture
async def fake_forge() -> AsyncIterator[FakeForge]:
    fake = FakeForge()
    await fake.start()
    yield fake
    await fake.close()


def _settings(settings: Settings, fake: FakeForge) -> dict[str, Any]:
    return {"forge_app_id": APP_ID, "forge_jwks_url": fake.url}


def _headers(token: str | None, **extra: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **extra}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


async def test_forge_issue_updated_fires_a_jira_issue_updated_rule(
    make_client: ClientFactory, settings: Settings, fake_forge: FakeForge
) -> None:
    write_rules(settings.rules_dir, {"r.yaml": RULE})
    client = await make_client(settings, **_settings(settings, fake_forge))
    body = json.dumps(issue_updated_event())
    resp = await client.post(
        "/webhooks/forge",
        data=body,
        headers=_headers(fake_forge.fit(), **{"x-forge-oauth-system": "system-token-1"}),
    )
    assert resp.status == 202, await resp.text()
    event_id = (await resp.json())["event_id"]
    # A Forge retry of the same event (a new FIT) is a duplicate.
    again = await client.post("/webhooks/forge", data=body, headers=_headers(fake_forge.fit()))
    assert again.status == 200
    assert await stored_count(settings) == 1
    engine = create_engine(settings.database_url)
    try:

        async def matched() -> bool:
            shown = await get_event(engine, event_id)
            return bool(shown and shown["matches"])

        await wait_for(matched)
        shown = await get_event(engine, event_id)
        async with engine.connect() as conn:
            row = (await conn.execute(select(events).where(events.c.id == event_id))).one()
    finally:
        await engine.dispose()
    assert shown is not None
    assert {(m["rule"], m["matched"]) for m in shown["matches"]} == {
        ("on-webhook-name", True),
        ("on-forge-name", True),
    }
    assert row.webhook_event == "jira:issue_updated"
    assert row.source == "forge"
    assert row.issue_key == "OPS-7"
    stored = json.loads(row.body)
    assert stored["forgeEventType"] == "avi:jira:updated:issue"
    assert stored["user"] == {"accountId": "5b10a2844c20165700ede21g"}
    assert "system-token-1" not in row.body.decode()  # the token is never stored
    assert fake_forge.jwks_requests == 1  # cached


REFUSALS = [
    "wrong aud",
    "expired",
    "not yet valid",
    "issued in the future",
    "wrong issuer",
    "alg none",
    "alg HS256",
    "unknown kid",
    "other key, same kid",
    "no token",
    "no exp",
]


@pytest.mark.parametrize("case", REFUSALS)
async def test_bad_fit_is_refused_and_nothing_stored(
    make_client: ClientFactory, settings: Settings, fake_forge: FakeForge, case: str
) -> None:
    client = await make_client(settings, **_settings(settings, fake_forge))
    now = int(fake_forge.claims()["iat"])
    token: str | None
    if case == "wrong aud":
        token = fake_forge.fit(aud="ari:cloud:ecosystem::app/someone-else")
    elif case == "expired":
        token = fake_forge.fit(iat=now - 900, nbf=now - 900, exp=now - 600)
    elif case == "not yet valid":
        token = fake_forge.fit(nbf=now + 600, exp=now + 900)
    elif case == "issued in the future":
        token = fake_forge.fit(iat=now + 600, exp=now + 900)
    elif case == "wrong issuer":
        token = fake_forge.fit(iss="someone")
    elif case == "alg none":
        token = fake_forge.fit_alg_none()
    elif case == "alg HS256":
        token = fake_forge.fit_hs256()
    elif case == "unknown kid":
        token = fake_forge.fit(kid="not-a-known-key")
    elif case == "other key, same kid":
        token = fake_forge.fit(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    elif case == "no exp":
        token = _without_exp(fake_forge)
    else:
        token = None
    resp = await client.post(
        "/webhooks/forge", data=json.dumps(issue_updated_event()), headers=_headers(token)
    )
    assert resp.status == 401, await resp.text()
    assert await stored_count(settings) == 0


def _without_exp(fake: FakeForge) -> str:
    claims = fake.claims()
    del claims["exp"]
    return jwt.encode(claims, fake._key, algorithm="RS256", headers={"kid": fake.kid})


async def test_unknown_kids_do_not_refetch_the_jwks_each_time(
    make_client: ClientFactory, settings: Settings, fake_forge: FakeForge
) -> None:
    client = await make_client(settings, **_settings(settings, fake_forge))
    for i in range(20):
        resp = await client.post(
            "/webhooks/forge",
            data=json.dumps(issue_updated_event()),
            headers=_headers(fake_forge.fit(kid=f"invented-{i}")),
        )
        assert resp.status == 401
    assert fake_forge.jwks_requests == 1


async def test_jwks_unreachable_is_503(make_client: ClientFactory, settings: Settings) -> None:
    fake = FakeForge()
    client = await make_client(
        settings, forge_app_id=APP_ID, forge_jwks_url="http://127.0.0.1:9/jwks.json"
    )
    resp = await client.post(
        "/webhooks/forge", data=json.dumps(issue_updated_event()), headers=_headers(fake.fit())
    )
    assert resp.status == 503  # Forge retries
    assert await stored_count(settings) == 0


async def test_endpoint_is_off_without_app_id(
    make_client: ClientFactory, settings: Settings, fake_forge: FakeForge
) -> None:
    client = await make_client(settings)
    resp = await client.post(
        "/webhooks/forge",
        data=json.dumps(issue_updated_event()),
        headers=_headers(fake_forge.fit()),
    )
    assert resp.status in (404, 405)


def test_mapping_and_refusals() -> None:
    delivery_id, payload = forge.to_webhook_payload(
        json.dumps({"payload": issue_updated_event()}).encode(), now_ms=5
    )
    assert payload["webhookEvent"] == "jira:issue_updated"
    assert payload["timestamp"] == 5
    # the same change is the same delivery id, whatever the retry context says
    retried = issue_updated_event() | {"retryContext": {"retryCount": 2}}
    assert forge.to_webhook_payload(json.dumps(retried).encode(), now_ms=9)[0] == delivery_id
    other = issue_updated_event(changelog_id="10297")
    assert forge.to_webhook_payload(json.dumps(other).encode(), now_ms=5)[0] != delivery_id
    with pytest.raises(PayloadError, match="no Jira webhook equivalent"):
        forge.to_webhook_payload(b'{"eventType": "avi:jira:assigned:issue", "issue": {}}', now_ms=1)
    with pytest.raises(PayloadError, match="no eventType"):
        forge.to_webhook_payload(b'{"webhookEvent": "jira:issue_updated"}', now_ms=1)


def test_rules_name_forge_events_by_their_jira_equivalent(settings: Settings) -> None:
    write_rules(settings.rules_dir, {"r.yaml": RULE})
    ruleset = load_rules(settings.rules_dir)
    assert ruleset.events == frozenset({"jira:issue_updated"})
    write_rules(settings.rules_dir, {"r.yaml": RULE.replace("avi:jira:updated:issue", "avi:x")})
    with pytest.raises(RuleError, match="Forge event"):
        load_rules(settings.rules_dir)


COMMENT_RULE = """
rules:
  - name: comment-back
    on:
      events: ["avi:jira:updated:issue"]
    when:
      - changed: status
        to: Ready to deploy
    do:
      - action: jira.add_comment
        with: {issue: "{{ issue.key }}", body: "Seen by deploybot."}
"""


async def test_write_back_uses_the_app_system_token_the_event_carried(
    make_client: ClientFactory, settings: Settings, fake_forge: FakeForge
) -> None:
    fake_jira = FakeJira(mode="oauth")
    await fake_jira.start()
    try:
        issue = fake_jira.add_issue("OPS-7")
        system_token = jwt.encode(
            {"exp": int(fake_jira.now) + 900},
            "a-forge-signing-key-of-32-bytes!!",
            algorithm="HS256",
        )
        fake_jira.access_tokens[system_token] = fake_jira.now + 900
        write_rules(settings.rules_dir, {"r.yaml": COMMENT_RULE})
        client = await make_client(settings, **_settings(settings, fake_forge))
        fit = fake_forge.fit(app=fake_forge.claims()["app"] | {"apiBaseUrl": fake_jira.base_url})
        resp = await client.post(
            "/webhooks/forge",
            data=json.dumps(issue_updated_event()),
            headers=_headers(fit, **{"x-forge-oauth-system": system_token}),
        )
        assert resp.status == 202, await resp.text()
        await wait_for(lambda: len(issue.comments) == 1)
        [post] = [r for r in fake_jira.requests if r.method == "POST"]
        assert post.headers["Authorization"] == f"Bearer {system_token}"
        assert post.auth_error is None
    finally:
        await fake_jira.close()


async def test_without_a_fresh_system_token_write_back_is_retried(
    settings: Settings, database_url: str
) -> None:
    # No token yet: no client (the run is dead, as for an unconfigured service). A stale
    # one: the call fails retryably, the next Forge event brings a fresh token.
    from bot.jira_app.access import JiraAccess, JiraActionClients
    from bot.services.forge_tokens import ForgeSystemTokens

    tokens = ForgeSystemTokens(clock=lambda: 1000.0)
    engine = create_engine(database_url)
    try:
        async with aiohttp.ClientSession() as session:
            clients = JiraActionClients(JiraAccess(settings, engine, session), tokens)
            assert await clients.client("") is None
            tokens.remember("https://api.atlassian.com/ex/jira/x", "not a jwt")
            assert await clients.client("") is None
            stale = jwt.encode(
                {"exp": 1010}, "a-forge-signing-key-of-32-bytes!!", algorithm="HS256"
            )  # within the margin
            tokens.remember("https://api.atlassian.com/ex/jira/x", stale)
            stale_client = await clients.client("")
            assert stale_client is not None
            with pytest.raises(ActionError, match="no fresh Forge app system token") as caught:
                await stale_client.send(PlannedRequest("GET", "/rest/api/3/myself"))
            assert caught.value.retryable
            fresh = jwt.encode(
                {"exp": 1600}, "a-forge-signing-key-of-32-bytes!!", algorithm="HS256"
            )
            tokens.remember("https://api.atlassian.com/ex/jira/x", fresh)
            found = await clients.client("")
            assert found is not None and found.base_url == "https://api.atlassian.com/ex/jira/x"
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"not json", "application/json", 400),
        (b'["a list"]', "application/json", 400),
        (b'{"eventType": "avi:jira:assigned:issue", "issue": {}}', "application/json", 400),
        (b'{"eventType": "avi:jira:updated:issue", "issue": "OPS-1"}', "application/json", 400),
        (b'{"eventType": "avi:jira:updated:issue\\u0000", "issue": {}}', "application/json", 400),
        (json.dumps(issue_updated_event()).encode(), "text/plain", 415),
        (json.dumps(issue_updated_event() | {"pad": "x" * 4096}).encode(), "application/json", 413),
    ],
)
async def test_hostile_bodies_are_refused_and_nothing_stored(
    make_client: ClientFactory,
    settings: Settings,
    fake_forge: FakeForge,
    body: bytes,
    content_type: str,
    status: int,
) -> None:
    client = await make_client(settings, max_body_bytes=2048, **_settings(settings, fake_forge))
    headers = _headers(fake_forge.fit()) | {"Content-Type": content_type}
    resp = await client.post("/webhooks/forge", data=body, headers=headers)
    assert resp.status == status, await resp.text()
    assert await stored_count(settings) == 0


async def test_odd_issue_key_is_stored_without_an_index_key(
    make_client: ClientFactory, settings: Settings, fake_forge: FakeForge
) -> None:
    event = issue_updated_event()
    event["issue"]["key"] = "OPS-1\x00\n"
    client = await make_client(settings, **_settings(settings, fake_forge))
    resp = await client.post(
        "/webhooks/forge", data=json.dumps(event), headers=_headers(fake_forge.fit())
    )
    assert resp.status == 202, await resp.text()
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(select(events.c.issue_key, events.c.body))).one()
    finally:
        await engine.dispose()
    assert row.issue_key is None
    assert json.loads(row.body)["issue"]["key"] == "OPS-1\x00\n"
