"""While deliveries load the write path, the executor claims (a commit each, with an
outcome commit after) at most every BUSY_CLAIM_PAUSE_S, for all its free slots at once:
the deliveries' commits queue behind those transactions. Real database (both engines),
real fake UbiOps."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

from bot.db.models import action_runs
from bot.pipeline import executor as executor_module
from bot.pipeline.processor import EventProcessor
from tests.helpers import wait_for
from tests.workflow_world import Env, issue_updated, write_rules
from tests.workflow_world import env as env  # the fixture

ONE_STEP = """
rules:
  - name: version
    on: {events: [jira:issue_updated]}
    when:
      - changed: status
        to: Ready to deploy
    do:
      - action: ubiops.deployment_versions_create
        with:
          project_name: ml-prod
          deployment_name: churn
          data: {version: "{{ issue.key | lower }}"}
"""


async def _succeeded(env: Env) -> int:
    async with env.engine.connect() as conn:
        query = select(func.count()).where(action_runs.c.status == "succeeded")
        return int((await conn.execute(query)).scalar_one())


async def test_while_ingest_is_busy_claims_wait_between_batches(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    ruleset = write_rules(env.rules_dir, ONE_STEP)
    env.processor = EventProcessor(env.engine, lambda: ruleset, clock=env.clock)
    for n in range(12):
        await env.deliver(issue_updated(f"OPS-{n}", change=n), f"d-{n}")
    monkeypatch.setattr(executor_module, "BUSY_CLAIM_PAUSE_S", 3600.0)  # one batch, then none
    executor = env.executor(concurrency=4, ingest_busy=lambda: True)
    task = asyncio.create_task(executor.run(poll_s=0.01))
    try:

        async def first_batch_done() -> bool:
            return await _succeeded(env) == 4

        await wait_for(first_batch_done, timeout_s=20)
        await asyncio.sleep(0.3)  # slots are free and runs due: no claim while paused
        assert await _succeeded(env) == 4
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # Not busy: the executor claims as slots free, as before.
    idle = env.executor(concurrency=4)
    task = asyncio.create_task(idle.run(poll_s=0.01))
    try:

        async def all_done() -> bool:
            return await _succeeded(env) == 12

        await wait_for(all_done, timeout_s=20)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sorted(env.fake.version_names("ml-prod", "churn")) == sorted(
        f"ops-{n}" for n in range(12)
    )
