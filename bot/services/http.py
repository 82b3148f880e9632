"""The one resilience policy every adapter uses: retries, backoff, rate limits, errors.

`retry_delay_s` is the pure decision (retry or not, and after how long); `RateLimiter`
keeps us under a service's per-minute quota; `send` is the only place that does HTTP
for the adapters. Secrets from request headers never reach an error message or a log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import IO, Any
from urllib.request import getproxies_environment

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from bot.core.backoff import RetryPolicy, is_retryable, retry_delay_s, server_wait_s
from bot.core.catalog import JSON, Operation, PlannedRequest, plan_request
from bot.errors import ActionError

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[Any]]
HeaderSource = Mapping[str, str] | Callable[[], Awaitable[Mapping[str, str]]]
OnUnauthorized = Callable[[], Awaitable[bool]]

SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
ERROR_KEYS = ("error", "error_message", "message", "detail")  # UbiOps, UbiOps, Genesys, other
MAX_ERROR_CHARS = 500
DOWNLOAD_CHUNK_BYTES = 1 << 16
# The HTTP status of the last answer a client received in this task: an action run's
# attempt records it (a failure's status travels in its ActionError).
LAST_STATUS: ContextVar[int | None] = ContextVar("LAST_STATUS", default=None)


@dataclass(frozen=True, slots=True)
class Response:
    """A successful answer: status, headers, raw body and its JSON (None if not JSON)."""

    status: int
    headers: Mapping[str, str]
    body: bytes = b""
    json: Any = None
    downloaded_bytes: int = 0  # when the body was saved to the request's download_path


class RateLimiter:
    """Token bucket that keeps calls under `per_minute`, spreading a burst evenly."""

    def __init__(
        self,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        self._rate_per_s = per_minute / 60.0
        self._capacity = float(per_minute)
        self._tokens = float(per_minute)
        self._clock = clock
        self._sleep = sleep
        self._updated = clock()
        self._lock = asyncio.Lock()  # callers queue in order instead of racing for tokens

    async def acquire(self) -> None:
        """Wait until one more call fits in the quota, then take it."""
        async with self._lock:
            while True:
                now = self._clock()
                elapsed_s = max(now - self._updated, 0.0)
                self._tokens = min(self._capacity, self._tokens + elapsed_s * self._rate_per_s)
                self._updated = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await self._sleep((1.0 - self._tokens) / self._rate_per_s)


def client_session(
    *,
    proxy: str | None = None,
    timeout_s: float = 30.0,
) -> aiohttp.ClientSession:
    """The HTTP session of every outgoing call (UbiOps, Genesys, Jira, Connect keys).

    An explicit proxy carries every call (its credentials, from the URL, go as
    Proxy-Authorization); without one, aiohttp's `trust_env` applies the standard
    HTTP_PROXY / HTTPS_PROXY / NO_PROXY variables, as the official clients do.
    """
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    if proxy is not None:
        return aiohttp.ClientSession(timeout=timeout, proxy=proxy)
    # Read once, here: with trust_env, aiohttp looks the variables (and ~/.netrc) up again
    # in a thread for every call, a few percent of a busy pipeline's CPU.
    return aiohttp.ClientSession(timeout=timeout, trust_env=bool(getproxies_environment()))


def secret_values(headers: Mapping[str, str]) -> list[str]:
    """List the header values (and their credential part) that must never be shown."""
    out: list[str] = []
    for name, value in headers.items():
        if name.lower() in SENSITIVE_HEADERS and value:
            out.append(value)
            credential = value.split(" ", 1)[-1].strip()  # "Token abc" -> "abc"
            if credential:
                out.append(credential)
    return sorted(set(out), key=len, reverse=True)


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret in the text with a marker."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


def error_detail(body: bytes) -> str:
    """Extract the service's own error message from an error body."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, Mapping):
        for key in ERROR_KEYS:
            value = data.get(key)
            if value:
                text = value if isinstance(value, str) else json.dumps(value)
                return text[:MAX_ERROR_CHARS]
    text = body.decode("utf-8", errors="replace").strip()
    return text[:MAX_ERROR_CHARS] or "(empty body)"


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def request_url(url: str, req: PlannedRequest) -> URL:
    """The full URL, already encoded: the catalog quoted the path, the query is encoded
    as the clients encode it (yarl would leave `:` and `,` raw)."""
    query = req.query_string
    return URL(f"{url}?{query}" if query else url, encoded=True)


