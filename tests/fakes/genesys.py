"""In-memory fake of Genesys Cloud: login, web deployments and widgets, with fault injection.

Serve `FakeGenesys().app` with aiohttp's test server; use its URL as both the API and the
login URL. Every request is recorded in `requests` (method, path, query, headers, body).
Shapes follow the SDK reference in docs/reference/genesys-*.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from aiohttp import web

from tests.fakes import base
from tests.fakes.base import RecordedRequest

MAX_BODY_BYTES = 512_000
WD = "/api/v2/webdeployments"
WIDGETS = "/api/v2/widgets/deployments"
TOKEN_PATH = "/oauth/token"
WIDGET_CLIENT_TYPES = frozenset({"v1", "v2", "v1-http", "third-party"})

FaultKind = Literal["429", "500", "503", "slow", "drop"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GenesysHTTPError(Exception):
    """Raised by a handler to answer with a Genesys error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Answer with Genesys' error body `{message, code, status, contextId, details, errors}`."""
    body = {
        "message": message,
        "code": code,
        "status": status,
        "contextId": str(uuid.uuid4()),
        "details": [],
        "errors": [],
    }
    return web.json_response(body, status=status, headers=headers)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _not_found(kind: str, ident: str) -> GenesysHTTPError:
    return GenesysHTTPError(404, "not.found", f"{kind} {ident} not found")


def _bad(message: str) -> GenesysHTTPError:
    return GenesysHTTPError(400, "bad.request", message)


@dataclass(slots=True)
class _Configuration:
    draft: dict[str, Any]
    versions: list[dict[str, Any]] = field(default_factory=list)  # published, oldest first


# Fields the server owns; a client sending them in a body does not change them.
_SERVER_FIELDS = frozenset(
    {"id", "version", "status", "dateCreated", "dateModified", "datePublished", "selfUri"}
)
# Routes the reference documents without the OAuth access token (web messaging side).
_NO_AUTH = frozenset(
    {
        ("DELETE", f"{WD}/deployments/{{deploymentId}}/cobrowse/{{sessionId}}"),
        ("GET", f"{WD}/deployments/{{deploymentId}}/cobrowse/{{sessionId}}"),
        ("DELETE", f"{WD}/token/revoke"),
        ("POST", f"{WD}/token/oauthcodegrantjwtexchange"),
        ("POST", f"{WD}/token/refresh"),
    }
)


