"""Jira dynamic webhooks adapter: operation table, auth (Connect JWT or OAuth) and client.

Operations are the five of Jira's WebhooksApi (`docs/reference/jira-webhooks-api.md`).
The only I/O is `http.send`; signing, token bookkeeping and answer parsing are pure.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp

from bot.errors import ActionError
from bot.services import http
from bot.services.catalog import Operation, Param, PlannedRequest, plan_request
from bot.services.tokens import AccessToken, CachedToken, parse_token_answer
from bot.verify import sign_connect
from bot.webhook_plan import AuthMode, RegisteredWebhook, SyncPlan, WebhookSpec

SERVICE = "jira"
DEFAULT_POLICY = http.RetryPolicy()
_HOOKS = "/rest/api/3/webhook"


def _body_param(name: str) -> tuple[Param, ...]:
    return (Param(name, "body", required=True),)


OPERATIONS: tuple[Operation, ...] = (
    Operation(
        SERVICE, "delete_webhook_by_id", "DELETE", _HOOKS, _body_param("container_for_webhook_ids")
    ),
    Operation(
        SERVICE,
        "get_dynamic_webhooks_for_app",
        "GET",
        _HOOKS,
        (
            Param("start_at", "query", wire_name="startAt"),
            Param("max_results", "query", wire_name="maxResults"),
        ),
    ),
    Operation(
        SERVICE,
        "get_failed_webhooks",
        "GET",
        _HOOKS + "/failed",
        (Param("max_results", "query", wire_name="maxResults"), Param("after", "query")),
    ),
    Operation(
        SERVICE,
        "refresh_webhooks",
        "PUT",
        _HOOKS + "/refresh",
        _body_param("container_for_webhook_ids"),
    ),
    Operation(
        SERVICE,
        "register_dynamic_webhooks",
        "POST",
        _HOOKS,
        _body_param("webhook_registration_details"),
    ),
)
OPERATIONS_BY_NAME: Mapping[str, Operation] = {op.name: op for op in OPERATIONS}


# --- answers ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegistrationResult:
    """Jira's verdict on one webhook of a registration: its new id, or why it failed."""

    spec: WebhookSpec
    created_id: int | None
    errors: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FailedDelivery:
    """A delivery Jira gave up on; `id` is its X-Atlassian-Webhook-Identifier."""

    id: str
    body: str
    url: str
    failure_time: datetime


def parse_jira_time(value: Any) -> datetime:
    """Parse a Jira timestamp given as epoch milliseconds or as an ISO-8601 string."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000, UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())  # takes "Z" and "+0000" (3.11)
        except ValueError:
            pass
        else:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    raise ActionError(f"Jira sent a timestamp deploybot cannot read: {value!r}")


def _registered(item: Mapping[str, Any]) -> RegisteredWebhook:
    expires = item.get("expirationDate")
    return RegisteredWebhook(
        id=int(item["id"]),
        spec=WebhookSpec(
            tuple(item.get("events") or ()),
            str(item.get("jqlFilter", "")),
            item.get("fieldIdsFilter"),
            item.get("issuePropertyKeysFilter"),
        ),
        expires_at=None if expires is None else parse_jira_time(expires),
    )


def _registration_results(specs: list[WebhookSpec], answer: Any) -> list[RegistrationResult]:
    entries = answer.get("webhookRegistrationResult") if isinstance(answer, Mapping) else None
    if not isinstance(entries, list) or len(entries) != len(specs):
        raise ActionError("Jira's registration answer does not list one result per webhook")
    results = []
    for spec, entry in zip(specs, entries, strict=True):
        created = entry.get("createdWebhookId")
        errors = tuple(str(e) for e in entry.get("errors") or ())
        if created is None and not errors:
            errors = ("Jira neither created the webhook nor said why",)
        results.append(RegistrationResult(spec, None if created is None else int(created), errors))
    return results


# --- auth ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectAuth:
    """Connect app credentials for one tenant: app key (iss) and the tenant's shared secret."""

    app_key: str
    shared_secret: str = field(repr=False)
    ttl_s: int = 180

    def header(self, req: PlannedRequest, now: float) -> dict[str, str]:
        """Sign this very request: the qsh covers its method, path and query."""
        token = sign_connect(
            req.method,
            req.path,
            req.query,
            issuer=self.app_key,
            secret=self.shared_secret,
            now=now,
            ttl_s=self.ttl_s,
        )
        return {"Authorization": f"JWT {token}"}


