"""UbiOpsClient and ActionRunner against the fake UbiOps server."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from bot.core.apis import ubiops as ubiops_api
from bot.core.backoff import RetryPolicy
from bot.errors import ActionError, ServiceDisabled
from bot.services.actions import ActionResult, Done, Wait
from bot.services.runner import ActionRunner
from bot.services.ubiops import UbiOpsClient
from tests.fakes.ubiops import FakeUbiOps, Fault

ServerFactory = Callable[..., Awaitable[TestServer]]
TOKEN = "fake-token-0123456789"
PROJECT = "ml-prod"
FAST = RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=30.0, timeout_s=2.0)
DEPLOYMENT = {"name": "churn", "input_type": "plain", "output_type": "plain"}


class Sleeps:
    """Record the waits the client asks for instead of waiting."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@dataclass
class Env:
    fake: FakeUbiOps
    client: UbiOpsClient
    runner: ActionRunner
    sleeps: Sleeps
    base_url: str
    session: aiohttp.ClientSession


@pytest.fixture
async def env(aiohttp_server: ServerFactory, tmp_path: Path) -> AsyncIterator[Env]:
    fake = FakeUbiOps(token=TOKEN, projects=(PROJECT, "other"))
    server = await aiohttp_server(fake.app())
    base_url = str(server.make_url(fake.prefix))
    sleeps = Sleeps()
    async with aiohttp.ClientSession() as session:
        client = UbiOpsClient(
            session,
            base_url,
            TOKEN,
            policy=FAST,
            per_minute=6000,
            sleep=sleeps,
            rng=random.Random(1),
        )
        runner = ActionRunner({"ubiops": client}, files_dir=tmp_path)
        yield Env(fake, client, runner, sleeps, base_url, session)


class RecordingClient:
    """Wrap a client and note which operations were called."""

    def __init__(self, client: UbiOpsClient) -> None:
        self.client = client
        self.called: list[str] = []

    async def call(self, op_name: str, params: Mapping[str, Any]) -> Any:
        self.called.append(op_name)
        return await self.client.call(op_name, {"project_name": PROJECT, **params})


