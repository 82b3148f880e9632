"""Conformance: the official `ubiops` SDK talks to the fake and parses every answer.

The SDK is synchronous (urllib3): it runs in a thread while the fake serves on the
event loop. If the SDK rejects an answer, the fake is wrong, not this test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import ubiops
from aiohttp.test_utils import TestServer

from tests.fakes.ubiops import FakeUbiOps

ServerFactory = Callable[..., Awaitable[TestServer]]
TOKEN = "sdk-token-0123456789"
PROJECT = "ml-prod"


def sdk_round(host: str, model: Path) -> dict[str, Any]:
    """Create, get, list, update and delete deployments, versions and variables."""
    configuration = ubiops.Configuration(host=host, api_key={"Authorization": f"Token {TOKEN}"})
    client = ubiops.ApiClient(configuration)
    api = ubiops.CoreApi(client)
    seen: dict[str, Any] = {}
    try:
        created = api.deployments_create(
            PROJECT,
            ubiops.DeploymentCreate(
                name="churn",
                description="Churn model",
                input_type="structured",
                output_type="structured",
                input_fields=[ubiops.DeploymentInputFieldCreate(name="x", data_type="double")],
                output_fields=[ubiops.DeploymentOutputFieldCreate(name="y", data_type="double")],
                labels={"team": "ml"},
            ),
        )
        assert isinstance(created, ubiops.DeploymentCreateResponse)
        assert (created.name, created.project, created.input_fields[0].name) == (
            "churn",
            PROJECT,
            "x",
        )
        detail = api.deployments_get(PROJECT, "churn")
        assert isinstance(detail, ubiops.DeploymentDetail)
        listed = api.deployments_list(PROJECT, labels="team:ml")
        assert [d.name for d in listed] == ["churn"]
        assert all(isinstance(d, ubiops.DeploymentList) for d in listed)
        updated = api.deployments_update(
            PROJECT, "churn", ubiops.DeploymentUpdate(description="Churn v2")
        )
        assert updated.description == "Churn v2"

        version = api.deployment_versions_create(
            PROJECT,
            "churn",
            ubiops.DeploymentVersionCreate(
                version="v1", environment="python3-11", instance_type="512mb"
            ),
        )
        # the reference says DeploymentVersionList, SDK 4.x parses it as the detail model
        assert isinstance(version, ubiops.DeploymentVersionList | ubiops.DeploymentVersionDetail)
        assert (version.deployment, version.version, version.default) == ("churn", "v1", True)
        got = api.deployment_versions_get(PROJECT, "churn", "v1")
        assert isinstance(got, ubiops.DeploymentVersionDetail)
        assert got.instance_type == "512mb"
        assert [v.version for v in api.deployment_versions_list(PROJECT, "churn")] == ["v1"]
        changed = api.deployment_versions_update(
            PROJECT, "churn", "v1", ubiops.DeploymentVersionUpdate(maximum_instances=3)
        )
        assert changed.maximum_instances == 3
        assert api.deployments_get(PROJECT, "churn").default_version == "v1"

        variable = api.deployment_environment_variables_create(
            PROJECT,
            "churn",
            ubiops.EnvironmentVariableCreate(name="MODEL_NAME", value="churn", secret=False),
        )
        assert isinstance(variable, ubiops.EnvironmentVariableList)
        fetched = api.deployment_environment_variables_get(PROJECT, "churn", variable.id)
        assert fetched.value == "churn"
        listed_vars = api.deployment_environment_variables_list(PROJECT, "churn")
        assert [(v.name, v.inheritance_type) for v in listed_vars] == [("MODEL_NAME", None)]
        secret = api.deployment_environment_variables_update(
            PROJECT,
            "churn",
            variable.id,
            ubiops.EnvironmentVariableCreate(name="MODEL_NAME", value="hidden", secret=True),
        )
        assert (secret.secret, secret.value) == (True, None)

        version_variable = api.deployment_version_environment_variables_create(
            PROJECT,
            "churn",
            "v1",
            ubiops.EnvironmentVariableCreate(name="THRESHOLD", value="0.7", secret=False),
        )
        inherited = api.deployment_version_environment_variables_list(PROJECT, "churn", "v1")
        assert {(v.name, v.inheritance_type) for v in inherited} == {
            ("THRESHOLD", None),
            ("MODEL_NAME", "deployment"),
        }
        assert (
            api.deployment_version_environment_variables_get(
                PROJECT, "churn", version_variable.id, "v1"
            ).name
            == "THRESHOLD"
        )
        api.deployment_version_environment_variables_update(
            PROJECT,
            "churn",
            version_variable.id,
            "v1",
            ubiops.EnvironmentVariableCreate(name="THRESHOLD", value="0.8", secret=False),
        )
        copied = api.deployment_version_environment_variables_copy(
            PROJECT,
            "churn",
            "v1",
            ubiops.EnvironmentVariableCopy(source_deployment="churn"),
        )
        assert [v.name for v in copied] == ["MODEL_NAME"]

        upload = api.revisions_file_upload(PROJECT, "churn", "v1", file=str(model))
        assert isinstance(upload, ubiops.RevisionCreate)
        assert upload.success is True
        revision = api.revisions_get(PROJECT, "churn", upload.revision, "v1")
        assert isinstance(revision, ubiops.RevisionList)
        seen["statuses"] = [revision.status] + [
            api.revisions_get(PROJECT, "churn", upload.revision, "v1").status for _ in range(2)
        ]
        assert [r.id for r in api.revisions_list(PROJECT, "churn", "v1")] == [upload.revision]
        events = api.deployment_audit_events_list(PROJECT, "churn", action="create", limit=3)
        assert events and all(e.action == "create" for e in events)

        api.deployment_version_environment_variables_delete(
            PROJECT, "churn", version_variable.id, "v1"
        )
        api.deployment_environment_variables_delete(PROJECT, "churn", variable.id)
        api.deployment_versions_delete(PROJECT, "churn", "v1")
        api.deployments_delete(PROJECT, "churn")
        with pytest.raises(ubiops.ApiException) as missing:
            api.deployments_get(PROJECT, "churn")
        seen["missing"] = (missing.value.status, missing.value.body)
        seen["final"] = api.deployments_list(PROJECT)
    finally:
        client.close()
    return seen


async def test_sdk_round_trip_against_the_fake(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeUbiOps(token=TOKEN, projects=(PROJECT,))
    server = await aiohttp_server(fake.app())
    model = tmp_path / "model.zip"
    model.write_bytes(b"PK\x03\x04 sdk model")
    seen = await asyncio.to_thread(sdk_round, str(server.make_url(fake.prefix)), model)
    assert seen["statuses"] == ["queued", "building", "success"]
    assert seen["missing"][0] == 404
    assert "Deployment not found" in str(seen["missing"][1])
    assert seen["final"] == []
    assert all(r.headers.get("Authorization") == f"Token {TOKEN}" for r in fake.requests)
    uploads = fake.calls("POST", r".*/revisions")
    assert uploads[0].headers["Content-Type"].startswith("multipart/form-data")
    assert b"PK\x03\x04 sdk model" in uploads[0].body
