"""http.request: only DEPLOYBOT_HTTP_ALLOWED_HOSTS, refused at `rules check` otherwise,
the shared retry policy, no redirects followed, expect_status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bot.core.backoff import RetryPolicy
from bot.core.hosts import host_problem
from bot.errors import ActionError, ServiceDisabled
from bot.rules.loader import check_rules
from bot.services.actions import Done
from bot.services.outbound import OutboundClient
from bot.services.runner import ActionRunner
from bot.settings import from_env
from tests.system.harness import serve

QUICK = RetryPolicy(max_attempts=3, base_delay_s=0.0, max_delay_s=0.0, timeout_s=5.0)


class Hooks:
    """A Slack-like incoming webhook and a flaky health check, recording what they get."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str, dict[str, str], bytes]] = []
        self.health_failures = 2

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(
            (request.method, request.path_qs, dict(request.headers), await request.read())
        )
        if request.path == "/health":
            if self.health_failures:
                self.health_failures -= 1
                return web.json_response({"message": "warming up"}, status=503)
            return web.Response(text="ok")
        if request.path == "/moved":
            raise web.HTTPFound("http://elsewhere.example/steal")
        return web.json_response({"ok": True})


@pytest.fixture
async def hooks() -> AsyncIterator[tuple[Hooks, str]]:
    fake = Hooks()
    runner, origin = await serve(fake.app())
    try:
        yield fake, origin
    finally:
        await runner.cleanup()


async def call(origin_hosts: tuple[str, ...], params: dict[str, Any]) -> Any:
    async with aiohttp.ClientSession() as session:
        client = OutboundClient(session, origin_hosts, policy=QUICK)
        outcome = await ActionRunner({"http": client}).run("http.request", params)
        assert isinstance(outcome, Done)
        return outcome.result


async def test_a_post_to_an_allowed_host(hooks: tuple[Hooks, str]) -> None:
    fake, origin = hooks
    result = await call(
        ("127.0.0.1",),
        {
            "method": "post",
            "url": origin + "/services/T0/B0/x?thread=1",
            "json": {"text": "Deployed OPS-1"},
            "headers": {"X-Team": "ops"},
        },
    )
    assert result == {"status": 200, "json": {"ok": True}, "text": None}
    [(method, path, headers, body)] = fake.received
    assert (method, path, body) == (
        "POST",
        "/services/T0/B0/x?thread=1",
        b'{"text": "Deployed OPS-1"}',
    )
    assert headers["X-Team"] == "ops"


async def test_a_health_check_is_retried_by_the_shared_policy(hooks: tuple[Hooks, str]) -> None:
    fake, origin = hooks
    port = origin.rsplit(":", 1)[1]
    result = await call((f"127.0.0.1:{port}",), {"method": "GET", "url": origin + "/health"})
    assert result == {"status": 200, "json": None, "text": "ok"}
    assert len(fake.received) == 3  # two 503s, then the answer


async def test_expect_status(hooks: tuple[Hooks, str]) -> None:
    fake, origin = hooks
    with pytest.raises(ActionError, match=r"answered 200, expected \[201\]"):
        await call(("127.0.0.1",), {"url": origin + "/hook", "expect_status": 201})
    fake.health_failures = 10
    down = await call(
        ("127.0.0.1",), {"method": "GET", "url": origin + "/health", "expect_status": [503]}
    )
    assert down["status"] == 503


async def test_a_redirect_is_not_followed_off_the_allowed_hosts(hooks: tuple[Hooks, str]) -> None:
    fake, origin = hooks
    result = await call(("127.0.0.1",), {"method": "GET", "url": origin + "/moved"})
    assert result["status"] == 302 and len(fake.received) == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example/x",  # a rendered Jira value choosing the host
        "http://127.0.0.1.evil.example/x",
        "http://user:pw@127.0.0.1/x",
        "file:///etc/passwd",
        "127.0.0.1/x",
        "http://[::1/x",
    ],
)
async def test_a_url_off_the_allowed_hosts_fails_the_run_for_good(
    hooks: tuple[Hooks, str], url: str
) -> None:
    fake, _ = hooks
    with pytest.raises(ActionError) as caught:
        await call(("127.0.0.1",), {"url": url, "json": {"text": "x"}})
    assert not caught.value.retryable and fake.received == []


async def test_without_allowed_hosts_the_action_is_disabled() -> None:
    with pytest.raises(ServiceDisabled, match="service http is not configured"):
        await ActionRunner({"http": None}).run("http.request", {"url": "http://127.0.0.1/"})


def test_the_setting_is_parsed_into_hosts() -> None:
    settings = from_env({"DEPLOYBOT_HTTP_ALLOWED_HOSTS": " Hooks.Slack.com, 10.0.0.5:8080 ,"})
    assert settings.http_allowed_hosts == ("hooks.slack.com", "10.0.0.5:8080")
    assert from_env({}).http_allowed_hosts == ()
    assert host_problem("https://HOOKS.slack.com./a", settings.http_allowed_hosts) is None
    assert host_problem("http://10.0.0.5:8080/", settings.http_allowed_hosts) is None
    assert host_problem("http://10.0.0.5:9090/", settings.http_allowed_hosts) is not None


RULE = """\
rules:
  - name: tell-slack
    on: {events: [jira:issue_updated]}
    do:
      - action: http.request
        with:
          url: https://hooks.slack.com/services/T0/B0/x
          json: {text: "{{ issue.key }} deployed"}
      - action: http.request
        with:
          url: "https://{{ issue.fields.summary }}/x"
"""


def test_rules_check_refuses_http_request_without_allowed_hosts(tmp_path: Path) -> None:
    (tmp_path / "slack.yaml").write_text(RULE)
    where = tmp_path / "slack.yaml"
    _, errors = check_rules(tmp_path, http_allowed_hosts=())
    assert errors == [
        f"{where}:5: http.request is refused: DEPLOYBOT_HTTP_ALLOWED_HOSTS is empty",
        f"{where}:9: http.request is refused: DEPLOYBOT_HTTP_ALLOWED_HOSTS is empty",
    ]
    _, errors = check_rules(tmp_path, http_allowed_hosts=("teams.example",))
    assert errors == [
        f"{where}:7: http.request: host 'hooks.slack.com' is not in"
        " DEPLOYBOT_HTTP_ALLOWED_HOSTS (allowed: teams.example)"
    ]
    ruleset, errors = check_rules(tmp_path, http_allowed_hosts=("hooks.slack.com",))
    assert errors == [] and ruleset is not None  # the templated host is checked per run
