"""`deploybot events replay`: events run again, succeeded steps are not repeated."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.cli.main import main
from bot.core.delivery import Delivery
from bot.db.engine import create_engine, upgrade
from bot.db.models import action_runs, events
from bot.db.store import EventStore
from bot.pipeline.executor import ActionExecutor
from bot.pipeline.processor import EventProcessor
from bot.pipeline.replay import PROGRESS_MIN_EVENTS, Selection, parse_since, render_bar, replay
from bot.rules.loader import load_rules
from bot.services.runner import ActionRunner
from bot.services.ubiops import UbiOpsClient
from tests import test_pipeline
from tests.fakes.ubiops import FakeUbiOps
from tests.helpers import TOKEN, issue_updated

rules_dir = test_pipeline.rules_dir  # fixtures shared with the pipeline tests
ubiops = test_pipeline.ubiops


async def store(engine: AsyncEngine, *keys: str) -> list[int]:
    writer = EventStore(engine)
    await writer.start()
    try:
        stored = [
            await writer.add(
                "",
                Delivery(
                    f"d-{k}", 0, "jira:issue_updated", k, json.dumps(issue_updated(k)).encode()
                ),
            )
            for k in keys
        ]
    finally:
        await writer.close()
    return [s.event_id for s in stored if s.event_id is not None]


async def statuses(engine: AsyncEngine, event_id: int) -> tuple[str, list[str]]:
    async with engine.connect() as conn:
        event = (
            await conn.execute(select(events.c.status).where(events.c.id == event_id))
        ).scalar_one()
        runs = (
            await conn.execute(
                select(action_runs.c.status)
                .where(action_runs.c.event_id == event_id)
                .order_by(action_runs.c.step_index)
            )
        ).scalars()
        return event, list(runs)


async def drain(processor: EventProcessor, executor: ActionExecutor) -> None:
    """Process and execute until nothing is left to do now."""
    while await processor.run_once() + await executor.run_once():
        pass


async def test_replay_reruns_dead_steps_and_not_succeeded_ones(
    database_url: str, rules_dir: Path, ubiops: tuple[FakeUbiOps, str]
) -> None:
    fake, base_url = ubiops
    engine = create_engine(database_url)
    await upgrade(engine)
    ruleset = load_rules(rules_dir)
    processor = EventProcessor(engine, lambda: ruleset)
    try:
        async with aiohttp.ClientSession() as session:
            working = ActionRunner(
                {"ubiops": UbiOpsClient(session, base_url, TOKEN)}, files_dir=rules_dir
            )
            no_ubiops = ActionRunner({"ubiops": None}, files_dir=rules_dir)
            with_ubiops = ActionExecutor(engine, working, rules_dir=rules_dir)
            without_ubiops = ActionExecutor(engine, no_ubiops, rules_dir=rules_dir)
            [done] = await store(engine, "OPS-60")
            await drain(processor, with_ubiops)
            # UbiOps was not configured when the second event came: its first step is dead.
            [stuck] = await store(engine, "OPS-61")
            await drain(processor, without_ubiops)
            assert await statuses(engine, done) == ("processed", ["succeeded", "succeeded"])
            assert await statuses(engine, stuck) == ("processed", ["dead", "skipped"])
            creates = len(fake.calls("POST", r".*/deployments/churn/versions"))

            outcome = await replay(engine, Selection(ids=[done, stuck, 999_999]))
            assert outcome.replayed == [done, stuck]
            assert outcome.runs_reset == 2
            assert outcome.missing == [999_999]
            assert await statuses(engine, stuck) == ("received", ["pending", "pending"])
            assert await statuses(engine, done) == ("received", ["succeeded", "succeeded"])

            # UbiOps is configured now: the stuck event finishes, the done one is not redone.
            await drain(processor, with_ubiops)
    finally:
        await engine.dispose()
    engine = create_engine(database_url)
    try:
        assert await statuses(engine, done) == ("processed", ["succeeded", "succeeded"])
        assert await statuses(engine, stuck) == ("processed", ["succeeded", "succeeded"])
    finally:
        await engine.dispose()
    assert fake.version_names("ml-prod", "churn") == ["ops-60", "ops-61"]
    assert len(fake.calls("POST", r".*/deployments/churn/versions")) == creates + 1


async def test_selection_by_status_and_since_with_a_progress_bar(database_url: str) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    try:
        ids = await store(engine, *(f"OPS-{i}" for i in range(PROGRESS_MIN_EVENTS + 5)))
        old, failed, busy = ids[0], ids[1:4], ids[4]
        async with engine.begin() as conn:
            await conn.execute(update(events).values(status="processed"))
            await conn.execute(
                update(events).where(events.c.id.in_(failed)).values(status="failed", error="x")
            )
            await conn.execute(
                update(events).where(events.c.id == busy).values(status="processing")
            )
            await conn.execute(
                update(events)
                .where(events.c.id == old)
                .values(received_at=datetime(2020, 1, 1, tzinfo=UTC))
            )
        quiet = io.StringIO()
        outcome = await replay(engine, Selection(status="failed"), progress=quiet)
        assert outcome.replayed == failed
        assert quiet.getvalue() == ""  # a handful of events: no bar
        async with engine.connect() as conn:
            reset = (
                await conn.execute(
                    select(events.c.status, events.c.error).where(events.c.id.in_(failed))
                )
            ).all()
        assert {tuple(r) for r in reset} == {("received", None)}

        bar = io.StringIO()
        outcome = await replay(
            engine, Selection(since=datetime(2024, 1, 1, tzinfo=UTC)), progress=bar
        )
        assert old not in outcome.replayed
        assert outcome.busy == [busy]  # being processed: left alone
        assert len(outcome.replayed) == len(ids) - 2
        total = len(ids) - 2
        assert bar.getvalue().endswith(f"[{'#' * 30}] {total}/{total} events\n")
        assert bar.getvalue().startswith("\r[")
    finally:
        await engine.dispose()


async def test_cli_replays_by_id_and_reports_missing(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    try:
        [event_id] = await store(engine, "OPS-70")
        async with engine.begin() as conn:
            await conn.execute(update(events).values(status="failed"))
    finally:
        await engine.dispose()
    monkeypatch.setenv("DEPLOYBOT_DATABASE_URL", database_url)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["events", "replay", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = await asyncio.to_thread(run, str(event_id), "424242")
    assert code == 1
    assert "replayed 1 event(s)" in out
    assert "no event 424242" in err
    code, out, _ = await asyncio.to_thread(run, "--status", "failed")
    assert (code, out) == (
        0,
        "replayed 0 event(s); 0 dead or skipped action run(s) back to pending\n",
    )
    code, _, err = await asyncio.to_thread(run)
    assert code == 2
    assert "choose events" in err
    code, _, err = await asyncio.to_thread(run, "--since", "yesterday")
    assert code == 2
    assert "ISO 8601" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", datetime(2024, 5, 1, 11, 30, tzinfo=UTC)),
        ("2h", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
        ("7d", datetime(2024, 4, 24, 12, 0, tzinfo=UTC)),
        ("2024-04-30", datetime(2024, 4, 30, tzinfo=UTC)),
        ("2024-04-30T08:00:00+02:00", datetime(2024, 4, 30, 6, 0, tzinfo=UTC)),
    ],
)
def test_parse_since(text: str, expected: datetime) -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_since(text, now) == expected


def test_render_bar() -> None:
    assert render_bar(0, 4, width=4) == "[....] 0/4 events"
    assert render_bar(2, 4, width=4) == "[##..] 2/4 events"
    assert render_bar(7, 120, width=10) == "[..........]   7/120 events"
    assert render_bar(120, 120, width=10) == "[##########] 120/120 events"
    assert render_bar(0, 0, width=3) == "[###] 0/0 events"