def _open_binary(path: str, mode: str) -> IO[bytes]:
    if "w" in mode:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return open(path, mode)  # closed by the caller


async def _save_body(resp: aiohttp.ClientResponse, path: str) -> int:
    """Stream a response body into a file atomically; return its size in bytes."""
    partial = f"{path}.part"
    size = 0
    out = await asyncio.to_thread(_open_binary, partial, "wb")
    try:
        async for chunk in resp.content.iter_chunked(DOWNLOAD_CHUNK_BYTES):
            await asyncio.to_thread(out.write, chunk)
            size += len(chunk)
    finally:
        await asyncio.to_thread(out.close)
    await asyncio.to_thread(os.replace, partial, path)
    return size


async def _attempt(
    session: aiohttp.ClientSession,
    req: PlannedRequest,
    url: str,
    headers: Mapping[str, str],
    timeout_s: float,
) -> Response:
    """Make one HTTP request and read its whole answer within the timeout."""
    upload: IO[bytes] | None = None
    data: aiohttp.FormData | bytes | None = None
    content_headers: dict[str, str] = {}
    try:
        if req.multipart:
            # multipart even without a file (source_deployment + source_version): aiohttp
            # would send form fields alone URL-encoded, the client sends multipart.
            data = aiohttp.FormData(default_to_multipart=True)
            for name, value in req.form:
                data.add_field(name, value)
            if req.file_path is not None:
                # reopened on every attempt: a retried upload must start from byte 0
                upload = await asyncio.to_thread(_open_binary, req.file_path, "rb")
                filename = os.path.basename(req.file_path)
                data.add_field(
                    "file",
                    upload,
                    filename=filename,
                    # as the UbiOps client labels the part: by the file name's type
                    content_type=mimetypes.guess_type(filename)[0] or "application/octet-stream",
                )
        elif req.json_body is not None:
            data = json.dumps(req.json_body).encode()
            content_headers["Content-Type"] = JSON
        elif req.content_type == JSON:
            # a body method without a body: JSON as the clients say, not octet-stream
            data = req.empty_json
            content_headers["Content-Type"] = JSON
        async with session.request(
            req.method,
            request_url(url, req),
            data=data,
            headers={**dict(req.headers), **content_headers, **headers},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            allow_redirects=req.follow_redirects,
        ) as resp:
            resp_headers = CIMultiDict(resp.headers)
            if req.download_path is not None and resp.status < 400:
                size = await _save_body(resp, req.download_path)
                return Response(resp.status, resp_headers, downloaded_bytes=size)
            body = await resp.read()
            return Response(resp.status, resp_headers, body, _parse_json(body))
    finally:
        if upload is not None:
            upload.close()


