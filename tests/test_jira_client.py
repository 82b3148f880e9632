"""JiraClient against the fake Jira in both auth modes; the fake checks every request's auth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from bot.core.apis import registry
from bot.core.apis.jira import OPERATIONS_BY_NAME
from bot.core.backoff import RetryPolicy
from bot.core.catalog import PlannedRequest, plan_request
from bot.core.due import refresh_due
from bot.core.verify import sign_connect
from bot.core.webhook_plan import Need, WebhookSpec, plan_sync
from bot.errors import ActionError
from bot.services.jira import ConnectAuth, JiraClient, next_request, parse_jira_time
from tests.fakes.jira import ACCESS_TOKEN_TTL_S, LIFETIME_S, FakeJira
from tests.helpers import OAuthTokens

QUICK = RetryPolicy(max_attempts=2, base_delay_s=0.0, max_delay_s=0.0, timeout_s=5.0)
DELIVERY_URL = "https://deploybot.example.com/webhooks/jira"
GOOD = WebhookSpec(("jira:issue_updated",), "project = OPS AND status = 'Ready to deploy'")


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def spec(n: int) -> WebhookSpec:
    return WebhookSpec(("jira:issue_updated",), f"project = P{n}")


class Jira:
    """A running fake, a session and a client wired to the fake's clock."""

    def __init__(self, fake: FakeJira, session: aiohttp.ClientSession, rotated: list[str]) -> None:
        self.fake = fake
        self.session = session
        self.rotated = rotated
        self.client = self.make_client()

    def tokens(self, refresh_token: str | None = None) -> OAuthTokens:
        async def keep(token: str) -> None:
            self.rotated.append(token)

        fake = self.fake
        return OAuthTokens(
            self.session,
            fake.token_url,
            fake.client_id,
            fake.client_secret,
            refresh_token or fake.refresh_token,
            on_rotate=keep,
            policy=QUICK,
            clock=lambda: fake.now,
        )

    def make_client(self, secret: str | None = None) -> JiraClient:
        fake = self.fake
        auth: ConnectAuth | OAuthTokens = (
            ConnectAuth(fake.app_key, secret or fake.shared_secret)
            if fake.mode == "connect"
            else self.tokens()
        )
        return JiraClient(self.session, fake.base_url, auth, policy=QUICK, clock=lambda: fake.now)

    def assert_all_authorized(self) -> None:
        """Every REST call reached the fake with a valid token (and, in Connect, qsh)."""
        calls = self.fake.api_requests()
        assert calls, "no request reached the fake"
        assert [(c.method, c.path, c.auth_error) for c in calls if c.auth_error] == []


async def running(mode: str, base_path: str) -> AsyncIterator[Jira]:
    fake = FakeJira(mode=mode, base_path=base_path)  # type: ignore[arg-type]
    await fake.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Jira(fake, session, [])
    finally:
        await fake.close()


@pytest.fixture(params=["connect", "oauth"])
async def jira(request: pytest.FixtureRequest) -> AsyncIterator[Jira]:
    # Connect tenants sit under a context path so qsh must be relative to the base URL.
    base_path = "/jira" if request.param == "connect" else "/ex/jira/cloud-1"
    async for wired in running(request.param, base_path):
        yield wired


@pytest.fixture
async def connect() -> AsyncIterator[Jira]:
    async for wired in running("connect", "/jira"):
        yield wired


@pytest.fixture
async def oauth() -> AsyncIterator[Jira]:
    async for wired in running("oauth", "/ex/jira/cloud-1"):
        yield wired


async def test_register_reports_each_entry_and_creates_only_good_ones(jira: Jira) -> None:
    bad_field = WebhookSpec(("jira:issue_updated",), "summary ~ deploy")
    bad_op = WebhookSpec(("jira:issue_created",), "project > 3")
    fielded = WebhookSpec(("jira:issue_updated",), "cf[10011] IN (a, b)", ("status", "labels"))
    results = await jira.client.register([GOOD, bad_field, fielded, bad_op], DELIVERY_URL)

    assert [r.spec for r in results] == [GOOD, bad_field, fielded, bad_op]
    assert [r.created_id is not None for r in results] == [True, False, True, False]
    assert "summary" in results[1].errors[0] and "'>'" in results[3].errors[0]
    listed = await jira.client.list_all()
    assert {h.id: h.spec for h in listed} == {
        results[0].created_id: GOOD,
        results[2].created_id: fielded,
    }
    assert all(h.expires_at == at(jira.fake.now + LIFETIME_S) for h in listed)
    jira.assert_all_authorized()