async def test_every_operation_once_through_the_client(env: Env, tmp_path: Path) -> None:
    c = RecordingClient(env.client)
    d = {"deployment_name": "churn"}
    v = {**d, "version": "v1"}
    model = tmp_path / "model.zip"
    model.write_bytes(b"PK\x03\x04 churn model")

    created = await c.call("deployments_create", {"data": {**DEPLOYMENT, "labels": {"team": "ml"}}})
    assert (created["name"], created["project"]) == ("churn", PROJECT)
    assert (await c.call("deployments_get", d))["name"] == "churn"
    assert [x["name"] for x in await c.call("deployments_list", {"labels": "team:ml"})] == ["churn"]
    assert await c.call("deployments_list", {"labels": "team:web"}) == []
    updated = await c.call("deployments_update", {**d, "data": {"description": "Churn"}})
    assert updated["description"] == "Churn"

    version = await c.call("deployment_versions_create", {**d, "data": {"version": "v1"}})
    assert (version["deployment"], version["version"], version["status"]) == (
        "churn",
        "v1",
        "unavailable",
    )
    assert (await c.call("deployment_versions_get", v))["version"] == "v1"
    assert [x["version"] for x in await c.call("deployment_versions_list", d)] == ["v1"]
    changed = await c.call("deployment_versions_update", {**v, "data": {"maximum_instances": 2}})
    assert changed["maximum_instances"] == 2

    # a second deployment as the source of the copies
    await c.client.call(
        "deployments_create", {"project_name": PROJECT, "data": {**DEPLOYMENT, "name": "src"}}
    )
    await c.client.call(
        "deployment_environment_variables_create",
        {
            "project_name": PROJECT,
            "deployment_name": "src",
            "data": {"name": "FROM_SRC", "value": "1", "secret": False},
        },
    )

    var = await c.call(
        "deployment_environment_variables_create",
        {**d, "data": {"name": "MODEL_NAME", "value": "churn", "secret": False}},
    )
    one = {**d, "id": var["id"]}
    assert (await c.call("deployment_environment_variables_get", one))["value"] == "churn"
    listed = await c.call("deployment_environment_variables_list", d)
    assert [(x["name"], x["inheritance_type"]) for x in listed] == [("MODEL_NAME", None)]
    renamed = await c.call(
        "deployment_environment_variables_update",
        {**one, "data": {"name": "MODEL_NAME", "value": "churn2", "secret": True}},
    )
    assert (renamed["value"], renamed["secret"]) == (None, True)
    copied = await c.call(
        "deployment_environment_variables_copy", {**d, "data": {"source_deployment": "src"}}
    )
    assert [x["name"] for x in copied] == ["FROM_SRC"]

    vvar = await c.call(
        "deployment_version_environment_variables_create",
        {**v, "data": {"name": "THRESHOLD", "value": "0.7", "secret": False}},
    )
    vone = {**v, "id": vvar["id"]}
    assert (await c.call("deployment_version_environment_variables_get", vone))["name"] == (
        "THRESHOLD"
    )
    vlisted = await c.call("deployment_version_environment_variables_list", v)
    assert {(x["name"], x["inheritance_type"]) for x in vlisted} == {
        ("THRESHOLD", None),
        ("MODEL_NAME", "deployment"),
        ("FROM_SRC", "deployment"),
    }
    vupdated = await c.call(
        "deployment_version_environment_variables_update",
        {**vone, "data": {"name": "THRESHOLD", "value": "0.8", "secret": False}},
    )
    assert vupdated["value"] == "0.8"
    vcopied = await c.call(
        "deployment_version_environment_variables_copy",
        {**v, "data": {"source_deployment": "src"}},
    )
    assert [x["name"] for x in vcopied] == ["FROM_SRC"]
    assert await c.call("deployment_version_environment_variables_delete", vone) is None
    assert await c.call("deployment_environment_variables_delete", one) is None

    upload = await c.call("revisions_file_upload", {**v, "file": str(model)})
    assert upload["success"] is True
    rev = {**v, "revision_id": upload["revision"]}
    assert (await c.call("revisions_get", rev))["status"] == "queued"
    assert [x["id"] for x in await c.call("revisions_list", v)] == [upload["revision"]]
    saved = tmp_path / "downloaded" / "model.zip"
    info = await c.call("revisions_file_download", {**rev, "save_to": str(saved)})
    assert saved.read_bytes() == model.read_bytes()
    assert info == {"filename": "model.zip", "size_bytes": model.stat().st_size, "path": str(saved)}
    rebuild = await c.call("revisions_rebuild", rev)
    assert (rebuild["revision"], rebuild["status"]) == (upload["revision"], "queued")
    builds = await c.call("builds_list", v)
    assert {b["id"] for b in builds} == {upload["build"], rebuild["id"]}
    build = {**v, "build_id": rebuild["id"]}
    assert (await c.call("builds_get", build))["status"] == "queued"
    cancelled = await c.call("builds_update", {**build, "data": {"status": "cancelled"}})
    assert cancelled["status"] == "cancelled"

    audit = await c.call("deployment_audit_events_list", {**d, "action": "create", "limit": 2})
    assert len(audit) == 2
    assert all(e["action"] == "create" for e in audit)

    assert await c.call("deployment_versions_delete", v) is None
    assert await c.call("deployments_delete", d) is None
    with pytest.raises(ActionError) as gone:
        await c.call("deployments_get", d)

    assert sorted(set(c.called)) == sorted(op.name for op in ubiops_api.DEPLOYMENT_OPERATIONS)
    assert gone.value.status == 404
    assert "Deployment not found" in str(gone.value)
    assert all(r.headers["Authorization"] == f"Token {TOKEN}" for r in env.fake.requests)