async def send(
    session: aiohttp.ClientSession,
    req: PlannedRequest,
    *,
    base_url: str,
    headers: HeaderSource,
    limiter: RateLimiter | None,
    policy: RetryPolicy,
    sleep: Sleep = asyncio.sleep,
    rng: random.Random | None = None,
    on_unauthorized: OnUnauthorized | None = None,
) -> Response:
    """Send a planned request with the shared policy; return the answer or raise ActionError.

    `headers` may be an async callable (called before every attempt, so a refreshed
    token is picked up). On a 401, `on_unauthorized` (if given) is awaited once; when it
    returns True the request is sent again without counting as an attempt.
    """
    if req.file_path is not None and not await asyncio.to_thread(os.path.isfile, req.file_path):
        raise ActionError(f"{req.method} {req.path}: file not found: {req.file_path}")
    url = base_url.rstrip("/") + req.path
    rng = rng or random.Random()
    attempt = 0
    reauthorized = False
    while True:
        attempt += 1
        if limiter is not None:
            await limiter.acquire()
        sent_headers = dict(await headers()) if callable(headers) else dict(headers)
        secrets = secret_values(sent_headers)
        status: int | None = None
        resp_headers: Mapping[str, str] = {}
        unsent = False  # the request surely never reached the service
        try:
            response = await _attempt(session, req, url, sent_headers, policy.timeout_s)
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = f"no answer ({type(exc).__name__}: {exc})" if str(exc) else type(exc).__name__
            unsent = isinstance(exc, aiohttp.ClientConnectorError)
        else:
            status, resp_headers = response.status, response.headers
            if status < 400:
                return response
            if status == 401 and on_unauthorized is not None and not reauthorized:
                reauthorized = True
                if await on_unauthorized():
                    attempt -= 1  # the retry with a fresh credential is not a failure
                    continue
            problem = f"HTTP {status}: {error_detail(response.body)}"
        problem = redact(problem, secrets)
        unknown_outcome = (status is None and not unsent) or (status or 0) >= 500
        if unknown_outcome and not req.repeatable:
            # A POST without an answer (timeout, dropped connection, 5xx) may have been
            # carried out: sending it again could make a second object. The caller looks
            # for the object first (ActionRunner), then the executor retries.
            raise ActionError(
                f"{req.method} {req.path}: {problem}; outcome unknown, not sent again",
                status=status,
                retryable=True,
                retry_after_s=server_wait_s(status, resp_headers),
            )
        delay_s = retry_delay_s(policy, attempt, status, resp_headers, rng)
        if delay_s is None:
            raise ActionError(
                f"{req.method} {req.path} failed after {attempt} attempt(s): {problem}",
                status=status,
                retryable=is_retryable(status),
                retry_after_s=server_wait_s(status, resp_headers),
            )
        log.warning(
            "%s %s: %s; retrying in %.2fs (attempt %d of %d)",
            req.method,
            req.path,
            problem,
            delay_s,
            attempt,
            policy.max_attempts,
        )
        await sleep(delay_s)


class OperationClient:
    """The shared shape of the service clients (UbiOps, Genesys, Jira): look an operation up
    in the service's table, plan its request, send it with the service's authentication
    through the one resilience policy (`send`).

    A subclass names its `service` and `operations` and says how a request is
    authenticated (`_headers`) and whether a 401 is worth a new credential (`_refresh`).
    """

    service: str
    operations: Mapping[str, Operation]

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        policy: RetryPolicy,
        limiter: RateLimiter | None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._session = session
        self.base_url = base_url.rstrip("/")
        self._policy = policy
        self._limiter = limiter
        self._sleep = sleep
        self._rng = rng

    def operation(self, op_name: str) -> Operation:
        """The operation `op_name` (with or without the `service.` prefix) of the table."""
        op = self.operations.get(op_name.removeprefix(f"{self.service}."))
        if op is None:
            raise ActionError(f"unknown {self.service} operation {op_name}")
        return op

    async def call(self, op_name: str, params: Mapping[str, Any]) -> Any:
        """Call one operation by its reference name with its parameters; return the answer."""
        op = self.operation(op_name)
        req = plan_request(op, params)
        self._check(op, req)
        return self._answer(req, await self.send(req))

    async def send(self, req: PlannedRequest) -> Response:
        """Send one request with this client's authentication and the shared policy."""
        sent: list[str] = []  # the credential of each attempt: a 401 refreshes the last only

        async def headers() -> Mapping[str, str]:
            return await self._headers(req, sent)

        async def on_unauthorized() -> bool:
            return await self._refresh(sent)

        response = await send(
            self._session,
            req,
            base_url=self.base_url,
            headers=headers,
            limiter=self._limiter,
            policy=self._policy,
            sleep=self._sleep,
            rng=self._rng,
            on_unauthorized=on_unauthorized if self._refreshes(req) else None,
        )
        LAST_STATUS.set(response.status)
        return response

    async def _headers(self, req: PlannedRequest, sent: list[str]) -> Mapping[str, str]:
        """The request's headers, credentials included (append a token sent to `sent`)."""
        raise NotImplementedError

    def _refreshes(self, req: PlannedRequest) -> bool:
        """Whether a 401 to `req` is answered by a new credential and one more try."""
        return False

    async def _refresh(self, sent: list[str]) -> bool:
        """Replace the credential last sent; True to send the request again."""
        return False

    def _check(self, op: Operation, req: PlannedRequest) -> None:
        """Refuse a request the service would refuse anyway (before sending it)."""

    def _answer(self, req: PlannedRequest, response: Response) -> Any:
        """What a call returns: the decoded answer."""
        return response.json
