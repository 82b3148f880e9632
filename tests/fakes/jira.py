"""A fake Jira Cloud for the dynamic webhooks API, in memory, on a real aiohttp server.

It checks what Jira checks, independently of deploybot's code: the Connect JWT and the
`qsh` of every request (via the `atlassian_jwt` package), OAuth bearer tokens, the JQL
subset webhooks accept, the per-app limits; webhooks expire 30 days after creation or
refresh by `fake.now` (epoch seconds, set by tests). It records every request, serves the
OAuth refresh-token grant with rotating refresh tokens, and delivers signed events.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import jwt
from aiohttp import web
from atlassian_jwt.url_utils import hash_url

from tests.fakes.base import RecordedRequest, recorded

Mode = Literal["connect", "oauth"]

REST = "/rest/api/3/webhook"
TOKEN_PATH = "/oauth/token"
LIFETIME_S = 30 * 24 * 3600
FAILED_KEPT_S = 72 * 3600
LIMITS: dict[Mode, int] = {"connect": 100, "oauth": 5}
ACCESS_TOKEN_TTL_S = 3600

# Jira's webhook JQL subset: these fields, the operators = != IN NOT IN, AND/OR, brackets;
# of custom fields only the epic label field (its id is the site's: this fake's is 10011).
EPIC_LABEL_FIELD_ID = "10011"
JQL_FIELD = re.compile(
    rf"(?i)(issueKey|project|issuetype|status|assignee|reporter|cf\[{EPIC_LABEL_FIELD_ID}\]|issue\.property\[[\w.-]+\](?:\.[\w.]+)*)$"
)
JQL_TOKEN = re.compile(
    r'\s*(?:(\()|(\))|(,)|(!=|=)|"((?:[^"\\]|\\.)*)"|\'([^\']*)\'|([^\s(),=!"\']+))'
)


def _jql_tokens(jql: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    jql = jql.strip()
    while pos < len(jql):
        match = JQL_TOKEN.match(jql, pos)
        if match is None:
            raise ValueError(f"cannot read JQL at {jql[pos:]!r}")
        quoted = match.group(5) if match.group(5) is not None else match.group(6)
        tokens.append("'v" if quoted is not None else next(g for g in match.groups() if g))
        pos = match.end()
    return tokens


def jql_error(jql: str) -> str | None:
    """Return why Jira would refuse this webhook JQL filter, or None (Jira's side of it)."""
    try:
        tokens = _jql_tokens(jql)
    except ValueError as exc:
        return str(exc)
    if not tokens:
        return "JQL filter is empty"
    pos = 0

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise ValueError("JQL ends too early")
        pos += 1
        return tokens[pos - 1]

    def peek_word(*words: str) -> bool:
        return pos < len(tokens) and tokens[pos].upper() in words

    def value() -> None:
        token = take()
        if token in ("(", ")", ",", "=", "!="):
            raise ValueError(f"expected a value, got {token!r}")

    def clause() -> None:
        if peek_word("("):
            take()
            expression()
            if take() != ")":
                raise ValueError("missing )")
            return
        name = take()
        if not JQL_FIELD.match(name):
            raise ValueError(f"field {name!r} is not supported in webhook JQL")
        op = take().upper()
        if op == "NOT":
            op += " " + take().upper()
        if op in ("=", "!="):
            value()
        elif op in ("IN", "NOT IN"):
            if take() != "(":
                raise ValueError(f"{op} needs a list")
            value()
            while peek_word(","):
                take()
                value()
            if take() != ")":
                raise ValueError("missing ) after list")
        else:
            raise ValueError(f"operator {op!r} is not supported in webhook JQL")

    def expression() -> None:
        clause()
        while peek_word("AND", "OR"):
            take()
            clause()

    try:
        expression()
        if pos != len(tokens):
            raise ValueError(f"unexpected {tokens[pos]!r}")
    except ValueError as exc:
        return f"Invalid JQL: {exc}"
    return None


@dataclass
class FakeWebhook:
    """A webhook held by the fake."""

    id: int
    events: list[str]
    jql: str
    fields: list[str] | None
    url: str
    expires_at: float
    property_keys: list[str] | None = None


@dataclass
class FakeFailure:
    """A delivery Jira gave up on."""

    id: str
    body: str
    url: str
    failure_time_ms: int


@dataclass
class FakeIssue:
    """An issue held by the fake: fields, comments (with properties) and its workflow."""

    key: str
    id: str
    fields: dict[str, Any]
    comments: list[dict[str, Any]] = field(default_factory=list)
    # status name -> transitions available from it: (id, name, target status)
    workflow: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    # changelog entries, oldest first, as GET .../changelog answers them
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.fields["status"]["name"])


