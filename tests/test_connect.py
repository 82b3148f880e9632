"""Connect mode: signed install, re-install rules, uninstall, and qsh-verified deliveries."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bot.settings import Settings
from tests.conftest import ClientFactory
from tests.helpers import (
    CLIENT_KEY,
    PAYLOAD,
    PUBLIC_URL,
    SECRET,
    KeyServer,
    deliver_connect,
    install,
    install_body,
    stored_count,
)
from tests.signing import InstallKeys, connect_claims_token, connect_token


@pytest.fixture
async def key_server(aiohttp_server: Callable[..., Any]) -> tuple[KeyServer, TestServer]:
    ks = KeyServer(InstallKeys())
    server: TestServer = await aiohttp_server(ks.app())
    return ks, server


@pytest.fixture
async def connect_client(
    make_client: ClientFactory, settings: Settings, key_server: tuple[KeyServer, TestServer]
) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await make_client(
        settings,
        jira_auth_mode="connect",
        public_url=PUBLIC_URL,
        jira_connect_keys_url=str(key_server[1].make_url("")).rstrip("/"),
    )
    return client


async def test_descriptor(connect_client: TestClient[Any, Any]) -> None:
    resp = await connect_client.get("/atlassian-connect.json")
    descriptor = await resp.json()
    assert descriptor["baseUrl"] == PUBLIC_URL
    assert descriptor["authentication"] == {"type": "jwt"}
    assert descriptor["lifecycle"]["installed"] == "/lifecycle/installed"
    assert descriptor["lifecycle"]["uninstalled"] == "/lifecycle/uninstalled"
    assert descriptor["apiMigrations"] == {"signed-install": True, "context-qsh": True}
    assert "READ" in descriptor["scopes"]


async def test_signed_install_then_verified_deliveries(
    connect_client: TestClient[Any, Any],
    key_server: tuple[KeyServer, TestServer],
    settings: Settings,
) -> None:
    keys = key_server[0].keys
    assert await install(connect_client, keys) == 204
    token = connect_token("POST", "/webhooks/jira?b=2&a=x y", CLIENT_KEY, SECRET)
    assert await deliver_connect(connect_client, token, query="?b=2&a=x y") == 202
    # The key is fetched once by kid and cached.
    assert await install(connect_client, keys) == 204
    assert key_server[0].fetches == [keys.kid]
    assert await stored_count(settings) == 1


CONNECT_REJECTIONS: list[tuple[str, Callable[[], str], str, str]] = [
    (
        "qsh of another path",
        lambda: connect_token("POST", "/lifecycle/installed", CLIENT_KEY, SECRET),
        "",
        "qsh",
    ),
    (
        "qsh of another method",
        lambda: connect_token("GET", "/webhooks/jira", CLIENT_KEY, SECRET),
        "",
        "qsh",
    ),
    (
        "qsh of another query",
        lambda: connect_token("POST", "/webhooks/jira?a=1", CLIENT_KEY, SECRET),
        "?a=2",
        "qsh",
    ),
    (
        "context-qsh",
        lambda: connect_claims_token(
            SECRET, iss=CLIENT_KEY, exp=int(time.time()) + 60, qsh="context-qsh"
        ),
        "",
        "context-qsh",
    ),
    (
        "unknown tenant",
        lambda: connect_token("POST", "/webhooks/jira", "jira:unknown", SECRET),
        "",
        "unknown tenant",
    ),
    (
        "wrong secret",
        lambda: connect_token("POST", "/webhooks/jira", CLIENT_KEY, "x" * 64),
        "",
        "signature",
    ),
    (
        "no qsh",
        lambda: connect_claims_token(SECRET, iss=CLIENT_KEY, exp=int(time.time()) + 60),
        "",
        "qsh",
    ),
    (
        "expired",
        lambda: connect_claims_token(SECRET, iss=CLIENT_KEY, exp=int(time.time()) - 120, qsh="x"),
        "",
        "expired",
    ),
    ("no issuer", lambda: connect_claims_token(SECRET, exp=int(time.time()) + 60), "", "issuer"),
]


@pytest.mark.parametrize(
    ("make_token", "query", "reason"),
    [c[1:] for c in CONNECT_REJECTIONS],
    ids=[c[0] for c in CONNECT_REJECTIONS],
)
async def test_connect_rejections(
    connect_client: TestClient[Any, Any],
    key_server: tuple[KeyServer, TestServer],
    settings: Settings,
    make_token: Callable[[], str],
    query: str,
    reason: str,
) -> None:
    assert await install(connect_client, key_server[0].keys) == 204
    resp = await connect_client.post(
        "/webhooks/jira" + query,
        data=json.dumps(PAYLOAD),
        headers={
            "Authorization": f"JWT {make_token()}",
            "Content-Type": "application/json",
            "X-Atlassian-Webhook-Identifier": "bad-1",
        },
    )
    assert resp.status == 401
    assert reason in (await resp.json())["error"]
    assert await stored_count(settings) == 0


async def test_install_must_be_signed_by_atlassian(
    connect_client: TestClient[Any, Any], key_server: tuple[KeyServer, TestServer]
) -> None:
    keys = key_server[0].keys
    # A new tenant cannot install with an HS256 token signed by the secret it sends.
    hs_token = connect_token("POST", "/lifecycle/installed", CLIENT_KEY, SECRET)
    resp = await connect_client.post(
        "/lifecycle/installed", json=install_body(), headers={"Authorization": f"JWT {hs_token}"}
    )
    assert resp.status == 401
    assert await install(connect_client, keys, audience="https://evil.example.com") == 401
    assert await install(connect_client, keys, client_key="jira:someone-else") == 401
    assert await install(connect_client, keys, exp_in_s=-300) == 401
    assert await install(connect_client, keys, kid="unknown-kid") == 401
    other = InstallKeys(kid=keys.kid)  # right kid, wrong private key
    assert await install(connect_client, other) == 401
    unsigned = await connect_client.post("/lifecycle/installed", json=install_body())
    assert unsigned.status == 401
    # Nothing was installed: deliveries signed with that secret are refused.
    token = connect_token("POST", "/webhooks/jira", CLIENT_KEY, SECRET)
    assert await deliver_connect(connect_client, token) == 401


async def test_reinstall_rules(
    connect_client: TestClient[Any, Any], key_server: tuple[KeyServer, TestServer]
) -> None:
    keys = key_server[0].keys
    assert await install(connect_client, keys) == 204
    new_secret = "rotated-secret-" + "0123456789abcdef" * 3
    # Re-install signed by the current shared secret is accepted and rotates the secret.
    token = connect_token("POST", "/lifecycle/installed", CLIENT_KEY, SECRET)
    resp = await connect_client.post(
        "/lifecycle/installed",
        json=install_body(new_secret),
        headers={"Authorization": f"JWT {token}"},
    )
    assert resp.status == 204
    old = connect_token("POST", "/webhooks/jira", CLIENT_KEY, SECRET)
    assert await deliver_connect(connect_client, old, "r-1") == 401
    new = connect_token("POST", "/webhooks/jira", CLIENT_KEY, new_secret)
    assert await deliver_connect(connect_client, new, "r-2") == 202
    # Re-install signed by a stale secret is refused and changes nothing.
    stale = connect_token("POST", "/lifecycle/installed", CLIENT_KEY, SECRET)
    resp = await connect_client.post(
        "/lifecycle/installed",
        json=install_body("attacker-secret-" + "9" * 48),
        headers={"Authorization": f"JWT {stale}"},
    )
    assert resp.status == 401
    assert await deliver_connect(connect_client, new, "r-3") == 202
    # A valid signed install may always replace it.
    assert await install(connect_client, keys, install_body(SECRET)) == 204
    assert await deliver_connect(connect_client, old, "r-4") == 202


async def test_uninstall_disables_tenant(
    connect_client: TestClient[Any, Any], key_server: tuple[KeyServer, TestServer]
) -> None:
    keys = key_server[0].keys
    assert await install(connect_client, keys) == 204
    unsigned = await connect_client.post("/lifecycle/uninstalled", json={"clientKey": CLIENT_KEY})
    assert unsigned.status == 401
    token = keys.sign("POST", "/lifecycle/uninstalled", client_key=CLIENT_KEY, audience=PUBLIC_URL)
    resp = await connect_client.post(
        "/lifecycle/uninstalled",
        json={"clientKey": CLIENT_KEY, "eventType": "uninstalled"},
        headers={"Authorization": f"JWT {token}"},
    )
    assert resp.status == 204
    delivery = connect_token("POST", "/webhooks/jira", CLIENT_KEY, SECRET)
    assert await deliver_connect(connect_client, delivery) == 401


async def test_lifecycle_bad_bodies(
    connect_client: TestClient[Any, Any], key_server: tuple[KeyServer, TestServer]
) -> None:
    keys = key_server[0].keys
    token = keys.sign("POST", "/lifecycle/installed", client_key=CLIENT_KEY, audience=PUBLIC_URL)
    for body in (b"not json", b"[]", b'{"clientKey": "jira:tenant-1"}'):
        resp = await connect_client.post(
            "/lifecycle/installed",
            data=body,
            headers={"Authorization": f"JWT {token}", "Content-Type": "application/json"},
        )
        assert resp.status == 400
