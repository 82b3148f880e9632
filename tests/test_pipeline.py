"""End to end: a delivery is matched, planned into the outbox and executed exactly once."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy import func, select

from bot.core.backoff import RetryPolicy
from bot.core.delivery import Delivery
from bot.db.engine import create_engine, upgrade
from bot.db.models import action_runs, events, rule_matches, utcnow
from bot.db.queries import get_event
from bot.db.store import EventStore
from bot.pipeline.executor import ActionExecutor, RetryBudget
from bot.pipeline.processor import EventProcessor
from bot.rules.loader import load_rules
from bot.rules.watcher import RuleWatcher
from bot.services.runner import ActionRunner
from bot.services.ubiops import UbiOpsClient
from bot.settings import Settings
from tests.conftest import ClientFactory
from tests.fakes.ubiops import FakeUbiOps
from tests.helpers import (
    EXAMPLE_RULES,
    RULES,
    TOKEN,
    event_when_runs_are,
    headers,
    issue_updated,
    wait_for,
)


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "rules"
    folder.mkdir(exist_ok=True)
    (folder / "deploy.yaml").write_text(RULES)
    shutil.copytree(EXAMPLE_RULES / "artifacts", folder / "artifacts")
    return folder


@pytest.fixture
async def ubiops(aiohttp_server: Callable[..., Any]) -> tuple[FakeUbiOps, str]:
    fake = FakeUbiOps(token=TOKEN)
    server: TestServer = await aiohttp_server(fake.app())
    base_url = str(server.make_url(fake.prefix))
    async with aiohttp.ClientSession() as session:
        client = UbiOpsClient(session, base_url, TOKEN)
        await client.call(
            "deployments_create",
            {
                "project_name": "ml-prod",
                "data": {"name": "churn", "input_type": "structured", "output_type": "structured"},
            },
        )
    return fake, base_url


async def test_delivery_runs_the_rule_once(
    make_client: ClientFactory,
    settings: Settings,
    rules_dir: Path,
    ubiops: tuple[FakeUbiOps, str],
) -> None:
    fake, base_url = ubiops
    client = await make_client(
        settings, rules_dir=rules_dir, ubiops_api_url=base_url, ubiops_api_token=TOKEN
    )
    body = json.dumps(issue_updated("OPS-42"))
    resp = await client.post("/webhooks/jira", data=body, headers=headers("e2e-1"))
    assert resp.status == 202
    event_id = (await resp.json())["event_id"]
    engine = create_engine(settings.database_url)

    async def finished() -> bool:
        shown = await get_event(engine, event_id)
        assert shown is not None
        runs = shown["action_runs"]
        return len(runs) == 2 and all(r["status"] == "succeeded" for r in runs)

    try:
        await wait_for(finished)
        shown = await get_event(engine, event_id)
    finally:
        await engine.dispose()
    assert shown is not None
    assert shown["status"] == "processed"
    assert {(m["rule"], m["matched"]) for m in shown["matches"]} == {
        ("roll-out", True),
        ("only-hotfixes", False),
    }
    miss = next(m for m in shown["matches"] if not m["matched"])
    assert "hotfix" in miss["reason"]
    assert fake.version_names("ml-prod", "churn") == ["ops-42"]
    assert len(fake.calls("POST", r".*/versions/ops-42/revisions")) == 1
    assert shown["action_runs"][1]["attempt_log"][0]["outcome"] == "succeeded"
    # A redelivery changes nothing.
    again = await client.post("/webhooks/jira", data=body, headers=headers("e2e-1"))
    assert again.status == 200
    await asyncio.sleep(0.3)
    assert len(fake.calls("POST", r".*/deployments/churn/versions")) == 1


async def test_template_failure_kills_the_run_and_skips_later_steps(
    make_client: ClientFactory,
    settings: Settings,
    rules_dir: Path,
    ubiops: tuple[FakeUbiOps, str],
) -> None:
    fake, base_url = ubiops
    client = await make_client(
        settings, rules_dir=rules_dir, ubiops_api_url=base_url, ubiops_api_token=TOKEN
    )
    body = json.dumps(issue_updated("OPS-43", deployment=None))
    resp = await client.post("/webhooks/jira", data=body, headers=headers("e2e-2"))
    event_id = (await resp.json())["event_id"]
    shown = await event_when_runs_are(settings.database_url, event_id, ["dead", "skipped"])
    assert "customfield_10050" in shown["action_runs"][0]["last_error"]
    assert fake.calls("POST", r".*/versions") == []


async def _stored_event(database_url: str, key: str) -> int:
    engine = create_engine(database_url)
    await upgrade(engine)
    store = EventStore(engine)
    await store.start()
    body = json.dumps(issue_updated(key)).encode()
    stored = await store.add("", Delivery(f"d-{key}", 0, "jira:issue_updated", key, body))
    await store.close()
    await engine.dispose()
    assert stored.event_id is not None
    return stored.event_id


async def test_crash_between_claim_and_completion_plans_once(
    database_url: str, rules_dir: Path
) -> None:
    event_id = await _stored_event(database_url, "OPS-50")
    ruleset = load_rules(rules_dir)
    engine = create_engine(database_url)
    try:
        crashed = EventProcessor(engine, lambda: ruleset, lease_s=30)
        assert [c.id for c in await crashed.claim()] == [event_id]
        # The first worker dies here. Within its lease nobody else takes the event...
        later = utcnow() + timedelta(seconds=31)
        survivor = EventProcessor(engine, lambda: ruleset, lease_s=30, clock=lambda: later)
        assert await EventProcessor(engine, lambda: ruleset).claim() == []
        # ...after it, the survivor does, and plans the rule's steps once.
        assert await survivor.run_once() == 1
        # The first worker comes back to life: its lease is gone, it changes nothing.
        claimed_before = await crashed_claim_replay(crashed, event_id)
        assert claimed_before is False
        async with engine.connect() as conn:
            runs = (await conn.execute(select(func.count()).select_from(action_runs))).scalar_one()
            matches = (
                await conn.execute(select(func.count()).select_from(rule_matches))
            ).scalar_one()
            status, misses = (
                await conn.execute(select(events.c.status, events.c.rule_misses))
            ).one()
        assert runs == 2
        # One rule matched (a row), one missed (a reason in the event's rule_misses): once.
        assert matches == 1
        assert [m["rule"] for m in misses] == ["only-hotfixes"]
        assert status == "processed"
    finally:
        await engine.dispose()


async def crashed_claim_replay(processor: EventProcessor, event_id: int) -> bool:
    from bot.pipeline.processor import Claimed

    async with processor._engine.connect() as conn:
        body = (
            await conn.execute(select(events.c.body).where(events.c.id == event_id))
        ).scalar_one()
    return await processor.process(Claimed(event_id, body, 1))


async def test_crash_after_sending_a_create_gives_one_object(
    database_url: str, rules_dir: Path, ubiops: tuple[FakeUbiOps, str]
) -> None:
    fake, base_url = ubiops
    await _stored_event(database_url, "OPS-51")
    ruleset = load_rules(rules_dir)
    engine = create_engine(database_url)
    async with aiohttp.ClientSession() as session:
        runner = ActionRunner(
            {"ubiops": UbiOpsClient(session, base_url, TOKEN, policy=RetryPolicy(max_attempts=1))},
            files_dir=rules_dir,
        )
        try:
            await EventProcessor(engine, lambda: ruleset).run_once()
            dying = ActionExecutor(engine, runner, rules_dir=rules_dir, lease_s=60)
            [run] = await dying.claim(1)
            # The worker sends the create, then is killed before recording the outcome.
            from bot.rules.templates import render_params

            params = render_params(dying._step(run), run.context)
            await runner.run(run.action, params)
            assert fake.version_names("ml-prod", "churn") == ["ops-51"]
            # After the lease, another worker resumes the run: it looks before creating.
            later: datetime = utcnow() + timedelta(seconds=61)
            survivor = ActionExecutor(
                engine, runner, rules_dir=rules_dir, clock=lambda: later, budget=RetryBudget()
            )
            assert await survivor.run_once() == 1
            assert await survivor.run_once() == 1  # the upload step, now due
            async with engine.connect() as conn:
                statuses = (
                    (
                        await conn.execute(
                            select(action_runs.c.status).order_by(action_runs.c.step_index)
                        )
                    )
                    .scalars()
                    .all()
                )
        finally:
            await engine.dispose()
    assert statuses == ["succeeded", "succeeded"]
    assert fake.version_names("ml-prod", "churn") == ["ops-51"]
    assert len(fake.calls("POST", r".*/deployments/churn/versions")) == 1


async def test_example_rules_load() -> None:
    watcher = RuleWatcher(EXAMPLE_RULES)
    assert watcher.loaded, watcher.errors
    assert watcher.current.rules


async def _store_deliveries(database_url: str, count: int) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    store = EventStore(engine)
    await store.start()
    for i in range(count):
        body = json.dumps(issue_updated(f"OPS-{i}")).encode()
        await store.add("", Delivery(f"d-{i}", 0, "jira:issue_updated", f"OPS-{i}", body))
    await store.close()
    await engine.dispose()


async def test_while_deliveries_load_the_write_path_batches_are_small(
    database_url: str, rules_dir: Path
) -> None:
    from bot.pipeline.processor import BUSY_BATCH

    await _store_deliveries(database_url, 3 * BUSY_BATCH)
    ruleset = load_rules(rules_dir)
    busy = True
    engine = create_engine(database_url)
    processor = EventProcessor(engine, lambda: ruleset, ingest_busy=lambda: busy)
    try:
        assert len(await processor.claim()) == BUSY_BATCH
        busy = False
        assert len(await processor.claim()) == 2 * BUSY_BATCH  # the rest, in one batch
    finally:
        await engine.dispose()


async def test_a_batch_holds_a_bounded_number_of_rule_evaluations(
    database_url: str, tmp_path: Path
) -> None:
    from bot.pipeline.processor import BATCH_EVALUATIONS

    folder = tmp_path / "many"
    folder.mkdir()
    rules = [
        f"  - name: r{i}\n    on: {{events: [jira:issue_updated]}}\n"
        f"    when: [{{field: issue.key, equals: NONE-{i}}}]\n"
        f"    do: [{{action: ubiops.deployments_list, with: {{project_name: p}}}}]"
        for i in range(400)  # every one of them is evaluated for every event
    ]
    (folder / "many.yaml").write_text("rules:\n" + "\n".join(rules) + "\n")
    ruleset = load_rules(folder)
    await _store_deliveries(database_url, 12)
    engine = create_engine(database_url)
    busy = True
    processor = EventProcessor(engine, lambda: ruleset, ingest_busy=lambda: busy)
    try:
        assert len(await processor.claim()) == 1  # under load: at least one, if it is wide
        busy = False
        assert len(await processor.claim()) == BATCH_EVALUATIONS // 400  # 5: 2,000 evaluations
    finally:
        await engine.dispose()