class FakeGenesys:
    """The fake server: state, recorded requests, faults and the aiohttp application."""

    def __init__(
        self,
        *,
        client_id: str = "deploybot-test-client",
        client_secret: str = "fake-genesys-secret-7f3a9c",
        token_expires_in_s: int = 86_400,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_expires_in_s = token_expires_in_s
        self._clock = clock
        self._recorder = base.Recorder()
        self.requests = self._recorder.requests
        self.faults = base.FaultPlan()
        self.tokens: dict[str, float] = {}  # bearer token -> expiry (clock seconds)
        self.configurations: dict[str, _Configuration] = {}
        self.deployments: dict[str, dict[str, Any]] = {}
        self.cobrowse_sessions: dict[tuple[str, str], dict[str, Any]] = {}
        self.widget_deployments: dict[str, dict[str, Any]] = {}
        self.jwt_refresh_tokens: dict[str, str] = {}  # refresh token -> deployment id
        self.issued_jwts: list[str] = []  # guest JWTs answered by exchange and refresh
        self.app = web.Application(middlewares=[self._middleware], client_max_size=8 * 2**20)
        self.app.router.add_post(TOKEN_PATH, self._login)
        for method, path, handler in self._routes():
            self.app.router.add_route(method, path, handler)

    # --- test controls ---------------------------------------------------------------

    @property
    def token_requests(self) -> list[RecordedRequest]:
        """Return the recorded requests to the login endpoint."""
        return [r for r in self.requests if r.path == TOKEN_PATH]

    @property
    def api_requests(self) -> list[RecordedRequest]:
        """Return the recorded requests to the platform API."""
        return [r for r in self.requests if r.path.startswith("/api/")]

    def expire_tokens(self) -> None:
        """Make every issued token expired (the API answers 401 to it)."""
        self.tokens = dict.fromkeys(self.tokens, float("-inf"))

    def revoke_tokens(self) -> None:
        """Forget every issued token."""
        self.tokens.clear()

    def inject(
        self,
        kind: FaultKind,
        *,
        count: int | None = 1,
        fraction: float = 1.0,
        seed: int = 0,
        path_prefix: str = "/api/",
        retry_after_s: int = 1,
        delay_s: float = 0.5,
        after: bool = False,
        echo_authorization: bool = False,
    ) -> base.Injection:
        """Fail the next `count` matching requests (or, with count=None, a seeded fraction)."""
        headers = {}
        if kind == "429":  # as Genesys sends it: the wait in seconds, and its own headers
            reset_s = str(retry_after_s)
            headers = {
                "Retry-After": reset_s,
                "inin-ratelimit-count": "300",
                "inin-ratelimit-allowed": "300",
                "inin-ratelimit-reset": reset_s,
            }
        fault = base.Fault(
            kind=kind if kind in ("slow", "drop") else "status",
            status=int(kind) if kind.isdigit() else 500,
            headers=headers,
            delay_s=delay_s,
            after=after,
            path_prefix=path_prefix,
            echo_authorization=echo_authorization,
        )
        if count is None:
            return self.faults.fail_fraction(fraction, fault, seed=seed)
        return self.faults.fail_next(count, fault)

    def add_cobrowse_session(self, deployment_id: str) -> dict[str, Any]:
        """Start a cobrowse session on a deployment (a visitor would, not the API)."""
        session_id = str(uuid.uuid4())
        session = {
            "id": session_id,
            "joinCode": f"{secrets.randbelow(10**6):06d}",
            "websocketUrl": f"wss://cobrowse.example/{session_id}",
            "state": "Active",
            "selfUri": f"{WD}/deployments/{deployment_id}/cobrowse/{session_id}",
        }
        self.cobrowse_sessions[(deployment_id, session_id)] = session
        return session

    # --- middleware: record, faults, size, auth, error bodies -------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = (await self._recorder.record(request, request.path)).body
        fault = self.faults.next(request)
        if fault is not None and not (fault.kind == "slow" and fault.after):
            answer = await self._apply(fault, request)
            if answer is not None:
                return answer
        response = await self._respond(request, handler, body)
        if fault is not None and fault.kind == "slow" and fault.after:
            await asyncio.sleep(fault.delay_s)  # done, but the client has given up by now
        return response

    async def _respond(
        self, request: web.Request, handler: Handler, body: bytes
    ) -> web.StreamResponse:
        if len(body) > MAX_BODY_BYTES:
            return error_response(
                413, "request.entity.too.large", f"Request body exceeds {MAX_BODY_BYTES} bytes"
            )
        if request.path.startswith("/api/") and not self._authorized(request):
            return error_response(
                401, "authentication.required", "No valid authentication bearer token specified"
            )
        try:
            return await handler(request)
        except GenesysHTTPError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except web.HTTPNotFound:
            return error_response(404, "not.found", f"No route for {request.path}")
        except web.HTTPMethodNotAllowed:
            return error_response(405, "method.not.allowed", f"{request.method} not allowed")

    async def _apply(self, fault: base.Fault, request: web.Request) -> web.StreamResponse | None:
        if fault.kind == "slow":
            await asyncio.sleep(fault.delay_s)
            return None
        if fault.kind == "drop":
            assert request.transport is not None
            request.transport.abort()  # the client sees the connection reset, no answer
            raise asyncio.CancelledError
        if fault.status == 429:
            reset_s = fault.headers["Retry-After"]
            message = f"Rate limit exceeded the maximum. Retry the request in [{reset_s}] seconds"
            return error_response(429, "too.many.requests", message, fault.headers)
        code = "internal.server.error" if fault.status == 500 else "service.unavailable"
        message = f"Injected {fault.status}"
        if fault.echo_authorization:
            message += f" (Authorization: {request.headers.get('Authorization')})"
        return error_response(fault.status, code, message)

    def _authorized(self, request: web.Request) -> bool:
        route = request.match_info.route
        template = route.resource.canonical if route.resource is not None else request.path
        if (request.method, template) in _NO_AUTH:
            return True
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        expiry = self.tokens.get(token)
        return scheme.lower() == "bearer" and expiry is not None and self._clock() < expiry

    # --- login -----------------------------------------------------------------------

    async def _login(self, request: web.Request) -> web.Response:
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        try:
            pair = base64.b64decode(encoded, validate=True).decode() if scheme == "Basic" else ""
        except (binascii.Error, UnicodeDecodeError):
            pair = ""
        if pair != f"{self.client_id}:{self.client_secret}":
            return web.json_response(
                {"error": "invalid_client", "description": "client authentication failed"},
                status=401,
            )
        form = await request.post()
        if request.content_type != "application/x-www-form-urlencoded" or (
            form.get("grant_type") != "client_credentials"
        ):
            return web.json_response(
                {"error": "unsupported_grant_type", "description": "grant type not supported"},
                status=400,
            )
        token = secrets.token_urlsafe(32)
        self.tokens[token] = self._clock() + self.token_expires_in_s
        return web.json_response(
            {"access_token": token, "token_type": "bearer", "expires_in": self.token_expires_in_s}
        )

    # --- platform API ----------------------------------------------------------------

    def _routes(self) -> list[tuple[str, str, Handler]]:
        cfg, dep = f"{WD}/configurations/{{configurationId}}", f"{WD}/deployments/{{deploymentId}}"
        return [
            ("GET", f"{WD}/configurations", self._list_configurations),
            ("POST", f"{WD}/configurations", self._create_configuration),
            ("DELETE", cfg, self._delete_configuration),
            ("GET", f"{cfg}/versions", self._list_versions),
            ("GET", f"{cfg}/versions/draft", self._get_draft),
            ("PUT", f"{cfg}/versions/draft", self._put_draft),
            ("POST", f"{cfg}/versions/draft/publish", self._publish),
            ("GET", f"{cfg}/versions/{{versionId}}", self._get_version),
            ("GET", f"{WD}/deployments", self._list_deployments),
            ("POST", f"{WD}/deployments", self._create_deployment),
            ("GET", dep, self._get_deployment),
            ("PUT", dep, self._put_deployment),
            ("DELETE", dep, self._delete_deployment),
            ("GET", f"{dep}/configurations", self._deployment_configuration),
            ("GET", f"{dep}/cobrowse/{{sessionId}}", self._get_cobrowse),
            ("DELETE", f"{dep}/cobrowse/{{sessionId}}", self._delete_cobrowse),
            ("POST", f"{WD}/token/oauthcodegrantjwtexchange", self._jwt_exchange),
            ("POST", f"{WD}/token/refresh", self._jwt_refresh),
            ("DELETE", f"{WD}/token/revoke", self._jwt_revoke),
            ("GET", WIDGETS, self._list_widgets),
            ("POST", WIDGETS, self._create_widget),
            ("GET", f"{WIDGETS}/{{deploymentId}}", self._get_widget),
            ("PUT", f"{WIDGETS}/{{deploymentId}}", self._put_widget),
            ("DELETE", f"{WIDGETS}/{{deploymentId}}", self._delete_widget),
        ]

    @staticmethod
    async def _json_object(request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read())
        except ValueError:
            raise _bad("The request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object")
        return body

    def _configuration(self, request: web.Request) -> tuple[str, _Configuration]:
        config_id = request.match_info["configurationId"]
        if (config := self.configurations.get(config_id)) is None:
            raise _not_found("Configuration", config_id)
        return config_id, config

    @staticmethod
    def _version_doc(
        config_id: str, content: dict[str, Any], version: str, status: str
    ) -> dict[str, Any]:
        for key in ("name", "defaultLanguage"):
            if not isinstance(content.get(key), str) or not content[key]:
                raise _bad(f"{key} is required")
        languages = content.get("languages")
        if not isinstance(languages, list) or content["defaultLanguage"] not in languages:
            raise _bad("languages is required and must contain defaultLanguage")
        doc = {k: v for k, v in content.items() if k not in _SERVER_FIELDS}
        now = _now()
        doc.update(
            id=config_id,
            version=version,
            status=status,
            dateCreated=content.get("dateCreated", now),
            dateModified=now,
            selfUri=f"{WD}/configurations/{config_id}/versions/{version}",
        )
        return doc

    @staticmethod
    def _listing(entities: list[dict[str, Any]], self_uri: str) -> web.Response:
        return web.json_response(
            {"total": len(entities), "entities": entities, "selfUri": self_uri}
        )

    async def _list_configurations(self, request: web.Request) -> web.Response:
        only_published = request.query.get("showOnlyPublished", "false").lower() == "true"
        drafts = [c.draft for c in self.configurations.values() if c.versions or not only_published]
        return self._listing(drafts, f"{WD}/configurations")

    async def _create_configuration(self, request: web.Request) -> web.Response:
        config_id = str(uuid.uuid4())
        draft = self._version_doc(config_id, await self._json_object(request), "draft", "Pending")
        self.configurations[config_id] = _Configuration(draft)
        return web.json_response(draft)

    async def _delete_configuration(self, request: web.Request) -> web.Response:
        config_id, _ = self._configuration(request)
        if any(d["configuration"]["id"] == config_id for d in self.deployments.values()):
            raise _bad(f"Configuration {config_id} is in use by a deployment")
        del self.configurations[config_id]
        return web.Response(status=204)

    async def _list_versions(self, request: web.Request) -> web.Response:
        config_id, config = self._configuration(request)
        newest = list(reversed(config.versions))[:50]  # the reference: the 50 most recent
        return self._listing(newest, f"{WD}/configurations/{config_id}/versions")

    async def _get_draft(self, request: web.Request) -> web.Response:
        return web.json_response(self._configuration(request)[1].draft)

    async def _put_draft(self, request: web.Request) -> web.Response:
        config_id, config = self._configuration(request)
        content = {**await self._json_object(request), "dateCreated": config.draft["dateCreated"]}
        config.draft = self._version_doc(config_id, content, "draft", "Pending")
        return web.json_response(config.draft)

    async def _publish(self, request: web.Request) -> web.Response:
        config_id, config = self._configuration(request)
        for old in config.versions:
            old["status"] = "Inactive"
        number = str(len(config.versions) + 1)
        published = self._version_doc(config_id, config.draft, number, "Active")
        published["datePublished"] = published["dateModified"]
        config.versions.append(published)
        return web.json_response(published)

    async def _get_version(self, request: web.Request) -> web.Response:
        config_id, config = self._configuration(request)
        wanted = request.match_info["versionId"]
        for version in config.versions:
            if version["version"] == wanted:
                return web.json_response(version)
        raise _not_found("Configuration version", f"{config_id}/{wanted}")

    def _published(self, ref: Any) -> dict[str, Any]:
        if not isinstance(ref, dict) or not ref.get("id") or not ref.get("version"):
            raise _bad("configuration {id, version} is required")
        config = self.configurations.get(str(ref["id"]))
        for version in config.versions if config else []:
            if version["version"] == str(ref["version"]):
                return version
        raise _bad(f"Configuration {ref['id']} has no published version {ref['version']}")

    def _deployment_doc(
        self, deployment_id: str, body: dict[str, Any], created: str | None
    ) -> dict[str, Any]:
        if not isinstance(body.get("name"), str) or not body["name"]:
            raise _bad("name is required")
        version = self._published(body.get("configuration"))
        doc = {k: v for k, v in body.items() if k not in _SERVER_FIELDS}
        now = _now()
        doc.update(
            id=deployment_id,
            configuration={
                "id": version["id"],
                "name": version["name"],
                "version": version["version"],
                "selfUri": version["selfUri"],
            },
            allowAllDomains=bool(body.get("allowAllDomains", False)),
            status="Active",
            dateCreated=created or now,
            dateModified=now,
            snippet=f"<script>Genesys('deploymentId', '{deployment_id}')</script>",
            selfUri=f"{WD}/deployments/{deployment_id}",
        )
        return doc

    def _deployment(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        deployment_id = request.match_info["deploymentId"]
        if (deployment := self.deployments.get(deployment_id)) is None:
            raise _not_found("Deployment", deployment_id)
        return deployment_id, deployment

    def _expanded(self, deployment: dict[str, Any], expand: str) -> dict[str, Any]:
        if "configuration" not in expand.lower().split(","):
            return deployment
        return {**deployment, "configuration": self._published(deployment["configuration"])}

    async def _list_deployments(self, request: web.Request) -> web.Response:
        expand = request.query.get("expand", "")
        entities = [self._expanded(d, expand) for d in self.deployments.values()]
        return self._listing(entities, f"{WD}/deployments")

    async def _create_deployment(self, request: web.Request) -> web.Response:
        deployment_id = str(uuid.uuid4())
        doc = self._deployment_doc(deployment_id, await self._json_object(request), None)
        self.deployments[deployment_id] = doc
        return web.json_response(doc)

    async def _get_deployment(self, request: web.Request) -> web.Response:
        _, deployment = self._deployment(request)
        return web.json_response(self._expanded(deployment, request.query.get("expand", "")))

    async def _put_deployment(self, request: web.Request) -> web.Response:
        deployment_id, old = self._deployment(request)
        body = await self._json_object(request)
        doc = self._deployment_doc(deployment_id, body, old["dateCreated"])
        self.deployments[deployment_id] = doc
        return web.json_response(doc)

    async def _delete_deployment(self, request: web.Request) -> web.Response:
        deployment_id, _ = self._deployment(request)
        del self.deployments[deployment_id]
        return web.Response(status=204)

    async def _deployment_configuration(self, request: web.Request) -> web.Response:
        _, deployment = self._deployment(request)
        version = self._published(deployment["configuration"])
        keep = ("id", "name", "version", "languages", "defaultLanguage", "messenger", "position")
        active = {k: version[k] for k in keep if k in version}
        if "supportedcontent" in request.query.get("expand", "").lower().split(","):
            active["supportedContent"] = version.get("messenger", {}).get("fileUpload", {})
        return web.json_response(active)

    def _cobrowse_key(self, request: web.Request) -> tuple[str, str]:
        key = (request.match_info["deploymentId"], request.match_info["sessionId"])
        if key not in self.cobrowse_sessions:
            raise _not_found("Cobrowse session", key[1])
        return key

    async def _get_cobrowse(self, request: web.Request) -> web.Response:
        return web.json_response(self.cobrowse_sessions[self._cobrowse_key(request)])

    async def _delete_cobrowse(self, request: web.Request) -> web.Response:
        del self.cobrowse_sessions[self._cobrowse_key(request)]
        return web.json_response({})

    async def _jwt_exchange(self, request: web.Request) -> web.Response:
        body = await self._json_object(request)
        deployment_id, params = body.get("deploymentId"), body.get("oauthParameters")
        if deployment_id not in self.deployments:
            raise _bad("deploymentId must name an existing deployment")
        if not isinstance(params, dict) or not params.get("code"):
            raise _bad("oauthParameters.code is required")
        refresh_token = secrets.token_urlsafe(16)
        self.jwt_refresh_tokens[refresh_token] = str(deployment_id)
        self.issued_jwts.append(secrets.token_urlsafe(24))
        return web.json_response({"jwt": self.issued_jwts[-1], "refreshToken": refresh_token})

    async def _jwt_refresh(self, request: web.Request) -> web.Response:
        body = await self._json_object(request) if await request.read() else {}
        if self.jwt_refresh_tokens.get(str(body.get("refreshToken"))) != body.get("deploymentId"):
            raise GenesysHTTPError(401, "bad.credentials", "Invalid refresh token")
        self.issued_jwts.append(secrets.token_urlsafe(24))
        return web.json_response({"jwt": self.issued_jwts[-1]})

    async def _jwt_revoke(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    def _widget(self, request: web.Request) -> tuple[str, dict[str, Any]]:
        deployment_id = request.match_info["deploymentId"]
        if (widget := self.widget_deployments.get(deployment_id)) is None:
            raise _not_found("Widget deployment", deployment_id)
        return deployment_id, widget

    @staticmethod
    def _widget_doc(deployment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(body.get("name"), str) or not body["name"]:
            raise _bad("name is required")
        if body.get("clientType") not in WIDGET_CLIENT_TYPES:
            raise _bad(f"clientType must be one of {sorted(WIDGET_CLIENT_TYPES)}")
        doc = {k: v for k, v in body.items() if k not in _SERVER_FIELDS}
        doc.update(id=deployment_id, selfUri=f"{WIDGETS}/{deployment_id}")
        return doc

    async def _list_widgets(self, request: web.Request) -> web.Response:
        entities = list(self.widget_deployments.values())
        return web.json_response(
            {
                "entities": entities,
                "pageSize": max(len(entities), 25),
                "pageNumber": 1,
                "total": len(entities),
                "pageCount": 1,
                "selfUri": WIDGETS,
                "firstUri": f"{WIDGETS}?pageNumber=1",
                "lastUri": f"{WIDGETS}?pageNumber=1",
            }
        )

    async def _create_widget(self, request: web.Request) -> web.Response:
        deployment_id = str(uuid.uuid4())
        doc = self._widget_doc(deployment_id, await self._json_object(request))
        self.widget_deployments[deployment_id] = doc
        return web.json_response(doc)

    async def _get_widget(self, request: web.Request) -> web.Response:
        return web.json_response(self._widget(request)[1])

    async def _put_widget(self, request: web.Request) -> web.Response:
        deployment_id, _ = self._widget(request)
        doc = self._widget_doc(deployment_id, await self._json_object(request))
        self.widget_deployments[deployment_id] = doc
        return web.json_response(doc)

    async def _delete_widget(self, request: web.Request) -> web.Response:
        deployment_id, _ = self._widget(request)
        del self.widget_deployments[deployment_id]
        return web.Response(status=204)
