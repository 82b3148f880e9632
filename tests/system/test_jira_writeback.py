"""Jira write-back from real `bot serve` processes in OAuth mode, against a fake Jira that
rotates refresh tokens and refuses a spent one (invalid_grant).

Two replicas on one PostgreSQL database each take deliveries whose rule comments on the
ticket: twenty comment steps run at once across both, and all of them share one access
token, refreshed once. Both replicas are then restarted after Jira revoked that token:
the next twenty comments are posted after exactly one more refresh, made with the
refresh token the first one stored. Not one grant is refused.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import CLIENT_SECRET, PG_URL_ENV, postgres_database
from tests.fakes.jira import FakeJira
from tests.helpers import wait_for
from tests.system.harness import Service, deliver, serve, service_env

COMMENT_RULE = """
rules:
  - name: tell-jira
    on: {events: [jira:issue_updated]}
    do:
      - action: jira.add_comment
        with:
          issue: "{{ issue.key }}"
          body: "Deployment of **{{ issue.key }}** started."
"""
BATCH = 20


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    base = os.environ.get(PG_URL_ENV)
    if not base:
        pytest.skip(f"replicas share a PostgreSQL database: set {PG_URL_ENV}")
    async with postgres_database(base) as url:
        yield url


async def test_two_replicas_and_a_restart_post_every_comment_with_one_refresh_each(
    pg_url: str, tmp_path: Path
) -> None:
    jira = FakeJira(mode="oauth", client_secret=CLIENT_SECRET)
    jira_runner, jira.origin = await serve(jira.make_app())
    configured = jira.refresh_token
    for n in range(1, 2 * BATCH + 1):
        jira.add_issue(f"OPS-{n}")
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "comment.yaml").write_text(COMMENT_RULE)

    def replica(i: int) -> Service:
        env = service_env(
            pg_url,
            rules,
            JIRA_AUTH_MODE="oauth",
            JIRA_BASE_URL=jira.base_url,
            JIRA_CLIENT_ID=jira.client_id,
            JIRA_REFRESH_TOKEN=configured,
            JIRA_TOKEN_URL=jira.token_url,
            DEPLOYBOT_WORKERS="10",
        )
        return Service(env, tmp_path, tmp_path / f"replica-{i}.log")

    def comments() -> int:
        return sum(len(issue.comments) for issue in jira.issues.values())

    async def run_batch(
        session: aiohttp.ClientSession, replicas: list[Service], first: int
    ) -> None:
        numbers = range(first, first + BATCH)
        statuses = await asyncio.gather(
            *(deliver(session, replicas[n % 2].url, f"d-{n}", f"OPS-{n}") for n in numbers)
        )
        assert statuses == [202] * BATCH

        async def posted() -> bool:
            return comments() >= first + BATCH - 1

        await wait_for(posted, timeout_s=60)

    replicas = [replica(0), replica(1)]
    try:
        async with aiohttp.ClientSession() as session:
            for r in replicas:
                await r.start(session)
            await run_batch(session, replicas, 1)
            assert jira.token_grants == 1 and jira.refused_grants == 0
            for r in replicas:
                assert (await r.stop(30))[0] == 0
            # While they were down Jira revoked the access token (or it expired): the
            # restarted replicas meet a 401 and refresh with the stored, rotated token.
            jira.revoke_access_tokens()
            replicas = [replica(0), replica(1)]
            for r in replicas:
                await r.start(session)
            await run_batch(session, replicas, BATCH + 1)
        assert comments() == 2 * BATCH  # each comment posted once
        assert jira.token_grants == 2 and jira.refused_grants == 0
        assert jira.refresh_token != configured
        posts = [r for r in jira.issue_requests() if r.method == "POST"]
        assert sum(r.status == 201 for r in posts) == 2 * BATCH
        # The calls in flight when the revoked token met its 401s were answered by the
        # one refresh (token_grants), then sent again.
        assert {r.status for r in posts} <= {201, 401}
        for r in replicas:
            assert configured not in r.log.read_text()
    finally:
        for r in replicas:
            if r.proc is not None and r.proc.returncode is None:
                await r.kill()
        await jira_runner.cleanup()
