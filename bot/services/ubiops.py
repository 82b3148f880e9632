"""UbiOps deployments API: the operation table, the client, and `ubiops.deploy_revision`.

Operation names and parameters are those of the UbiOps deployments API reference
(`Deployments.md`, 31 methods); the client sends them through the shared policy in
`bot.services.http`.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Mapping
from typing import Any

import aiohttp

from bot.core.backoff import RetryPolicy
from bot.core.catalog import CreateSpec, Operation, Param, plan_request
from bot.errors import ActionError
from bot.services.actions import ActionResult, Done, HighLevelAction, ServiceClient, Wait
from bot.services.http import RateLimiter, Sleep, send

SERVICE = "ubiops"
DEFAULT_BASE_URL = "https://api.ubiops.com/v2.1"
DEFAULT_PER_MINUTE = 240  # stay under the account quota; 429s are handled on top

_DEPLOYMENTS = "/projects/{project_name}/deployments"
_DEPLOYMENT = _DEPLOYMENTS + "/{deployment_name}"
_VERSION = _DEPLOYMENT + "/versions/{version}"

DATA = Param("data", "body", required=True)


def _op(
    name: str,
    method: str,
    path: str,
    *extra: Param,
    creates: CreateSpec | None = None,
    one_of: tuple[tuple[str, ...], ...] = (),
) -> Operation:
    """Build an operation; every `{placeholder}` of the path is a required path param."""
    path_params = tuple(Param(n, "path", required=True) for n in re.findall(r"{(\w+)}", path))
    return Operation(SERVICE, name, method, path, path_params + extra, creates, one_of=one_of)


def _same(*names: str) -> tuple[tuple[str, str], ...]:
    """Map lookup params to the create params of the same name."""
    return tuple((n, n) for n in names)


def _environment_variable_ops(scope: str, base: str, *keys: str) -> tuple[Operation, ...]:
    """The six environment-variable operations of one scope (deployment or version)."""
    variables = base + "/environment-variables"
    prefix = f"{scope}_environment_variables"
    return (
        _op(f"{prefix}_copy", "POST", base + "/copy-environment-variables", DATA),
        _op(
            f"{prefix}_create",
            "POST",
            variables,
            DATA,
            # no get-by-name: list the scope and pick our own (not inherited) variable
            creates=CreateSpec(
                f"{prefix}_list",
                _same(*keys),
                match=(("name", "data.name"), ("inheritance_type", None)),
                compare=("value", "secret"),
            ),
        ),
        _op(f"{prefix}_delete", "DELETE", variables + "/{id}"),
        _op(f"{prefix}_get", "GET", variables + "/{id}"),
        _op(f"{prefix}_list", "GET", variables),
        _op(f"{prefix}_update", "PATCH", variables + "/{id}", DATA),
    )


OPERATIONS: tuple[Operation, ...] = (
    _op("builds_get", "GET", _VERSION + "/builds/{build_id}"),
    _op("builds_list", "GET", _VERSION + "/builds"),
    _op("builds_update", "PATCH", _VERSION + "/builds/{build_id}", DATA),
    _op(
        "deployment_audit_events_list",
        "GET",
        _DEPLOYMENT + "/audit",
        Param("action", "query"),
        Param("limit", "query"),
        Param("offset", "query"),
    ),
    *_environment_variable_ops("deployment", _DEPLOYMENT, "project_name", "deployment_name"),
    *_environment_variable_ops(
        "deployment_version", _VERSION, "project_name", "deployment_name", "version"
    ),
    _op(
        "deployment_versions_create",
        "POST",
        _DEPLOYMENT + "/versions",
        DATA,
        creates=CreateSpec(
            "deployment_versions_get",
            (*_same("project_name", "deployment_name"), ("version", "data.version")),
            compare=("description", "instance_type", "minimum_instances", "maximum_instances"),
        ),
    ),
    _op("deployment_versions_delete", "DELETE", _VERSION),
    _op("deployment_versions_get", "GET", _VERSION),
    _op("deployment_versions_list", "GET", _DEPLOYMENT + "/versions", Param("labels", "query")),
    _op("deployment_versions_update", "PATCH", _VERSION, DATA),
    _op(
        "deployments_create",
        "POST",
        _DEPLOYMENTS,
        DATA,
        creates=CreateSpec(
            "deployments_get",
            (*_same("project_name"), ("deployment_name", "data.name")),
            compare=("input_type", "output_type"),
        ),
    ),
    _op("deployments_delete", "DELETE", _DEPLOYMENT),
    _op("deployments_get", "GET", _DEPLOYMENT),
    _op("deployments_list", "GET", _DEPLOYMENTS, Param("labels", "query")),
    _op("deployments_update", "PATCH", _DEPLOYMENT, DATA),
    _op(
        "revisions_file_download",
        "GET",
        _VERSION + "/revisions/{revision_id}/download",
        Param("save_to", "download"),  # deploybot's own: where to store the file
    ),
    _op(
        "revisions_file_upload",
        "POST",
        _VERSION + "/revisions",
        Param("file", "file"),
        Param("source_deployment", "form"),
        Param("source_version", "form"),
        Param("template_deployment_id", "form"),
        # "Either file or source_deployment and source_version must be provided" (the
        # reference); a template deployment is the third source of the file.
        one_of=(("file",), ("source_deployment", "source_version"), ("template_deployment_id",)),
    ),
    _op("revisions_get", "GET", _VERSION + "/revisions/{revision_id}"),
    _op("revisions_list", "GET", _VERSION + "/revisions"),
    _op(
        "revisions_rebuild",
        "POST",
        _VERSION + "/revisions/{revision_id}/rebuild",
        Param("data", "body"),
    ),
)

# Deployment requests (UbiOps' requests API, not in the deployments reference): a direct
# request answers with its result (`status`, `success`, `result`, `error_message`); a
# batch request answers at once with pending requests, read back with `..._get`.
REQUEST_OPERATIONS: tuple[Operation, ...] = (
    _op(
        "deployment_requests_create",
        "POST",
        _DEPLOYMENT + "/requests",
        DATA,
        Param("timeout", "query"),
    ),
    _op(
        "deployment_version_requests_create",
        "POST",
        _VERSION + "/requests",
        DATA,
        Param("timeout", "query"),
    ),
    _op(
        "deployment_requests_get",
        "GET",
        _DEPLOYMENT + "/requests/{request_id}",
        Param("metadata_only", "query"),
    ),
    _op(
        "deployment_version_requests_get",
        "GET",
        _VERSION + "/requests/{request_id}",
        Param("metadata_only", "query"),
    ),
    _op(
        "batch_deployment_requests_create",
        "POST",
        _DEPLOYMENT + "/requests/batch",
        DATA,
        Param("timeout", "query"),
    ),
    _op(
        "batch_deployment_version_requests_create",
        "POST",
        _VERSION + "/requests/batch",
        DATA,
        Param("timeout", "query"),
    ),
)
# The deployments reference's 31 operations (DEPLOYMENT_OPERATIONS) plus requests.
DEPLOYMENT_OPERATIONS = OPERATIONS
OPERATIONS = DEPLOYMENT_OPERATIONS + REQUEST_OPERATIONS

OPERATIONS_BY_NAME: Mapping[str, Operation] = {op.name: op for op in OPERATIONS}


def authorization(token: str) -> str:
    """Return the Authorization header value; accept a token pasted with its "Token " prefix."""
    token = token.strip()
    return token if token.lower().startswith("token ") else f"Token {token}"


def _filename(headers: Mapping[str, str]) -> str | None:
    match = re.search(r'filename="?([^";]+)"?', headers.get("Content-Disposition", ""))
    return match.group(1) if match else None


class UbiOpsClient:
    """Typed client of the UbiOps deployments API; every call goes through `http.send`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str = DEFAULT_BASE_URL,
        token: str = "",
        *,
        policy: RetryPolicy | None = None,
        per_minute: int = DEFAULT_PER_MINUTE,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._session = session
        self._base_url = base_url
        self._headers = {"Authorization": authorization(token), "Accept": "application/json"}
        self._policy = policy or RetryPolicy()
        self._limiter = RateLimiter(per_minute)
        self._sleep = sleep
        self._rng = rng or random.Random()

    async def call(self, op_name: str, params: Mapping[str, Any]) -> Any:
        """Call one operation by its reference name; return the decoded answer."""
        op = OPERATIONS_BY_NAME.get(op_name.removeprefix(f"{SERVICE}."))
        if op is None:
            raise ActionError(f"unknown UbiOps operation {op_name}")
        req = plan_request(op, params)
        resp = await send(
            self._session,
            req,
            base_url=self._base_url,
            headers=self._headers,
            limiter=self._limiter,
            policy=self._policy,
            sleep=self._sleep,
            rng=self._rng,
        )
        if op.name == "revisions_file_download":
            # a step result is stored as JSON: describe the file, never return its bytes
            return {
                "filename": _filename(resp.headers),
                "size_bytes": resp.downloaded_bytes or len(resp.body),
                "path": req.download_path,
            }
        return resp.json


