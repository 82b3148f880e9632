"""A fake UbiOps API (deployments, 31 operations) with in-memory state and fault injection.

It answers the way the UbiOps reference documents: JSON bodies of the documented
shapes, `{"error": ...}` on failure, 404 for unknown objects, 409 for a duplicate
deployment or version and 400 for a duplicate variable, token auth, rate-limit headers
on every answer. A revision's status advances along `build_steps` (queued -> building
-> success) one step per status read. Every request is recorded for assertions.
The reference does not say which status a duplicate gets; the runner accepts both.

    fake = FakeUbiOps(token="t")
    server = await aiohttp_server(fake.app())
    base_url = str(server.make_url(fake.prefix))
    fake.fail_next(2, Fault(status=503))
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.fakes import base

PREFIX = "/v2.1"
USER = "deploybot@example.com"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Inheritance = tuple[str | None, str | None]  # (inheritance_type, inheritance_name)
OWN: Inheritance = (None, None)
# Variable names: letters and underscores, not starting or ending with an underscore.
VARIABLE_NAME = re.compile(r"^[A-Za-z](?:[A-Za-z_]*[A-Za-z])?$")
FIELD_TYPES = frozenset({"structured", "plain"})
FINAL_BUILD_STATES = frozenset({"success", "failed", "cancelled"})

VERSION_DEFAULTS: dict[str, Any] = {
    "description": "",
    "environment": "python3-11",
    "language": "python3.11",
    "instance_type": "2048mb",
    "maximum_instances": 5,
    "minimum_instances": 0,
    "maximum_idle_time": 300,
    "labels": {},
    "monitoring": None,
    "default_notification_group": None,
    "request_retention_time": 604800,
    "request_retention_mode": "full",
    "maximum_queue_size_express": 100,
    "maximum_queue_size_batch": 100000,
    "static_ip": False,
    "restart_request_interruption": False,
}


class ApiError(Exception):
    """An answer `{"error": message}` with this status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Fault(base.Fault):
    """A fault as UbiOps answers it (its error body: `{"error": ...}`)."""

    @staticmethod
    def rate_limited(reset_s: int) -> Fault:
        """A 429 as UbiOps sends it: the wait is in `x-ratelimit-reset` (seconds)."""
        return Fault(status=429, headers={"x-ratelimit-reset": str(reset_s)})


@dataclass
class _Version:
    data: dict[str, Any]
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    revisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # revision -> file
    builds: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)  # deployment requests


@dataclass
class _Deployment:
    data: dict[str, Any]
    versions: dict[str, _Version] = field(default_factory=dict)
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    audit: list[dict[str, Any]] = field(default_factory=list)


def _double_or_echo(version: str, data: Any) -> Any:
    if isinstance(data, dict) and isinstance(data.get("input"), int | float):
        return {"output": data["input"] * 2}
    return data


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _public_variable(var: dict[str, Any], inheritance: Inheritance | None = None) -> dict[str, Any]:
    out = {k: var[k] for k in ("id", "name", "value", "secret")}
    if var["secret"]:
        out["value"] = None  # secrets are never shown
    if inheritance is not None:
        out["inheritance_type"], out["inheritance_name"] = inheritance
    return out


def _labels_match(labels: dict[str, str], query: str | None) -> bool:
    """Keep an object having at least one of the `key:value` pairs of the filter."""
    if not query:
        return True
    wanted = [pair.split(":", 1) for pair in query.split(",") if ":" in pair]
    return any(labels.get(k) == v for k, v in wanted)