async def test_every_answer_carries_rate_limit_headers_and_bad_tokens_get_401(env: Env) -> None:
    bad = UbiOpsClient(env.session, env.base_url, "wrong", policy=FAST, sleep=env.sleeps)
    with pytest.raises(ActionError) as info:
        await bad.call("deployments_list", {"project_name": PROJECT})
    assert (info.value.status, info.value.retryable) == (401, False)
    assert "Invalid token" in str(info.value)
    assert "wrong" not in str(info.value)
    async with env.session.get(f"{env.base_url}/projects/{PROJECT}/deployments") as resp:
        assert resp.status == 401
        assert {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= {
            h.lower() for h in resp.headers
        }
    # a token pasted with its prefix works as is
    pasted = UbiOpsClient(env.session, env.base_url, f"Token {TOKEN}", policy=FAST)
    assert await pasted.call("deployments_list", {"project_name": PROJECT}) == []


async def test_429_waits_as_told_by_the_reset_header(env: Env) -> None:
    env.fake.fail_next(2, Fault.rate_limited(reset_s=7))
    result = await env.client.call("deployments_list", {"project_name": PROJECT})
    assert result == []
    assert env.sleeps.calls == [7.0, 7.0]
    assert len(env.fake.requests) == 3


async def test_fake_enforces_its_own_rate_limit(aiohttp_server: ServerFactory) -> None:
    fake = FakeUbiOps(token=TOKEN, rate_limit_per_minute=2)
    server = await aiohttp_server(fake.app())
    async with aiohttp.ClientSession() as session:
        client = UbiOpsClient(
            session, str(server.make_url(fake.prefix)), TOKEN, policy=FAST, sleep=Sleeps()
        )
        await client.call("deployments_list", {"project_name": PROJECT})
        await client.call("deployments_list", {"project_name": PROJECT})
        async with session.get(
            str(server.make_url(f"{fake.prefix}/projects/{PROJECT}/deployments")),
            headers={"Authorization": f"Token {TOKEN}"},
        ) as resp:
            assert resp.status == 429
            assert resp.headers["x-ratelimit-remaining"] == "0"
            assert 0 < int(resp.headers["x-ratelimit-reset"]) <= 60
            assert (await resp.json())["error"] == "Rate limit exceeded"


async def run_like_the_executor(
    runner: ActionRunner, action: str, params: dict[str, Any], attempts: int = 6
) -> tuple[ActionResult, list[ActionError]]:
    """Run an action as the executor does: retry retryable failures, looking first."""
    failures: list[ActionError] = []
    for attempt in range(attempts):
        try:
            return await runner.run(action, params, lookup_first=attempt > 0), failures
        except ActionError as exc:
            assert exc.retryable, exc
            failures.append(exc)
    raise AssertionError(f"{action} still failing after {attempts} attempts: {failures}")


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=500, method="POST"),
        Fault(status=503, method="POST"),
        Fault(kind="drop", method="POST"),
    ],
    ids=["500", "503", "drop"],
)
async def test_failures_before_processing_then_success_give_one_object(
    env: Env, fault: Fault
) -> None:
    env.fake.fail_next(2, fault)
    outcome, failures = await run_like_the_executor(
        env.runner, "ubiops.deployments_create", {"project_name": PROJECT, "data": DEPLOYMENT}
    )
    # a POST without an answer is not sent again blindly: each failure ends the attempt
    assert [("outcome unknown" in str(f), f.retryable) for f in failures] == [(True, True)] * 2
    assert isinstance(outcome, Done)
    assert outcome.result["name"] == "churn"
    assert env.fake.deployment_names(PROJECT) == ["churn"]
    assert len(env.fake.calls("POST", f"/projects/{PROJECT}/deployments")) == 3


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=500, method="POST", after=True),
        Fault(kind="drop", method="POST", after=True),
        Fault(kind="slow", delay_s=0.4, method="POST"),
    ],
    ids=["500-after-create", "drop-after-create", "slow"],
)
async def test_lost_answer_then_409_counts_as_done_with_one_object(
    aiohttp_server: ServerFactory, fault: Fault
) -> None:
    fake = FakeUbiOps(token=TOKEN)
    server = await aiohttp_server(fake.app())
    await_slow = RetryPolicy(max_attempts=4, base_delay_s=0.5, timeout_s=0.2)
    async with aiohttp.ClientSession() as session:
        client = UbiOpsClient(session, str(server.make_url(fake.prefix)), TOKEN, policy=await_slow)
        runner = ActionRunner({"ubiops": client})
        await runner.run("ubiops.deployments_create", {"project_name": PROJECT, "data": DEPLOYMENT})
        fake.fail_next(1, fault)
        params = {
            "project_name": PROJECT,
            "deployment_name": "churn",
            "data": {"version": "v1", "instance_type": "512mb"},
        }
        outcome, _ = await run_like_the_executor(
            runner, "ubiops.deployment_versions_create", params
        )
    assert isinstance(outcome, Done)
    assert outcome.result["version"] == "v1"
    assert fake.version_names(PROJECT, "churn") == ["v1"]
    posts = fake.calls("POST", f"/projects/{PROJECT}/deployments/churn/versions")
    lookups = fake.calls("GET", f"/projects/{PROJECT}/deployments/churn/versions/v1")
    if fault.after:  # the create was done, its answer lost: found by the lookup
        assert (len(posts), len(lookups)) == (1, 1)
    else:  # slow: the lookup may come before the slow create lands; a retry meets a 409
        assert len(posts) <= 2 and len(lookups) >= 1


