"""Hostile requests below the token: compressed bodies and bytes that are not UTF-8.

A companion of test_hostile_input.py. Every case runs on a real localhost server, on both
engines, and ends with the tables untouched. Raw sockets send what aiohttp's client will
not: header bytes that are not UTF-8.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from bot.settings import Settings
from tests.conftest import CLIENT_SECRET, ClientFactory
from tests.signing import InstallKeys
from tests.signing import oauth_token as signed_oauth_token
from tests.system.test_hostile_input import _row_counts
from tests.test_connect import PUBLIC_URL, KeyServer, install_body
from tests.test_pipeline import issue_updated

ADMIN = "admin-token-" + "0123456789" * 3
NOTHING = {"events": 0, "rule_matches": 0, "action_runs": 0}


def _delivery_headers(ident: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {signed_oauth_token(CLIENT_SECRET)}",
        "Content-Type": "application/json",
        "X-Atlassian-Webhook-Identifier": ident,
    }


async def raw_request(
    client: TestClient[Any, Any],
    request_line: bytes,
    header_lines: list[bytes],
    body: bytes = b"",
) -> tuple[int, bytes]:
    """Send bytes the HTTP client refuses to write; return the status and the answer's body."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        head = [request_line, f"Host: {client.host}:{client.port}".encode()]
        head += [*header_lines, f"Content-Length: {len(body)}".encode(), b"Connection: close"]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


# ----- item 1: compressed bodies ---------------------------------------------------------


def _bomb(payload: bytes, inflated_bytes: int) -> bytes:
    """A gzip body that inflates to `inflated_bytes`: a valid JSON object padded with spaces."""
    return gzip.compress(payload[:-1] + b" " * (inflated_bytes - len(payload)) + b"}", 9)


async def test_compressed_bodies_are_refused_unread_on_every_route(
    make_client: ClientFactory, settings: Settings, tmp_path: Path
) -> None:
    client = await make_client(settings, admin_token=ADMIN)
    delivery = json.dumps(issue_updated("OPS-1")).encode()
    small = gzip.compress(delivery)
    bombs = {
        "gzip": small,
        "GZIP": small,
        "deflate": zlib.compress(delivery),
        "gzip, identity": small,
        "x-gzip": small,
        "br": b"\x0b\x02\x80" + delivery + b"\x03",
        "gzip ": _bomb(delivery, 50 * 1024 * 1024),
    }
    for encoding, body in bombs.items():
        headers = {**_delivery_headers(f"gz-{encoding}"), "Content-Encoding": encoding}
        resp = await client.post("/webhooks/jira", data=body, headers=headers)
        assert resp.status == 415, (encoding, resp.status, await resp.text())
        assert "Content-Encoding" in (await resp.json())["error"]
    admin = {"Authorization": f"Bearer {ADMIN}", "Content-Encoding": "gzip"}
    for path in ("/api/events/1/replay", "/api/action-runs/1/retry", "/login"):
        resp = await client.post(
            path, data=gzip.compress(b"token=" + ADMIN.encode()), headers=admin
        )
        assert resp.status == 415, (path, resp.status)
    assert await _row_counts(settings) == NOTHING
    # identity is no encoding at all: the same delivery goes through.
    headers = {**_delivery_headers("plain"), "Content-Encoding": "identity"}
    resp = await client.post("/webhooks/jira", data=delivery, headers=headers)
    assert resp.status == 202, await resp.text()


async def test_compressed_lifecycle_callbacks_are_refused_unread(
    make_client: ClientFactory, settings: Settings, aiohttp_server: Any
) -> None:
    key_server = KeyServer(InstallKeys())
    keys_url = str((await aiohttp_server(key_server.app())).make_url("")).rstrip("/")
    client = await make_client(
        settings, jira_auth_mode="connect", public_url=PUBLIC_URL, jira_connect_keys_url=keys_url
    )
    body = json.dumps(install_body()).encode()
    token = key_server.keys.sign(
        "POST", "/lifecycle/installed", client_key="jira:tenant-1", audience=PUBLIC_URL
    )
    for path in ("/lifecycle/installed", "/lifecycle/uninstalled"):
        resp = await client.post(
            path,
            data=_bomb(body, 20 * 1024 * 1024),
            headers={
                "Authorization": f"JWT {token}",
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
            },
        )
        assert resp.status == 415, (path, resp.status)
    assert key_server.fetches == []  # refused before any key was fetched
    assert await _row_counts(settings) == NOTHING
