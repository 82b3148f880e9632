"""POST /webhooks/jira in OAuth mode: store before 202, dedupe, every rejection."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import jwt
import pytest
from sqlalchemy import select

from bot.db.engine import create_engine
from bot.db.models import events
from bot.settings import Settings
from tests.conftest import CLIENT_SECRET, ClientFactory
from tests.helpers import PAYLOAD, headers, stored_count
from tests.signing import oauth_token


async def test_delivery_is_stored_then_acknowledged(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client(settings)
    resp = await client.post(
        "/webhooks/jira",
        data=json.dumps(PAYLOAD),
        headers=headers(**{"X-Atlassian-Webhook-Retry": "2"}),
    )
    assert resp.status == 202
    event_id = (await resp.json())["event_id"]
    engine = create_engine(settings.database_url)
    async with engine.connect() as conn:
        row = (await conn.execute(select(events).where(events.c.id == event_id))).one()
    await engine.dispose()
    assert row.delivery_id == "d-1"
    assert row.retry_count == 2
    assert row.webhook_event == "jira:issue_updated"
    assert row.issue_key == "OPS-7"
    assert row.status in {"received", "processing", "processed"}  # the worker may be quick
    assert row.tenant == ""
    assert json.loads(row.body) == PAYLOAD


async def test_concurrent_redeliveries_store_one_event(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client(settings)
    body = json.dumps(PAYLOAD)
    responses = await asyncio.gather(
        *(client.post("/webhooks/jira", data=body, headers=headers("same")) for _ in range(25)),
        *(
            client.post("/webhooks/jira", data=body, headers=headers(f"other-{i}"))
            for i in range(25)
        ),
    )
    statuses = [r.status for r in responses]
    assert statuses[:25].count(202) == 1
    assert statuses[:25].count(200) == 24
    assert statuses[25:] == [202] * 25
    assert await stored_count(settings) == 26
    later = await client.post("/webhooks/jira", data=body, headers=headers("same"))
    assert later.status == 200
    assert await stored_count(settings) == 26


def _token_none_alg() -> str:
    def b64(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'exp': 9999999999})}."


REJECTIONS: list[tuple[str, dict[str, Any], bytes | None, int, str]] = [
    # (case, header overrides, body or None for the good one, status, reason fragment)
    ("no authorization", {"Authorization": ""}, None, 401, "missing"),
    ("wrong scheme", {"Authorization": "Basic abc"}, None, 401, "Bearer"),
    ("garbage token", {"Authorization": "Bearer not.a.jwt"}, None, 401, "malformed"),
    ("alg none", {"Authorization": f"Bearer {_token_none_alg()}"}, None, 401, "HS256"),
    (
        "HS384",
        {"Authorization": "Bearer " + jwt.encode({"exp": 9999999999}, CLIENT_SECRET, "HS384")},
        None,
        401,
        "HS256",
    ),
    (
        "wrong secret",
        {"Authorization": f"Bearer {oauth_token('another-secret-' + 'f' * 48)}"},
        None,
        401,
        "signature",
    ),
    (
        "expired",
        {"Authorization": f"Bearer {oauth_token(CLIENT_SECRET, exp_in_s=-120)}"},
        None,
        401,
        "expired",
    ),
    (
        "no exp",
        {"Authorization": "Bearer " + jwt.encode({"iss": "x"}, CLIENT_SECRET, "HS256")},
        None,
        401,
        "exp",
    ),
    ("text content type", {"Content-Type": "text/plain"}, None, 415, "application/json"),
    ("form content type", {"Content-Type": "application/x-www-form-urlencoded"}, None, 415, "json"),
    ("not json", {}, b"{not json", 400, "JSON"),
    ("json array", {}, b"[1, 2]", 400, "object"),
    ("no webhookEvent", {}, b'{"issue": {}}', 400, "webhookEvent"),
    ("webhookEvent not string", {}, b'{"webhookEvent": 3}', 400, "webhookEvent"),
    ("invalid utf-8", {}, b'{"webhookEvent": "\xff\xfe"}', 400, "JSON"),
    ("no delivery id", {"X-Atlassian-Webhook-Identifier": ""}, None, 400, "Identifier"),
    ("huge delivery id", {"X-Atlassian-Webhook-Identifier": "x" * 300}, None, 400, "Identifier"),
    (
        "oversized body",
        {},
        b'{"webhookEvent": "x", "pad": "' + b"a" * (1024 * 1024) + b'"}',
        413,
        "large",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "body", "status", "reason"),
    [case[1:] for case in REJECTIONS],
    ids=[case[0] for case in REJECTIONS],
)
async def test_rejections_store_nothing(
    make_client: ClientFactory,
    settings: Settings,
    overrides: dict[str, str],
    body: bytes | None,
    status: int,
    reason: str,
) -> None:
    client = await make_client(settings)
    hdrs = {
        k: v
        for k, v in {**headers(), **overrides}.items()
        if v != "" or k == "X-Atlassian-Webhook-Identifier"
    }
    data = io.BytesIO(body or json.dumps(PAYLOAD).encode())
    resp = await client.post("/webhooks/jira", data=data, headers=hdrs)
    assert resp.status == status
    assert reason.lower() in (await resp.json())["error"].lower()
    assert await stored_count(settings) == 0


async def test_deliveries_refused_without_client_secret(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client(settings, jira_client_secret=None)
    resp = await client.post("/webhooks/jira", data=json.dumps(PAYLOAD), headers=headers())
    assert resp.status == 401
    assert await stored_count(settings) == 0


async def test_health_and_readiness(make_client: ClientFactory, settings: Settings) -> None:
    client = await make_client(settings)
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["status"] == "ready"