async def test_lookup_first_returns_the_existing_object_without_creating(env: Env) -> None:
    params = {"project_name": PROJECT, "data": DEPLOYMENT}
    first = await env.runner.run("ubiops.deployments_create", params)
    again = await env.runner.run("ubiops.deployments_create", params, lookup_first=True)
    assert isinstance(first, Done) and isinstance(again, Done)
    assert again.result["id"] == first.result["id"]
    assert len(env.fake.calls("POST", f"/projects/{PROJECT}/deployments")) == 1
    # lookup_first on something absent: looks (404), then creates
    fresh = {"project_name": PROJECT, "data": {**DEPLOYMENT, "name": "fresh"}}
    created = await env.runner.run("ubiops.deployments_create", fresh, lookup_first=True)
    assert isinstance(created, Done)
    assert env.fake.deployment_names(PROJECT) == ["churn", "fresh"]


async def test_existing_object_that_differs_is_refused(env: Env) -> None:
    await env.runner.run("ubiops.deployments_create", {"project_name": PROJECT, "data": DEPLOYMENT})
    version = {"project_name": PROJECT, "deployment_name": "churn"}
    await env.runner.run(
        "ubiops.deployment_versions_create",
        {**version, "data": {"version": "v1", "instance_type": "512mb"}},
    )
    for lookup_first in (True, False):
        with pytest.raises(ActionError, match="differs in instance_type") as info:
            await env.runner.run(
                "ubiops.deployment_versions_create",
                {**version, "data": {"version": "v1", "instance_type": "4096mb"}},
                lookup_first=lookup_first,
            )
        assert info.value.retryable is False
    assert env.fake.version_names(PROJECT, "churn") == ["v1"]


async def test_variable_create_looks_up_by_name_ignoring_inherited(env: Env) -> None:
    env.fake.add_project_variable(PROJECT, "MODEL_NAME", "project-wide")
    await env.runner.run("ubiops.deployments_create", {"project_name": PROJECT, "data": DEPLOYMENT})
    params = {
        "project_name": PROJECT,
        "deployment_name": "churn",
        "data": {"name": "MODEL_NAME", "value": "churn", "secret": False},
    }
    path = f"/projects/{PROJECT}/deployments/churn/environment-variables"
    first = await env.runner.run(
        "ubiops.deployment_environment_variables_create", params, lookup_first=True
    )
    assert isinstance(first, Done)
    assert first.result["value"] == "churn"  # the inherited one did not count
    again = await env.runner.run(
        "ubiops.deployment_environment_variables_create", params, lookup_first=True
    )
    duplicate = await env.runner.run("ubiops.deployment_environment_variables_create", params)
    assert isinstance(again, Done) and isinstance(duplicate, Done)
    assert again.result["id"] == duplicate.result["id"] == first.result["id"]
    assert len(env.fake.calls("POST", path)) == 2  # first create, then the 400 "already exists"
    scope = {"project_name": PROJECT, "deployment_name": "churn"}
    listed = await env.client.call("deployment_environment_variables_list", scope)
    assert sorted((v["name"], v["inheritance_type"]) for v in listed) == [("MODEL_NAME", None)]


