"""Hostile requests below the token: compressed bodies and bytes that are not UTF-8.

A companion of test_hostile_input.py. Every case runs on a real localhost server, on both
engines, and ends with the tables untouched. Raw sockets send what aiohttp's client will
not: header bytes that are not UTF-8.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import select

from bot.core.verify import OAUTH_MAX_LIFETIME_S, query_string_hash, verify_connect, verify_install
from bot.db.engine import create_engine
from bot.db.models import events
from bot.errors import VerificationError
from bot.settings import Settings
from bot.web.app import create_app
from bot.web.install_keys import FETCH_CONNECTIONS, KeyServiceUnavailable
from bot.web.install_keys import InstallKeys as KeyCache
from bot.web.keys import HTTP
from bot.web.sessions import LOGIN_BURST, LOGIN_REFILL_S, SESSION_TTL_S
from bot.web.status import csrf_token
from tests.conftest import CLIENT_SECRET, ClientFactory
from tests.helpers import (
    CLIENT_KEY,
    PUBLIC_URL,
    SECRET,
    KeyServer,
    install_body,
    issue_updated,
    row_counts,
)
from tests.signing import InstallKeys, connect_claims_token
from tests.signing import oauth_token as signed_oauth_token

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
    assert await row_counts(settings) == NOTHING
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
    assert await row_counts(settings) == NOTHING


# ----- item 7: header bytes that are not UTF-8, odd digits, huge numbers ------------------


async def test_header_bytes_that_are_not_utf8_get_4xx_everywhere(
    make_client: ClientFactory, settings: Settings, aiohttp_server: Any
) -> None:
    key_server = KeyServer(InstallKeys())
    keys_url = str((await aiohttp_server(key_server.app())).make_url("")).rstrip("/")
    oauth = await make_client(settings, admin_token=ADMIN)
    connect = await make_client(
        settings,
        admin_token=ADMIN,
        jira_auth_mode="connect",
        public_url=PUBLIC_URL,
        jira_connect_keys_url=keys_url,
    )
    delivery = json.dumps(issue_updated("OPS-1")).encode()
    json_type = b"Content-Type: application/json"
    ident = b"X-Atlassian-Webhook-Identifier: raw-1"
    hostile_headers = [
        [b"Authorization: Bearer \xff", json_type, ident],
        [b"Authorization: JWT \xff\xfe.\x80.\xc0", json_type, ident],
        [b"Authorization: \xff\xfe \xff", json_type, ident],
        [b"Cookie: token=\xff\xfe", json_type, ident],
        [b"Cookie: \xff\xfe=\xff", json_type, ident],
        [b"Authorization: Bearer " + ADMIN.encode() + b"\xff", json_type, ident],
    ]
    targets = [
        (b"POST /webhooks/jira HTTP/1.1", delivery),
        (b"POST /lifecycle/installed HTTP/1.1", json.dumps(install_body()).encode()),
        (b"POST /lifecycle/uninstalled HTTP/1.1", json.dumps(install_body()).encode()),
        (b"GET /api/events HTTP/1.1", b""),
        (b"GET /api/events/1 HTTP/1.1", b""),
        (b"POST /api/events/1/replay HTTP/1.1", b""),
        (b"GET / HTTP/1.1", b""),
        (b"POST /logout HTTP/1.1", b""),
        (b"POST /login HTTP/1.1", b"token=\xff"),
    ]
    failures = []
    for client in (oauth, connect):
        for request_line, body in targets:
            for lines in hostile_headers:
                status, answer = await raw_request(client, request_line, lines, body)
                if not 400 <= status < 500:
                    failures.append((request_line, lines, status, answer[:200]))
    assert failures == []
    assert key_server.fetches == []
    assert await row_counts(settings) == NOTHING


async def test_odd_digits_and_huge_numbers_get_4xx(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client(settings, admin_token=ADMIN)
    bearer = {"Authorization": f"Bearer {ADMIN}"}
    huge = "9" * 5000
    for query in (f"limit={huge}", f"cursor={huge}", f"offset={huge}", "limit=²", "cursor=٣"):
        resp = await client.get(f"/api/events?{query}", headers=bearer)
        assert resp.status == 400, (query[:20], resp.status, await resp.text())
    for path in (
        f"/api/events/{2**64}",
        f"/api/events/{2**63}",
        f"/api/events/{huge}",
        "/api/events/²",
        "/api/events/%D9%A3",
    ):
        resp = await client.get(path, headers=bearer)
        assert resp.status in (400, 404), (path[:30], resp.status)
    for path in (f"/api/events/{2**64}/replay", f"/api/action-runs/{2**64}/retry"):
        resp = await client.post(path, headers=bearer)
        assert resp.status in (400, 404), (path[:30], resp.status)
    # Jira counts retries in ASCII digits: any other retry header is no retry count at all.
    for retry in ("²", "٣", "1" * 5000, "-1", "+1", "1e3"):
        headers = {**_delivery_headers(f"retry-{retry[:8]}"), "X-Atlassian-Webhook-Retry": retry}
        resp = await client.post(
            "/webhooks/jira", data=json.dumps(issue_updated("OPS-1")), headers=headers
        )
        assert resp.status == 202, (retry[:8], resp.status, await resp.text())
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            counts = (await conn.execute(select(events.c.retry_count))).scalars().all()
    finally:
        await engine.dispose()
    assert counts == [0] * 6


# ----- item 5: the install-key fetch -----------------------------------------------------


class SlowKeyServer:
    """Serves the same public key for any kid starting `k-`, each after `release` is set."""

    def __init__(self, keys: InstallKeys) -> None:
        self.keys = keys
        self.fetches: list[str] = []
        self.release = asyncio.Event()
        self.release.set()
        self.asked = asyncio.Event()

    def app(self) -> web.Application:
        async def key(request: web.Request) -> web.Response:
            kid = request.match_info["kid"]
            self.fetches.append(kid)
            self.asked.set()
            await self.release.wait()
            if not kid.startswith("k-"):
                return web.Response(status=404)
            return web.Response(text=self.keys.public_pem)

        app = web.Application()
        app.router.add_get("/{kid}", key)
        return app


async def _connect_app(
    make_client: ClientFactory, settings: Settings, aiohttp_server: Any, key_app: web.Application
) -> TestClient[Any, Any]:
    keys_url = str((await aiohttp_server(key_app)).make_url("")).rstrip("/")
    client: TestClient[Any, Any] = await make_client(
        settings, jira_auth_mode="connect", public_url=PUBLIC_URL, jira_connect_keys_url=keys_url
    )
    return client


async def _install_with_kid(
    session: aiohttp.ClientSession, client: TestClient[Any, Any], keys: InstallKeys, kid: str
) -> int:
    token = keys.sign(
        "POST", "/lifecycle/installed", client_key="jira:tenant-1", audience=PUBLIC_URL, kid=kid
    )
    async with session.post(
        client.make_url("/lifecycle/installed"),
        json=install_body(),
        headers={"Authorization": f"JWT {token}"},
    ) as resp:
        await resp.read()
        return resp.status


async def test_a_malformed_kid_causes_no_fetch(
    make_client: ClientFactory, settings: Settings, aiohttp_server: Any
) -> None:
    server = SlowKeyServer(InstallKeys())
    client = await _connect_app(make_client, settings, aiohttp_server, server.app())
    bad = ["k-1?x=1", "k-1#frag", "k-%2e%2e", "k-1/../k-2", "..", "k-a..b", "k-" + "1" * 200]
    bad += ["k-ü", "k 1", "k-1\t", ".hidden"]
    async with aiohttp.ClientSession() as session:
        for kid in bad:
            assert await _install_with_kid(session, client, server.keys, kid) == 401, kid
        # The same unknown (well-formed) kid, many times: fetched once, the miss remembered.
        for _ in range(5):
            assert await _install_with_kid(session, client, server.keys, "unknown-1") == 401
    assert server.fetches == ["unknown-1"]
    assert await row_counts(settings) == NOTHING


async def test_the_key_cache_is_bounded_and_expires(aiohttp_server: Any) -> None:
    server = SlowKeyServer(InstallKeys())
    url = str((await aiohttp_server(server.app())).make_url("")).rstrip("/")
    now = [1000.0]
    cache = KeyCache(
        url, max_keys=8, key_ttl_s=600, miss_ttl_s=30, fetches_per_minute=1000, clock=lambda: now[0]
    )
    try:
        for i in range(50):
            assert await cache.get(f"k-{i}") == server.keys.public_pem
        assert len(cache) == 8
        assert await cache.get("k-49") and server.fetches.count("k-49") == 1  # still cached
        assert await cache.get("k-0") and server.fetches.count("k-0") == 2  # evicted: again
        for _ in range(3):
            with pytest.raises(VerificationError):
                await cache.get("miss-1")
        assert server.fetches.count("miss-1") == 1
        now[0] += 31  # the miss is forgotten first, the key later
        with pytest.raises(VerificationError):
            await cache.get("miss-1")
        await cache.get("k-49")
        assert (server.fetches.count("miss-1"), server.fetches.count("k-49")) == (2, 1)
        now[0] += 600
        await cache.get("k-49")
        assert server.fetches.count("k-49") == 2
        # Concurrent askers of one kid share one fetch.
        server.release.clear()
        waiting = [asyncio.create_task(cache.get("k-shared")) for _ in range(10)]
        await asyncio.sleep(0.1)
        server.release.set()
        assert len(set(await asyncio.gather(*waiting))) == 1
        assert server.fetches.count("k-shared") == 1
    finally:
        await cache.close()


async def test_key_fetches_are_rate_limited(aiohttp_server: Any) -> None:
    server = SlowKeyServer(InstallKeys())
    url = str((await aiohttp_server(server.app())).make_url("")).rstrip("/")
    now = [1000.0]
    cache = KeyCache(url, fetches_per_minute=5, clock=lambda: now[0])
    try:
        refused = 0
        for i in range(20):  # well-formed kids are free to invent
            try:
                await cache.get(f"invented-{i}")
            except VerificationError:
                pass
            except KeyServiceUnavailable:
                refused += 1
        assert (len(server.fetches), refused) == (5, 15)
        now[0] += 12  # one more fetch a twelfth of a minute later
        assert await cache.get("k-1") == server.keys.public_pem
        with pytest.raises(KeyServiceUnavailable):
            await cache.get("k-2")
        with pytest.raises(VerificationError):  # cached misses cost no allowance
            await cache.get("invented-0")
    finally:
        await cache.close()


async def test_a_slow_key_server_does_not_hold_up_other_outbound_calls(
    make_client: ClientFactory, settings: Settings, aiohttp_server: Any
) -> None:
    """More installs than the shared pool has connections, all stuck on the key server:
    a call on the shared session (the one UbiOps, Genesys and Jira use) still goes out
    and comes back while every one of them is still waiting."""
    server = SlowKeyServer(InstallKeys())
    client = await _connect_app(make_client, settings, aiohttp_server, server.app())
    other = web.Application()
    other.router.add_get("/ping", _pong)
    other_url = (await aiohttp_server(other)).make_url("/ping")
    server.release.clear()
    attackers = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        installs = [
            asyncio.create_task(_install_with_kid(attackers, client, server.keys, f"k-slow-{i}"))
            for i in range(110)
        ]
        await server.asked.wait()
        await asyncio.sleep(0.2)  # the rest of the installs reach the key fetch
        async with client.app[HTTP].get(other_url) as resp:
            assert resp.status == 200
        # Those the fetch allowance let through are still held by the key server.
        assert sum(not task.done() for task in installs) >= FETCH_CONNECTIONS
        server.release.set()
        statuses = await asyncio.gather(*installs)
    finally:
        server.release.set()
        await attackers.close()
    assert set(statuses) <= {204, 503}  # installed, or its key fetch timed out in the queue
    assert len(server.fetches) <= 110


async def _pong(_request: web.Request) -> web.Response:
    return web.Response(text="pong")


# ----- low: the admin cookie and the login form -------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _session_cookie(resp: aiohttp.ClientResponse) -> str:
    morsel = resp.cookies["token"]
    return morsel.value


async def test_logout_revokes_the_cookie_and_it_expires(
    aiohttp_client: Any, settings: Settings
) -> None:
    clock = Clock()
    client = await aiohttp_client(create_app(replace(settings, admin_token=ADMIN), clock=clock))
    login = await client.post("/login", data={"token": ADMIN}, allow_redirects=False)
    assert login.status == 303
    cookie = {"Cookie": f"token={_session_cookie(login)}"}
    assert (await client.get("/api/events", headers=cookie)).status == 200
    copied = dict(cookie)  # what someone who saw the cookie could keep
    out = await client.post(
        "/logout", data={"csrf": csrf_token(ADMIN)}, headers=cookie, allow_redirects=False
    )
    assert out.status == 303
    assert out.cookies["token"].value == "" and out.cookies["token"]["max-age"] == "0"
    assert (await client.get("/api/events", headers=copied)).status == 401
    # A fresh login works again, until the session is 12 hours old.
    login = await client.post("/login", data={"token": ADMIN}, allow_redirects=False)
    cookie = {"Cookie": f"token={_session_cookie(login)}"}
    assert (await client.get("/api/events", headers=cookie)).status == 200
    clock.now += SESSION_TTL_S + 1
    assert (await client.get("/api/events", headers=cookie)).status == 401
    for forged in ("1.abc", f"{int(clock.now)}.{'0' * 64}", "9" * 40 + ".x", "\u00b2.x"):
        resp = await client.get("/api/events", headers={"Cookie": f"token={forged}"})
        assert resp.status == 401


async def test_the_cookie_is_secure_when_configured(
    make_client: ClientFactory, settings: Settings
) -> None:
    plain = await make_client(settings, admin_token=ADMIN)
    login = await plain.post("/login", data={"token": ADMIN}, allow_redirects=False)
    assert not login.cookies["token"]["secure"]
    secure = await make_client(settings, admin_token=ADMIN, secure_cookies=True)
    login = await secure.post("/login", data={"token": ADMIN}, allow_redirects=False)
    assert login.cookies["token"]["secure"] and login.cookies["token"]["httponly"]
    cookie = {"Cookie": f"token={_session_cookie(login)}"}
    out = await secure.post(
        "/logout", data={"csrf": csrf_token(ADMIN)}, headers=cookie, allow_redirects=False
    )
    assert out.cookies["token"]["secure"]


async def test_failed_logins_are_throttled(aiohttp_client: Any, settings: Settings) -> None:
    clock = Clock()
    client = await aiohttp_client(create_app(replace(settings, admin_token=ADMIN), clock=clock))
    statuses = []
    for i in range(LOGIN_BURST + 5):
        resp = await client.post("/login", data={"token": f"guess-{i}"}, allow_redirects=False)
        statuses.append(resp.status)
    assert statuses == [401] * LOGIN_BURST + [429] * 5
    assert int(resp.headers["Retry-After"]) >= 1
    # Throttled means throttled: the right token waits too, then works.
    right = await client.post("/login", data={"token": ADMIN}, allow_redirects=False)
    assert right.status == 429
    clock.now += LOGIN_REFILL_S
    right = await client.post("/login", data={"token": ADMIN}, allow_redirects=False)
    assert right.status == 303


# ----- low: token lifetime ------------------------------------------------------------------


async def test_tokens_that_live_too_long_are_refused(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client(settings)
    body = json.dumps(issue_updated("OPS-1"))
    far = [253402300799 - int(time.time()), 10**9, OAUTH_MAX_LIFETIME_S + 3600]
    for i, exp_in_s in enumerate(far):
        token = signed_oauth_token(CLIENT_SECRET, exp_in_s=exp_in_s)
        headers = {**_delivery_headers(f"far-{i}"), "Authorization": f"Bearer {token}"}
        resp = await client.post("/webhooks/jira", data=body, headers=headers)
        assert resp.status == 401, (exp_in_s, resp.status)
        assert "too far in the future" in (await resp.json())["error"]
    assert await row_counts(settings) == NOTHING
    token = signed_oauth_token(CLIENT_SECRET, exp_in_s=OAUTH_MAX_LIFETIME_S)  # a day is fine
    headers = {**_delivery_headers("hour"), "Authorization": f"Bearer {token}"}
    assert (await client.post("/webhooks/jira", data=body, headers=headers)).status == 202


def test_connect_and_install_tokens_that_live_too_long_are_refused() -> None:
    now = int(time.time())
    qsh = query_string_hash("POST", "/webhooks/jira", [])
    for exp in (253402300799, now + 2 * 3600):
        token = connect_claims_token(SECRET, iss=CLIENT_KEY, iat=now, exp=exp, qsh=qsh)
        with pytest.raises(VerificationError, match="too far in the future"):
            verify_connect(f"JWT {token}", "POST", "/webhooks/jira", [], lambda _: SECRET, now=now)
    keys = InstallKeys()
    install = keys.sign(
        "POST", "/lifecycle/installed", client_key=CLIENT_KEY, audience=PUBLIC_URL, exp_in_s=10**8
    )
    with pytest.raises(VerificationError, match="too far in the future"):
        verify_install(
            f"JWT {install}",
            "POST",
            "/lifecycle/installed",
            [],
            keys.public_pem,
            audience=PUBLIC_URL,
            now=now,
        )


# ----- low: clients that trickle -------------------------------------------------------------

TRICKLE_BYTES = 60  # one byte every TRICKLE_GAP_S: far longer than the client timeout
TRICKLE_GAP_S = 0.25


async def _trickle(client: TestClient[Any, Any], head: bytes, rest: bytes) -> bytes | None:
    """Send `head`, then `rest` a byte at a time; return what the server said when it cut
    the connection off, or None if it let the whole trickle through."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head)
        await writer.drain()
        for byte in rest[:TRICKLE_BYTES]:
            try:  # read(n), not read(): a cancelled read() loses what it had gathered
                chunk = await asyncio.wait_for(reader.read(65536), TRICKLE_GAP_S)
            except TimeoutError:  # still open and silent: keep trickling
                writer.write(bytes([byte]))
                try:
                    await writer.drain()
                except ConnectionError:  # closed meanwhile: what did it say first?
                    return await _rest(reader)
                continue
            return chunk + await _rest(reader)  # an answer, or b"" (closed)
        return None
    finally:
        writer.close()


async def _rest(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes the connection."""
    received = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            received += chunk
    except ConnectionError:
        pass
    return received


async def test_trickling_clients_are_cut_off(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client(settings, admin_token=ADMIN, client_timeout_s=1.0)
    start = b"POST /webhooks/jira HTTP/1.1\r\nHost: x\r\n"
    # Headers that never end: the connection is closed.
    assert await _trickle(client, start, b"X-Padding: " + b"a" * 200) is not None
    # A whole head, then a body that never arrives: 408, connection closed.
    token = signed_oauth_token(CLIENT_SECRET)
    head = (
        start
        + f"Authorization: Bearer {token}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        b"X-Atlassian-Webhook-Identifier: slow-1\r\nContent-Length: 500\r\n\r\n"
    )
    answer = await _trickle(client, head, b"{" + b" " * 499)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
    login = (
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 500\r\n\r\n"
    )
    answer = await _trickle(client, login, b"token=" + b"a" * 494)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
    assert await row_counts(settings) == NOTHING
