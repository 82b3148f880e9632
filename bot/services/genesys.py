"""Genesys Cloud adapter: operation table, client-credentials tokens and the typed client.

Operations are those of the Python SDK's WebDeploymentsApi and of the WidgetsApi (see
`docs/reference/genesys-*.md`), named as the SDK names them. The only I/O of this
module is the login call and `http.send`; everything else is pure.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bot.core.apis.genesys import (
    OPERATIONS_BY_NAME,
    PUBLISH_ACTION,
    PUBLISH_PARAMS,
    SERVICE,
)
from bot.core.backoff import RetryPolicy
from bot.core.catalog import (
    Operation,
    PlannedRequest,
    check_params,
)
from bot.errors import ActionError, ServiceDisabled
from bot.services.actions import ActionResult, Done, HighLevelAction, RunInfo, ServiceClient
from bot.services.http import OperationClient, RateLimiter, Sleep
from bot.services.tokens import AccessToken, CachedToken, parse_token_answer

MAX_BODY_BYTES = 512_000  # Genesys refuses larger request bodies with 413
# --- operation table -------------------------------------------------------------------


# --- client-credentials tokens ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """An OAuth client id and secret; the secret never shows in a repr."""

    client_id: str
    client_secret: str = field(repr=False)

    def basic_auth(self) -> str:
        """Return the `Authorization` header value of the client-credentials grant."""
        pair = f"{self.client_id}:{self.client_secret}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        return None


def _login_failure(status: int, answer: Any) -> ActionError:
    code = answer.get("error") if isinstance(answer, dict) else None
    detail = f" ({code})" if isinstance(code, str) and len(code) < 64 else ""
    retryable = status == 429 or status >= 500
    return ActionError(
        f"Genesys login refused the token request: HTTP {status}{detail}",
        status=status,
        retryable=retryable,
    )


class TokenManager(CachedToken):
    """The client-credentials token, refreshed `refresh_margin_s` before it expires."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        login_url: str,
        credentials: ClientCredentials,
        *,
        refresh_margin_s: float = 60.0,
        timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(clock)
        self._session = session
        self._token_url = login_url.rstrip("/") + "/oauth/token"
        self._credentials = credentials
        self._margin_s = refresh_margin_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    def __repr__(self) -> str:
        client_id = self._credentials.client_id
        return f"TokenManager(token_url={self._token_url!r}, client_id={client_id!r})"

    async def _fetch(self) -> AccessToken:
        headers = {"Authorization": self._credentials.basic_auth(), "Accept": "application/json"}
        form = {"grant_type": "client_credentials"}
        try:
            async with self._session.post(
                self._token_url, data=form, headers=headers, timeout=self._timeout
            ) as resp:
                status, raw = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The exception text may echo the request; report only its type.
            raise ActionError(
                f"Genesys login failed: {type(exc).__name__}", retryable=True
            ) from None
        answer = _json_or_none(raw)
        if status != 200:
            raise _login_failure(status, answer)
        return parse_token_answer(
            answer, source="Genesys login", now_s=self._clock(), margin_s=self._margin_s
        )


# --- the client ------------------------------------------------------------------------


def body_size_bytes(req: PlannedRequest) -> int:
    """Return the size of the JSON body sent for this request."""
    return 0 if req.json_body is None else len(json.dumps(req.json_body).encode())


