"""The workflow tests' world: a fake UbiOps, a controllable clock, the rollout rule, and an
`env` fixture driving processor and executor by hand (shared by the workflow, liveness,
pacing and console tests)."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.backoff import RetryPolicy
from bot.core.delivery import Delivery
from bot.db.engine import create_engine, upgrade
from bot.db.models import utcnow
from bot.db.queries import get_event
from bot.db.store import EventStore
from bot.pipeline.executor import ActionExecutor
from bot.pipeline.processor import EventProcessor
from bot.rules.loader import load_rules
from bot.rules.model import RuleSet
from bot.services.runner import ActionRunner
from bot.services.ubiops import UbiOpsClient
from tests.fakes.ubiops import FakeUbiOps

TOKEN = "ubiops-token-" + "w" * 40


EXAMPLE_RULES = Path(__file__).resolve().parent.parent / "rules"


FAST = RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.05, timeout_s=5.0)


ROLLOUT = """
rules:
  - name: rollout
    on: {events: [jira:issue_updated]}
    when:
      - changed: status
        to: Ready to deploy
    concurrency: "ubiops/ml-prod/{{ issue.fields.customfield_10050 }}"
    do:
      - id: version
        action: ubiops.deployment_versions_create
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          data:
            version: "{{ issue.key | lower }}"
            maximum_instances: "{{ issue.fields.customfield_10054 | default(3) }}"
      - id: upload
        action: ubiops.revisions_file_upload
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          version: "{{ steps.version.version }}"
          file: artifacts/model.zip
      - id: build
        action: ubiops.revisions_get
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          version: "{{ steps.version.version }}"
          revision_id: "{{ steps.upload.revision }}"
        until:
          - field: result.status
            in: [success, failed]
        every: 10m
        timeout: 2h
        fail_if:
          - field: result.status
            equals: failed
      - id: smoke
        action: ubiops.deployment_version_requests_create
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          version: "{{ steps.version.version }}"
          data: {input: 2.0}
      - action: ubiops.deployments_update
        if:
          - field: steps.smoke.success
            equals: true
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          data: {default_version: "{{ steps.version.version }}"}
    on_failure:
      - action: ubiops.deployment_versions_delete
        if: [{field: steps.version, exists: true}]
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          version: "{{ steps.version.version }}"
      - id: note
        action: ubiops.deployment_audit_events_list
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          action: "{{ failure.step_id }}"
"""


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def issue_updated(
    key: str, deployment: str = "churn", *, change: int = 1, **fields: Any
) -> dict[str, Any]:
    return {
        "timestamp": 1700000000000,
        "webhookEvent": "jira:issue_updated",
        "issue": {
            "id": str(10000 + int(key.split("-")[1])),
            "key": key,
            "fields": {"customfield_10050": deployment, **fields},
        },
        "changelog": {
            "id": str(change),
            "items": [{"field": "status", "fromString": "Open", "toString": "Ready to deploy"}],
        },
    }


@dataclass
class Env:
    engine: AsyncEngine
    fake: FakeUbiOps
    store: EventStore
    processor: EventProcessor
    executor: Callable[..., ActionExecutor]
    clock: Clock
    runner: ActionRunner
    rules_dir: Path

    async def store_only(self, payload: dict[str, Any], delivery_id: str) -> int:
        """Store a delivery, not yet evaluated; return its event id."""
        body = json.dumps(payload).encode()
        issue = payload["issue"]["key"]
        stored = await self.store.add(
            "", Delivery(delivery_id, 0, payload["webhookEvent"], issue, body)
        )
        assert stored.event_id is not None
        return stored.event_id

    async def deliver(self, payload: dict[str, Any], delivery_id: str) -> int:
        """Store a delivery and evaluate it (its runs planned); return its event id."""
        event_id = await self.store_only(payload, delivery_id)
        await self.processor.run_once()
        return event_id

    async def runs(self, event_id: int) -> list[dict[str, Any]]:
        shown = await get_event(self.engine, event_id)
        assert shown is not None
        runs: list[dict[str, Any]] = shown["action_runs"]
        return sorted(runs, key=lambda r: r["step"])

    async def statuses(self, event_id: int) -> list[str]:
        return [r["status"] for r in await self.runs(event_id)]


async def drive(executor: ActionExecutor, clock: Clock, *, rounds: int = 40) -> None:
    """Execute due runs; when none is due, move the clock 10 minutes (one `every`)."""
    idle = 0
    for _ in range(rounds):
        if await executor.run_once():
            idle = 0
            continue
        idle += 1
        if idle > 2:
            return
        clock.advance(minutes=10)


def write_rules(folder: Path, text: str) -> RuleSet:
    folder.mkdir(exist_ok=True)
    (folder / "r.yaml").write_text(text)
    if not (folder / "artifacts").exists():
        shutil.copytree(EXAMPLE_RULES / "artifacts", folder / "artifacts")
    return load_rules(folder)


@pytest.fixture
async def env(
    database_url: str, tmp_path: Path, aiohttp_server: Callable[..., Any]
) -> AsyncIterator[Env]:
    fake = FakeUbiOps(token=TOKEN)
    server: TestServer = await aiohttp_server(fake.app())
    base_url = str(server.make_url(fake.prefix))
    rules_dir = tmp_path / "rules"
    holder: dict[str, RuleSet] = {"rules": write_rules(rules_dir, ROLLOUT)}
    engine = create_engine(database_url)
    await upgrade(engine)
    store = EventStore(engine)
    await store.start()
    clock = Clock()
    async with aiohttp.ClientSession() as session:
        client = UbiOpsClient(session, base_url, TOKEN, policy=FAST)
        for name in ("churn", "fraud"):
            await client.call(
                "deployments_create",
                {"project_name": "ml-prod", "data": {"name": name, "input_type": "structured",
                                                     "output_type": "structured"}},
            )  # fmt: skip
        runner = ActionRunner({"ubiops": client}, files_dir=rules_dir)
        processor = EventProcessor(engine, lambda: holder["rules"], clock=clock)

        def executor(**kwargs: Any) -> ActionExecutor:
            return ActionExecutor(engine, runner, rules_dir=rules_dir, clock=clock, **kwargs)

        yield Env(engine, fake, store, processor, executor, clock, runner, rules_dir)
    await store.close()
    await engine.dispose()


def _uploads(fake: FakeUbiOps, version: str) -> int:
    return len(fake.calls("POST", rf".*/versions/{version}/revisions"))