async def test_fraction_of_failures_is_survived_with_one_object_each(env: Env) -> None:
    env.fake.fail_fraction(0.3, Fault(status=503), seed=7)
    for name in ("a", "b", "c", "d"):
        outcome, _ = await run_like_the_executor(
            env.runner,
            "ubiops.deployments_create",
            {"project_name": PROJECT, "data": {**DEPLOYMENT, "name": name}},
        )
        assert isinstance(outcome, Done)
    assert env.fake.deployment_names(PROJECT) == ["a", "b", "c", "d"]
    assert len(env.fake.requests) > 4  # some answers were 503 and retried


async def test_deploy_revision_waits_then_finishes(env: Env, tmp_path: Path) -> None:
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "model.zip").write_bytes(b"PK model")
    await env.runner.run("ubiops.deployments_create", {"project_name": PROJECT, "data": DEPLOYMENT})
    where = {"project_name": PROJECT, "deployment_name": "churn", "version": "v1"}
    await env.runner.run(
        "ubiops.deployment_versions_create",
        {"project_name": PROJECT, "deployment_name": "churn", "data": {"version": "v1"}},
    )
    params = {**where, "file": "artifacts/model.zip"}  # relative to the rules folder
    outcomes = [await env.runner.run("ubiops.deploy_revision", params)]
    while isinstance(outcomes[-1], Wait):
        outcomes.append(
            await env.runner.run("ubiops.deploy_revision", params, state=outcomes[-1].state)
        )
        assert len(outcomes) < 10
    *rest, last = outcomes
    waits = [w for w in rest if isinstance(w, Wait)]
    assert len(waits) == len(rest) and isinstance(last, Done)
    assert [(w.after_s, w.state["status"], w.state["polls"]) for w in waits] == [
        (2.0, "queued", 0),  # just uploaded
        (5.0, "queued", 1),
        (10.0, "building", 2),
    ]
    revision = waits[0].state["revision"]
    assert last.result == {"revision": revision, "status": "success", **where}
    assert len(env.fake.calls("POST", r".*/revisions")) == 1
    version = await env.client.call("deployment_versions_get", where)
    assert (version["active_revision"], version["status"]) == (revision, "available")


