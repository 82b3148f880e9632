"""GenesysClient and genesys.publish_configuration against the fake Genesys server."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from bot.core.apis import registry
from bot.core.apis.genesys import GUEST_OPERATIONS, OPERATIONS_BY_NAME
from bot.core.backoff import RetryPolicy
from bot.errors import ActionError, ServiceDisabled
from bot.services.actions import Done
from bot.services.genesys import MAX_BODY_BYTES, GenesysClient, publish_configuration
from bot.services.runner import ActionRunner, high_level_actions
from tests.fakes.genesys import WD, WIDGETS, FakeGenesys

POLICY = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=30.0, timeout_s=2.0)
CONFIG = {"name": "Support", "languages": ["en-us"], "defaultLanguage": "en-us"}


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class Sleeps:
    """A sleep that records how long it was asked to wait and returns at once."""

    def __init__(self) -> None:
        self.waits_s: list[float] = []

    async def __call__(self, delay_s: float) -> None:
        self.waits_s.append(delay_s)


@pytest.fixture
def fake() -> FakeGenesys:
    return FakeGenesys(token_expires_in_s=3600)


@pytest.fixture
async def base(fake: FakeGenesys) -> AsyncIterator[str]:
    async with TestServer(fake.app, host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(
    fake: FakeGenesys, base: str, http: aiohttp.ClientSession, sleeps: Sleeps, clock: Clock
) -> GenesysClient:
    return make_client(fake, base, http, sleeps, clock)


def make_client(
    fake: FakeGenesys,
    base: str,
    http: aiohttp.ClientSession,
    sleeps: Sleeps,
    clock: Callable[[], float],
    secret: str = "",
    policy: RetryPolicy = POLICY,
) -> GenesysClient:
    return GenesysClient(
        http,
        base,
        base,
        fake.client_id,
        secret or fake.client_secret,
        policy=policy,
        per_minute=6000,
        sleep=sleeps,
        clock=clock,
    )


async def test_every_operation_once(fake: FakeGenesys, client: GenesysClient) -> None:
    called: list[str] = []

    async def call(name: str, params: dict[str, Any], method: str, path: str) -> Any:
        answer = await client.call(name, params)
        seen = fake.api_requests[-1]
        assert (seen.method, seen.path) == (method, path), name
        if name in GUEST_OPERATIONS:  # sent as the SDK sends them: without the org's token
            assert "Authorization" not in seen.headers, name
        else:
            assert seen.headers["Authorization"].startswith("Bearer ")
        called.append(name)
        return answer

    draft = await call(
        "post_webdeployments_configurations",
        {"configuration_version": CONFIG},
        "POST",
        f"{WD}/configurations",
    )
    cid = draft["id"]
    assert (draft["version"], draft["status"]) == ("draft", "Pending")
    cfg = f"{WD}/configurations/{cid}"
    edited = {**CONFIG, "description": "edited"}
    draft = await call(
        "put_webdeployments_configuration_versions_draft",
        {"configuration_id": cid, "configuration_version": edited},
        "PUT",
        f"{cfg}/versions/draft",
    )
    assert fake.api_requests[-1].json == edited
    got = await call(
        "get_webdeployments_configuration_versions_draft",
        {"configuration_id": cid},
        "GET",
        f"{cfg}/versions/draft",
    )
    assert got["description"] == "edited"
    v1 = await call(
        "post_webdeployments_configuration_versions_draft_publish",
        {"configuration_id": cid},
        "POST",
        f"{cfg}/versions/draft/publish",
    )
    assert (v1["version"], v1["status"]) == ("1", "Active")
    versions = await call(
        "get_webdeployments_configuration_versions",
        {"configuration_id": cid},
        "GET",
        f"{cfg}/versions",
    )
    assert [v["version"] for v in versions["entities"]] == ["1"]
    one = await call(
        "get_webdeployments_configuration_version",
        {"configuration_id": cid, "version_id": "1"},
        "GET",
        f"{cfg}/versions/1",
    )
    assert one == v1
    listing = await call(
        "get_webdeployments_configurations",
        {"show_only_published": True},
        "GET",
        f"{WD}/configurations",
    )
    assert list(fake.api_requests[-1].query) == [
        ("showOnlyPublished", "true"),
    ]
    assert [c["id"] for c in listing["entities"]] == [cid]

    ref = {"id": cid, "version": "1"}
    deployment = await call(
        "post_webdeployments_deployments",
        {"deployment": {"name": "site", "configuration": ref}},
        "POST",
        f"{WD}/deployments",
    )
    did = deployment["id"]
    dep = f"{WD}/deployments/{did}"
    deployments = await call(
        "get_webdeployments_deployments",
        {"expand": ["Configuration"]},
        "GET",
        f"{WD}/deployments",
    )
    assert list(fake.api_requests[-1].query) == [
        ("expand", "Configuration"),
    ]
    assert deployments["entities"][0]["configuration"]["defaultLanguage"] == "en-us"
    got = await call(
        "get_webdeployments_deployment",
        {"deployment_id": did, "expand": ["supportedContent"]},
        "GET",
        dep,
    )
    assert got["configuration"]["version"] == "1"
    renamed = await call(
        "put_webdeployments_deployment",
        {"deployment_id": did, "deployment": {**got, "name": "site 2"}},
        "PUT",
        dep,
    )
    assert renamed["name"] == "site 2"
    active = await call(
        "get_webdeployments_deployment_configurations",
        {"deployment_id": did, "type": "Published", "expand": ["supportedContent"]},
        "GET",
        f"{dep}/configurations",
    )
    assert list(fake.api_requests[-1].query) == [
        ("type", "Published"),
        ("expand", "supportedContent"),
    ]
    assert (active["id"], active["version"]) == (cid, "1")

    session = fake.add_cobrowse_session(did)
    got = await call(
        "get_webdeployments_deployment_cobrowse_session_id",
        {"deployment_id": did, "session_id": session["id"]},
        "GET",
        f"{dep}/cobrowse/{session['id']}",
    )
    assert got["joinCode"] == session["joinCode"]
    assert (
        await call(
            "delete_webdeployments_deployment_cobrowse_session_id",
            {"deployment_id": did, "session_id": session["id"]},
            "DELETE",
            f"{dep}/cobrowse/{session['id']}",
        )
        == {}
    )
    exchange = {"deploymentId": did, "oauthParameters": {"code": "c0de", "redirectUri": "x:/"}}
    jwt = await call(
        "post_webdeployments_token_oauthcodegrantjwtexchange",
        {"body": exchange},
        "POST",
        f"{WD}/token/oauthcodegrantjwtexchange",
    )
    refreshed = await call(
        "post_webdeployments_token_refresh",
        {"body": {"deploymentId": did, "refreshToken": jwt["refreshToken"]}},
        "POST",
        f"{WD}/token/refresh",
    )
    assert refreshed["jwt"]
    revoked = await call(
        "delete_webdeployments_token_revoke",
        {"x_journey_session_id": "js-1", "x_journey_session_type": "web"},
        "DELETE",
        f"{WD}/token/revoke",
    )
    assert revoked is None
    sent = fake.api_requests[-1].headers
    assert (sent["X-Journey-Session-Id"], sent["X-Journey-Session-Type"]) == ("js-1", "web")

    widget = await call(
        "post_widgets_deployments", {"body": {"name": "w", "clientType": "v2"}}, "POST", WIDGETS
    )
    wid = widget["id"]
    widgets = await call("get_widgets_deployments", {}, "GET", WIDGETS)
    assert [w["id"] for w in widgets["entities"]] == [wid] and widgets["total"] == 1
    got = await call("get_widgets_deployment", {"deployment_id": wid}, "GET", f"{WIDGETS}/{wid}")
    assert got == widget
    changed = {**widget, "disabled": True}
    put = await call(
        "put_widgets_deployment",
        {"deployment_id": wid, "body": changed},
        "PUT",
        f"{WIDGETS}/{wid}",
    )
    assert put["disabled"] is True
    gone = await call(
        "delete_widgets_deployment", {"deployment_id": wid}, "DELETE", f"{WIDGETS}/{wid}"
    )
    assert gone is None and not fake.widget_deployments

    assert (
        await call("delete_webdeployments_deployment", {"deployment_id": did}, "DELETE", dep)
        is None
    )
    assert (
        await call("delete_webdeployments_configuration", {"configuration_id": cid}, "DELETE", cfg)
        is None
    )
    assert not fake.deployments and not fake.configurations
    assert sorted(called) == sorted(OPERATIONS_BY_NAME)
    assert len(fake.token_requests) == 1


async def test_unknown_operation_and_parameters_are_refused(
    fake: FakeGenesys, client: GenesysClient
) -> None:
    with pytest.raises(ActionError, match="unknown genesys operation get_everything"):
        await client.call("get_everything", {})
    with pytest.raises(ActionError, match="unknown parameter"):
        await client.call("get_webdeployments_deployments", {"colour": "red"})
    assert fake.requests == []


async def test_404_is_a_clear_non_retryable_error(fake: FakeGenesys, client: GenesysClient) -> None:
    with pytest.raises(ActionError) as caught:
        await client.call("get_webdeployments_deployment", {"deployment_id": "nope"})
    assert (caught.value.status, caught.value.retryable) == (404, False)
    assert "Deployment nope not found" in str(caught.value)
    assert len(fake.api_requests) == 1


async def test_expired_token_is_refreshed_once_for_50_concurrent_calls(
    fake: FakeGenesys, client: GenesysClient, clock: Clock
) -> None:
    await client.call("get_webdeployments_deployments", {})
    fake.inject("slow", path_prefix="/oauth/", delay_s=0.05)  # keep the refresh in flight
    clock.now_s += 3600  # our copy is due, and the server agrees it is dead
    fake.expire_tokens()
    answers = await asyncio.gather(
        *(client.call("get_webdeployments_deployments", {}) for _ in range(50))
    )
    assert all(a["total"] == 0 for a in answers)
    assert len(fake.token_requests) == 2
    assert len(fake.api_requests) == 51  # no request went out with the stale token


async def test_revoked_token_401s_lead_to_one_refresh_for_all_callers(
    fake: FakeGenesys, client: GenesysClient
) -> None:
    await client.call("get_widgets_deployments", {})
    fake.revoke_tokens()  # the client still believes its token is good
    fake.inject("slow", path_prefix="/oauth/", delay_s=0.05)
    await asyncio.gather(*(client.call("get_widgets_deployments", {}) for _ in range(50)))
    assert len(fake.token_requests) == 2
    assert len(fake.api_requests) == 1 + 50 + 50  # first call, 50 rejected, 50 retried


async def test_401_refreshes_once_and_retries_the_call(
    fake: FakeGenesys, client: GenesysClient, sleeps: Sleeps
) -> None:
    await client.call("get_webdeployments_deployments", {})
    fake.revoke_tokens()
    assert await client.call("get_webdeployments_deployments", {}) is not None
    trail = [(r.method, r.path) for r in fake.requests]
    assert trail == [
        ("POST", "/oauth/token"),
        ("GET", f"{WD}/deployments"),
        ("GET", f"{WD}/deployments"),
        ("POST", "/oauth/token"),
        ("GET", f"{WD}/deployments"),
    ]
    assert fake.requests[2].headers["Authorization"] != fake.requests[4].headers["Authorization"]
    assert sleeps.waits_s == []


async def test_a_401_that_persists_is_refreshed_only_once(
    base: str, http: aiohttp.ClientSession, sleeps: Sleeps, clock: Clock
) -> None:
    # The fake's clock jumps ahead on every reading, so every token it issues is dead.
    ticks = itertools.count(0, 10_000)
    doomed = FakeGenesys(token_expires_in_s=60, clock=lambda: float(next(ticks)))
    async with TestServer(doomed.app, host="127.0.0.1") as server:
        url = str(server.make_url("")).rstrip("/")
        client = make_client(doomed, url, http, sleeps, clock)
        with pytest.raises(ActionError) as caught:
            await client.call("get_webdeployments_deployments", {})
    assert (caught.value.status, caught.value.retryable) == (401, False)
    assert len(doomed.token_requests) == 2 and len(doomed.api_requests) == 2


async def test_429_waits_as_told_by_retry_after(
    fake: FakeGenesys, client: GenesysClient, sleeps: Sleeps
) -> None:
    fake.inject("429", count=2, retry_after_s=7)
    assert await client.call("get_webdeployments_configurations", {}) is not None
    assert sleeps.waits_s == [7.0, 7.0]
    assert len(fake.api_requests) == 3


async def test_429_asking_too_long_a_wait_goes_back_to_the_executor(
    fake: FakeGenesys, client: GenesysClient, sleeps: Sleeps
) -> None:
    fake.inject("429", count=1, retry_after_s=120)
    with pytest.raises(ActionError) as caught:
        await client.call("get_webdeployments_configurations", {})
    error = caught.value
    assert (error.status, error.retryable, error.retry_after_s) == (429, True, 120.0)
    assert sleeps.waits_s == [] and len(fake.api_requests) == 1


@pytest.mark.parametrize("kind", ["500", "503", "drop", "slow"])
async def test_transient_failures_are_retried(
    fake: FakeGenesys,
    base: str,
    http: aiohttp.ClientSession,
    sleeps: Sleeps,
    clock: Clock,
    kind: Any,
) -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_s=0.01, timeout_s=0.3)
    client = make_client(fake, base, http, sleeps, clock, policy=policy)
    fake.inject(kind, count=2, delay_s=1.0)
    assert await client.call("get_widgets_deployments", {}) is not None
    assert len(fake.api_requests) == 3
    # aiohttp itself resends an idempotent request once when a reused connection drops
    assert len(sleeps.waits_s) in ({1, 2} if kind == "drop" else {2})


async def test_persistent_503_ends_retryable(fake: FakeGenesys, client: GenesysClient) -> None:
    fake.inject("503", count=None, fraction=1.0)
    with pytest.raises(ActionError) as caught:
        await client.call("get_widgets_deployments", {})
    assert (caught.value.status, caught.value.retryable) == (503, True)
    assert len(fake.api_requests) == POLICY.max_attempts


def padded_config(total_bytes: int) -> dict[str, Any]:
    """Return a valid configuration whose JSON body is exactly `total_bytes` long."""
    body = {**CONFIG, "description": ""}
    body["description"] = "x" * (total_bytes - len(json.dumps(body).encode()))
    assert len(json.dumps(body).encode()) == total_bytes
    return body


async def test_oversized_body_is_refused_without_a_request(
    fake: FakeGenesys, client: GenesysClient
) -> None:
    with pytest.raises(ActionError) as caught:
        await client.call(
            "post_webdeployments_configurations",
            {"configuration_version": padded_config(MAX_BODY_BYTES + 1)},
        )
    assert (caught.value.status, caught.value.retryable) == (413, False)
    assert f"{MAX_BODY_BYTES + 1} bytes" in str(caught.value)
    assert fake.requests == []
    at_limit = padded_config(MAX_BODY_BYTES)
    draft = await client.call(
        "post_webdeployments_configurations", {"configuration_version": at_limit}
    )
    assert len(fake.api_requests[-1].body) == MAX_BODY_BYTES
    assert draft["description"] == at_limit["description"]


async def seed_deployment(client: GenesysClient) -> tuple[str, str]:
    draft = await client.call(
        "post_webdeployments_configurations", {"configuration_version": CONFIG}
    )
    cid = draft["id"]
    await client.call(
        "post_webdeployments_configuration_versions_draft_publish", {"configuration_id": cid}
    )
    ref = {"id": cid, "version": "1"}
    deployment = await client.call(
        "post_webdeployments_deployments", {"deployment": {"name": "site", "configuration": ref}}
    )
    return cid, deployment["id"]


async def test_publish_configuration_end_to_end(fake: FakeGenesys, client: GenesysClient) -> None:
    cid, did = await seed_deployment(client)
    content = {**CONFIG, "description": "new greeting"}
    params = {"configuration_id": cid, "body": content, "deployment_id": did}
    fake.requests.clear()
    result = await publish_configuration(client, params)

    assert (result["version"], result["published"]) == ("2", True)
    config = fake.configurations[cid]
    assert config.draft["description"] == "new greeting"
    assert [(v["version"], v["status"]) for v in config.versions] == [
        ("1", "Inactive"),
        ("2", "Active"),
    ]
    assert config.versions[-1]["description"] == "new greeting"
    assert fake.deployments[did]["configuration"]["version"] == "2"
    assert result["deployment"]["configuration"] == fake.deployments[did]["configuration"]
    put = [r for r in fake.api_requests if r.method == "PUT" and r.path.endswith(did)]
    assert put[0].json["configuration"] == {"id": cid, "version": "2"}

    # Run again (a retry after a crash): nothing new is published or changed.
    fake.requests.clear()
    again = await publish_configuration(client, params)
    assert (again["version"], again["published"]) == ("2", False)
    assert len(config.versions) == 2
    assert [r.method for r in fake.api_requests] == ["PUT", "GET", "GET"]


async def test_publish_configuration_without_body_or_deployment(
    fake: FakeGenesys, client: GenesysClient
) -> None:
    draft = await client.call(
        "post_webdeployments_configurations", {"configuration_version": CONFIG}
    )
    result = await publish_configuration(client, {"configuration_id": draft["id"]})
    assert (result["version"], result["published"]) == ("1", True)
    assert "deployment" not in result
    assert not any(r.method == "PUT" for r in fake.api_requests)
    with pytest.raises(ActionError, match=r"missing required parameter.*configuration_id"):
        await publish_configuration(client, {"deployment_id": "d"})


async def test_no_secret_in_any_error_repr_or_log(
    fake: FakeGenesys,
    base: str,
    http: aiohttp.ClientSession,
    sleeps: Sleeps,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    good = make_client(fake, base, http, sleeps, clock)
    wrong = make_client(fake, base, http, sleeps, clock, secret="wrong-secret-never-shown")
    errors: list[ActionError] = []
    scenarios: list[tuple[GenesysClient, Callable[[], object]]] = [
        (wrong, lambda: None),
        (good, lambda: fake.inject("500", count=None)),
        (good, lambda: fake.inject("drop", count=None)),
        (good, lambda: fake.inject("drop", count=1, path_prefix="/oauth/")),
    ]
    for client, arrange in scenarios:
        fake.faults.clear()
        fake.revoke_tokens()
        arrange()
        with pytest.raises(ActionError) as caught:
            await client.call("get_webdeployments_deployments", {})
        errors.append(caught.value)
    shown = " ".join(f"{e} {e!r} {e.__cause__!r} {e.__context__!r}" for e in errors)
    shown += f" {good!r} {wrong!r} " + caplog.text
    issued = [r for r in fake.requests if r.path.startswith("/api/")]
    bearer_tokens = {r.headers["Authorization"].split()[1] for r in issued}
    assert bearer_tokens  # the scenarios did reach the API with tokens
    basic = fake.token_requests[0].headers["Authorization"]
    for secret in [fake.client_secret, "wrong-secret-never-shown", basic, *bearer_tokens]:
        assert secret not in shown


async def test_runner_routes_genesys_actions(fake: FakeGenesys, client: GenesysClient) -> None:
    assert "genesys.publish_configuration" in high_level_actions()
    assert {f"genesys.{name}" for name in OPERATIONS_BY_NAME} <= set(registry())
    runner = ActionRunner({"genesys": client})
    created = await runner.run(
        "genesys.post_widgets_deployments", {"body": {"name": "w", "clientType": "v1"}}
    )
    assert isinstance(created, Done) and created.result["id"] in fake.widget_deployments
    draft = await client.call(
        "post_webdeployments_configurations", {"configuration_version": CONFIG}
    )
    outcome = await runner.run(
        "genesys.publish_configuration", {"configuration_id": draft["id"], "body": CONFIG}
    )
    assert isinstance(outcome, Done) and outcome.result["version"] == "1"
    with pytest.raises(ActionError, match="unknown parameter"):
        await runner.run("genesys.publish_configuration", {"configuration_id": "c", "x": 1})
    with pytest.raises(ServiceDisabled):
        await ActionRunner({"genesys": None}).run("genesys.get_widgets_deployments", {})