class GenesysClient(OperationClient):
    """Call Genesys Cloud operations by name with a cached token and the shared policy."""

    service = SERVICE
    operations = OPERATIONS_BY_NAME

    def __init__(
        self,
        session: aiohttp.ClientSession,
        api_url: str,
        login_url: str,
        client_id: str | None,
        client_secret: str | None,
        *,
        policy: RetryPolicy,
        per_minute: int,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        refresh_margin_s: float = 60.0,
    ) -> None:
        super().__init__(
            session,
            api_url,
            policy=policy,
            limiter=RateLimiter(per_minute, clock=clock),
            sleep=sleep,
        )
        # Without credentials only the guest operations can be called.
        self._tokens = (
            TokenManager(
                session,
                login_url,
                ClientCredentials(client_id, client_secret),
                refresh_margin_s=refresh_margin_s,
                timeout_s=policy.timeout_s,
                clock=clock,
            )
            if client_id and client_secret
            else None
        )

    def __repr__(self) -> str:
        return f"GenesysClient(api_url={self.base_url!r}, tokens={self._tokens!r})"

    def _check(self, op: Operation, req: PlannedRequest) -> None:
        if (size := body_size_bytes(req)) > MAX_BODY_BYTES:
            raise ActionError(
                f"{op.full_name}: request body is {size} bytes; Genesys accepts at most "
                f"{MAX_BODY_BYTES}",
                status=413,
            )
        if req.authorized and self._tokens is None:
            raise ServiceDisabled(
                f"{op.full_name}: Genesys needs GENESYS_CLIENT_ID and GENESYS_CLIENT_SECRET"
                " (only the guest operations are sent without them)"
            )

    async def _headers(self, req: PlannedRequest, sent: list[str]) -> Mapping[str, str]:
        if not req.authorized or self._tokens is None:
            # a guest call: the org's token is not sent (the SDK sends none either)
            return {"Accept": "application/json"}
        sent.append(await self._tokens.token())
        return {"Authorization": f"Bearer {sent[-1]}", "Accept": "application/json"}

    def _refreshes(self, req: PlannedRequest) -> bool:
        return req.authorized

    async def _refresh(self, sent: list[str]) -> bool:
        assert self._tokens is not None and sent
        await self._tokens.refresh(sent[-1])
        return True


# --- high-level actions ----------------------------------------------------------------

# Fields Genesys sets on a configuration version; the rest is the content a user edits.
_VERSION_META = frozenset(
    {
        "id",
        "version",
        "status",
        "dateCreated",
        "dateModified",
        "datePublished",
        "lastModifiedUser",
        "createdUser",
        "publishedUser",
        "selfUri",
    }
)


def same_content(draft: Mapping[str, Any], version: Mapping[str, Any]) -> bool:
    """Say whether a draft holds exactly the content of a published version."""
    return {k: v for k, v in draft.items() if k not in _VERSION_META} == {
        k: v for k, v in version.items() if k not in _VERSION_META
    }


def latest_version(listing: Any) -> Mapping[str, Any] | None:
    """Return the highest-numbered published version of a versions listing."""
    entities = listing.get("entities") if isinstance(listing, Mapping) else None
    numbered = [
        v for v in entities or [] if isinstance(v, Mapping) and str(v.get("version")).isdigit()
    ]
    return max(numbered, key=lambda v: int(v["version"]), default=None)


async def publish_configuration(client: ServiceClient, params: Mapping[str, Any]) -> dict[str, Any]:
    """Update the draft (if a body is given), publish it, and point a deployment at it.

    Safe to run again after a crash: a draft identical to the latest published version
    is not published a second time, and a deployment already on it is left alone.
    """
    check_params(PUBLISH_ACTION, PUBLISH_PARAMS, params)
    config = {"configuration_id": params["configuration_id"]}
    if params.get("body") is not None:
        draft = await client.call(
            "put_webdeployments_configuration_versions_draft",
            {**config, "configuration_version": params["body"]},
        )
    else:
        draft = await client.call("get_webdeployments_configuration_versions_draft", config)
    latest = latest_version(await client.call("get_webdeployments_configuration_versions", config))
    published = latest is None or not same_content(draft, latest)
    if published:
        latest = await client.call(
            "post_webdeployments_configuration_versions_draft_publish", config
        )
    assert latest is not None
    version = str(latest["version"])
    result: dict[str, Any] = {
        "configuration_id": str(params["configuration_id"]),
        "version": version,
        "published": published,
        "configuration": latest,
    }
    if deployment_id := params.get("deployment_id"):
        deployment = await client.call(
            "get_webdeployments_deployment", {"deployment_id": deployment_id}
        )
        target = {"id": latest["id"], "version": version}
        current = deployment.get("configuration") or {}
        if {"id": current.get("id"), "version": str(current.get("version"))} != target:
            deployment = await client.call(
                "put_webdeployments_deployment",
                {
                    "deployment_id": deployment_id,
                    "deployment": {**deployment, "configuration": target},
                },
            )
        result["deployment"] = deployment
    return result


async def _publish_action(
    client: ServiceClient, params: Mapping[str, Any], state: dict[str, Any] | None, _run: RunInfo
) -> ActionResult:
    # Every call is short, so the action finishes in one go; `state` is never needed.
    return Done(await publish_configuration(client, params))


ACTIONS: tuple[HighLevelAction, ...] = (
    HighLevelAction(SERVICE, "publish_configuration", PUBLISH_PARAMS, _publish_action),
)
