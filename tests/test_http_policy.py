"""The shared resilience policy: retry decisions, rate limiting, and `send` on the wire."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bot.core.backoff import RetryPolicy, retry_delay_s
from bot.core.catalog import PlannedRequest
from bot.errors import ActionError
from bot.services.http import RateLimiter, send

ServerFactory = Callable[..., Awaitable[TestServer]]
POLICY = RetryPolicy(max_attempts=4, base_delay_s=0.5, max_delay_s=30.0, timeout_s=2.0)


class TopOfRange(random.Random):
    """A random source that always picks the top of the range: makes jitter visible."""

    def uniform(self, a: float, b: float) -> float:
        return b


RETRY_TABLE: list[tuple[int, int | None, dict[str, str], float | None]] = [
    # attempt, status, headers -> delay (None: stop)
    (1, None, {}, 0.5),  # connection error: backoff base
    (2, 500, {}, 1.0),  # doubles per attempt
    (3, 503, {}, 2.0),
    (4, 500, {}, None),  # the last attempt failed: stop
    (1, 408, {}, 0.5),
    (1, 502, {}, 0.5),
    (1, 400, {}, None),  # a client error will not pass on retry
    (1, 401, {}, None),
    (1, 404, {}, None),
    (1, 409, {}, None),
    (1, 429, {"x-ratelimit-reset": "7"}, 7.0),  # UbiOps
    (1, 429, {"X-RateLimit-Reset": "7"}, 7.0),  # header names are case-insensitive
    (1, 429, {"inin-ratelimit-reset": "3"}, 3.0),  # Genesys
    (1, 429, {"Retry-After": "2"}, 2.0),
    (1, 429, {"Retry-After": "2", "x-ratelimit-reset": "9"}, 2.0),  # Retry-After first
    (1, 503, {"Retry-After": "4"}, 4.0),
    (1, 500, {"x-ratelimit-reset": "50"}, 0.5),  # reset only means "wait" on a 429
    (1, 429, {}, 0.5),  # a 429 without a hint: backoff
    (1, 429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # a date gone by
    (1, 429, {"Retry-After": "-5"}, 0.0),
    (1, 429, {"x-ratelimit-reset": "120"}, None),  # too long to hold a worker
    (4, 429, {"x-ratelimit-reset": "1"}, None),  # attempts used up
]


@pytest.mark.parametrize(("attempt", "status", "headers", "expected"), RETRY_TABLE)
def test_retry_delay_table(
    attempt: int, status: int | None, headers: dict[str, str], expected: float | None
) -> None:
    assert retry_delay_s(POLICY, attempt, status, headers, TopOfRange()) == expected


def test_backoff_is_capped_and_fully_jittered() -> None:
    policy = RetryPolicy(max_attempts=20, base_delay_s=1.0, max_delay_s=8.0)
    assert retry_delay_s(policy, 10, 500, {}, TopOfRange()) == 8.0
    rng = random.Random(42)
    delays = [retry_delay_s(policy, 3, 500, {}, rng) for _ in range(200)]
    assert all(d is not None and 0.0 <= d <= 4.0 for d in delays)
    assert len({round(d or 0.0, 6) for d in delays}) > 150  # spread, not a fixed value


class FakeTime:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now_s = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now_s

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now_s += seconds


async def test_rate_limiter_allows_a_burst_then_spaces_calls() -> None:
    time = FakeTime()
    limiter = RateLimiter(60, clock=time.clock, sleep=time.sleep)  # one per second
    for _ in range(60):
        await limiter.acquire()
    assert time.slept == []
    await limiter.acquire()
    assert time.slept == [pytest.approx(1.0)]
    time.now_s += 10.0  # ten seconds idle: ten calls' worth of quota back
    for _ in range(10):
        await limiter.acquire()
    assert len(time.slept) == 1
    await limiter.acquire()
    assert time.slept[1:] == [pytest.approx(1.0)]


async def test_rate_limiter_queues_concurrent_callers() -> None:
    time = FakeTime()
    limiter = RateLimiter(120, clock=time.clock, sleep=time.sleep)  # one per half second
    for _ in range(120):
        await limiter.acquire()
    await asyncio.gather(*(limiter.acquire() for _ in range(3)))
    assert time.slept == [pytest.approx(0.5)] * 3
    assert time.now_s == pytest.approx(1.5)


def test_rate_limiter_rejects_a_zero_quota() -> None:
    with pytest.raises(ValueError, match="per_minute"):
        RateLimiter(0)


# ----- send() against real local servers ------------------------------------------------


class Recorder:
    """A scripted local service: answers from a list, records what it received."""

    def __init__(self, answers: list[Callable[[web.Request], Awaitable[web.StreamResponse]]]):
        self.answers = answers
        self.seen: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append({"headers": dict(request.headers), "body": body, "path": request.path})
        answer = self.answers[min(len(self.seen), len(self.answers)) - 1]
        return await answer(request)


def reply(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Any:
    async def answer(request: web.Request) -> web.StreamResponse:
        if body is None:
            return web.Response(status=status, headers=headers)
        return web.json_response(body, status=status, headers=headers)

    return answer


async def serve(aiohttp_server: ServerFactory, recorder: Recorder) -> str:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    server = await aiohttp_server(app)
    return str(server.make_url("/api"))


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


async def test_send_retries_5xx_then_returns_the_answer(aiohttp_server: ServerFactory) -> None:
    recorder = Recorder([reply(500, {"error": "boom"}), reply(502), reply(201, {"id": 1})])
    base_url = await serve(aiohttp_server, recorder)
    sleeps = Sleeps()
    async with aiohttp.ClientSession() as session:
        resp = await send(
            session,
            PlannedRequest("PUT", "/things", query=(("a", "1"),), json_body={"x": 1}),
            base_url=base_url,
            headers={"Authorization": "Token s3cr3t-value"},
            limiter=None,
            policy=POLICY,
            sleep=sleeps,
            rng=TopOfRange(),
        )
    assert (resp.status, resp.json) == (201, {"id": 1})
    assert sleeps.calls == [0.5, 1.0]
    assert len(recorder.seen) == 3
    assert all(s["path"] == "/api/things" for s in recorder.seen)
    assert recorder.seen[0]["headers"]["Authorization"] == "Token s3cr3t-value"


async def test_a_post_without_an_answer_is_not_sent_again(aiohttp_server: ServerFactory) -> None:
    """A 5xx may come after the POST was carried out: the caller looks before retrying.
    A 429 was not carried out, so it is retried here as for any method."""
    recorder = Recorder([reply(429), reply(502), reply(201, {"id": 1})])
    base_url = await serve(aiohttp_server, recorder)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ActionError, match=r"HTTP 502.*outcome unknown, not sent again") as info:
            await send(
                session,
                PlannedRequest("POST", "/things", json_body={"x": 1}),
                base_url=base_url,
                headers={},
                limiter=None,
                policy=POLICY,
                sleep=Sleeps(),
                rng=TopOfRange(),
            )
    assert info.value.retryable and info.value.status == 502
    assert len(recorder.seen) == 2


async def test_a_post_that_never_connected_is_retried() -> None:
    with socket.socket() as sock:  # a port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps = Sleeps()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ActionError, match="failed after 4 attempt") as info:
            await send(
                session,
                PlannedRequest("POST", "/things", json_body={"x": 1}),
                base_url=f"http://127.0.0.1:{port}",
                headers={},
                limiter=None,
                policy=POLICY,
                sleep=sleeps,
                rng=TopOfRange(),
            )
    assert info.value.retryable and len(sleeps.calls) == 3


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"error": "Deployment not found"}, "Deployment not found"),  # UbiOps
        ({"error_message": "Version is building"}, "Version is building"),  # UbiOps
        ({"message": "configuration not found", "code": "not.found"}, "configuration not found"),
    ],
)
async def test_send_error_message_comes_from_the_service_body(
    aiohttp_server: ServerFactory, body: dict[str, Any], expected: str
) -> None:
    base_url = await serve(aiohttp_server, Recorder([reply(404, body)]))
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ActionError) as info:
            await send(
                session,
                PlannedRequest("GET", "/x"),
                base_url=base_url,
                headers={},
                limiter=None,
                policy=POLICY,
                sleep=Sleeps(),
            )
    assert info.value.status == 404
    assert info.value.retryable is False
    assert expected in str(info.value)
    assert "GET /x" in str(info.value)


async def test_secrets_never_reach_errors_or_logs(
    aiohttp_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    token = "Token s3cr3t-0123456789"

    async def echo(request: web.Request) -> web.StreamResponse:
        auth = request.headers["Authorization"]
        return web.json_response({"error": f"bad header {auth}"}, status=503)

    base_url = await serve(aiohttp_server, Recorder([echo]))
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ActionError) as info:
            await send(
                session,
                PlannedRequest("GET", "/x"),
                base_url=base_url,
                headers={"Authorization": token},
                limiter=None,
                policy=RetryPolicy(max_attempts=2, base_delay_s=0.0),
                sleep=Sleeps(),
            )
    assert info.value.retryable is True
    assert "s3cr3t" not in str(info.value)
    assert "[redacted]" in str(info.value)
    assert caplog.records, "a retry is logged"
    assert all("s3cr3t" not in r.getMessage() for r in caplog.records)


async def test_unauthorized_hook_refreshes_the_token_once(aiohttp_server: ServerFactory) -> None:
    current = {"token": "old"}

    async def check(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != "Bearer new":
            return web.json_response({"message": "token expired"}, status=401)
        return web.json_response({"ok": True})

    recorder = Recorder([check])
    base_url = await serve(aiohttp_server, recorder)

    async def headers() -> dict[str, str]:
        return {"Authorization": f"Bearer {current['token']}"}

    async def refresh() -> bool:
        current["token"] = "new"
        return True

    async with aiohttp.ClientSession() as session:
        resp = await send(
            session,
            PlannedRequest("GET", "/x"),
            base_url=base_url,
            headers=headers,
            limiter=None,
            policy=RetryPolicy(max_attempts=1),
            sleep=Sleeps(),
            on_unauthorized=refresh,
        )
        assert resp.json == {"ok": True}
        assert len(recorder.seen) == 2

        async def no_luck() -> bool:
            return True

        current["token"] = "revoked"
        recorder.seen.clear()
        with pytest.raises(ActionError) as info:
            await send(
                session,
                PlannedRequest("GET", "/x"),
                base_url=base_url,
                headers=headers,
                limiter=None,
                policy=RetryPolicy(max_attempts=3),
                sleep=Sleeps(),
                on_unauthorized=no_luck,
            )
    assert info.value.status == 401
    assert len(recorder.seen) == 2  # one refresh, then a final 401
    assert "revoked" not in str(info.value)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connection_errors_are_retried_then_reported_retryable() -> None:
    sleeps = Sleeps()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ActionError) as info:
            await send(
                session,
                PlannedRequest("GET", "/x"),
                base_url=f"http://127.0.0.1:{_closed_port()}",
                headers={},
                limiter=None,
                policy=POLICY,
                sleep=sleeps,
                rng=TopOfRange(),
            )
    assert info.value.status is None
    assert info.value.retryable is True
    assert sleeps.calls == [0.5, 1.0, 2.0]
    assert "after 4 attempt(s)" in str(info.value)


async def test_each_attempt_has_its_own_timeout(aiohttp_server: ServerFactory) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return web.json_response({})

    recorder = Recorder([slow, reply(200, {"late": False})])
    base_url = await serve(aiohttp_server, recorder)
    async with aiohttp.ClientSession() as session:
        resp = await send(
            session,
            PlannedRequest("GET", "/x"),
            base_url=base_url,
            headers={},
            limiter=None,
            policy=RetryPolicy(max_attempts=2, timeout_s=0.1),
            sleep=Sleeps(),
        )
    assert resp.json == {"late": False}


async def test_429_gives_up_with_retry_after_when_the_wait_is_long(
    aiohttp_server: ServerFactory,
) -> None:
    base_url = await serve(
        aiohttp_server, Recorder([reply(429, {"error": "slow down"}, {"x-ratelimit-reset": "90"})])
    )
    sleeps = Sleeps()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ActionError) as info:
            await send(
                session,
                PlannedRequest("GET", "/x"),
                base_url=base_url,
                headers={},
                limiter=None,
                policy=POLICY,
                sleep=sleeps,
            )
    assert (info.value.status, info.value.retryable, info.value.retry_after_s) == (429, True, 90.0)
    assert sleeps.calls == []


async def test_multipart_upload_and_download(aiohttp_server: ServerFactory, tmp_path: Path) -> None:
    received: dict[str, Any] = {}

    async def upload(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        file_field = form["file"]
        assert isinstance(file_field, web.FileField)
        received.update(
            filename=file_field.filename,
            content=file_field.file.read(),
            note=form["note"],
        )
        return web.json_response({"success": True}, status=201)

    async def download(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"zip-bytes" * 1000, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_post("/up", upload)
    app.router.add_get("/down", download)
    server = await aiohttp_server(app)
    model = tmp_path / "model.zip"
    model.write_bytes(b"PK\x03\x04 model")
    async with aiohttp.ClientSession() as session:
        common: dict[str, Any] = {
            "base_url": str(server.make_url("")),
            "headers": {},
            "limiter": None,
            "policy": POLICY,
        }
        resp = await send(
            session,
            PlannedRequest("POST", "/up", file_path=str(model), form=(("note", "hi"),)),
            **common,
        )
        assert resp.json == {"success": True}
        target = tmp_path / "out" / "copy.zip"
        got = await send(
            session, PlannedRequest("GET", "/down", download_path=str(target)), **common
        )
        with pytest.raises(ActionError, match="file not found") as info:
            await send(
                session,
                PlannedRequest("POST", "/up", file_path=str(tmp_path / "absent.zip")),
                **common,
            )
    assert received == {"filename": "model.zip", "content": b"PK\x03\x04 model", "note": "hi"}
    assert target.read_bytes() == b"zip-bytes" * 1000
    assert got.downloaded_bytes == 9000
    assert info.value.retryable is False
