"""Leader election on PostgreSQL, the APScheduler wiring, and the app's scheduler context."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.engine import create_engine, upgrade
from bot.db.models import events
from bot.jira_app.scheduler import SCHEDULER_LOCK_ID, Job, LeaderLock, Scheduler
from bot.settings import Settings
from tests.conftest import PG_URL_ENV, ClientFactory, postgres_database
from tests.helpers import wait_for


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    base = os.environ.get(PG_URL_ENV)
    if not base:
        pytest.skip(f"PostgreSQL tests need {PG_URL_ENV}")
    async with postgres_database(base) as url:
        yield url


async def lock_holders(engine: AsyncEngine) -> list[int]:
    """Return the backend pids holding the scheduler lock (PostgreSQL's own view)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                # Advisory locks are per database; other test databases share the server.
                "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                " WHERE d.datname = current_database() AND l.locktype = 'advisory'"
                " AND l.granted AND ((l.classid::bigint << 32) | l.objid::bigint) = :id"
            ),
            {"id": SCHEDULER_LOCK_ID},
        )
        return [int(r.pid) for r in rows]


async def kill_holder(engine: AsyncEngine) -> None:
    """Terminate the holder's backend, as when its replica dies or its network drops."""
    (pid,) = await lock_holders(engine)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})


async def test_one_leader_at_a_time_and_takeover_when_its_connection_dies(pg_url: str) -> None:
    replicas = [create_engine(pg_url) for _ in range(3)]
    a, b = LeaderLock(replicas[0]), LeaderLock(replicas[1])
    try:
        assert await a.try_acquire()
        assert not await b.try_acquire()
        assert await a.try_acquire()  # still held: the holder keeps leading
        assert len(await lock_holders(replicas[2])) == 1
        await kill_holder(replicas[2])
        assert await b.try_acquire()
        assert not await a.try_acquire()  # noticed its loss, and cannot take it back
        await b.release()
        assert await a.try_acquire()  # a graceful release frees it at once
    finally:
        await a.release()
        await b.release()
        for engine in replicas:
            await engine.dispose()


async def test_two_replicas_run_the_jobs_on_one_leader_and_fail_over(pg_url: str) -> None:
    engines = [create_engine(pg_url) for _ in range(3)]
    runs: list[str] = []

    def replica(name: str, engine: AsyncEngine) -> Scheduler:
        async def tick(_now: datetime) -> None:
            runs.append(name)

        return Scheduler([Job("tick", 0.05, tick)], LeaderLock(engine), check_s=0.05)

    first, second = replica("a", engines[0]), replica("b", engines[1])
    tasks = [asyncio.create_task(first.run())]
    try:
        await wait_for(lambda: first.leading)
        tasks.append(asyncio.create_task(second.run()))
        await wait_for(lambda: runs.count("a") >= 5)
        assert not second.leading and "b" not in runs
        assert len(await lock_holders(engines[2])) == 1

        await kill_holder(engines[2])
        await wait_for(lambda: second.leading and not first.leading)
        seen = len(runs)
        await wait_for(lambda: runs.count("b") >= 5)
        assert set(runs[seen:]) == {"b"}  # the old leader stopped once it saw its loss
        assert len(await lock_holders(engines[2])) == 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for engine in engines:
            await engine.dispose()


async def test_on_sqlite_the_scheduler_always_leads_and_survives_a_failing_job() -> None:
    engine = create_engine("sqlite+aiosqlite:///:memory:")
    calls: list[str] = []

    async def broken(_now: datetime) -> None:
        calls.append("broken")
        raise RuntimeError("boom")

    async def fine(now: datetime) -> None:
        assert now.tzinfo is UTC
        calls.append("fine")

    scheduler = Scheduler(
        [Job("broken", 0.03, broken), Job("fine", 0.03, fine)],
        LeaderLock(engine),
        check_s=0.03,
    )
    task = asyncio.create_task(scheduler.run())
    try:
        await wait_for(lambda: calls.count("broken") >= 3 and calls.count("fine") >= 3)
        assert scheduler.leading
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await engine.dispose()


async def test_the_app_runs_the_scheduler_and_prunes_at_start(
    make_client: ClientFactory, settings: Settings
) -> None:
    engine = create_engine(settings.database_url)
    await upgrade(engine)
    old = datetime.now(UTC) - timedelta(days=settings.retention_days + 1)
    async with engine.begin() as conn:
        await conn.execute(
            insert(events),
            {
                "tenant": "",
                "delivery_id": "old",
                "webhook_event": "jira:issue_updated",
                "source": "live",
                "body": b"{}",
                "status": "processed",
                "received_at": old,
                "processed_at": old,
                "attempts": 1,
            },
        )

    async def remaining() -> int:
        async with engine.connect() as conn:
            return len((await conn.execute(select(events.c.id))).all())

    try:
        client = await make_client(settings, scheduler_interval_s=1.0)

        async def pruned() -> bool:  # a new leader runs every job at once
            return await remaining() == 0

        await wait_for(pruned, timeout_s=10)
        await client.close()
        if not settings.is_sqlite:
            assert await lock_holders(engine) == []  # released at shutdown
    finally:
        await engine.dispose()
