"""The fake Genesys server itself: login, auth, limits, faults and error bodies."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer, make_mocked_request

from tests.fakes.genesys import MAX_BODY_BYTES, WD, FakeGenesys

ERROR_KEYS = {"message", "code", "status", "contextId", "details", "errors"}


@pytest.fixture
def fake() -> FakeGenesys:
    return FakeGenesys()


@pytest.fixture
async def base(fake: FakeGenesys) -> AsyncIterator[str]:
    async with TestServer(fake.app, host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def login(http: aiohttp.ClientSession, base: str, fake: FakeGenesys) -> str:
    headers = basic(fake.client_id, fake.client_secret)
    form = {"grant_type": "client_credentials"}
    async with http.post(f"{base}/oauth/token", data=form, headers=headers) as resp:
        assert resp.status == 200
        answer: dict[str, Any] = await resp.json()
    assert answer["token_type"] == "bearer"
    assert answer["expires_in"] == fake.token_expires_in_s
    token: str = answer["access_token"]
    return token


async def test_login_checks_basic_auth_and_grant_type(
    fake: FakeGenesys, base: str, http: aiohttp.ClientSession
) -> None:
    form = {"grant_type": "client_credentials"}
    async with http.post(f"{base}/oauth/token", data=form, headers=basic("x", "y")) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"] == "invalid_client"
    headers = basic(fake.client_id, fake.client_secret)
    bad_form = {"grant_type": "password"}
    async with http.post(f"{base}/oauth/token", data=bad_form, headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "unsupported_grant_type"
    assert len(fake.token_requests) == 2
    assert await login(http, base, fake)


@pytest.mark.parametrize("control", ["expire_tokens", "revoke_tokens"])
async def test_api_needs_a_valid_bearer(
    fake: FakeGenesys, base: str, http: aiohttp.ClientSession, control: str
) -> None:
    async with http.get(f"{base}{WD}/deployments") as resp:
        assert resp.status == 401
        assert set(await resp.json()) == ERROR_KEYS
    auth = {"Authorization": f"Bearer {await login(http, base, fake)}"}
    async with http.get(f"{base}{WD}/deployments", headers=auth) as resp:
        assert resp.status == 200
        assert await resp.json() == {"total": 0, "entities": [], "selfUri": f"{WD}/deployments"}
    getattr(fake, control)()
    async with http.get(f"{base}{WD}/deployments", headers=auth) as resp:
        assert resp.status == 401


async def test_oversized_body_is_413_and_everything_is_recorded(
    fake: FakeGenesys, base: str, http: aiohttp.ClientSession
) -> None:
    auth = {"Authorization": f"Bearer {await login(http, base, fake)}"}
    body = b'{"name": "' + b"x" * MAX_BODY_BYTES + b'"}'
    async with http.post(f"{base}{WD}/configurations?a=1", data=body, headers=auth) as resp:
        assert resp.status == 413
        answer = await resp.json()
    assert set(answer) == ERROR_KEYS and answer["status"] == 413
    seen = fake.requests[-1]
    assert (seen.method, seen.path, seen.query, seen.body) == (
        "POST",
        f"{WD}/configurations",
        (("a", "1"),),
        body,
    )
    assert seen.headers["Authorization"] == auth["Authorization"]


async def test_injected_429_carries_retry_after_and_ratelimit_headers(
    fake: FakeGenesys, base: str, http: aiohttp.ClientSession
) -> None:
    fake.inject("429", count=1, retry_after_s=7)
    auth = {"Authorization": f"Bearer {await login(http, base, fake)}"}
    async with http.get(f"{base}{WD}/deployments", headers=auth) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "7"
        assert resp.headers["inin-ratelimit-reset"] == "7"
        assert {"inin-ratelimit-count", "inin-ratelimit-allowed"} <= set(resp.headers)
        assert (await resp.json())["code"] == "too.many.requests"
    async with http.get(f"{base}{WD}/deployments", headers=auth) as resp:
        assert resp.status == 200  # count=1: only the first request failed


async def test_seeded_fraction_is_reproducible(fake: FakeGenesys) -> None:
    requests = [make_mocked_request("GET", f"/api/v2/x/{i}") for i in range(200)]
    first = fake.inject("503", count=None, fraction=0.3, seed=42)
    hits = [first.fires(r) is not None for r in requests]
    again = FakeGenesys().inject("503", count=None, fraction=0.3, seed=42)
    assert [again.fires(r) is not None for r in requests] == hits
    assert 30 < sum(hits) < 90
    assert first.fires(make_mocked_request("POST", "/oauth/token")) is None  # not its prefix


async def test_dropped_connection(
    fake: FakeGenesys, base: str, http: aiohttp.ClientSession
) -> None:
    fake.inject("drop", path_prefix="/oauth/")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await login(http, base, fake)
    assert await login(http, base, fake)


async def test_unknown_things_answer_genesys_errors(
    fake: FakeGenesys, base: str, http: aiohttp.ClientSession
) -> None:
    auth = {"Authorization": f"Bearer {await login(http, base, fake)}"}
    for path in (f"{WD}/deployments/nope", f"{WD}/configurations/nope/versions/draft"):
        async with http.get(f"{base}{path}", headers=auth) as resp:
            assert resp.status == 404
            answer = await resp.json()
            assert set(answer) == ERROR_KEYS and answer["code"] == "not.found"
    bad = {"name": "x", "configuration": {"id": "nope", "version": "1"}}
    async with http.post(f"{base}{WD}/deployments", json=bad, headers=auth) as resp:
        assert resp.status == 400
        assert (await resp.json())["code"] == "bad.request"
