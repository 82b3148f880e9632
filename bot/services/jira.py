"""Jira dynamic webhooks adapter: operation table, auth (Connect JWT or OAuth) and client.

Operations are the five of Jira's WebhooksApi (`docs/reference/jira-webhooks-api.md`).
The only I/O is `http.send`; signing, token bookkeeping and answer parsing are pure.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp

from bot.core.apis.jira import ACTION_PARAMS, OPERATIONS_BY_NAME, SERVICE
from bot.core.backoff import RetryPolicy
from bot.core.catalog import PlannedRequest, dig, plan_request
from bot.core.verify import sign_connect
from bot.core.webhook_plan import AuthMode, RegisteredWebhook, SyncPlan, WebhookSpec
from bot.db.oauth_tokens import OAuthTokenStore, TokenState
from bot.errors import ActionError
from bot.services import http
from bot.services.actions import ActionResult, Done, HighLevelAction, RunInfo, Wait
from bot.services.adf import to_adf
from bot.services.http import OperationClient
from bot.services.tokens import AccessToken, BearerAuth, parse_token_answer

DEFAULT_POLICY = RetryPolicy()


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


def token_seed(refresh_token: str) -> str:
    """Which configured refresh token a stored (rotated) one descends from; a new
    JIRA_REFRESH_TOKEN (the app was consented again) then wins over the old chain."""
    return hashlib.sha256(refresh_token.encode()).hexdigest()[:16]


class SharedOAuthTokens:
    """The OAuth app's access token as every worker and replica shares it (the database).

    A caller takes the stored token while it is fresh; the first to find it due (or
    rejected with a 401) refreshes it while holding the row, and the others then find the
    new one there. The rotated refresh token is committed before the access token is
    handed out, so the next refresher (maybe after a restart) starts from it.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        store: OAuthTokenStore,
        token_url: str,
        client_id: str,
        client_secret: str,
        configured_refresh_token: str,
        *,
        initial_refresh_token: str | None = None,
        policy: RetryPolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
        margin_s: float = 60.0,
    ) -> None:
        self._session = session
        self._store = store
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._seed = token_seed(configured_refresh_token)
        # Where a chain starts when the table has none: the rotated token an older
        # version kept (kv), else the configured one.
        self._initial = initial_refresh_token or configured_refresh_token
        self._policy = policy
        self._clock = clock
        self._margin_s = margin_s
        self._cached: AccessToken | None = None
        self.grants = 0  # token calls made by this holder (tests, logs)

    def __repr__(self) -> str:
        return f"SharedOAuthTokens(token_url={self._token_url!r}, client_id={self._client_id!r})"

    def _usable(self, state: TokenState | None, rejected: str | None) -> AccessToken | None:
        if state is None or state.seed != self._seed or not state.access_token:
            return None
        if state.access_token == rejected or self._clock() * 1000 >= state.refresh_at_ms:
            return None
        return AccessToken(state.access_token, state.refresh_at_ms / 1000)

    async def token(self) -> str:
        """Return a usable access token: cached, stored by another holder, or refreshed."""
        cached = self._cached
        if cached is not None and self._clock() < cached.refresh_at_s:
            return cached.value
        found = self._usable(await self._store.current(), None)
        if found is not None:
            self._cached = found
            return found.value
        return await self.refresh(None)

    async def refresh(self, rejected: str | None) -> str:
        """Replace the token (`rejected` by the API, or due) unless another holder did."""
        async with self._store.exclusive() as slot:
            found = self._usable(slot.state, rejected)
            if found is not None:  # someone refreshed while we waited for the row
                self._cached = found
                return found.value
            state = slot.state if slot.state and slot.state.seed == self._seed else None
            refresh_token = state.refresh_token if state else self._initial
            answer = await self._grant(refresh_token)
            token = parse_token_answer(
                answer, source="Jira's token endpoint", now_s=self._clock(), margin_s=self._margin_s
            )
            rotated = answer.get("refresh_token")
            new = TokenState(
                self._seed,
                rotated if isinstance(rotated, str) and rotated else refresh_token,
                token.value,
                int(token.refresh_at_s * 1000),
                slot.next_generation,
            )
            if not await slot.save(new):
                # Only SQLite gets here: another process refreshed meanwhile, and the
                # token Jira just rotated is lost with its chain. Say so loudly.
                raise ActionError(
                    "the Jira OAuth token row changed during a refresh (another deploybot"
                    " process on this SQLite file?); run one process per SQLite file",
                    retryable=True,
                )
        self._cached = token
        return token.value

    async def _grant(self, refresh_token: str) -> dict[str, Any]:
        self.grants += 1
        return await refresh_token_grant(
            self._session,
            self._token_url,
            self._client_id,
            self._client_secret,
            refresh_token,
            policy=self._policy,
        )