DEFAULT_WORKFLOW: dict[str, list[tuple[str, str, str]]] = {
    "Ready to deploy": [("21", "Start deploy", "Deploying"), ("31", "Deploy failed", "Failed")],
    "Deploying": [("41", "Done", "Done"), ("31", "Deploy failed", "Failed")],
    "Failed": [("51", "Reopen", "Ready to deploy")],
    "Done": [],
}


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _iso(seconds: float) -> str:
    """Jira's ISO form: milliseconds and a colon-less offset."""
    stamp = datetime.fromtimestamp(seconds, UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}+0000"


def _epoch(value: Any) -> float:
    """Seconds of Jira's ISO time (-inf when absent)."""
    if not isinstance(value, str):
        return float("-inf")
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def _error(status: int, *messages: str) -> web.Response:
    return web.json_response({"errorMessages": list(messages), "errors": {}}, status=status)


@dataclass
class FakeJira:
    """In-memory Jira Cloud serving the dynamic webhooks API in one auth mode."""

    mode: Mode = "connect"
    base_path: str = "/jira"  # tenant base URL path: qsh is computed relative to it
    app_key: str = "io.deploybot"
    client_key: str = "jira:tenant-1"
    shared_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    client_id: str = "oauth-client"
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    refresh_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    # Starts at the wall clock: deploybot's verifier also checks `exp` against it.
    now: float = field(default_factory=lambda: float(int(time.time())))
    expiration_format: Literal["epoch_ms", "iso"] = "epoch_ms"
    page_size_cap: int = 100
    webhooks: dict[int, FakeWebhook] = field(default_factory=dict)
    failures: list[FakeFailure] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    access_tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry
    token_grants: int = 0
    refused_grants: int = 0  # grants with a spent (or unknown) refresh token: invalid_grant
    issues: dict[str, FakeIssue] = field(default_factory=dict)
    lose_comment_answers: int = 0  # comments stored whose answer is then lost (a 502)
    search_page_cap: int = 100
    changelog_page_cap: int = 100
    origin: str = ""
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(10000))
    _runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """Build the aiohttp app (routes under `base_path`, token endpoint at the root)."""
        app = web.Application(middlewares=[self._record_and_auth])
        base = self.base_path
        app.router.add_post(base + REST, self._register)
        app.router.add_get(base + REST, self._list)
        app.router.add_delete(base + REST, self._delete)
        app.router.add_put(base + REST + "/refresh", self._refresh)
        app.router.add_get(base + REST + "/failed", self._failed)
        app.router.add_post(TOKEN_PATH, self._token)
        issue = base + "/rest/api/3/issue/{key}"
        app.router.add_get(issue, self._get_issue)
        app.router.add_put(issue, self._edit_issue)
        app.router.add_get(issue + "/comment", self._comments)
        app.router.add_post(issue + "/comment", self._add_comment)
        app.router.add_get(issue + "/transitions", self._transitions)
        app.router.add_post(issue + "/transitions", self._transition)
        app.router.add_get(base + "/rest/api/3/search/jql", self._search)
        app.router.add_get(issue + "/changelog", self._changelog)
        return app

    async def start(self) -> str:
        """Serve on 127.0.0.1 on a free port; return the tenant base URL."""
        self._runner = web.AppRunner(self.make_app())
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.origin = f"http://127.0.0.1:{port}"
        return self.base_url

    async def close(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return self.origin + self.base_path

    @property
    def token_url(self) -> str:
        return self.origin + TOKEN_PATH

    # -- test controls -----------------------------------------------------------------

    def live(self) -> list[FakeWebhook]:
        """Drop expired webhooks (Jira forgets them) and return the rest, oldest first."""
        for hook in [h for h in self.webhooks.values() if h.expires_at <= self.now]:
            del self.webhooks[hook.id]
        return sorted(self.webhooks.values(), key=lambda h: h.id)

    def drop_webhook(self, webhook_id: int) -> None:
        """Delete a webhook on Jira's side (an admin, or Jira itself)."""
        self.webhooks.pop(webhook_id, None)

    def add_failure(
        self, body: str, url: str, *, failure_time_ms: int | None = None, id: str | None = None
    ) -> FakeFailure:
        """Record a delivery that failed after Jira's last retry."""
        failure = FakeFailure(id or str(uuid.uuid4()), body, url, failure_time_ms or _ms(self.now))
        self.failures.append(failure)
        return failure

    def revoke_access_tokens(self) -> None:
        """Invalidate every access token (the next call answers 401)."""
        self.access_tokens.clear()

    def add_issue(
        self, key: str, *, status: str = "Ready to deploy", fields: dict[str, Any] | None = None
    ) -> FakeIssue:
        """Create an issue (with the default deployment workflow)."""
        issue = FakeIssue(
            key,
            str(10000 + len(self.issues)),
            {
                "summary": f"Deploy {key}",
                "status": {"name": status},
                "project": {"key": key.split("-")[0]},
            }
            | (fields or {}),
            workflow={k: list(v) for k, v in DEFAULT_WORKFLOW.items()},
        )
        self.issues[key] = issue
        return issue

    def issue_requests(self) -> list[RecordedRequest]:
        """Return the recorded issue and search calls."""
        return [
            r
            for r in self.requests
            if r.path.startswith(("/rest/api/3/issue", "/rest/api/3/search"))
        ]

    def api_requests(self) -> list[RecordedRequest]:
        """Return the recorded REST calls (not the token endpoint)."""
        return [r for r in self.requests if r.path.startswith(REST)]

    # -- auth --------------------------------------------------------------------------

    def _relative(self, raw_path_qs: str) -> str:
        return raw_path_qs[len(self.base_path) :] if self.base_path else raw_path_qs

    def _auth_error(self, request: web.Request) -> str | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if self.mode == "oauth":
            expiry = self.access_tokens.get(token) if scheme == "Bearer" else None
            return None if expiry is not None and expiry > self.now else "bad bearer token"
        if scheme != "JWT":
            return "expected Authorization: JWT"
        try:
            claims = jwt.decode(
                token,
                self.shared_secret,
                algorithms=["HS256"],
                options={"verify_exp": False, "verify_iat": False, "require": ["exp", "iss"]},
            )
        except jwt.PyJWTError as exc:
            return f"bad JWT: {exc}"
        if claims["iss"] != self.app_key:
            return f"iss {claims['iss']!r} is not the app key"
        if float(claims["exp"]) < self.now:
            return "JWT expired"
        expected = hash_url(request.method, self._relative(request.raw_path))
        if claims.get("qsh") != expected:
            return f"qsh mismatch: got {claims.get('qsh')!r}, want {expected!r}"
        return None

    @web.middleware
    async def _record_and_auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = self._relative(request.path) if request.path != TOKEN_PATH else TOKEN_PATH
        record = await recorded(request, path)
        self.requests.append(record)
        if request.path != TOKEN_PATH:
            record.auth_error = self._auth_error(request)
        response = _error(401, record.auth_error) if record.auth_error else await handler(request)
        record.status = response.status
        return response

    async def _token(self, request: web.Request) -> web.Response:
        body = await request.json()
        if (body.get("client_id"), body.get("client_secret")) != (
            self.client_id,
            self.client_secret,
        ):
            return web.json_response({"error": "access_denied"}, status=401)
        if body.get("grant_type") != "refresh_token" or body.get("refresh_token") != (
            self.refresh_token
        ):
            self.refused_grants += 1
            return web.json_response(
                {
                    "error": "invalid_grant",
                    "error_description": "Unknown or invalid refresh token.",
                },
                status=403,
            )
        # Rotating refresh tokens: the one just used is spent, a new one is issued.
        self.refresh_token = secrets.token_urlsafe(16)
        access = secrets.token_urlsafe(24)
        self.access_tokens[access] = self.now + ACCESS_TOKEN_TTL_S
        self.token_grants += 1
        return web.json_response(
            {
                "access_token": access,
                "refresh_token": self.refresh_token,
                "expires_in": ACCESS_TOKEN_TTL_S,
                "token_type": "Bearer",
                "scope": "read:jira-work manage:jira-webhook offline_access",
            }
        )

    # -- the five operations -----------------------------------------------------------

    async def _ids_body(self, request: web.Request) -> list[int] | None:
        try:
            ids = (await request.json()).get("webhookIds")
        except ValueError:
            return None
        return ids if isinstance(ids, list) and ids else None

    async def _register(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "body is not JSON")
        url, entries = body.get("url"), body.get("webhooks")
        if not isinstance(url, str) or not isinstance(entries, list):
            return _error(400, "url and webhooks are required")
        live = self.live()
        if any(h.url != url for h in live):
            return _error(400, "an app can register webhooks for one URL only")
        results: list[dict[str, Any]] = []
        count = len(live)
        for entry in entries:
            events, jql = entry.get("events"), entry.get("jqlFilter", "")
            problem = (
                "events are required"
                if not events
                else jql_error(jql)
                or ("webhook limit reached" if count >= LIMITS[self.mode] else None)
            )
            if problem:
                results.append({"errors": [problem]})
                continue
            hook = FakeWebhook(
                next(self._ids),
                list(events),
                jql,
                entry.get("fieldIdsFilter"),
                url,
                self.now + LIFETIME_S,
                entry.get("issuePropertyKeysFilter"),
            )
            self.webhooks[hook.id] = hook
            count += 1
            results.append({"createdWebhookId": hook.id})
        return web.json_response({"webhookRegistrationResult": results})

    async def _list(self, request: web.Request) -> web.Response:
        start = int(request.query.get("startAt", 0))
        size = min(int(request.query.get("maxResults", 100)), self.page_size_cap)
        live = self.live()
        page = live[start : start + size]
        values = [
            {
                "id": h.id,
                "events": h.events,
                "jqlFilter": h.jql,
                "expirationDate": _ms(h.expires_at),
            }
            | ({"fieldIdsFilter": h.fields} if h.fields is not None else {})
            | ({"issuePropertyKeysFilter": h.property_keys} if h.property_keys is not None else {})
            for h in page
        ]
        return web.json_response(
            {
                "startAt": start,
                "maxResults": size,
                "total": len(live),
                "isLast": start + size >= len(live),
                "values": values,
            }
        )

    async def _delete(self, request: web.Request) -> web.Response:
        ids = await self._ids_body(request)
        if ids is None:
            return _error(400, "webhookIds is required")
        for webhook_id in ids:
            self.webhooks.pop(webhook_id, None)
        return web.Response(status=202)

    async def _refresh(self, request: web.Request) -> web.Response:
        ids = await self._ids_body(request)
        if ids is None:
            return _error(400, "webhookIds is required")
        expires_at = self.now + LIFETIME_S
        live = {h.id: h for h in self.live()}
        for webhook_id in ids:  # unknown ids are ignored, as Jira does
            if webhook_id in live:
                live[webhook_id].expires_at = expires_at
        stamp: int | str = (
            _ms(expires_at) if self.expiration_format == "epoch_ms" else _iso(expires_at)
        )
        return web.json_response({"expirationDate": stamp})

    async def _failed(self, request: web.Request) -> web.Response:
        if self.mode != "connect":
            return _error(403, "Only Connect apps can use this operation.")
        size = min(int(request.query.get("maxResults", 100)), self.page_size_cap)
        after = max(int(request.query.get("after", 0)), _ms(self.now - FAILED_KEPT_S))
        pending = sorted(
            (f for f in self.failures if f.failure_time_ms > after), key=lambda f: f.failure_time_ms
        )
        page = pending[:size]
        # Jira ignores maxResults rather than split failures with the same time across pages.
        while (
            page
            and len(page) < len(pending)
            and pending[len(page)].failure_time_ms == page[-1].failure_time_ms
        ):
            page.append(pending[len(page)])
        answer: dict[str, Any] = {
            "maxResults": size,
            "values": [
                {"id": f.id, "body": f.body, "url": f.url, "failureTime": f.failure_time_ms}
                for f in page
            ],
        }
        if len(page) < len(pending):
            last = page[-1].failure_time_ms
            answer["next"] = f"{self.base_url}{REST}/failed?after={last}&maxResults={size}"
        return web.json_response(answer)

    # -- issues ------------------------------------------------------------------------

    def _find(self, request: web.Request) -> FakeIssue | None:
        key = request.match_info["key"]
        return self.issues.get(key) or next((i for i in self.issues.values() if i.id == key), None)

    def _issue_json(self, issue: FakeIssue, fields: str | None) -> dict[str, Any]:
        wanted = None if fields in (None, "", "*all", "*navigable") else set(fields.split(","))
        shown = {k: v for k, v in issue.fields.items() if wanted is None or k in wanted}
        return {
            "id": issue.id,
            "key": issue.key,
            "self": f"{self.base_url}/rest/api/3/issue/{issue.id}",
            "fields": shown,
        }

    async def _get_issue(self, request: web.Request) -> web.Response:
        issue = self._find(request)
        if issue is None:
            return _error(404, "Issue does not exist or you do not have permission to see it.")
        answer = self._issue_json(issue, request.query.get("fields"))
        if "expand" in request.query:
            answer["expand"] = request.query["expand"]
        return web.json_response(answer)

    async def _edit_issue(self, request: web.Request) -> web.Response:
        issue = self._find(request)
        if issue is None:
            return _error(404, "Issue does not exist or you do not have permission to see it.")
        body = await request.json()
        for name, value in (body.get("fields") or {}).items():
            if name == "status":
                return _error(
                    400, "Field 'status' cannot be set. It is not on the appropriate screen."
                )
            issue.fields[name] = value
        for name, operations in (body.get("update") or {}).items():
            for operation in operations:
                if "add" in operation:
                    issue.fields.setdefault(name, []).append(operation["add"])
                elif "remove" in operation:
                    issue.fields[name] = [
                        v for v in issue.fields.get(name, []) if v != operation["remove"]
                    ]
                elif "set" in operation:
                    issue.fields[name] = operation["set"]
        return web.Response(status=204)

    def _store_comment(self, issue: FakeIssue, body: dict[str, Any]) -> dict[str, Any]:
        doc = body.get("body")
        if not isinstance(doc, dict) or doc.get("type") != "doc" or doc.get("version") != 1:
            raise web.HTTPBadRequest(
                text=json.dumps({"errorMessages": ["Comment body is not valid!"]}),
                content_type="application/json",
            )
        comment = {
            "id": str(next(self._ids)),
            "self": f"{self.base_url}/rest/api/3/issue/{issue.id}/comment/{len(issue.comments)}",
            "body": doc,
            "created": _iso(self.now),
            "properties": list(body.get("properties") or []),
        }
        issue.comments.append(comment)
        return comment

    async def _add_comment(self, request: web.Request) -> web.Response:
        issue = self._find(request)
        if issue is None:
            return _error(404, "Issue does not exist or you do not have permission to see it.")
        comment = self._store_comment(issue, await request.json())
        if self.lose_comment_answers > 0:
            self.lose_comment_answers -= 1
            return _error(502, "Bad Gateway")  # stored, but deploybot never hears of it
        return web.json_response(
            {k: v for k, v in comment.items() if k != "properties"}, status=201
        )

    async def _comments(self, request: web.Request) -> web.Response:
        issue = self._find(request)
        if issue is None:
            return _error(404, "Issue does not exist or you do not have permission to see it.")
        start = int(request.query.get("startAt", 0))
        size = min(int(request.query.get("maxResults", 50)), 100)
        ordered = list(issue.comments)
        if request.query.get("orderBy") == "-created":
            ordered.reverse()
        expand = "properties" in request.query.get("expand", "").split(",")
        page = [
            c if expand else {k: v for k, v in c.items() if k != "properties"}
            for c in ordered[start : start + size]
        ]
        return web.json_response(
            {"startAt": start, "maxResults": size, "total": len(ordered), "comments": page}
        )

    async def _transitions(self, request: web.Request) -> web.Response:
        issue = self._find(request)
        if issue is None:
            return _error(404, "Issue does not exist or you do not have permission to see it.")
        return web.json_response(
            {
                "expand": "transitions",
                "transitions": [
                    {"id": tid, "name": name, "to": {"name": to, "id": str(abs(hash(to)) % 1000)}}
                    for tid, name, to in issue.workflow.get(issue.status, [])
                ],
            }
        )

    async def _transition(self, request: web.Request) -> web.Response:
        issue = self._find(request)
        if issue is None:
            return _error(404, "Issue does not exist or you do not have permission to see it.")
        body = await request.json()
        wanted = str((body.get("transition") or {}).get("id"))
        found = next((t for t in issue.workflow.get(issue.status, []) if t[0] == wanted), None)
        if found is None:
            return _error(400, f"Transition id '{wanted}' is not valid for this issue.")
        issue.fields.update(body.get("fields") or {})
        for operation in (body.get("update") or {}).get("comment", []):
            self._store_comment(issue, operation["add"])
        issue.fields["status"] = {"name": found[2]}
        return web.Response(status=204)

    async def _search(self, request: web.Request) -> web.Response:
        jql = request.query.get("jql", "")
        # `project = X`, or catch-up's `(project = X) AND updated >= "-Nm" ORDER BY updated ASC`
        updated = re.fullmatch(
            r'\s*\(\s*project\s*=\s*(\w+)\s*\)\s+AND\s+updated\s*>=\s*"-(\d+)m"'
            r"\s*ORDER BY updated ASC\s*",
            jql,
            re.I,
        )
        match = updated or re.fullmatch(r"\s*project\s*=\s*(\w+)\s*(?:ORDER BY key)?\s*", jql, re.I)
        if match is None:
            return _error(400, f"The fake searches only 'project = X': {jql!r}")
        found = sorted(
            (i for i in self.issues.values() if i.fields["project"]["key"] == match[1]),
            key=lambda i: (i.key.split("-")[0], int(i.key.split("-")[1])),
        )
        if updated is not None:
            after = self.now - int(updated[2]) * 60
            found = sorted(
                (i for i in found if _epoch(i.fields.get("updated")) >= after),
                key=lambda i: _epoch(i.fields.get("updated")),
            )
        start = int(request.query.get("nextPageToken", "0") or 0)
        size = min(int(request.query.get("maxResults", 50)), self.search_page_cap)
        page = found[start : start + size]
        answer: dict[str, Any] = {
            "issues": [self._issue_json(i, request.query.get("fields")) for i in page],
            "isLast": start + size >= len(found),
        }
        if not answer["isLast"]:
            answer["nextPageToken"] = str(start + size)
        return web.json_response(answer)

    async def _changelog(self, request: web.Request) -> web.Response:
        issue = self._find(request)
        if issue is None:
            return _error(404, "Issue does not exist or you do not have permission to see it.")
        start = int(request.query.get("startAt", "0"))
        size = min(int(request.query.get("maxResults", 50)), self.changelog_page_cap)
        page = issue.history[start : start + size]
        return web.json_response(
            {
                "startAt": start,
                "maxResults": size,
                "total": len(issue.history),
                "isLast": start + size >= len(issue.history),
                "values": page,
            }
        )

    def change_status(self, key: str, to: str, *, at: float) -> dict[str, Any]:
        """Record a status change at `at` (a changelog entry, `updated`); return the
        `jira:issue_updated` payload Jira would deliver for it."""
        issue = self.issues[key]
        before = issue.status
        history = {
            "id": str(next(self._ids)),
            "author": {"accountId": "5b10a2844c20165700ede21g", "displayName": "Ada Ops"},
            "created": _iso(at),
            "items": [
                {
                    "field": "status",
                    "fieldtype": "jira",
                    "fieldId": "status",
                    "from": None,
                    "fromString": before,
                    "to": None,
                    "toString": to,
                }
            ],
        }
        issue.history.append(history)
        issue.fields["status"] = {"name": to}
        issue.fields["updated"] = _iso(at)
        return {
            "timestamp": _ms(at),
            "webhookEvent": "jira:issue_updated",
            "issue_event_type_name": "issue_generic",
            "user": history["author"],
            "issue": self._issue_json(issue, None),
            "changelog": {"id": history["id"], "items": history["items"]},
        }

    # -- deliveries --------------------------------------------------------------------

    def delivery_headers(
        self, url: str, *, identifier: str, retry: int | None, app_base_url: str | None = None
    ) -> dict[str, str]:
        """Return the headers Jira sends with a delivery to `url`."""
        claims: dict[str, Any] = {"iat": int(self.now), "exp": int(self.now) + 180}
        if self.mode == "connect":
            parts = urlsplit(url)
            base_path = urlsplit(app_base_url).path.rstrip("/") if app_base_url else ""
            relative = parts.path[len(base_path) :] + (f"?{parts.query}" if parts.query else "")
            claims |= {"iss": self.client_key, "qsh": hash_url("POST", relative)}
            authorization = "JWT " + jwt.encode(claims, self.shared_secret, algorithm="HS256")
        else:
            claims |= {"iss": self.client_id}
            authorization = "Bearer " + jwt.encode(claims, self.client_secret, algorithm="HS256")
        headers = {
            "Authorization": authorization,
            "Content-Type": "application/json",
            "X-Atlassian-Webhook-Identifier": identifier,
        }
        if retry is not None:
            headers["X-Atlassian-Webhook-Retry"] = str(retry)
        return headers

    async def deliver(
        self,
        session: aiohttp.ClientSession,
        url: str,
        payload: dict[str, Any],
        *,
        identifier: str | None = None,
        retry: int | None = None,
        app_base_url: str | None = None,
    ) -> tuple[int, str]:
        """POST a signed event to deploybot; return the status and the body text."""
        headers = self.delivery_headers(
            url, identifier=identifier or str(uuid.uuid4()), retry=retry, app_base_url=app_base_url
        )
        async with session.post(url, data=json.dumps(payload).encode(), headers=headers) as resp:
            return resp.status, await resp.text()


def issue_updated_payload(
    *,
    key: str = "OPS-1",
    project: str = "OPS",
    issuetype: str = "Deployment",
    status: str = "Ready to deploy",
    changes: list[tuple[str, str | None, str | None]] | None = None,
    fields: dict[str, Any] | None = None,
    webhook_ids: list[int] | None = None,
    timestamp_ms: int = 1_700_000_000_000,
    base_url: str = "https://example.atlassian.net",
) -> dict[str, Any]:
    """Build a realistic `jira:issue_updated` payload; `changes` are (field, from, to)."""
    # One id per key (a sum of the characters made OPS-15 and OPS-51 one issue).
    issue_id = str(10000 + zlib.crc32(key.encode()))
    user = {
        "self": f"{base_url}/rest/api/2/user?accountId=5b10a2844c20165700ede21g",
        "accountId": "5b10a2844c20165700ede21g",
        "displayName": "Ada Ops",
        "active": True,
        "timeZone": "Europe/Amsterdam",
        "accountType": "atlassian",
    }
    issue_fields: dict[str, Any] = {
        "summary": f"Deploy {key}",
        "status": {"name": status, "id": "10001", "statusCategory": {"key": "indeterminate"}},
        "issuetype": {"name": issuetype, "id": "10005", "subtask": False},
        "project": {"key": project, "name": project.title(), "id": "10000"},
        "labels": [],
        "priority": {"name": "Medium", "id": "3"},
        "assignee": None,
        "reporter": user,
        "created": "2024-01-02T10:00:00.000+0000",
        "updated": "2024-01-03T10:00:00.000+0000",
    } | (fields or {})
    items = [
        {
            "field": name,
            "fieldtype": "jira" if not name.startswith("customfield_") else "custom",
            "fieldId": name,
            "from": None,
            "fromString": before,
            "to": None,
            "toString": after,
        }
        for name, before, after in (
            changes if changes is not None else [("status", "In Progress", status)]
        )
    ]
    return {
        "timestamp": timestamp_ms,
        "webhookEvent": "jira:issue_updated",
        "issue_event_type_name": "issue_generic",
        "user": user,
        "issue": {
            "id": issue_id,
            "self": f"{base_url}/rest/api/2/issue/{issue_id}",
            "key": key,
            "fields": issue_fields,
        },
        "changelog": {"id": str(timestamp_ms % 100000), "items": items},
        "matchedWebhookIds": webhook_ids or [],
    }
