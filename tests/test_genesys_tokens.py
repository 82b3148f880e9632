"""Genesys regions, the client-credentials token manager and the operation table."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import pytest

from bot.core.apis.genesys import OPERATIONS, OPERATIONS_BY_NAME
from bot.core.regions import genesys_region, genesys_urls
from bot.errors import ActionError
from bot.services.genesys import ClientCredentials, TokenManager
from tests import test_genesys_client
from tests.fakes.genesys import FakeGenesys


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


# The fake Genesys server and an HTTP session: fixtures shared with the client tests.
fake, base, http = test_genesys_client.fake, test_genesys_client.base, test_genesys_client.http


def manager(
    http: aiohttp.ClientSession, base: str, fake: FakeGenesys, clock: Clock, secret: str = ""
) -> TokenManager:
    creds = ClientCredentials(fake.client_id, secret or fake.client_secret)
    return TokenManager(http, base, creds, refresh_margin_s=60, clock=clock)


def test_region_urls_and_overrides() -> None:
    assert genesys_urls("mypurecloud.ie") == (
        "https://api.mypurecloud.ie",
        "https://login.mypurecloud.ie",
    )
    assert genesys_urls("euw2.pure.cloud")[1] == "https://login.euw2.pure.cloud"
    assert genesys_urls("mypurecloud.de", api_url="http://gw/api/")[0] == "http://gw/api"
    assert genesys_urls("mypurecloud.de", api_url="https://api.gw.example/") == (
        "https://api.gw.example",
        "https://login.gw.example",  # as the SDK derives it
    )
    assert genesys_region("EUW2.pure.cloud") == "euw2.pure.cloud"
    assert genesys_region("eu-west-2") == "euw2.pure.cloud"
    assert genesys_region("example.com") is None
    both = genesys_urls("nowhere", api_url="http://127.0.0.1:1", login_url="http://127.0.0.1:2")
    assert both == ("http://127.0.0.1:1", "http://127.0.0.1:2")


def test_operation_table_matches_the_references() -> None:
    assert len(OPERATIONS) == 24 == len(OPERATIONS_BY_NAME)
    assert {op.service for op in OPERATIONS} == {"genesys"}
    assert sum(op.path.startswith("/api/v2/webdeployments/") for op in OPERATIONS) == 19
    assert sum(op.path.startswith("/api/v2/widgets/deployments") for op in OPERATIONS) == 5
    publish = OPERATIONS_BY_NAME["post_webdeployments_configuration_versions_draft_publish"]
    assert publish.method == "POST"
    assert (
        publish.path
        == "/api/v2/webdeployments/configurations/{configurationId}/versions/draft/publish"
    )
    assert [(p.name, p.location, p.wire, p.required) for p in publish.params] == [
        ("configuration_id", "path", "configurationId", True)
    ]
    listing = OPERATIONS_BY_NAME["get_webdeployments_configurations"]
    assert [(p.name, p.location, p.wire, p.required) for p in listing.params] == [
        ("show_only_published", "query", "showOnlyPublished", False)
    ]
    put_widget = OPERATIONS_BY_NAME["put_widgets_deployment"]
    assert [(p.name, p.location) for p in put_widget.params] == [
        ("deployment_id", "path"),
        ("body", "body"),
    ]
    for op in OPERATIONS:  # every path placeholder has exactly one path parameter
        wires = sorted(p.wire for p in op.params if p.location == "path")
        assert wires == sorted(part[1:-1] for part in op.path.split("/") if part.startswith("{"))


async def test_token_is_cached_then_refreshed_before_expiry(
    fake: FakeGenesys, base: str, http: aiohttp.ClientSession
) -> None:
    clock = Clock()
    tokens = manager(http, base, fake, clock)
    first = await tokens.token()
    assert await tokens.token() == first
    assert len(fake.token_requests) == 1
    sent = fake.token_requests[0]
    expected = base64.b64encode(f"{fake.client_id}:{fake.client_secret}".encode()).decode()
    assert sent.headers["Authorization"] == f"Basic {expected}"
    assert sent.body == b"grant_type=client_credentials"
    clock.now_s += 3600 - 61  # still outside the 60 s margin
    assert await tokens.token() == first
    clock.now_s += 2  # inside the margin: refresh although the token has not expired yet
    assert await tokens.token() != first
    assert len(fake.token_requests) == 2


async def test_concurrent_callers_share_one_refresh(
    fake: FakeGenesys, base: str, http: aiohttp.ClientSession
) -> None:
    clock = Clock()
    tokens = manager(http, base, fake, clock)
    fake.inject("slow", path_prefix="/oauth/", delay_s=0.05)
    values = await asyncio.gather(*(tokens.token() for _ in range(50)))
    assert len(set(values)) == 1 and len(fake.token_requests) == 1
    clock.now_s += 3600
    values = await asyncio.gather(*(tokens.token() for _ in range(50)))
    assert len(set(values)) == 1 and len(fake.token_requests) == 2


async def test_refresh_after_rejection_happens_once(
    fake: FakeGenesys, base: str, http: aiohttp.ClientSession
) -> None:
    tokens = manager(http, base, fake, Clock())
    rejected = await tokens.token()
    renewed = await asyncio.gather(*(tokens.refresh(rejected) for _ in range(20)))
    assert len(set(renewed)) == 1 and renewed[0] != rejected
    assert len(fake.token_requests) == 2


@pytest.mark.parametrize(
    ("fault", "status", "retryable"),
    [(None, 401, False), ("503", 503, True), ("drop", None, True)],
)
async def test_login_failures_are_clear_and_keep_secrets(
    fake: FakeGenesys,
    base: str,
    http: aiohttp.ClientSession,
    fault: str | None,
    status: int | None,
    retryable: bool,
) -> None:
    secret = fake.client_secret if fault else "wrong-secret-do-not-print"
    if fault == "503":
        fake.inject("503", path_prefix="/oauth/")
    elif fault == "drop":
        fake.inject("drop", path_prefix="/oauth/")
    tokens = manager(http, base, fake, Clock(), secret=secret)
    with pytest.raises(ActionError) as caught:
        await tokens.token()
    assert (caught.value.status, caught.value.retryable) == (status, retryable)
    shown = f"{caught.value} {caught.value!r} {tokens!r} {ClientCredentials('id', secret)!r}"
    assert "Genesys login" in str(caught.value)
    assert secret not in shown
    assert base64.b64encode(f"{fake.client_id}:{secret}".encode()).decode() not in shown