async def test_list_follows_pagination_to_the_end(jira: Jira) -> None:
    jira.fake.page_size_cap = 2
    limit = 5 if jira.fake.mode == "oauth" else 7
    created = await jira.client.register([spec(n) for n in range(limit)], DELIVERY_URL)

    listed = await jira.client.list_all(page_size=50)

    assert [h.id for h in listed] == [r.created_id for r in created]
    starts = [c.query for c in jira.fake.api_requests() if c.method == "GET"]
    assert [dict(q)["startAt"] for q in starts] == [str(n) for n in range(0, limit, 2)]
    jira.assert_all_authorized()


@pytest.mark.parametrize("form", ["epoch_ms", "iso"])
async def test_refresh_parses_either_expiration_form(jira: Jira, form: Any) -> None:
    jira.fake.expiration_format = form
    (result,) = await jira.client.register([GOOD], DELIVERY_URL)
    assert result.created_id is not None
    jira.fake.now += 10 * 86400

    expires_at = await jira.client.refresh([result.created_id])

    assert expires_at == at(jira.fake.now + LIFETIME_S)
    assert jira.fake.webhooks[result.created_id].expires_at == jira.fake.now + LIFETIME_S
    jira.assert_all_authorized()


async def test_webhooks_lapse_unless_refreshed_and_delete_removes(jira: Jira) -> None:
    kept, lapsing, deleted = (
        r.created_id for r in await jira.client.register([spec(1), spec(2), spec(3)], DELIVERY_URL)
    )
    assert kept and lapsing and deleted
    await jira.client.delete([deleted])
    jira.fake.now += LIFETIME_S - 60
    await jira.client.refresh([kept, deleted])  # an unknown id is ignored, as Jira does
    jira.fake.now += 120

    assert [h.id for h in await jira.client.list_all()] == [kept]
    with pytest.raises(ValueError):
        await jira.client.delete([])
    jira.assert_all_authorized()


async def test_limits_and_one_url_per_app(jira: Jira) -> None:
    limit = 5 if jira.fake.mode == "oauth" else 100
    results = await jira.client.register([spec(n) for n in range(limit + 1)], DELIVERY_URL)
    assert [r.errors for r in results[:limit]] == [()] * limit
    assert results[limit].created_id is None and "limit" in results[limit].errors[0]

    with pytest.raises(ActionError) as refused:
        await jira.client.register([GOOD], "https://elsewhere.example.com/hook")
    assert refused.value.status == 400


async def test_sync_converges_and_heals_a_webhook_deleted_in_jira(jira: Jira) -> None:
    needs = [
        Need("deploy", ("jira:issue_updated",), "project = OPS", ("status",)),
        Need("audit", ("jira:issue_created",), "project = OPS", ("status",)),
        Need("hotfix", ("jira:issue_updated",), "project = HOT"),
    ]
    await jira.client.register([spec(9)], DELIVERY_URL)  # stale: no rule needs it

    async def sync() -> list[int]:
        plan = plan_sync(needs, await jira.client.list_all(), jira.client.mode)
        results = await jira.client.apply(plan, DELIVERY_URL)
        assert all(r.created_id is not None for r in results)
        return [r.created_id for r in results if r.created_id is not None]

    created = await sync()
    specs = {h.spec for h in await jira.client.list_all()}
    assert specs == {
        WebhookSpec(("jira:issue_created", "jira:issue_updated"), "project = OPS", ("status",)),
        WebhookSpec(("jira:issue_updated",), "project = HOT"),
    }
    assert await sync() == []  # converged: a second sync changes nothing

    jira.fake.drop_webhook(created[0])
    healed = await sync()
    assert len(healed) == 1 and healed[0] not in created
    assert {h.spec for h in await jira.client.list_all()} == specs
    jira.assert_all_authorized()