async def refresh_token_grant(
    session: aiohttp.ClientSession,
    token_url: str,
    client_id: str,
    client_secret: str,
    refresh_token: str,
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> dict[str, Any]:
    """Ask Jira's token endpoint for an access token (and the rotated refresh token)."""
    body = {
        "grant_type": "refresh_token",
        "client_id": client_id,
        "client_secret": client_secret,
        "refresh_token": refresh_token,
    }
    try:
        answer = (
            await http.send(
                session,
                PlannedRequest("POST", "", json_body=body),
                base_url=token_url,
                headers={},
                limiter=None,
                policy=policy,
            )
        ).json
    except ActionError as exc:
        if exc.status in (400, 401, 403):
            raise ActionError(
                f"Jira's token endpoint refused the stored refresh token ({exc}); consent"
                " the OAuth app again and set JIRA_REFRESH_TOKEN to the new token",
                status=exc.status,
            ) from None
        raise
    if not isinstance(answer, dict):
        raise ActionError("Jira's token endpoint answered without a JSON object", retryable=True)
    return answer


# --- client ----------------------------------------------------------------------------


class JiraClient(OperationClient):
    """Typed client of Jira's REST API for one tenant (Connect) or app (OAuth)."""

    service = SERVICE
    operations = OPERATIONS_BY_NAME

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        auth: ConnectAuth | BearerAuth,
        *,
        policy: RetryPolicy = DEFAULT_POLICY,
        limiter: http.RateLimiter | None = None,
        sleep: http.Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(session, base_url, policy=policy, limiter=limiter, sleep=sleep, rng=rng)
        self._auth = auth
        self._clock = clock

    @property
    def mode(self) -> AuthMode:
        return "connect" if isinstance(self._auth, ConnectAuth) else "oauth"

    async def _headers(self, req: PlannedRequest, sent: list[str]) -> Mapping[str, str]:
        if isinstance(self._auth, ConnectAuth):
            return self._auth.header(req, self._clock())
        sent.append(await self._auth.token())
        return {"Authorization": f"Bearer {sent[-1]}"}

    def _refreshes(self, req: PlannedRequest) -> bool:
        # A Connect 401 is a wrong secret or clock: signing again would not help.
        return not isinstance(self._auth, ConnectAuth)

    async def _refresh(self, sent: list[str]) -> bool:
        assert not isinstance(self._auth, ConnectAuth)
        await self._auth.refresh(sent[-1] if sent else None)
        return True

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


# --- issue actions (jira.add_comment, ...) ---------------------------------------------

_ISSUE_KEY = re.compile(r"(?i)^(?:[a-z][a-z0-9_]*-[1-9][0-9]*|[1-9][0-9]*)$")
# A comment property carries the run's marker: invisible to readers, returned with
# `expand=properties`, so a comment whose answer was lost is found before posting again.
MARKER_PROPERTY = "deploybot.run"
COMMENT_PAGE = 100
COMMENT_PAGES_SEARCHED = 10  # the newest 1,000 comments: a lost answer is recent
SEARCH_PAGE = 100
SEARCH_DEFAULT_MAX = 1000


def _issue(params: Mapping[str, Any], action: str) -> str:
    """The issue key or id; anything else (a path segment, `..`) is refused."""
    value = params.get("issue")
    text = (
        str(value).strip() if isinstance(value, str | int) and not isinstance(value, bool) else ""
    )
    if not _ISSUE_KEY.match(text):
        raise ActionError(f"jira.{action}: {value!r} is not an issue key (like OPS-12) or id")
    return text


def _jira(client: Any, action: str) -> JiraClient:
    if not isinstance(client, JiraClient):
        raise ActionError(f"jira.{action} needs a Jira client")
    return client


def _names(value: Any, param: str, action: str) -> str | None:
    """A list of field names (or one comma-separated string) as Jira's query value."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    raise ActionError(f"jira.{action}: {param} must be a list of names or a comma-separated text")


def _no_nul(value: Any) -> Any:
    """Jira's values as a step result: PostgreSQL refuses a NUL in stored text."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    if isinstance(value, dict):
        return {_no_nul(k): _no_nul(v) for k, v in value.items()}
    return value


def marker(key: str) -> str:
    """The marker of one action run (its idempotency key, hashed: keys hold rule names)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def comment_body(params: Mapping[str, Any], action: str) -> dict[str, Any]:
    """The ADF document of `body` (plain text / light Markdown) or `adf` (one of them)."""
    body, doc = params.get("body"), params.get("adf")
    if (body is None) == (doc is None):
        raise ActionError(f"jira.{action}: give exactly one of body (text) or adf (a document)")
    if doc is not None:
        if not isinstance(doc, Mapping) or doc.get("type") != "doc":
            raise ActionError(f'jira.{action}: adf must be a document ({{"type": "doc", ...}})')
        return dict(doc)
    return to_adf(str(body))


async def _find_marked(jira: JiraClient, issue: str, mark: str) -> dict[str, Any] | None:
    """Look for the comment carrying this run's marker among the newest comments."""
    start = 0
    for _ in range(COMMENT_PAGES_SEARCHED):
        query = (
            ("startAt", str(start)),
            ("maxResults", str(COMMENT_PAGE)),
            ("orderBy", "-created"),
            ("expand", "properties"),
        )
        page = (
            await jira.send(PlannedRequest("GET", f"/rest/api/3/issue/{issue}/comment", query))
        ).json
        comments = page.get("comments") if isinstance(page, Mapping) else None
        if not isinstance(comments, list):
            raise ActionError(f"Jira's comment list of {issue} has no comments")
        for comment in comments:
            for prop in (comment.get("properties") or []) if isinstance(comment, dict) else []:
                value = prop.get("value") if isinstance(prop, Mapping) else None
                if (
                    prop.get("key") == MARKER_PROPERTY
                    and isinstance(value, Mapping)
                    and value.get("marker") == mark
                ):
                    return dict(comment)
        start += len(comments)
        if not comments or start >= int(page.get("total", start)):
            return None
    return None


def _comment_result(issue: str, comment: Mapping[str, Any], existing: bool) -> dict[str, Any]:
    return {
        "issue": issue,
        "id": str(comment.get("id", "")),
        "self": comment.get("self"),
        "created": comment.get("created"),
        "existing": existing,  # found by its marker rather than posted by this attempt
    }


async def add_comment(
    client: Any, params: Mapping[str, Any], _state: dict[str, Any] | None, run: RunInfo
) -> ActionResult:
    """Comment on an issue, once per run: look for the run's marker before posting again."""
    jira, issue = _jira(client, "add_comment"), _issue(params, "add_comment")
    payload: dict[str, Any] = {"body": comment_body(params, "add_comment")}
    if params.get("visibility") is not None:
        payload["visibility"] = params["visibility"]
    mark = marker(run.key) if run.key else None
    if mark is not None:
        payload["properties"] = [{"key": MARKER_PROPERTY, "value": {"marker": mark}}]
        if run.lookup_first:
            found = await _find_marked(jira, issue, mark)
            if found is not None:
                return Done(_no_nul(_comment_result(issue, found, True)))
    req = PlannedRequest("POST", f"/rest/api/3/issue/{issue}/comment", json_body=payload)
    try:
        answer = (await jira.send(req)).json
    except ActionError as exc:
        if mark is None or not exc.retryable:
            raise
        # No answer: the comment may be there. Look; if the look fails too, the POST's
        # failure is the one reported, and the retry looks first.
        try:
            found = await _find_marked(jira, issue, mark)
        except ActionError:
            raise exc from None
        if found is None:
            raise
        return Done(_no_nul(_comment_result(issue, found, True)))
    return Done(
        _no_nul(_comment_result(issue, answer if isinstance(answer, Mapping) else {}, False))
    )


async def _status(jira: JiraClient, issue: str) -> str | None:
    answer = (
        await jira.send(
            PlannedRequest("GET", f"/rest/api/3/issue/{issue}", (("fields", "status"),))
        )
    ).json
    status = dig(answer, "fields.status.name") if isinstance(answer, Mapping) else None
    return str(status) if status is not None else None


def _transition_body(params: Mapping[str, Any], transition_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {"transition": {"id": transition_id}}
    if params.get("fields") is not None:
        body["fields"] = params["fields"]
    update = dict(params.get("update") or {})
    if params.get("comment") is not None:
        comment = params["comment"]
        doc = dict(comment) if isinstance(comment, Mapping) else to_adf(str(comment))
        update["comment"] = [*update.get("comment", []), {"add": {"body": doc}}]
    if update:
        body["update"] = update
    return body


async def transition_issue(
    client: Any, params: Mapping[str, Any], state: dict[str, Any] | None, run: RunInfo
) -> ActionResult:
    """Move an issue through the transition named (or numbered); already there is done.

    Two calls of the runner: the first resolves the transition and keeps its target status
    in the run's state; the second moves the issue. A retry after a lost answer then knows
    where the issue was going, even though that transition is no longer offered.
    """
    jira, issue = _jira(client, "transition_issue"), _issue(params, "transition_issue")
    wanted = str(params.get("transition", "")).strip()
    if not wanted:
        raise ActionError("jira.transition_issue: transition is empty")
    path = f"/rest/api/3/issue/{issue}/transitions"
    if state is None or "id" not in state:
        answer = (await jira.send(PlannedRequest("GET", path))).json
        available = answer.get("transitions") if isinstance(answer, Mapping) else None
        if not isinstance(available, list):
            raise ActionError(f"Jira's transitions of {issue} have no transitions list")
        chosen = next((t for t in available if str(t.get("id")) == wanted), None) or next(
            (t for t in available if str(t.get("name", "")).casefold() == wanted.casefold()),
            None,
        )
        if chosen is not None:
            resolved = {"id": str(chosen.get("id")), "name": str(chosen.get("name"))}
            return Wait(0.0, {**resolved, "to": str(dig(chosen, "to.name") or "")})
        status = await _status(jira, issue)
        if status is not None and wanted.casefold() == status.casefold():
            return Done({"issue": issue, "status": status, "transition": None, "already": True})
        names = ", ".join(f"{t.get('name')} ({t.get('id')})" for t in available) or "none"
        raise ActionError(
            f"jira.transition_issue: {issue} (status {status or 'unknown'}) has no transition"
            f" {wanted!r}; available: {names}"
        )
    transition = {"id": str(state["id"]), "name": state.get("name")}
    target = str(state.get("to") or "")
    if run.lookup_first and target:
        status = await _status(jira, issue)
        if status is not None and status.casefold() == target.casefold():
            return Done(
                {"issue": issue, "status": status, "transition": transition, "already": True}
            )
    await jira.send(
        PlannedRequest("POST", path, json_body=_transition_body(params, str(state["id"])))
    )
    return Done(
        _no_nul({"issue": issue, "transition": transition, "status": target, "already": False})
    )


async def edit_issue(
    client: Any, params: Mapping[str, Any], _state: dict[str, Any] | None, _run: RunInfo
) -> ActionResult:
    """Set fields (`fields`) or apply operations (`update`) on an issue (a PUT: repeatable)."""
    jira, issue = _jira(client, "edit_issue"), _issue(params, "edit_issue")
    body = {k: params[k] for k in ("fields", "update") if params.get(k) is not None}
    if not body:
        raise ActionError("jira.edit_issue: give fields or update")
    query = (
        ()
        if params.get("notify_users") is None
        else (("notifyUsers", "true" if params["notify_users"] else "false"),)
    )
    await jira.send(PlannedRequest("PUT", f"/rest/api/3/issue/{issue}", query, json_body=body))
    return Done({"issue": issue, "edited": sorted(body.get("fields", {}) or {})})


async def get_issue(
    client: Any, params: Mapping[str, Any], _state: dict[str, Any] | None, _run: RunInfo
) -> ActionResult:
    """Read an issue (optionally only some fields, with `expand`)."""
    jira, issue = _jira(client, "get_issue"), _issue(params, "get_issue")
    query = tuple(
        (wire, value)
        for wire, value in (
            ("fields", _names(params.get("fields"), "fields", "get_issue")),
            ("expand", _names(params.get("expand"), "expand", "get_issue")),
        )
        if value is not None
    )
    answer = (await jira.send(PlannedRequest("GET", f"/rest/api/3/issue/{issue}", query))).json
    return Done(_no_nul(answer))


async def search_issues(
    client: Any, params: Mapping[str, Any], _state: dict[str, Any] | None, _run: RunInfo
) -> ActionResult:
    """Every issue the JQL finds, following `nextPageToken`, up to `max_results`."""
    jira = _jira(client, "search_issues")
    jql = params.get("jql")
    if not isinstance(jql, str) or not jql.strip():
        raise ActionError("jira.search_issues: jql is empty")
    limit = params.get("max_results", SEARCH_DEFAULT_MAX)
    if isinstance(limit, str) and limit.isdigit():
        limit = int(limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ActionError("jira.search_issues: max_results must be a positive number")
    fields = _names(params.get("fields"), "fields", "search_issues")
    issues: list[Any] = []
    token: str | None = None
    while len(issues) < limit:
        query = [("jql", jql), ("maxResults", str(min(SEARCH_PAGE, limit - len(issues))))]
        if fields is not None:
            query.append(("fields", fields))
        if token:
            query.append(("nextPageToken", token))
        page = (await jira.send(PlannedRequest("GET", "/rest/api/3/search/jql", tuple(query)))).json
        found = page.get("issues") if isinstance(page, Mapping) else None
        if not isinstance(found, list):
            raise ActionError("Jira's search answer has no issues")
        issues.extend(found[: limit - len(issues)])
        token = page.get("nextPageToken")
        if not token or page.get("isLast") or not found:
            break
    complete = not token or len(issues) < limit
    return Done(_no_nul({"issues": issues, "count": len(issues), "complete": bool(complete)}))


# --- what the dry run shows: each action's main call ---


def _preview_comment(params: Mapping[str, Any]) -> PlannedRequest:
    issue = _issue(params, "add_comment")
    body = {
        "body": comment_body(params, "add_comment"),
        "properties": [{"key": MARKER_PROPERTY, "value": {"marker": "<this run's marker>"}}],
    }
    return PlannedRequest("POST", f"/rest/api/3/issue/{issue}/comment", json_body=body)


def _preview_transition(params: Mapping[str, Any]) -> PlannedRequest:
    issue = _issue(params, "transition_issue")
    wanted = str(params.get("transition", "")).strip()
    body = _transition_body(params, f"<the id of {wanted!r}, from GET .../transitions>")
    return PlannedRequest("POST", f"/rest/api/3/issue/{issue}/transitions", json_body=body)


def _preview_edit(params: Mapping[str, Any]) -> PlannedRequest:
    issue = _issue(params, "edit_issue")
    body = {k: params[k] for k in ("fields", "update") if params.get(k) is not None}
    return PlannedRequest("PUT", f"/rest/api/3/issue/{issue}", json_body=body)


def _preview_get(params: Mapping[str, Any]) -> PlannedRequest:
    issue = _issue(params, "get_issue")
    query = tuple(
        (wire, value)
        for wire in ("fields", "expand")
        if (value := _names(params.get(wire), wire, "get_issue")) is not None
    )
    return PlannedRequest("GET", f"/rest/api/3/issue/{issue}", query)


def _preview_search(params: Mapping[str, Any]) -> PlannedRequest:
    query = [("jql", str(params.get("jql", ""))), ("maxResults", str(SEARCH_PAGE))]
    fields = _names(params.get("fields"), "fields", "search_issues")
    if fields is not None:
        query.append(("fields", fields))
    return PlannedRequest("GET", "/rest/api/3/search/jql", tuple(query))


# Params are named as the rule writes them; `fields` and `expand` take a list or a text.
ACTIONS: tuple[HighLevelAction, ...] = (
    HighLevelAction(
        SERVICE, "add_comment", ACTION_PARAMS["add_comment"], add_comment, _preview_comment
    ),
    HighLevelAction(
        SERVICE,
        "transition_issue",
        ACTION_PARAMS["transition_issue"],
        transition_issue,
        _preview_transition,
    ),
    HighLevelAction(SERVICE, "edit_issue", ACTION_PARAMS["edit_issue"], edit_issue, _preview_edit),
    HighLevelAction(SERVICE, "get_issue", ACTION_PARAMS["get_issue"], get_issue, _preview_get),
    HighLevelAction(
        SERVICE, "search_issues", ACTION_PARAMS["search_issues"], search_issues, _preview_search
    ),
)
