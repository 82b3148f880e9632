"""The UbiOps deployments API as data: its operations and deploybot's own actions' parameters.

Operation names and parameters are those of the UbiOps deployments API reference
(`docs/reference/ubiops-deployments-api.md`, 31 methods), plus the requests API.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from bot.core.catalog import CreateSpec, Operation, Param

SERVICE = "ubiops"

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

DEPLOY_REVISION_PARAMS = (
    Param("project_name", "path", required=True),
    Param("deployment_name", "path", required=True),
    Param("version", "path", required=True),
    Param("file", "file", required=True),
)
