"""Shared pieces of the rule tests: a small registry mirroring the reference docs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from bot.services import ubiops
from bot.services.catalog import Operation, Param

DATA_DIR = Path(__file__).parent / "data"
_PROJECT = Param("project_name", "path", required=True)
_DEPLOYMENT = Param("deployment_name", "path", required=True)
_VERSION = Param("version", "path", required=True)

# Mirrors reference/ubiops-deployments-api.md and reference/genesys-webdeployments-api.md.
REGISTRY: dict[str, Operation] = {
    op.full_name: op
    for op in (
        Operation(
            "ubiops",
            "deployment_versions_create",
            "POST",
            "/projects/{project_name}/deployments/{deployment_name}/versions",
            (_PROJECT, _DEPLOYMENT, Param("data", "body", required=True)),
        ),
        Operation(
            "ubiops",
            "deployment_versions_get",
            "GET",
            "/projects/{project_name}/deployments/{deployment_name}/versions/{version}",
            (_PROJECT, _DEPLOYMENT, _VERSION),
        ),
        Operation(
            "ubiops",
            "revisions_file_upload",
            "POST",
            "/projects/{project_name}/deployments/{deployment_name}/versions/{version}/revisions",
            (
                _PROJECT,
                _DEPLOYMENT,
                _VERSION,
                Param("file", "file"),
                Param("source_deployment", "form"),
                Param("source_version", "form"),
                Param("template_deployment_id", "form"),
            ),
        ),
        Operation(
            "ubiops",
            "revisions_file_download",
            "GET",
            "/projects/{project_name}/deployments/{deployment_name}/versions/{version}"
            "/revisions/{revision_id}/download",
            (
                _PROJECT,
                _DEPLOYMENT,
                _VERSION,
                Param("revision_id", "path", required=True),
                Param("save_to", "download"),  # deploybot's own: where the file is stored
            ),
        ),
        Operation(
            "ubiops",
            "deployments_list",
            "GET",
            "/projects/{project_name}/deployments",
            (_PROJECT, Param("labels", "query")),
        ),
        Operation(
            "genesys",
            "post_webdeployments_configuration_versions_draft_publish",
            "POST",
            "/api/v2/webdeployments/configurations/{configurationId}/versions/draft/publish",
            (Param("configuration_id", "path", required=True, wire_name="configurationId"),),
        ),
    )
}
# The example rollout's other steps, as the adapter defines them.
REGISTRY |= {
    f"ubiops.{name}": ubiops.OPERATIONS_BY_NAME[name]
    for name in (
        "revisions_get",
        "deployment_version_requests_create",
        "deployments_update",
        "deployment_versions_delete",
    )
}


def payload(name: str) -> dict[str, Any]:
    """Return a fresh copy of a Jira webhook payload fixture from tests/data."""
    data: dict[str, Any] = json.loads((DATA_DIR / f"{name}.json").read_text())
    return data


def write_rules(folder: Path, files: dict[str, str]) -> Path:
    """Write dedented rule files into `folder` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip("\n"))
    return folder