async def test_deploy_revision_reports_a_failed_build(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    fake = FakeUbiOps(token=TOKEN, build_steps=("queued", "failed"))
    server = await aiohttp_server(fake.app())
    model = tmp_path / "model.zip"
    model.write_bytes(b"PK broken")
    async with aiohttp.ClientSession() as session:
        client = UbiOpsClient(session, str(server.make_url(fake.prefix)), TOKEN, policy=FAST)
        runner = ActionRunner({"ubiops": client})
        await runner.run("ubiops.deployments_create", {"project_name": PROJECT, "data": DEPLOYMENT})
        where = {"project_name": PROJECT, "deployment_name": "churn", "version": "v1"}
        await client.call(
            "deployment_versions_create",
            {"project_name": PROJECT, "deployment_name": "churn", "data": {"version": "v1"}},
        )
        params = {**where, "file": str(model)}
        waiting = await runner.run("ubiops.deploy_revision", params)
        assert isinstance(waiting, Wait)
        waiting = await runner.run("ubiops.deploy_revision", params, state=waiting.state)
        assert isinstance(waiting, Wait)  # still queued
        with pytest.raises(ActionError, match="build failed: Build failed") as info:
            await runner.run("ubiops.deploy_revision", params, state=waiting.state)
    assert info.value.retryable is False


async def test_runner_refuses_unknown_actions_and_disabled_services(env: Env) -> None:
    disabled = ActionRunner({"ubiops": None})
    with pytest.raises(ServiceDisabled, match="ubiops is not configured"):
        await disabled.run("ubiops.deployments_list", {"project_name": PROJECT})
    with pytest.raises(ServiceDisabled):
        await ActionRunner({}).run("ubiops.deploy_revision", {})
    with pytest.raises(ActionError, match=r"unknown action ubiops\.nope"):
        await env.runner.run("ubiops.nope", {})
    with pytest.raises(ActionError, match="missing required parameter"):
        await env.runner.run("ubiops.deploy_revision", {"project_name": PROJECT})
    assert env.fake.requests == []


async def _available_version(env: Env, tmp_path: Path, version: str = "v1") -> str:
    """Create churn/<version> and upload a file; read the revision until its build is done."""
    where = {"project_name": PROJECT, "deployment_name": "churn"}
    if "churn" not in env.fake.deployment_names(PROJECT):
        await env.client.call("deployments_create", {"project_name": PROJECT, "data": DEPLOYMENT})
    await env.client.call("deployment_versions_create", {**where, "data": {"version": version}})
    model = tmp_path / "model.zip"
    model.write_bytes(b"zip")
    upload = await env.client.call(
        "revisions_file_upload", {**where, "version": version, "file": str(model)}
    )
    revision = {**where, "version": version, "revision_id": upload["revision"]}
    while (await env.client.call("revisions_get", revision))["status"] != "success":
        pass
    return version


async def test_promoting_a_version_whose_build_is_not_done_is_refused(
    env: Env, tmp_path: Path
) -> None:
    where = {"project_name": PROJECT, "deployment_name": "churn"}
    await _available_version(env, tmp_path, "v1")
    await env.client.call("deployment_versions_create", {**where, "data": {"version": "v2"}})
    with pytest.raises(ActionError, match="Only available versions can be set as default"):
        await env.client.call("deployments_update", {**where, "data": {"default_version": "v2"}})
    assert env.fake.projects[PROJECT]["churn"].data["default_version"] == "v1"


async def test_deployment_requests_direct_batch_and_get(env: Env, tmp_path: Path) -> None:
    where = {"project_name": PROJECT, "deployment_name": "churn"}
    await _available_version(env, tmp_path, "v1")
    direct = await env.client.call(
        "deployment_version_requests_create", {**where, "version": "v1", "data": {"input": 2.0}}
    )
    assert (direct["status"], direct["success"], direct["result"]) == (
        "completed",
        True,
        {"output": 4.0},
    )
    # The deployment's own endpoint goes to its default version.
    by_default = await env.client.call(
        "deployment_requests_create", {**where, "data": {"input": 1}}
    )
    assert (by_default["version"], by_default["result"]) == ("v1", {"output": 2})
    batch = await env.client.call(
        "batch_deployment_version_requests_create",
        {**where, "version": "v1", "data": [{"input": 3}, {"input": 4}]},
    )
    assert [b["status"] for b in batch] == ["pending", "pending"]
    read = await env.client.call(
        "deployment_version_requests_get",
        {**where, "version": "v1", "request_id": batch[1]["id"]},
    )
    assert read["result"] == {"output": 8}
    read = await env.client.call("deployment_requests_get", {**where, "request_id": batch[0]["id"]})
    assert read["result"] == {"output": 6}
    env.fake.failing_versions.add("v1")
    failed = await env.client.call(
        "deployment_version_requests_create", {**where, "version": "v1", "data": {"input": 2}}
    )
    assert (failed["status"], failed["success"]) == ("failed", False)
    assert failed["error_message"]


async def test_a_request_to_a_version_not_built_is_refused(env: Env) -> None:
    where = {"project_name": PROJECT, "deployment_name": "churn"}
    await env.client.call("deployments_create", {"project_name": PROJECT, "data": DEPLOYMENT})
    await env.client.call("deployment_versions_create", {**where, "data": {"version": "v1"}})
    with pytest.raises(ActionError, match="not available"):
        await env.client.call(
            "deployment_version_requests_create", {**where, "version": "v1", "data": {"input": 1}}
        )