async def test_generic_call_uses_reference_names(jira: Jira) -> None:
    await jira.client.register([GOOD], DELIVERY_URL)
    page = await jira.client.call("get_dynamic_webhooks_for_app", {"start_at": 0, "max_results": 1})
    assert page["isLast"] is True and len(page["values"]) == 1
    with pytest.raises(ActionError, match="unknown jira operation"):
        await jira.client.call("get_webhook", {})
    with pytest.raises(ActionError, match="unknown parameter"):
        await jira.client.call("refresh_webhooks", {"webhookIds": [1]})
    jira.assert_all_authorized()


async def test_failed_deliveries_follow_next_to_the_end(connect: Jira) -> None:
    fake = connect.fake
    fake.page_size_cap = 2
    now_ms = int(fake.now * 1000)
    fake.add_failure("{}", DELIVERY_URL, failure_time_ms=now_ms - 73 * 3600 * 1000, id="too-old")
    times = [now_ms - 5000, now_ms - 4000, now_ms - 3000, now_ms - 3000, now_ms - 1000]
    for n in (4, 0, 1, 2, 3):  # stored out of order: Jira answers oldest first
        fake.add_failure(f'{{"n": {n}}}', DELIVERY_URL, failure_time_ms=times[n], id=f"d{n}")

    seen = [d async for d in connect.client.failed()]

    assert [d.id for d in seen] == ["d0", "d1", "d2", "d3", "d4"]
    assert [d.failure_time for d in seen] == [at(t / 1000) for t in times]
    assert seen[4].body == '{"n": 4}' and seen[4].url == DELIVERY_URL
    pages = [dict(c.query) for c in fake.api_requests()]
    # Page two keeps both failures of the same millisecond although maxResults is 2.
    assert [p.get("after") for p in pages] == [None, str(times[1]), str(times[3])]
    connect.assert_all_authorized()

    later = [d.id async for d in connect.client.failed(after=times[2])]
    assert later == ["d4"]


async def test_failed_deliveries_refused_in_oauth_mode(oauth: Jira) -> None:
    with pytest.raises(ActionError, match="only Connect apps") as refused:
        _ = [d async for d in oauth.client.failed()]
    assert refused.value.status == 403


async def test_connect_wrong_secret_is_401_and_not_retried(connect: Jira) -> None:
    client = connect.make_client(secret="not-the-tenant-shared-secret-0123456789")
    with pytest.raises(ActionError) as refused:
        await client.list_all()
    assert refused.value.status == 401
    assert len(connect.fake.api_requests()) == 1


async def test_fake_refuses_a_token_signed_for_another_request(connect: Jira) -> None:
    fake = connect.fake
    token = sign_connect(
        "GET",
        "/rest/api/3/webhook",
        [("startAt", "5")],
        issuer=fake.app_key,
        secret=fake.shared_secret,
        now=fake.now,
    )
    url = fake.base_url + "/rest/api/3/webhook?startAt=0"
    async with connect.session.get(url, headers={"Authorization": f"JWT {token}"}) as resp:
        assert resp.status == 401
    assert "qsh mismatch" in (fake.requests[-1].auth_error or "")


async def test_oauth_rotates_refresh_tokens_and_keeps_the_new_one(oauth: Jira) -> None:
    fake = oauth.fake
    original = fake.refresh_token
    await asyncio.gather(*(oauth.client.list_all() for _ in range(5)))
    assert fake.token_grants == 1  # concurrent callers share one grant
    assert oauth.rotated == [fake.refresh_token] and fake.refresh_token != original

    fake.now += ACCESS_TOKEN_TTL_S - 30  # inside the refresh margin: renew before expiry
    await oauth.client.list_all()
    assert fake.token_grants == 2 and len(oauth.rotated) == 2
    assert all(c.status == 200 for c in fake.api_requests())

    with pytest.raises(ActionError) as spent:
        await oauth.tokens(refresh_token=original).token()
    assert spent.value.status == 403
    oauth.assert_all_authorized()


async def test_oauth_401_refreshes_once_and_retries(oauth: Jira) -> None:
    fake = oauth.fake
    await oauth.client.list_all()
    fake.revoke_access_tokens()

    await oauth.client.register([GOOD], DELIVERY_URL)

    assert [c.status for c in fake.api_requests()] == [200, 401, 200]
    assert fake.token_grants == 2


