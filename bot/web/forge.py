"""POST /webhooks/forge: Jira events forwarded by a Forge app's trigger through Forge Remote.

The Forge Invocation Token is verified (bot.core.forge) with a key of Atlassian's JWKS,
fetched by this module: cached, refetched for an unknown `kid` at most once a minute,
with a small pool of its own and a short timeout, so that invented kids cost nothing
and a slow key server cannot hold Forge's 5 s budget or the service calls' connections.
The event is then mapped to its Jira webhook shape and stored like a webhook delivery.
https://developer.atlassian.com/platform/forge/forge-remote-invocation-contract
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bot import logs
from bot.core import forge
from bot.core.delivery import Delivery, is_json_content_type
from bot.errors import PayloadError, UnsupportedMediaType, VerificationError
from bot.services.forge_tokens import ForgeSystemTokens
from bot.web.errors import add_routes, read_body
from bot.web.keys import CLOCK, SETTINGS, STORE

log = logging.getLogger(__name__)

FORGE_PATH = "/webhooks/forge"
KEYS_TTL_S = 3600.0
REFETCH_AFTER_S = 60.0  # an unknown kid refetches the JWKS at most this often
FETCH_TIMEOUT_S = 2.0  # well inside Forge's 5 s
MAX_JWKS_BYTES = 64 * 1024


class KeysUnavailable(Exception):
    """The JWKS could not be fetched: not the caller's fault (503; Forge retries)."""


class ForgeKeys:
    """Atlassian's FIT signing keys by `kid`, from one JWKS URL."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = FETCH_TIMEOUT_S,
    ) -> None:
        self.url = url
        self._clock = clock
        self._timeout_s = timeout_s
        self._keys: dict[str, Any] = {}
        self._fetched_at = -1e9
        self._fetching: asyncio.Future[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.fetches = 0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, kid: str) -> Any:
        now = self._clock()
        stale = now - self._fetched_at > KEYS_TTL_S
        # An unknown kid (a rotation, or an invented one) refetches at most once a minute.
        if stale or (kid not in self._keys and now - self._fetched_at > REFETCH_AFTER_S):
            if self._fetching is None:
                self._fetching = asyncio.ensure_future(self._refresh())
                self._fetching.add_done_callback(self._done)
            await asyncio.shield(self._fetching)
        key = self._keys.get(kid)
        if key is None:
            raise VerificationError(f"unknown key id {kid!r}")
        return key

    def _done(self, done: asyncio.Future[None]) -> None:
        self._fetching = None
        if not done.cancelled():
            done.exception()  # retrieved: its awaiting callers have it

    async def _refresh(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=2),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            )
        self.fetches += 1
        self._fetched_at = self._clock()  # a failed fetch also waits REFETCH_AFTER_S
        try:
            async with self._session.get(self.url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise KeysUnavailable(f"JWKS answered {resp.status}")
                body = await resp.content.read(MAX_JWKS_BYTES + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KeysUnavailable(f"JWKS: {type(exc).__name__}") from exc
        if len(body) > MAX_JWKS_BYTES:
            raise KeysUnavailable("JWKS is too large")
        try:
            self._keys = forge.parse_jwks(body)
        except PayloadError as exc:
            raise KeysUnavailable(str(exc)) from exc


FORGE_KEYS = web.AppKey("forge_keys", ForgeKeys)
# The newest app system token of each Forge site: what `jira.*` actions call it back with.
FORGE_TOKENS = web.AppKey("forge_tokens", ForgeSystemTokens)


async def _verify(request: web.Request) -> forge.Invocation:
    settings = request.app[SETTINGS]
    if not settings.forge_app_id:
        raise VerificationError("Forge events are not accepted: FORGE_APP_ID is not set")
    token = forge.bearer(request.headers.get("Authorization"))
    kid = forge.fit_key_id(token)
    try:
        key = await request.app[FORGE_KEYS].get(kid)
    except KeysUnavailable as exc:
        raise web.HTTPServiceUnavailable(text="Forge key service unreachable") from exc
    return forge.verify_fit(
        token,
        key,
        app_id=settings.forge_app_id,
        now=request.app[CLOCK](),
        system_token=request.headers.get(forge.SYSTEM_TOKEN_HEADER),
    )


async def receive_forge_event(request: web.Request) -> web.Response:
    """Verify the FIT, map the event to its webhook shape, store (commit), acknowledge."""
    invocation = await _verify(request)
    if not is_json_content_type(request.headers.get("Content-Type")):
        raise UnsupportedMediaType("Content-Type must be application/json")
    now_ms = int(request.app[CLOCK]() * 1000)
    delivery_id, payload = forge.to_webhook_payload(await read_body(request), now_ms=now_ms)
    issue = payload["issue"]
    key = issue.get("key") if isinstance(issue, dict) else None
    delivery = Delivery(
        delivery_id=delivery_id,
        retry_count=0,
        webhook_event=payload["webhookEvent"],
        issue_key=key if isinstance(key, str) and key.isprintable() and len(key) < 100 else None,
        body=orjson.dumps(payload),
    )
    if invocation.system_token and invocation.api_base_url:
        request.app[FORGE_TOKENS].remember(invocation.api_base_url, invocation.system_token)
    stored = await request.app[STORE].add("", delivery, source="forge")
    logs.info(
        log,
        "forge event stored" if stored.created else "forge event duplicate",
        delivery_id=delivery_id,
        event_id=stored.event_id,
        webhook_event=delivery.webhook_event,
        issue_key=delivery.issue_key,
    )
    if stored.event_id is not None:
        return web.json_response({"event_id": stored.event_id}, status=202)
    return web.json_response({"duplicate": True}, status=200)


async def _keys_ctx(app: web.Application) -> AsyncIterator[None]:
    keys = ForgeKeys(app[SETTINGS].forge_jwks_url)
    app[FORGE_KEYS] = keys
    yield
    await keys.close()


def setup(app: web.Application) -> None:
    """Add the Forge endpoint (when FORGE_APP_ID is set) and its key cache."""
    if not app[SETTINGS].forge_app_id:
        return
    app[FORGE_TOKENS] = ForgeSystemTokens(app[CLOCK])
    app.cleanup_ctx.append(_keys_ctx)
    add_routes(app, [("POST", FORGE_PATH, receive_forge_event)])
