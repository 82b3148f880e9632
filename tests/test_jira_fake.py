"""The fake Jira's own promises: its JQL subset, and deliveries deploybot can verify."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from bot.core.verify import relative_path, verify_connect, verify_oauth
from bot.errors import VerificationError
from bot.rules.jql import check_jql
from tests.fakes.jira import EPIC_LABEL_FIELD_ID, FakeJira, issue_updated_payload, jql_error

ACCEPTED = [
    "project = OPS",
    "project = OPS AND issuetype = Deployment",
    "status != Done",
    "project IN (OPS, EXP) AND status = 'Ready to deploy'",
    'issueKey NOT IN ("OPS-1", OPS-2)',
    "(assignee = abc OR reporter = def) AND cf[10011] = model-x",  # the epic label field
    "issue.property[deploy].env = prod",
    "PROJECT = ops",
]
REFUSED = [
    "",
    "summary ~ deploy",
    "priority = High",
    "project > 3",
    "project IS EMPTY",
    "project = OPS ORDER BY created",
    "project IN OPS",
    "(project = OPS",
    "project = OPS AND",
    "labels = model-x",
    "cf[10050] = model-x",  # a custom field other than the epic label field
]


@pytest.mark.parametrize("jql", ACCEPTED)
def test_fake_accepts_the_webhook_jql_subset(jql: str) -> None:
    assert jql_error(jql) is None


@pytest.mark.parametrize("jql", REFUSED)
def test_fake_refuses_jql_outside_the_subset(jql: str) -> None:
    assert jql_error(jql)


@pytest.mark.parametrize("jql", ACCEPTED + REFUSED)
def test_rule_checker_agrees_with_the_fake(jql: str) -> None:
    """What `rules check` passes, the (fake) Jira registers: two independent parsers agree."""
    epic_label = f"customfield_{EPIC_LABEL_FIELD_ID}"
    assert (check_jql(jql, epic_label_field=epic_label) is None) == (jql_error(jql) is None)


class Receiver:
    """A stand-in for deploybot's endpoint that verifies with bot.core.verify and records."""

    def __init__(self, fake: FakeJira, app_base_path: str) -> None:
        self.fake = fake
        self.app_base_path = app_base_path
        self.seen: list[tuple[str, str | None, dict[str, object]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        fake = self.fake
        try:
            if fake.mode == "connect":
                verified = verify_connect(
                    request.headers.get("Authorization"),
                    request.method,
                    relative_path(request.path, self.app_base_path),
                    request.query.items(),
                    lambda iss: fake.shared_secret if iss == fake.client_key else None,
                    now=fake.now,
                )
                assert verified.tenant == fake.client_key
            else:
                verify_oauth(request.headers.get("Authorization"), fake.client_secret, now=fake.now)
        except VerificationError as exc:
            return web.Response(status=401, text=str(exc))
        assert request.content_type == "application/json"
        self.seen.append(
            (
                request.headers["X-Atlassian-Webhook-Identifier"],
                request.headers.get("X-Atlassian-Webhook-Retry"),
                await request.json(),
            )
        )
        return web.Response(status=202)


@pytest.fixture(params=["connect", "oauth"])
async def wired(request: pytest.FixtureRequest) -> AsyncIterator[tuple[FakeJira, Receiver, str]]:
    fake = FakeJira(mode=request.param)
    receiver = Receiver(fake, "/bot")
    app = web.Application()
    app.router.add_post("/bot/webhooks/jira", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}/bot"
    try:
        yield fake, receiver, base
    finally:
        await runner.cleanup()


async def test_deliveries_verify_and_carry_jira_headers(
    wired: tuple[FakeJira, Receiver, str],
) -> None:
    fake, receiver, base = wired
    payload = issue_updated_payload(key="OPS-7", changes=[("status", "Review", "Ready to deploy")])
    url = base + "/webhooks/jira?tenant=t1"
    async with aiohttp.ClientSession() as session:
        first = await fake.deliver(session, url, payload, identifier="d-1", app_base_url=base)
        again = await fake.deliver(
            session, url, payload, identifier="d-1", retry=1, app_base_url=base
        )
        fake.now += 3600  # tokens are minted on the fake clock: still valid for the receiver
        later = await fake.deliver(session, url, payload, app_base_url=base)

    assert [first[0], again[0], later[0]] == [202, 202, 202]
    assert [(ident, retry) for ident, retry, _ in receiver.seen[:2]] == [
        ("d-1", None),
        ("d-1", "1"),
    ]
    assert receiver.seen[2][0] != "d-1"
    body = receiver.seen[0][2]
    assert body["webhookEvent"] == "jira:issue_updated"
    assert body["changelog"] == {
        "id": body["changelog"]["id"],  # type: ignore[index]
        "items": [
            {
                "field": "status",
                "fieldtype": "jira",
                "fieldId": "status",
                "from": None,
                "fromString": "Review",
                "to": None,
                "toString": "Ready to deploy",
            }
        ],
    }


async def test_delivery_with_a_wrong_token_is_refused(
    wired: tuple[FakeJira, Receiver, str],
) -> None:
    fake, receiver, base = wired
    # Connect: a token for another path (qsh); OAuth: a token that expired an hour ago.
    signed_for = base + ("/other" if fake.mode == "connect" else "/webhooks/jira")
    headers = fake.delivery_headers(signed_for, identifier="x", retry=None, app_base_url=base)
    fake.now += 0 if fake.mode == "connect" else 3600
    async with (
        aiohttp.ClientSession() as session,
        session.post(base + "/webhooks/jira", data=b"{}", headers=headers) as resp,
    ):
        assert resp.status == 401
    assert receiver.seen == []
