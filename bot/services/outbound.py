"""`http.request`: a call to a URL on an allowed host (Slack/Teams webhooks, health checks).

The host list is `DEPLOYBOT_HTTP_ALLOWED_HOSTS`; a URL rendered from Jira's values never
reaches another host, and redirects are not followed (they could lead elsewhere). Same
resilience policy as every adapter (`http.send`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp

from bot.core.apis.http import PARAMS, SERVICE
from bot.core.backoff import RetryPolicy
from bot.core.catalog import PlannedRequest
from bot.core.hosts import host_problem
from bot.errors import ActionError
from bot.services import http
from bot.services.actions import ActionResult, Done, HighLevelAction, RunInfo

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
MAX_TEXT_CHARS = 2000  # of a non-JSON answer kept as the step's result
DEFAULT_POLICY = RetryPolicy()


class OutboundClient:
    """Sends `http.request` actions to the allowed hosts only."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        allowed_hosts: tuple[str, ...],
        *,
        policy: RetryPolicy = DEFAULT_POLICY,
        sleep: http.Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._session = session
        self.allowed_hosts = allowed_hosts
        self._policy = policy
        self._sleep = sleep
        self._rng = rng

    async def call(self, op_name: str, params: Mapping[str, Any]) -> Any:
        """Run `http.request` with its parameters; return status and answer."""
        if op_name != "request":
            raise ActionError(f"http.{op_name} is not an action")
        url = params.get("url")
        if not isinstance(url, str):
            raise ActionError("http.request: url must be text")
        problem = host_problem(url, self.allowed_hosts)
        if problem is not None:
            raise ActionError(f"http.request: {problem}")
        method = str(params.get("method") or "POST").upper()
        if method not in METHODS:
            raise ActionError(f"http.request: method {method!r} is not one of {sorted(METHODS)}")
        headers = params.get("headers") or {}
        if not isinstance(headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str | int) for k, v in headers.items()
        ):
            raise ActionError("http.request: headers must map names to text values")
        expected = _expected(params.get("expect_status"))
        parts = urlsplit(url)
        req = PlannedRequest(
            method,
            parts.path or "/",
            tuple(parse_qsl(parts.query, keep_blank_values=True)),
            json_body=params.get("json"),
            headers=tuple((str(k), str(v)) for k, v in headers.items()),
            follow_redirects=False,
        )
        try:
            response = await http.send(
                self._session,
                req,
                base_url=f"{parts.scheme}://{parts.netloc}",
                headers={},
                limiter=None,
                policy=self._policy,
                sleep=self._sleep,
                rng=self._rng,
            )
        except ActionError as exc:
            if exc.status is not None and expected is not None and exc.status in expected:
                return {"status": exc.status, "json": None, "text": str(exc)[:MAX_TEXT_CHARS]}
            raise
        if expected is not None and response.status not in expected:
            raise ActionError(
                f"http.request: {method} {url} answered {response.status},"
                f" expected {sorted(expected)}",
                status=response.status,
            )
        text = None
        if response.json is None and response.body:
            text = response.body.decode("utf-8", "replace")[:MAX_TEXT_CHARS].replace("\x00", "")
        return {"status": response.status, "json": response.json, "text": text}


def _expected(value: Any) -> frozenset[int] | None:
    if value is None:
        return None  # any answer below 400
    values = value if isinstance(value, list | tuple) else [value]
    try:
        codes = frozenset(int(v) for v in values)
    except (TypeError, ValueError):
        raise ActionError("http.request: expect_status must be a status or a list") from None
    if not codes or any(not 100 <= c <= 599 for c in codes):
        raise ActionError("http.request: expect_status must be HTTP statuses (100-599)")
    return codes


async def request(
    client: Any, params: Mapping[str, Any], _state: dict[str, Any] | None, _run: RunInfo
) -> ActionResult:
    """The `http.request` action."""
    return Done(await client.call("request", params))


def preview(params: Mapping[str, Any]) -> PlannedRequest:
    """The request as the dry run shows it (the host is checked against the setting when
    it runs, and by `rules check` for a literal URL)."""
    url = str(params.get("url", ""))
    parts = urlsplit(url)
    return PlannedRequest(
        str(params.get("method") or "POST").upper(),
        f"{parts.scheme}://{parts.netloc}{parts.path}",
        tuple(parse_qsl(parts.query, keep_blank_values=True)),
        json_body=params.get("json"),
    )


ACTIONS: tuple[HighLevelAction, ...] = (
    HighLevelAction(SERVICE, "request", PARAMS, request, preview),
)
