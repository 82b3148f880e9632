"""Connect lifecycle hardening (issue #17 item 4): no HS256 revival of an uninstalled
tenant, one use per install token and only fresh ones, Atlassian base URLs only, and the
optional tenant allow-list. Real RS256 tokens from tests/signing.py, a real key server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import select

from bot.core.verify import LIFECYCLE_MAX_AGE_S
from bot.db.engine import create_engine
from bot.db.models import tenants
from bot.settings import Settings, from_env
from tests.conftest import ClientFactory
from tests.helpers import (
    CLIENT_KEY,
    PUBLIC_URL,
    SECRET,
    KeyServer,
    deliver_connect,
    install,
    install_body,
)
from tests.signing import InstallKeys, connect_token

Client = TestClient[Any, Any]


@pytest.fixture
async def key_server(aiohttp_server: Callable[..., Any]) -> tuple[KeyServer, TestServer]:
    """A key server with one install key, as connect-install-keys.atlassian.com."""
    ks = KeyServer(InstallKeys())
    server: TestServer = await aiohttp_server(ks.app())
    return ks, server


ATTACKER_SECRET = "attacker-secret-" + "e" * 48
ATTACKER_URL = "https://attacker.atlassian.net"  # an allowed host: only the signature stops it


async def _client(
    make_client: ClientFactory,
    settings: Settings,
    key_server: tuple[KeyServer, TestServer],
    **changes: Any,
) -> Client:
    client: Client = await make_client(
        settings,
        jira_auth_mode="connect",
        public_url=PUBLIC_URL,
        jira_connect_keys_url=str(key_server[1].make_url("")).rstrip("/"),
        **changes,
    )
    return client


async def _tenant(settings: Settings, client_key: str = CLIENT_KEY) -> tuple[str, str, bool]:
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(select(tenants).where(tenants.c.client_key == client_key))
            ).one()
    finally:
        await engine.dispose()
    return row.shared_secret, row.base_url, bool(row.enabled)


async def _post(client: Client, path: str, token: str, body: dict[str, str]) -> int:
    resp = await client.post(path, json=body, headers={"Authorization": f"JWT {token}"})
    return resp.status


async def _uninstall(client: Client, token: str) -> int:
    return await _post(client, "/lifecycle/uninstalled", token, {"clientKey": CLIENT_KEY})


def _sign(keys: InstallKeys, path: str, **extra: Any) -> str:
    return keys.sign("POST", path, client_key=CLIENT_KEY, audience=PUBLIC_URL, **extra)


async def test_an_hs256_install_cannot_revive_an_uninstalled_tenant(
    make_client: ClientFactory, settings: Settings, key_server: tuple[KeyServer, TestServer]
) -> None:
    client = await _client(make_client, settings, key_server)
    keys = key_server[0].keys
    assert await install(client, keys) == 204
    uninstall = _sign(keys, "/lifecycle/uninstalled")
    assert await _uninstall(client, uninstall) == 204
    # The old shared secret signs a "re-install" with the attacker's secret and site.
    revival = connect_token("POST", "/lifecycle/installed", CLIENT_KEY, SECRET)
    body = {**install_body(ATTACKER_SECRET), "baseUrl": ATTACKER_URL}
    assert await _post(client, "/lifecycle/installed", revival, body) == 401
    assert await _tenant(settings) == (SECRET, "https://tenant-1.atlassian.net", False)
    attacker = connect_token("POST", "/webhooks/jira", CLIENT_KEY, ATTACKER_SECRET)
    assert await deliver_connect(client, attacker, "revived-1") == 401
    # Atlassian's own signature brings the tenant back.
    assert await install(client, keys) == 204
    assert (await _tenant(settings))[2] is True


async def test_an_install_token_is_good_for_one_install(
    make_client: ClientFactory, settings: Settings, key_server: tuple[KeyServer, TestServer]
) -> None:
    client = await _client(make_client, settings, key_server)
    keys = key_server[0].keys
    token = _sign(keys, "/lifecycle/installed")
    assert await _post(client, "/lifecycle/installed", token, install_body()) == 204
    # Replayed with another body: refused, the tenant keeps its secret and site.
    replay = {**install_body(ATTACKER_SECRET), "baseUrl": ATTACKER_URL}
    assert await _post(client, "/lifecycle/installed", token, replay) == 401
    assert await _post(client, "/lifecycle/installed", token, install_body()) == 401
    assert await _tenant(settings) == (SECRET, "https://tenant-1.atlassian.net", True)
    assert (
        await deliver_connect(client, connect_token("POST", "/webhooks/jira", CLIENT_KEY, SECRET))
        == 202
    )
    # An uninstall token replayed after a re-install does not disable the tenant again.
    uninstall = _sign(keys, "/lifecycle/uninstalled")
    assert await _uninstall(client, uninstall) == 204
    assert await install(client, keys) == 204
    assert await _uninstall(client, uninstall) == 401
    assert (await _tenant(settings))[2] is True


async def test_an_old_install_token_is_refused(
    make_client: ClientFactory, settings: Settings, key_server: tuple[KeyServer, TestServer]
) -> None:
    client = await _client(make_client, settings, key_server)
    keys = key_server[0].keys
    # Signed long ago, still unexpired (a long-lived token, captured and kept).
    old = _sign(keys, "/lifecycle/installed", issued_s_ago=LIFECYCLE_MAX_AGE_S + 60, exp_in_s=600)
    assert await _post(client, "/lifecycle/installed", old, install_body()) == 401
    fresh = _sign(keys, "/lifecycle/installed", exp_in_s=600)
    assert await _post(client, "/lifecycle/installed", fresh, install_body()) == 204


@pytest.mark.parametrize(
    "base_url",
    [
        "http://tenant-1.atlassian.net",  # not https
        "https://evil.example",
        "https://atlassian.net",  # no site
        "https://tenant-1.atlassian.net.evil.example",
        "https://tenant-1.atlassian.net@evil.example",
        "https://evil.example#.atlassian.net",
        "https://127.0.0.1:8080",
        "not a url",
    ],
)
async def test_a_base_url_outside_atlassian_is_refused(
    make_client: ClientFactory,
    settings: Settings,
    key_server: tuple[KeyServer, TestServer],
    base_url: str,
) -> None:
    client = await _client(make_client, settings, key_server)
    keys = key_server[0].keys
    token = _sign(keys, "/lifecycle/installed")
    body = {**install_body(), "baseUrl": base_url}
    assert await _post(client, "/lifecycle/installed", token, body) == 403
    assert key_server[0].fetches == []  # refused before any key was fetched
    assert await install(client, keys) == 204  # an Atlassian site is fine


async def test_allowed_base_url_hosts_and_tenants_are_settings(
    make_client: ClientFactory, settings: Settings, key_server: tuple[KeyServer, TestServer]
) -> None:
    client = await _client(
        make_client,
        settings,
        key_server,
        jira_allowed_base_url_hosts=("http://127.0.0.1", "*.atlassian.net"),
        jira_allowed_tenants=(CLIENT_KEY, "https://listed-site.atlassian.net/"),
    )
    keys = key_server[0].keys

    async def install_as(client_key: str, base_url: str) -> int:
        token = keys.sign(
            "POST", "/lifecycle/installed", client_key=client_key, audience=PUBLIC_URL
        )
        body = {**install_body(client_key=client_key), "baseUrl": base_url}
        return await _post(client, "/lifecycle/installed", token, body)

    assert await install_as(CLIENT_KEY, "http://127.0.0.1:1") == 204  # a test Jira
    assert await install_as("jira:unlisted", "https://unlisted.atlassian.net") == 403
    assert await install_as("jira:by-site", "https://listed-site.atlassian.net") == 204
    assert await _tenant(settings, "jira:by-site") == (
        SECRET,
        "https://listed-site.atlassian.net",
        True,
    )


def test_the_settings_read_comma_separated_lists() -> None:
    env = {
        "JIRA_ALLOWED_BASE_URL_HOSTS": "*.atlassian.net, http://127.0.0.1",
        "JIRA_ALLOWED_TENANTS": "jira:a,https://b.atlassian.net ,",
    }
    found = from_env(env, dotenv=None)
    assert found.jira_allowed_base_url_hosts == ("*.atlassian.net", "http://127.0.0.1")
    assert found.jira_allowed_tenants == ("jira:a", "https://b.atlassian.net")
    default = from_env({}, dotenv=None)
    assert (default.jira_allowed_base_url_hosts, default.jira_allowed_tenants) == (
        ("*.atlassian.net",),
        (),
    )


@pytest.mark.parametrize("field", ["sharedSecret", "baseUrl"])
async def test_an_install_with_a_nul_in_a_stored_field_is_a_bad_request(
    make_client: ClientFactory,
    settings: Settings,
    key_server: tuple[KeyServer, TestServer],
    field: str,
) -> None:
    client = await _client(make_client, settings, key_server)
    keys = key_server[0].keys
    body = install_body()
    body[field] += "/\x00" if field == "baseUrl" else "\x00"
    token = _sign(keys, "/lifecycle/installed")
    assert await _post(client, "/lifecycle/installed", token, body) == 400
    assert await install(client, keys) == 204