async def test_ninety_days_of_due_refreshes_never_lapse(jira: Jira) -> None:
    ids = [r.created_id for r in await jira.client.register([spec(1), spec(2)], DELIVERY_URL)]
    (control,) = [r.created_id for r in await jira.client.register([spec(3)], DELIVERY_URL)]
    start = jira.fake.now
    refreshes = 0
    while jira.fake.now < start + 90 * 86400:
        now = at(jira.fake.now)
        listed = await jira.client.list_all()
        assert {h.id for h in listed} >= set(ids), f"a webhook lapsed by {now}"
        ours = [(h.id, h.expires_at) for h in listed if h.id != control]
        due = refresh_due(ours, now)
        if due:
            await jira.client.refresh(due)
            refreshes += 1
        # a daily scheduler tick, with a 12-day outage in the middle
        outage = 12 if 40 <= (jira.fake.now - start) / 86400 < 41 else 0
        jira.fake.now += (1 + outage) * 86400
    assert control not in {h.id for h in await jira.client.list_all()}  # the fake does expire
    assert 8 <= refreshes <= 10  # about every 10 days: not lapsing, not hammering Jira


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1_700_000_000_000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("1700000000000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("2023-11-14T22:13:20.000+0000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("2023-11-14T23:13:20.500+01:00", datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)),
        ("2023-11-14T22:13:20Z", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
    ],
)
def test_parse_jira_time(raw: Any, expected: datetime) -> None:
    assert parse_jira_time(raw) == expected


@pytest.mark.parametrize("raw", ["next Tuesday", None, True, {"ms": 1}])
def test_parse_jira_time_refuses_garbage(raw: Any) -> None:
    with pytest.raises(ActionError):
        parse_jira_time(raw)


@pytest.mark.parametrize(
    ("base", "link", "expected"),
    [
        (
            "https://x.atlassian.net",
            "https://x.atlassian.net/rest/api/3/webhook/failed?after=17&maxResults=2",
            PlannedRequest(
                "GET", "/rest/api/3/webhook/failed", (("after", "17"), ("maxResults", "2"))
            ),
        ),
        (
            "https://api.atlassian.com/ex/jira/c1/",
            "https://api.atlassian.com/ex/jira/c1/rest/api/3/webhook/failed?after=1",
            PlannedRequest("GET", "/rest/api/3/webhook/failed", (("after", "1"),)),
        ),
        ("https://x.atlassian.net", "https://evil.example.com/rest/api/3/webhook/failed", None),
        ("https://x.atlassian.net", "http://x.atlassian.net/rest/api/3/webhook/failed", None),
        ("https://api.atlassian.com/ex/jira/c1", "https://api.atlassian.com/ex/jira/c2/x", None),
    ],
)
def test_next_request_stays_on_the_tenant(
    base: str, link: str, expected: PlannedRequest | None
) -> None:
    if expected is None:
        with pytest.raises(ActionError, match="leaves"):
            next_request(base, link)
    else:
        assert next_request(base, link) == expected


def test_operation_table_matches_the_reference() -> None:
    ops = {name for name in registry() if name.startswith("jira.")}
    assert ops == {
        "jira.delete_webhook_by_id",
        "jira.get_dynamic_webhooks_for_app",
        "jira.get_failed_webhooks",
        "jira.refresh_webhooks",
        "jira.register_dynamic_webhooks",
    }
    planned = plan_request(
        OPERATIONS_BY_NAME["get_failed_webhooks"], {"max_results": 10, "after": 1700000000000}
    )
    assert planned == PlannedRequest(
        "GET", "/rest/api/3/webhook/failed", (("maxResults", "10"), ("after", "1700000000000"))
    )
    planned = plan_request(
        OPERATIONS_BY_NAME["refresh_webhooks"], {"container_for_webhook_ids": {"webhookIds": [1]}}
    )
    assert (planned.method, planned.path, planned.json_body) == (
        "PUT",
        "/rest/api/3/webhook/refresh",
        {"webhookIds": [1]},
    )
    with pytest.raises(ActionError, match="missing"):
        plan_request(OPERATIONS_BY_NAME["register_dynamic_webhooks"], {})
