"""The database going away: deliveries get 503 (Jira retries them), the service heals itself.

A real `bot serve` process runs the version-per-issue rule against the UbiOps fake.
While its database is unusable every delivery must be answered 503 (never 500, never a
202 for something not committed) and /readyz must say so; once the database is back,
the same process (no restart) stores Jira's retries of the refused deliveries, once
each, and acts on every stored event once.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.engine import create_engine
from bot.db.models import action_runs, events
from tests.conftest import postgres_behind_proxy
from tests.fakes.ubiops import FakeUbiOps, Fault
from tests.helpers import TOKEN, wait_for
from tests.system.harness import (
    Service,
    create_churn_deployment,
    deliver,
    service_env,
    unsettled,
    version_rules,
)

BEFORE = 10  # deliveries acknowledged before the database goes away
REFUSED_WANTED = 8  # 503s to collect while it is away
SENDERS = 4  # concurrent Jira deliveries while it goes away
JIRA_RETRIES = 10  # Jira's redeliveries of a refused delivery (bounded here)
LEASE_S = 5  # DEPLOYBOT_LEASE_S: how long a claimed event stays with its worker
SETTLE_S = 35.0  # after the database is back, for everything stored to be acted on
HELD_S = 1.0  # UbiOps answers held this long, so that actions are in flight at the outage


async def ready(session: aiohttp.ClientSession, service: Service) -> int:
    async with session.get(service.url + "/readyz") as resp:
        await resp.read()
        return resp.status


class Jira:
    """Sends deliveries and retries the refused ones, remembering every answer."""

    def __init__(self, session: aiohttp.ClientSession, service: Service) -> None:
        self.session, self.service = session, service
        self.answers: dict[str, list[int | None]] = {}

    async def deliver(self, delivery_id: str) -> int | None:
        status = await deliver(self.session, self.service.url, delivery_id, delivery_id)
        self.answers.setdefault(delivery_id, []).append(status)
        return status

    def acked(self) -> set[str]:
        return {d for d, seen in self.answers.items() if any(s in (200, 202) for s in seen)}

    def refused(self) -> set[str]:
        return set(self.answers) - self.acked()

    async def retry_refused(self) -> None:
        """Redeliver each refused delivery (same identifier) until it is acknowledged."""

        async def one(delivery_id: str) -> None:
            for retry in range(1, JIRA_RETRIES + 1):
                status = await deliver(
                    self.session, self.service.url, delivery_id, delivery_id, retry
                )
                self.answers[delivery_id].append(status)
                if status in (200, 202):
                    return
                await asyncio.sleep(0.5)

        await asyncio.gather(*(one(d) for d in sorted(self.refused())))


@asynccontextmanager
async def running_service(
    tmp_path: Path, aiohttp_server: Callable[..., Any], database_url: str
) -> AsyncIterator[tuple[Service, FakeUbiOps, aiohttp.ClientSession]]:
    fake = FakeUbiOps(token=TOKEN)
    fake_server: TestServer = await aiohttp_server(fake.app())
    fake_url = str(fake_server.make_url(fake.prefix))
    rules = version_rules(tmp_path)
    env = service_env(
        database_url,
        rules,
        UBIOPS_API_URL=fake_url,
        UBIOPS_API_TOKEN=TOKEN,
        DEPLOYBOT_LEASE_S=str(LEASE_S),
    )
    service = Service(env, tmp_path, tmp_path / "serve.log")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        await create_churn_deployment(session, fake_url, TOKEN)
        await service.start(session)
        try:
            yield service, fake, session
        finally:
            if service.proc is not None and service.proc.returncode is None:
                await service.stop(15)


async def settle_and_check(
    engine: AsyncEngine, jira: Jira, service: Service, fake: FakeUbiOps
) -> dict[str, int]:
    """Wait until all is processed; check stored once, acted on once, nothing lost."""

    async def settled() -> bool:
        return await unsettled(engine) == 0

    try:
        await wait_for(settled, timeout_s=SETTLE_S)
    except AssertionError:
        async with engine.connect() as conn:
            stuck_events = (
                await conn.execute(
                    select(
                        events.c.id,
                        events.c.status,
                        events.c.attempts,
                        events.c.lease_owner,
                        events.c.lease_until,
                    ).where(events.c.status != "processed")
                )
            ).all()
            stuck_runs = (
                await conn.execute(
                    select(
                        action_runs.c.id,
                        action_runs.c.status,
                        action_runs.c.attempts,
                        action_runs.c.lease_owner,
                        action_runs.c.lease_until,
                    ).where(action_runs.c.status != "succeeded")
                )
            ).all()
            sessions: Sequence[Any] = []  # PostgreSQL's: what each session is doing
            if engine.dialect.name == "postgresql":
                sessions = (
                    await conn.execute(
                        text(
                            "SELECT pid, state, wait_event_type, wait_event, "
                            "now() - xact_start AS in_transaction, left(query, 120) "
                            "FROM pg_stat_activity WHERE datname = current_database() "
                            "AND pid <> pg_backend_pid()"
                        )
                    )
                ).all()
        raise AssertionError(
            f"{SETTLE_S} s after the database came back, not yet acted on: events "
            f"{[tuple(r) for r in stuck_events]}, action runs {[tuple(r) for r in stuck_runs]}; "
            f"server sessions: {[tuple(r) for r in sessions]}; "
            f"log: {service.log.read_text()[-3000:]}"
        ) from None
    async with engine.connect() as conn:
        stored = (await conn.execute(select(events.c.delivery_id))).scalars().all()
        statuses = set((await conn.execute(select(action_runs.c.status))).scalars().all())
        runs = (await conn.execute(select(func.count()).select_from(action_runs))).scalar_one()
    assert service.proc is not None and service.proc.returncode is None  # never restarted
    assert len(stored) == len(set(stored))  # stored once
    assert set(stored) == set(jira.answers) == jira.acked()  # nothing lost, all retried in
    assert runs == len(stored) and statuses == {"succeeded"}
    versions = fake.version_names("ml-prod", "churn")
    assert sorted(versions) == sorted(d.lower() for d in stored)  # acted on once each
    log = service.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    figures = {
        "deliveries": len(jira.answers),
        "answers": sum(len(seen) for seen in jira.answers.values()),
        "refused_503": sum(seen.count(503) for seen in jira.answers.values()),
        "stored": len(stored),
    }
    print(f"\n{figures}")
    return figures


async def test_postgres_stopped_gives_503_then_recovers_without_restart(
    tmp_path: Path, aiohttp_server: Callable[..., Any]
) -> None:
    """PostgreSQL "stops": a TCP proxy between the service and it cuts every connection
    and refuses new ones, then listens again. The machine's PostgreSQL server is shared
    and is never stopped."""
    async with postgres_behind_proxy() as (direct_url, via_proxy, proxy):
        engine = create_engine(direct_url)
        try:
            async with running_service(tmp_path, aiohttp_server, via_proxy) as (
                service,
                fake,
                session,
            ):
                jira = Jira(session, service)
                before = await asyncio.gather(*(jira.deliver(f"OPS-{i}") for i in range(BEFORE)))
                assert before == [202] * BEFORE

                # Deliveries keep coming while PostgreSQL goes away under them.
                down = asyncio.Event()
                refused_after_down = 0
                counter = iter(range(BEFORE, 10_000))

                async def sender() -> None:
                    nonlocal refused_after_down
                    while refused_after_down < REFUSED_WANTED:
                        status = await jira.deliver(f"OPS-{next(counter)}")
                        if down.is_set() and status != 202:
                            refused_after_down += 1
                        await asyncio.sleep(0.02)

                hold_creates(fake, SENDERS)
                senders = [asyncio.create_task(sender()) for _ in range(SENDERS)]
                await asyncio.sleep(0.3)
                await proxy.go_down()
                down.set()
                await asyncio.wait_for(asyncio.gather(*senders), timeout=20)
                await asyncio.sleep(HELD_S)  # the held answers arrive while it is away
                assert await ready(session, service) == 503
                answers = {s for seen in jira.answers.values() for s in seen}
                assert answers <= {202, 503}, jira.answers  # never 500, always answered
                assert jira.refused()

                await proxy.come_back()

                async def recovered() -> bool:
                    return await ready(session, service) == 200

                await wait_for(recovered, timeout_s=20)
                await jira.retry_refused()
                assert not jira.refused(), jira.answers
                await settle_and_check(engine, jira, service, fake)
        finally:
            await engine.dispose()


def hold_creates(fake: FakeUbiOps, count: int) -> None:
    """Carry out the next creates at once but answer them late: the outcome is recorded
    while the database is away."""
    fake.fail_next(count, Fault(kind="slow", delay_s=HELD_S, method="POST", after=True))


def _chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


async def test_sqlite_read_only_gives_503_then_recovers_without_restart(
    tmp_path: Path, aiohttp_server: Callable[..., Any]
) -> None:
    """The SQLite database turns read-only: its folder, file and WAL get the immutable
    attribute (`chattr +i`), then lose it.

    The tests run as root, which ignores file modes, and `chmod` never affects the file
    descriptor the service already holds. An immutable inode refuses writes from
    everyone, through open descriptors too (EPERM), as a read-only mount would (EROFS);
    that is what the service must survive. The shared-memory index (`-shm`) is left
    writable: SQLite maps it, and a write fault on an immutable mapping is a SIGBUS, a
    crash no real read-only database causes. Skipped where the attribute cannot be set
    (no CAP_LINUX_IMMUTABLE, or a file system without it).
    """
    folder = tmp_path / "data"
    folder.mkdir()
    probe = folder / "probe"
    probe.write_text("x")
    try:
        _chattr("+i", probe)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make a file immutable here: {exc}")
    _chattr("-i", probe)
    probe.unlink()
    db_file = folder / "deploybot.db"
    engine = create_engine(f"sqlite+aiosqlite:///{db_file}")
    locked: list[Path] = []
    try:
        async with running_service(tmp_path, aiohttp_server, f"sqlite+aiosqlite:///{db_file}") as (
            service,
            fake,
            session,
        ):
            jira = Jira(session, service)
            before = await asyncio.gather(*(jira.deliver(f"OPS-{i}") for i in range(BEFORE)))
            assert before == [202] * BEFORE

            wal = db_file.with_name(db_file.name + "-wal")
            assert wal.exists()  # WAL mode: commits are written here first
            hold_creates(fake, 4)
            held = await asyncio.gather(*(jira.deliver(f"OPS-H{i}") for i in range(4)))
            assert held == [202] * 4
            await asyncio.sleep(HELD_S / 3)  # their creates are under way
            locked = [db_file, wal, folder]
            _chattr("+i", *locked)
            refused = [await jira.deliver(f"OPS-{i}") for i in range(BEFORE, BEFORE + 5)]
            refused += await asyncio.gather(
                *(jira.deliver(f"OPS-{i}") for i in range(BEFORE + 5, BEFORE + REFUSED_WANTED))
            )
            readyz_while_read_only = await ready(session, service)
            await asyncio.sleep(HELD_S)  # the held answers arrive while it is read-only
            assert refused == [503] * REFUSED_WANTED, jira.answers  # not 500, not 202
            # SELECT 1 still works on a read-only file; readiness follows the failed writes.
            assert readyz_while_read_only == 503

            _chattr("-i", *locked)
            locked = []
            await jira.retry_refused()
            assert not jira.refused(), jira.answers
            figures = await settle_and_check(engine, jira, service, fake)
            assert await ready(session, service) == 200
            print(f"readyz while read-only: {readyz_while_read_only}, {figures}")
    finally:
        if locked:
            _chattr("-i", *locked)
        await engine.dispose()