# Revision build states (UbiOps): the last two are final.
BUILD_IN_PROGRESS = frozenset({"queued", "building", "deploying", "validating"})
POLL_DELAYS_S = (2.0, 5.0, 10.0, 15.0, 30.0)  # then every 30 s
MAX_POLLS = 240  # about two hours of building before giving up

DEPLOY_REVISION_PARAMS = (
    Param("project_name", "path", required=True),
    Param("deployment_name", "path", required=True),
    Param("version", "path", required=True),
    Param("file", "file", required=True),
)


def poll_delay_s(polls: int) -> float:
    """Return the wait before status check number `polls + 1`."""
    return POLL_DELAYS_S[min(polls, len(POLL_DELAYS_S) - 1)]


async def deploy_revision(
    client: ServiceClient, params: Mapping[str, Any], state: dict[str, Any] | None
) -> ActionResult:
    """Upload a deployment file, then follow its revision until the build is final.

    A revision has no natural key to look up, so a retry after an unknown outcome
    uploads again: UbiOps then builds the same file once more and the newest
    revision becomes active, which leaves the version as intended.
    """
    where = {k: params[k] for k in ("project_name", "deployment_name", "version")}
    if state is None:
        upload = await client.call("revisions_file_upload", {**where, "file": params["file"]})
        revision_id = upload["revision"]
        return Wait(poll_delay_s(0), {"revision": revision_id, "polls": 0, "status": "queued"})
    revision_id = state["revision"]
    revision = await client.call("revisions_get", {**where, "revision_id": revision_id})
    status = revision.get("status")
    if status == "success":
        return Done({"revision": revision_id, "status": status, **where})
    label = f"revision {revision_id} of {where['deployment_name']}/{where['version']}"
    if status not in BUILD_IN_PROGRESS:
        detail = revision.get("error_message") or "no error message"
        raise ActionError(f"{label}: build {status}: {detail}")
    polls = int(state.get("polls", 0)) + 1
    if polls >= MAX_POLLS:
        raise ActionError(f"{label}: still {status} after {polls} status checks; giving up")
    return Wait(poll_delay_s(polls), {"revision": revision_id, "polls": polls, "status": status})


ACTIONS: tuple[HighLevelAction, ...] = (
    HighLevelAction(SERVICE, "deploy_revision", DEPLOY_REVISION_PARAMS, deploy_revision),
)