class FakeUbiOps:
    """In-memory UbiOps deployments API served by an aiohttp app."""

    prefix = PREFIX

    def __init__(
        self,
        *,
        token: str = "fake-token",
        projects: tuple[str, ...] = ("ml-prod",),
        rate_limit_per_minute: int = 10_000,
        build_steps: tuple[str, ...] = ("queued", "building", "success"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token = token
        self.projects: dict[str, dict[str, _Deployment]] = {p: {} for p in projects}
        self.project_variables: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in projects}
        self.build_steps = build_steps
        self._recorder = base.Recorder()
        self.requests = self._recorder.requests
        self.calls = self._recorder.calls
        self.rate_limit_per_minute = rate_limit_per_minute
        self._clock = clock
        self._window_start = clock()
        self._window_count = 0
        self.faults = base.FaultPlan()
        self.fail_next = self.faults.fail_next
        self.fail_fraction = self.faults.fail_fraction
        self.fail_mix = self.faults.fail_mix
        self.clear_faults = self.faults.clear
        self.injected = self.faults.injected  # faults answered, by `Fault.label`
        # A deployment request's answer: the version's code, given (version, input). By
        # default it doubles a number under "input" and echoes anything else; a version
        # named in `failing_versions` raises, as a broken model would.
        self.model: Callable[[str, Any], Any] = _double_or_echo
        self.failing_versions: set[str] = set()
        self._build_reads: Counter[str] = Counter()  # build id -> its position in build_steps

    # ----- test controls -------------------------------------------------------------

    def add_project_variable(
        self, project: str, name: str, value: str, *, secret: bool = False
    ) -> None:
        """Define a project-level variable (inherited by deployments and versions)."""
        var_id = str(uuid.uuid4())
        var = {"id": var_id, "name": name, "value": value, "secret": secret}
        self.project_variables[project][var_id] = var

    def deployment_names(self, project: str) -> list[str]:
        return list(self.projects[project])

    def version_names(self, project: str, deployment: str) -> list[str]:
        return list(self.projects[project][deployment].versions)

    # ----- app and middleware --------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        d = PREFIX + "/projects/{project_name}/deployments"
        dn = d + "/{deployment_name}"
        v = dn + "/versions/{version}"
        routes: list[tuple[str, str, Handler]] = [
            ("GET", v + "/builds/{build_id}", self.builds_get),
            ("GET", v + "/builds", self.builds_list),
            ("PATCH", v + "/builds/{build_id}", self.builds_update),
            ("GET", dn + "/audit", self.deployment_audit_events_list),
            ("POST", dn + "/copy-environment-variables", self.variables_copy),
            ("POST", dn + "/environment-variables", self.variables_create),
            ("DELETE", dn + "/environment-variables/{id}", self.variables_delete),
            ("GET", dn + "/environment-variables/{id}", self.variables_get),
            ("GET", dn + "/environment-variables", self.variables_list),
            ("PATCH", dn + "/environment-variables/{id}", self.variables_update),
            ("POST", v + "/copy-environment-variables", self.variables_copy),
            ("POST", v + "/environment-variables", self.variables_create),
            ("DELETE", v + "/environment-variables/{id}", self.variables_delete),
            ("GET", v + "/environment-variables/{id}", self.variables_get),
            ("GET", v + "/environment-variables", self.variables_list),
            ("PATCH", v + "/environment-variables/{id}", self.variables_update),
            ("POST", dn + "/versions", self.deployment_versions_create),
            ("DELETE", v, self.deployment_versions_delete),
            ("GET", v, self.deployment_versions_get),
            ("GET", dn + "/versions", self.deployment_versions_list),
            ("PATCH", v, self.deployment_versions_update),
            ("POST", d, self.deployments_create),
            ("DELETE", dn, self.deployments_delete),
            ("GET", dn, self.deployments_get),
            ("GET", d, self.deployments_list),
            ("PATCH", dn, self.deployments_update),
            ("GET", v + "/revisions/{revision_id}/download", self.revisions_file_download),
            ("POST", v + "/revisions", self.revisions_file_upload),
            ("GET", v + "/revisions/{revision_id}", self.revisions_get),
            ("GET", v + "/revisions", self.revisions_list),
            ("POST", v + "/revisions/{revision_id}/rebuild", self.revisions_rebuild),
            ("POST", dn + "/requests", self.deployment_requests_create),
            ("POST", v + "/requests", self.deployment_requests_create),
            ("POST", dn + "/requests/batch", self.batch_requests_create),
            ("POST", v + "/requests/batch", self.batch_requests_create),
            ("GET", dn + "/requests/{request_id}", self.deployment_requests_get),
            ("GET", v + "/requests/{request_id}", self.deployment_requests_get),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
        return app

    def _rate_limit_headers(self) -> tuple[dict[str, str], bool]:
        """Count this request in the current minute; say whether it is over the limit."""
        now = self._clock()
        if now - self._window_start >= 60.0:
            self._window_start, self._window_count = now, 0
        self._window_count += 1
        limit = self.rate_limit_per_minute
        headers = {
            "x-ratelimit-limit": str(limit),
            "x-ratelimit-remaining": str(max(limit - self._window_count, 0)),
            "x-ratelimit-reset": str(max(math.ceil(self._window_start + 60.0 - now), 0)),
        }
        return headers, self._window_count > limit

    async def _fail(self, request: web.Request, fault: base.Fault) -> web.StreamResponse:
        if fault.kind == "drop":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never reaches the client
        body = {"error": "Rate limit exceeded" if fault.status == 429 else "Internal error"}
        if fault.status == 503:
            body = {"error": "Service temporarily unavailable"}
        if fault.echo_authorization:
            body["error"] += f" (Authorization: {request.headers.get('Authorization')})"
        return web.json_response(body, status=fault.status, headers=fault.headers)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        await self._recorder.record(request, request.path.removeprefix(PREFIX))
        limit_headers, over_limit = self._rate_limit_headers()
        response = await self._answer(request, handler, over_limit)
        for name, value in limit_headers.items():
            response.headers.setdefault(name, value)
        return response

    async def _answer(
        self, request: web.Request, handler: Handler, over_limit: bool
    ) -> web.StreamResponse:
        if over_limit:
            return web.json_response({"error": "Rate limit exceeded"}, status=429)
        fault = self.faults.next(request)
        if fault is not None and fault.kind == "slow" and not fault.after:
            await asyncio.sleep(fault.delay_s)  # the client has timed out by now
        elif fault is not None and not fault.after:
            return await self._fail(request, fault)
        auth = request.headers.get("Authorization")
        if auth is None:
            return web.json_response(
                {"error": "Authentication credentials were not provided."}, status=401
            )
        if auth != f"Token {self.token}":
            return web.json_response({"error": "Invalid token."}, status=401)
        try:
            response = await handler(request)
        except ApiError as exc:
            return web.json_response({"error": exc.message}, status=exc.status)
        if fault is not None and fault.after and fault.kind == "slow":
            await asyncio.sleep(fault.delay_s)  # done, but the client has given up by now
        elif fault is not None and fault.after:
            return await self._fail(request, fault)  # done, but the answer is lost
        return response

    # ----- lookups ---------------------------------------------------------------------

    def _project(self, request: web.Request) -> str:
        name = request.match_info["project_name"]
        if name not in self.projects:
            raise ApiError(404, "Project not found")
        return name

    def _deployment(self, request: web.Request) -> _Deployment:
        deployments = self.projects[self._project(request)]
        name = request.match_info["deployment_name"]
        if name not in deployments:
            raise ApiError(404, "Deployment not found")
        return deployments[name]

    def _version(self, request: web.Request) -> _Version:
        deployment = self._deployment(request)
        name = request.match_info["version"]
        if name not in deployment.versions:
            raise ApiError(404, "Version not found")
        return deployment.versions[name]

    def _scope(self, request: web.Request) -> tuple[_Deployment, _Version | None]:
        deployment = self._deployment(request)
        return deployment, (self._version(request) if "version" in request.match_info else None)

    @staticmethod
    async def _data(request: web.Request, *, required: bool = True) -> dict[str, Any]:
        raw = await request.read()
        if not raw:
            if required:
                raise ApiError(400, "Request body is required")
            return {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"JSON parse error - {exc}") from exc
        if not isinstance(data, dict):
            raise ApiError(400, "Invalid data. Expected a dictionary")
        return data

    def _audit(self, deployment: _Deployment, action: str, event: str, object_type: str) -> None:
        deployment.audit.append(
            {
                "id": str(uuid.uuid4()),
                "date": _now(),
                "action": action,
                "user": USER,
                "event": event,
                "object_type": object_type,
                "object_name": deployment.data["name"],
            }
        )

    # ----- deployments -----------------------------------------------------------------

    @staticmethod
    def _check_fields(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
        fields = data.get(key) or []
        if not isinstance(fields, list):
            raise ApiError(400, f"{key}: expected a list")
        out = []
        for item in fields:
            if not isinstance(item, dict) or not item.get("name") or not item.get("data_type"):
                raise ApiError(400, f"{key}: every field needs a name and a data_type")
            out.append({"name": item["name"], "data_type": item["data_type"], "widget": {}})
        return out

    def _deployment_json(self, deployment: _Deployment, *, detail: bool) -> dict[str, Any]:
        out = dict(deployment.data)
        if not detail:
            out.pop("default_version", None)
        return out

    async def deployments_create(self, request: web.Request) -> web.Response:
        project = self._project(request)
        data = await self._data(request)
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "name: This field is required.")
        for key in ("input_type", "output_type"):
            if data.get(key) not in FIELD_TYPES:
                raise ApiError(400, f"{key}: must be one of structured, plain")
        if name in self.projects[project]:
            raise ApiError(409, f"A deployment with name '{name}' already exists in this project")
        now = _now()
        record = {
            "id": str(uuid.uuid4()),
            "name": name,
            "project": project,
            "description": data.get("description") or "",
            "input_type": data["input_type"],
            "output_type": data["output_type"],
            "input_fields": self._check_fields(data, "input_fields"),
            "output_fields": self._check_fields(data, "output_fields"),
            "labels": data.get("labels") or {},
            "supports_request_format": bool(data.get("supports_request_format", True)),
            "creation_date": now,
            "last_updated": now,
            "default_version": None,
        }
        deployment = _Deployment(record)
        self.projects[project][name] = deployment
        self._audit(deployment, "create", f"Created deployment {name}", "deployment")
        return web.json_response(self._deployment_json(deployment, detail=False), status=201)

    async def deployments_get(self, request: web.Request) -> web.Response:
        return web.json_response(self._deployment_json(self._deployment(request), detail=True))

    async def deployments_list(self, request: web.Request) -> web.Response:
        project = self._project(request)
        labels = request.query.get("labels")
        return web.json_response(
            [
                self._deployment_json(d, detail=False)
                for d in self.projects[project].values()
                if _labels_match(d.data["labels"], labels)
            ]
        )

    async def deployments_update(self, request: web.Request) -> web.Response:
        project = self._project(request)
        deployment = self._deployment(request)
        data = await self._data(request)
        new_name = data.get("name", deployment.data["name"])
        if new_name != deployment.data["name"]:
            if new_name in self.projects[project]:
                raise ApiError(409, f"A deployment with name '{new_name}' already exists")
            del self.projects[project][deployment.data["name"]]
            self.projects[project][new_name] = deployment
            deployment.data["name"] = new_name
            for version in deployment.versions.values():
                version.data["deployment"] = new_name
        if "default_version" in data:
            default = data["default_version"]
            if default not in deployment.versions:
                raise ApiError(400, f"default_version: version '{default}' does not exist")
            if deployment.versions[default].data["status"] != "available":
                # UbiOps' answer when the version's build has not finished (or failed).
                raise ApiError(400, "Only available versions can be set as default")
            deployment.data["default_version"] = default
            for name, version in deployment.versions.items():
                version.data["default"] = name == default
        for key in ("description", "labels"):
            if key in data:
                deployment.data[key] = data[key]
        for key in ("input_fields", "output_fields"):
            if key in data:
                deployment.data[key] = self._check_fields(data, key)
        deployment.data["last_updated"] = _now()
        self._audit(deployment, "update", f"Updated deployment {new_name}", "deployment")
        return web.json_response(self._deployment_json(deployment, detail=True))

    async def deployments_delete(self, request: web.Request) -> web.Response:
        project = self._project(request)
        deployment = self._deployment(request)
        del self.projects[project][deployment.data["name"]]
        return web.Response(status=204)

    # ----- versions --------------------------------------------------------------------

    def _version_json(self, version: _Version, *, detail: bool) -> dict[str, Any]:
        out = dict(version.data)
        if not detail:
            for key in ("last_file_upload", "has_request_method", "has_requests_method"):
                out.pop(key, None)
        return out

    async def deployment_versions_create(self, request: web.Request) -> web.Response:
        deployment = self._deployment(request)
        data = await self._data(request)
        name = data.get("version")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "version: This field is required.")
        if name in deployment.versions:
            raise ApiError(409, f"A version with name '{name}' already exists for this deployment")
        now = _now()
        first = not deployment.versions
        record: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "deployment": deployment.data["name"],
            "version": name,
            "default": first,
            **VERSION_DEFAULTS,
            **{k: v for k, v in data.items() if k in VERSION_DEFAULTS},
            "language_description": "Python 3.11",
            "status": "unavailable",
            "active_revision": None,
            "latest_revision": None,
            "latest_build": None,
            "creation_date": now,
            "last_updated": now,
            "last_file_upload": None,
            "has_request_method": False,
            "has_requests_method": False,
        }
        deployment.versions[name] = _Version(record)
        if first:
            deployment.data["default_version"] = name  # the first version is the default
        self._audit(deployment, "create", f"Created version {name}", "deployment")
        return web.json_response(
            self._version_json(deployment.versions[name], detail=False), status=201
        )

    async def deployment_versions_get(self, request: web.Request) -> web.Response:
        return web.json_response(self._version_json(self._version(request), detail=True))

    async def deployment_versions_list(self, request: web.Request) -> web.Response:
        deployment = self._deployment(request)
        labels = request.query.get("labels")
        return web.json_response(
            [
                self._version_json(v, detail=False)
                for v in deployment.versions.values()
                if _labels_match(v.data["labels"], labels)
            ]
        )

    async def deployment_versions_update(self, request: web.Request) -> web.Response:
        deployment = self._deployment(request)
        version = self._version(request)
        data = await self._data(request)
        old_name = version.data["version"]
        new_name = data.get("version", old_name)
        if new_name != old_name:
            if new_name in deployment.versions:
                raise ApiError(409, f"A version with name '{new_name}' already exists")
            deployment.versions[new_name] = deployment.versions.pop(old_name)
            version.data["version"] = new_name
            if deployment.data["default_version"] == old_name:
                deployment.data["default_version"] = new_name
        version.data.update({k: v for k, v in data.items() if k in VERSION_DEFAULTS})
        version.data["last_updated"] = _now()
        self._audit(deployment, "update", f"Updated version {new_name}", "deployment")
        return web.json_response(self._version_json(version, detail=True))

    async def deployment_versions_delete(self, request: web.Request) -> web.Response:
        deployment = self._deployment(request)
        version = self._version(request)
        del deployment.versions[version.data["version"]]
        if deployment.data["default_version"] == version.data["version"]:
            deployment.data["default_version"] = None
        self._audit(
            deployment, "delete", f"Deleted version {version.data['version']}", "deployment"
        )
        return web.Response(status=204)

    # ----- environment variables (deployment and version scope) -----------------------

    @staticmethod
    def _own_variables(
        deployment: _Deployment, version: _Version | None
    ) -> dict[str, dict[str, Any]]:
        return deployment.variables if version is None else version.variables

    @staticmethod
    def _check_variable(data: dict[str, Any]) -> None:
        name, value, secret = data.get("name"), data.get("value"), data.get("secret")
        if not isinstance(name, str) or not VARIABLE_NAME.match(name):
            raise ApiError(
                400,
                "name: only letters and underscores, not starting or ending with an underscore",
            )
        if not isinstance(value, str):
            raise ApiError(400, "value: This field is required.")
        if not isinstance(secret, bool):
            raise ApiError(400, "secret: This field is required.")

    async def variables_create(self, request: web.Request) -> web.Response:
        deployment, version = self._scope(request)
        data = await self._data(request)
        self._check_variable(data)
        own = self._own_variables(deployment, version)
        if any(v["name"] == data["name"] for v in own.values()):
            raise ApiError(400, f"A variable with name '{data['name']}' already exists")
        var = {"id": str(uuid.uuid4()), **{k: data[k] for k in ("name", "value", "secret")}}
        own[var["id"]] = var
        self._audit(
            deployment, "create", f"Created environment variable {var['name']}", "deployment"
        )
        return web.json_response(_public_variable(var), status=201)

    def _variable(
        self, request: web.Request
    ) -> tuple[_Deployment, dict[str, dict[str, Any]], dict[str, Any]]:
        deployment, version = self._scope(request)
        own = self._own_variables(deployment, version)
        var = own.get(request.match_info["id"])
        if var is None:
            raise ApiError(404, "Environment variable not found")
        return deployment, own, var

    async def variables_get(self, request: web.Request) -> web.Response:
        return web.json_response(_public_variable(self._variable(request)[2]))

    async def variables_list(self, request: web.Request) -> web.Response:
        deployment, version = self._scope(request)
        project = request.match_info["project_name"]
        # nearest scope first; a variable shadows those of the same name further out
        layers: list[tuple[dict[str, dict[str, Any]], Inheritance]] = []
        if version is not None:
            layers.append((version.variables, OWN))
            layers.append((deployment.variables, ("deployment", deployment.data["name"])))
        else:
            layers.append((deployment.variables, OWN))
        layers.append((self.project_variables[project], ("project", project)))
        seen: set[str] = set()
        out = []
        for variables, inheritance in layers:
            for var in variables.values():
                if var["name"] not in seen:
                    seen.add(var["name"])
                    out.append(_public_variable(var, inheritance))
        return web.json_response(out)

    async def variables_update(self, request: web.Request) -> web.Response:
        deployment, own, var = self._variable(request)
        data = await self._data(request)
        self._check_variable(data)
        if var["secret"] and not data["secret"]:
            raise ApiError(400, "secret: a secret variable cannot be made non-secret")
        if any(v["name"] == data["name"] and v is not var for v in own.values()):
            raise ApiError(400, f"A variable with name '{data['name']}' already exists")
        var.update({k: data[k] for k in ("name", "value", "secret")})
        self._audit(
            deployment, "update", f"Updated environment variable {var['name']}", "deployment"
        )
        return web.json_response(_public_variable(var))

    async def variables_delete(self, request: web.Request) -> web.Response:
        deployment, own, var = self._variable(request)
        del own[var["id"]]
        self._audit(
            deployment, "delete", f"Deleted environment variable {var['name']}", "deployment"
        )
        return web.Response(status=204)

    async def variables_copy(self, request: web.Request) -> web.Response:
        deployment, version = self._scope(request)
        data = await self._data(request)
        source_name = data.get("source_deployment")
        if not isinstance(source_name, str) or not source_name:
            raise ApiError(400, "source_deployment: This field is required.")
        source = self.projects[request.match_info["project_name"]].get(source_name)
        if source is None:
            raise ApiError(404, "Source deployment not found")
        source_vars = source.variables
        if data.get("source_version") is not None:
            source_version = source.versions.get(data["source_version"])
            if source_version is None:
                raise ApiError(404, "Source version not found")
            source_vars = source_version.variables
        own = self._own_variables(deployment, version)
        copied = []
        for src in list(source_vars.values()):
            existing = next((v for v in own.values() if v["name"] == src["name"]), None)
            var = existing or {"id": str(uuid.uuid4()), "name": src["name"]}
            var.update(value=src["value"], secret=src["secret"])
            own[var["id"]] = var
            copied.append(_public_variable(var, OWN))
        self._audit(
            deployment, "update", f"Copied environment variables from {source_name}", "deployment"
        )
        return web.json_response(copied, status=201)

    # ----- revisions and builds --------------------------------------------------------

    @staticmethod
    async def _form(request: web.Request) -> dict[str, tuple[str | None, bytes]]:
        """Parse a multipart body into {field: (filename, content)}."""
        content_type = request.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise ApiError(400, "Unsupported media type: expected multipart/form-data")
        raw = await request.read()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw
        )
        out: dict[str, tuple[str | None, bytes]] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(payload, bytes):
                out[name] = (part.get_filename(), payload)
        return out

    def _new_build(self, version: _Version, revision_id: str, trigger: str) -> dict[str, Any]:
        build: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "revision": revision_id,
            "creation_date": _now(),
            "status": self.build_steps[0],
            "error_message": "",
            "trigger": trigger,
            "has_request_method": True,
            "has_requests_method": False,
        }
        version.builds[build["id"]] = build
        revision = version.revisions[revision_id]
        revision.update(status=build["status"], error_message="", build=build["id"])
        version.data.update(latest_build=build["id"], status="building")
        return build

    async def revisions_file_upload(self, request: web.Request) -> web.Response:
        deployment = self._deployment(request)
        version = self._version(request)
        form = await self._form(request)
        field_text = {k: v[1].decode() for k, v in form.items() if k != "file"}
        source_deployment = field_text.get("source_deployment")
        source_version = field_text.get("source_version")
        if (source_deployment is None) != (source_version is None):
            raise ApiError(400, "source_deployment and source_version must be provided together")
        if "file" in form:
            filename, content = form["file"][0] or "deployment.zip", form["file"][1]
        elif source_deployment is not None and source_version is not None:
            source = self.projects[request.match_info["project_name"]].get(source_deployment)
            src_version = source.versions.get(source_version) if source else None
            if src_version is None or src_version.data["active_revision"] is None:
                raise ApiError(404, "Source version has no deployment file")
            filename, content = src_version.files[src_version.data["active_revision"]]
        elif "template_deployment_id" in field_text:
            filename, content = "template.zip", b"template"
        else:
            raise ApiError(
                400, "Either file or source_deployment and source_version must be provided"
            )
        revision = {
            "id": str(uuid.uuid4()),
            "version": version.data["version"],
            "creation_date": _now(),
            "created_by": USER,
            "status": self.build_steps[0],
            "error_message": "",
            "has_request_method": True,
            "has_requests_method": False,
        }
        version.revisions[revision["id"]] = revision
        version.files[revision["id"]] = (filename, content)
        version.data.update(
            latest_revision=revision["id"], last_file_upload=revision["creation_date"]
        )
        build = self._new_build(version, revision["id"], "Deployment file upload")
        self._audit(
            deployment,
            "create",
            f"Uploaded deployment file for {version.data['version']}",
            "deployment",
        )
        return web.json_response(
            {"success": True, "revision": revision["id"], "build": build["id"]}, status=201
        )

    def _revision(self, request: web.Request) -> tuple[_Version, dict[str, Any]]:
        version = self._version(request)
        revision = version.revisions.get(request.match_info["revision_id"])
        if revision is None:
            raise ApiError(404, "Revision not found")
        return version, revision

    def _advance(self, version: _Version, revision: dict[str, Any]) -> None:
        """Move a revision (and its build) one step along `build_steps`."""
        if revision["status"] in FINAL_BUILD_STATES:
            return
        steps = self.build_steps
        # Counted per build, so that a step may repeat ("building" several reads long).
        position = min(self._build_reads[revision["build"]] + 1, len(steps) - 1)
        self._build_reads[revision["build"]] = position
        status = steps[position]
        revision["status"] = status
        build = version.builds[revision["build"]]
        build["status"] = status
        if status == "failed":
            revision["error_message"] = build["error_message"] = "Build failed: see the build logs"
        if status == "success":
            version.data.update(active_revision=revision["id"], status="available")
            version.data.update(has_request_method=True)

    @staticmethod
    def _revision_json(revision: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in revision.items() if k != "build"}

    async def revisions_get(self, request: web.Request) -> web.Response:
        version, revision = self._revision(request)
        answer = self._revision_json(revision)
        self._advance(version, revision)  # the next read sees the next step
        return web.json_response(answer)

    async def revisions_list(self, request: web.Request) -> web.Response:
        version = self._version(request)
        return web.json_response([self._revision_json(r) for r in version.revisions.values()])

    async def revisions_file_download(self, request: web.Request) -> web.Response:
        version, revision = self._revision(request)
        filename, content = version.files[revision["id"]]
        return web.Response(
            body=content,
            content_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    async def revisions_rebuild(self, request: web.Request) -> web.Response:
        version, revision = self._revision(request)
        await self._data(request, required=False)
        build = self._new_build(version, revision["id"], "Rebuild")
        return web.json_response(build, status=201)

    def _build(self, request: web.Request) -> tuple[_Version, dict[str, Any]]:
        version = self._version(request)
        build = version.builds.get(request.match_info["build_id"])
        if build is None:
            raise ApiError(404, "Build not found")
        return version, build

    async def builds_get(self, request: web.Request) -> web.Response:
        version, build = self._build(request)
        answer = dict(build)
        revision = version.revisions[build["revision"]]
        if revision.get("build") == build["id"]:
            self._advance(version, revision)
        return web.json_response(answer)

    async def builds_list(self, request: web.Request) -> web.Response:
        return web.json_response(list(self._version(request).builds.values()))

    async def builds_update(self, request: web.Request) -> web.Response:
        version, build = self._build(request)
        data = await self._data(request)
        if data.get("status") != "cancelled":
            raise ApiError(400, "status: a build can only be cancelled")
        if build["status"] in FINAL_BUILD_STATES:
            raise ApiError(400, f"The build is {build['status']} and cannot be cancelled")
        build["status"] = "cancelled"
        revision = version.revisions[build["revision"]]
        if revision.get("build") == build["id"]:
            revision["status"] = "cancelled"
        return web.json_response(build)

    # ----- deployment requests ---------------------------------------------------------

    def _request_target(self, request: web.Request) -> tuple[_Deployment, _Version]:
        deployment = self._deployment(request)
        if "version" in request.match_info:
            return deployment, self._version(request)
        default = deployment.data.get("default_version")
        if default is None or default not in deployment.versions:
            raise ApiError(400, "The deployment has no default version")
        return deployment, deployment.versions[default]

    def _run_request(self, deployment: _Deployment, version: _Version, data: Any) -> dict[str, Any]:
        if version.data["status"] != "available":
            raise ApiError(400, "Version is not available: its build has not succeeded")
        name = version.data["version"]
        record: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "deployment": deployment.data["name"],
            "version": name,
            "status": "completed",
            "success": True,
            "time_created": _now(),
            "request_data": data,
            "result": None,
            "error_message": None,
        }
        if name in self.failing_versions:
            record.update(status="failed", success=False, error_message="Model raised an error")
        else:
            record["result"] = self.model(name, data)
        version.requests[record["id"]] = record
        return record

    async def deployment_requests_create(self, request: web.Request) -> web.Response:
        deployment, version = self._request_target(request)
        data = json.loads(await request.read() or b"null")
        record = self._run_request(deployment, version, data)
        return web.json_response({k: v for k, v in record.items() if k != "request_data"})

    async def batch_requests_create(self, request: web.Request) -> web.Response:
        deployment, version = self._request_target(request)
        items = json.loads(await request.read() or b"null")
        if not isinstance(items, list):
            raise ApiError(400, "A batch request takes a list of inputs")
        out = []
        for item in items:
            record = self._run_request(deployment, version, item)
            out.append({"id": record["id"], "deployment": record["deployment"],
                        "version": record["version"], "status": "pending",
                        "time_created": record["time_created"]})  # fmt: skip
        return web.json_response(out, status=201)

    async def deployment_requests_get(self, request: web.Request) -> web.Response:
        deployment = self._deployment(request)
        versions = (
            [self._version(request)]
            if "version" in request.match_info
            else list(deployment.versions.values())
        )
        for version in versions:
            record = version.requests.get(request.match_info["request_id"])
            if record is not None:
                if request.query.get("metadata_only") == "true":
                    return web.json_response(
                        {k: v for k, v in record.items() if k not in ("request_data", "result")}
                    )
                return web.json_response(record)
        raise ApiError(404, "Request not found")

    # ----- audit -----------------------------------------------------------------------

    async def deployment_audit_events_list(self, request: web.Request) -> web.Response:
        deployment = self._deployment(request)
        action = request.query.get("action")
        try:
            limit = int(request.query.get("limit", "50"))
            offset = int(request.query.get("offset", "0"))
        except ValueError as exc:
            raise ApiError(400, "limit and offset must be integers") from exc
        events = [e for e in reversed(deployment.audit) if action is None or e["action"] == action]
        return web.json_response(events[offset : offset + limit])