OnRotate = Callable[[str], Awaitable[None]]


class OAuthTokens(CachedToken):
    """Access tokens from the refresh-token grant; keeps the rotated refresh token.

    Atlassian rotates refresh tokens: every grant answers with a new one and the old one
    stops working, so the new one is handed to `on_rotate` to be persisted before use.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        token_url: str,
        client_id: str,
        client_secret: str,
        refresh_token: str,
        *,
        on_rotate: OnRotate | None = None,
        policy: http.RetryPolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
        margin_s: float = 60.0,
    ) -> None:
        super().__init__(clock)
        self._session = session
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self.refresh_token = refresh_token
        self._on_rotate = on_rotate
        self._policy = policy
        self._margin_s = margin_s

    def __repr__(self) -> str:
        return f"OAuthTokens(token_url={self._token_url!r}, client_id={self._client_id!r})"

    async def _fetch(self) -> AccessToken:
        body = {
            "grant_type": "refresh_token",
            "client_id": self._client_id,
            "client_secret": self._client_secret,
            "refresh_token": self.refresh_token,
        }
        answer = (
            await http.send(
                self._session,
                PlannedRequest("POST", "", json_body=body),
                base_url=self._token_url,
                headers={},
                limiter=None,
                policy=self._policy,
            )
        ).json
        token = parse_token_answer(
            answer, source="Jira's token endpoint", now_s=self._clock(), margin_s=self._margin_s
        )
        rotated = answer.get("refresh_token")
        if isinstance(rotated, str) and rotated and rotated != self.refresh_token:
            self.refresh_token = rotated
            if self._on_rotate is not None:
                await self._on_rotate(rotated)
        return token


# --- client ----------------------------------------------------------------------------


class JiraClient:
    """Typed client of Jira's dynamic webhooks API for one tenant (Connect) or app (OAuth)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        auth: ConnectAuth | OAuthTokens,
        *,
        policy: http.RetryPolicy = DEFAULT_POLICY,
        limiter: http.RateLimiter | None = None,
        sleep: http.Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self.base_url = base_url.rstrip("/")
        self._auth = auth
        self._policy = policy
        self._limiter = limiter
        self._sleep = sleep
        self._rng = rng
        self._clock = clock

    @property
    def mode(self) -> AuthMode:
        return "connect" if isinstance(self._auth, ConnectAuth) else "oauth"

    async def send(self, req: PlannedRequest) -> http.Response:
        """Send one request with this client's auth and the shared resilience policy."""
        auth = self._auth
        sent: list[str] = []

        async def headers() -> Mapping[str, str]:
            if isinstance(auth, ConnectAuth):
                return auth.header(req, self._clock())
            sent.append(await auth.token())
            return {"Authorization": f"Bearer {sent[-1]}"}

        async def on_unauthorized() -> bool:
            assert isinstance(auth, OAuthTokens)
            await auth.refresh(sent[-1] if sent else None)
            return True

        return await http.send(
            self._session,
            req,
            base_url=self.base_url,
            headers=headers,
            limiter=self._limiter,
            policy=self._policy,
            sleep=self._sleep,
            rng=self._rng,
            # A Connect 401 is a wrong secret or clock: signing again would not help.
            on_unauthorized=None if isinstance(auth, ConnectAuth) else on_unauthorized,
        )

    async def call(self, op_name: str, params: Mapping[str, Any]) -> Any:
        """Run `jira.<op_name>` with the reference's parameter names; return the JSON answer."""
        op = OPERATIONS_BY_NAME.get(op_name)
        if op is None:
            raise ActionError(f"jira.{op_name} is not an operation of Jira's webhooks API")
        return (await self.send(plan_request(op, params))).json

    async def register(self, webhooks: list[WebhookSpec], url: str) -> list[RegistrationResult]:
        """Register webhooks for `url`; Jira answers 200 with a verdict per entry."""
        details = {"url": url, "webhooks": [spec.to_json() for spec in webhooks]}
        answer = await self.call(
            "register_dynamic_webhooks", {"webhook_registration_details": details}
        )
        return _registration_results(webhooks, answer)

    async def list_all(self, page_size: int = 100) -> list[RegisteredWebhook]:
        """List every webhook this app registered, following the pages to the last."""
        found: list[RegisteredWebhook] = []
        while True:
            page = await self.call(
                "get_dynamic_webhooks_for_app", {"start_at": len(found), "max_results": page_size}
            )
            values = page.get("values") if isinstance(page, Mapping) else None
            if not isinstance(values, list):
                raise ActionError("Jira's webhook list has no values")
            found.extend(_registered(item) for item in values)
            is_last = page.get("isLast")
            if is_last is None:  # not promised by every Jira: fall back on the total
                is_last = len(found) >= int(page.get("total", len(found)))
            if is_last or not values:
                return found

    async def refresh(self, ids: Iterable[int]) -> datetime:
        """Extend the webhooks' life; return their new expiry (unknown ids are ignored)."""
        answer = await self.call("refresh_webhooks", {"container_for_webhook_ids": _id_body(ids)})
        if not isinstance(answer, Mapping) or "expirationDate" not in answer:
            raise ActionError("Jira's refresh answer has no expirationDate")
        return parse_jira_time(answer["expirationDate"])

    async def delete(self, ids: Iterable[int]) -> None:
        """Delete webhooks by id (ids of other apps are ignored by Jira)."""
        await self.call("delete_webhook_by_id", {"container_for_webhook_ids": _id_body(ids)})

    async def apply(self, plan: SyncPlan, url: str) -> list[RegistrationResult]:
        """Carry out a sync plan: delete first, so the app never exceeds Jira's limit."""
        if plan.delete:
            await self.delete(plan.delete)
        if not plan.register:
            return []
        return await self.register([d.spec for d in plan.register], url)

    async def failed(
        self, after: int | None = None, page_size: int | None = None
    ) -> AsyncIterator[FailedDelivery]:
        """Yield deliveries Jira gave up on after `after` (epoch ms), following `next`."""
        req = plan_request(
            OPERATIONS_BY_NAME["get_failed_webhooks"], {"after": after, "max_results": page_size}
        )
        while True:
            try:
                page = (await self.send(req)).json
            except ActionError as exc:
                if exc.status == 403 and self.mode == "oauth":
                    raise ActionError(
                        "Jira refused to list failed deliveries: only Connect apps may"
                        " (JIRA_AUTH_MODE is oauth); missed events are not recovered",
                        status=403,
                    ) from exc
                raise
            values = page.get("values") if isinstance(page, Mapping) else None
            if not isinstance(values, list):
                raise ActionError("Jira's failed-webhooks answer has no values")
            for item in values:
                yield FailedDelivery(
                    id=str(item["id"]),
                    body=str(item.get("body") or ""),
                    url=str(item.get("url") or ""),
                    failure_time=parse_jira_time(item["failureTime"]),
                )
            next_url = page.get("next")
            if not next_url or not values:
                return
            req = next_request(self.base_url, str(next_url))


def next_request(base_url: str, link: str) -> PlannedRequest:
    """Turn a `next` link into a GET, refusing links off this Jira (they would get a token)."""
    base, target = urlsplit(base_url), urlsplit(link)
    base_path = base.path.rstrip("/")
    if (target.scheme, target.netloc) != (base.scheme, base.netloc) or not target.path.startswith(
        base_path + "/"
    ):
        raise ActionError(f"Jira's next link leaves {base_url}: {link}")
    query = tuple(parse_qsl(target.query, keep_blank_values=True))
    return PlannedRequest("GET", target.path[len(base_path) :], query)


def _id_body(ids: Iterable[int]) -> dict[str, list[int]]:
    webhook_ids = sorted(set(ids))
    if not webhook_ids:
        raise ValueError("no webhook ids given")  # Jira answers 400 to an empty list
    return {"webhookIds": webhook_ids}
