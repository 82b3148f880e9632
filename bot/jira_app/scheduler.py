"""Scheduler wiring: the one module that imports APScheduler, and the leader election.

On PostgreSQL several replicas share the database; exactly one runs the jobs: the one
holding a session-level advisory lock on a dedicated connection. The lock vanishes with
its connection, so when the holder dies another replica's periodic try-lock takes over.
On SQLite one process owns the file and the scheduler always runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.db.store import EventStore
from bot.jira_app import jobs
from bot.jira_app.access import JiraAccess
from bot.jira_app.catch_up import CatchUp
from bot.rules.model import RuleSet
from bot.settings import Settings

log = logging.getLogger(__name__)

# Any fixed 64-bit number, distinct from the migration lock's.
SCHEDULER_LOCK_ID = 0x6465706C6F79_02
PRUNE_INTERVAL_S = 3600.0
LEADER_CHECK_MAX_S = 15.0


class LeaderLock:
    """Leadership among replicas: `pg_try_advisory_lock` held on a connection of its own."""

    def __init__(self, engine: AsyncEngine, lock_id: int = SCHEDULER_LOCK_ID) -> None:
        self._engine = engine
        self._lock_id = lock_id
        self._conn: AsyncConnection | None = None

    @property
    def always_held(self) -> bool:
        return self._engine.dialect.name != "postgresql"

    async def try_acquire(self) -> bool:
        """Take the lock if free, or confirm it is still held; return whether we lead."""
        if self.always_held:
            return True
        try:
            if self._conn is None:
                conn = await self._engine.connect()
                got = (
                    await conn.execute(
                        text("SELECT pg_try_advisory_lock(:id)"), {"id": self._lock_id}
                    )
                ).scalar()
                # Session-level: the lock outlives this commit; an idle transaction would not
                # be harmless (it holds back vacuum).
                await conn.commit()
                if not got:
                    await conn.close()
                    return False
                self._conn = conn
                return True
            await self._conn.execute(text("SELECT 1"))  # the lock lives as long as this works
            await self._conn.commit()
            return True
        except Exception as exc:
            # Whatever keeps us from the database, we do not lead; the loop must live on.
            log.warning("scheduler leadership lost or not taken: %s", exc)
            await self._drop()
            return False

    async def release(self) -> None:
        """Give up the lock (closing the connection releases it whatever happens)."""
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError, OSError):
                await self._conn.execute(
                    text("SELECT pg_advisory_unlock(:id)"), {"id": self._lock_id}
                )
                await self._conn.commit()
            await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Never hand a connection that held the lock back to the pool.
            with contextlib.suppress(SQLAlchemyError, OSError):
                await conn.invalidate()
            with contextlib.suppress(SQLAlchemyError, OSError):
                await conn.close()


@dataclass(frozen=True, slots=True)
class Job:
    """A plain async job called with the tick's `now` every `interval_s` seconds."""

    name: str
    interval_s: float
    run: Callable[[datetime], Awaitable[object]]


class Scheduler:
    """Run `jobs` on APScheduler while `lock` is held; check the lock every `check_s`."""

    def __init__(
        self,
        jobs: Sequence[Job],
        lock: LeaderLock,
        *,
        check_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._jobs = jobs
        self._lock = lock
        self._check_s = check_s
        self._clock = clock
        self._running: set[asyncio.Task[None]] = set()
        self.leading = False

    def _wrap(self, job: Job) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            task = asyncio.current_task()
            assert task is not None
            self._running.add(task)
            try:
                await job.run(datetime.fromtimestamp(self._clock(), UTC))
            except Exception:  # one failed tick must not stop the job: the next one retries
                log.exception("scheduled job %s failed", job.name)
            finally:
                self._running.discard(task)

        return run

    async def run(self) -> None:
        """Lead while holding the lock, follow otherwise, until cancelled."""
        # APScheduler logs every run at INFO; our jobs log what matters themselves.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        aps = AsyncIOScheduler(event_loop=asyncio.get_running_loop(), timezone=UTC)
        for job in self._jobs:
            aps.add_job(
                self._wrap(job),
                IntervalTrigger(seconds=job.interval_s, timezone=UTC),
                id=job.name,
                name=job.name,
                max_instances=1,  # a slow tick is not overlapped by the next
                coalesce=True,
                misfire_grace_time=None,
            )
        aps.start(paused=True)
        try:
            while True:
                leading = await self._lock.try_acquire()
                if leading and not self.leading:
                    log.info("scheduler: this replica leads; running jobs")
                    now = datetime.now(UTC)
                    for job in self._jobs:  # a new leader runs everything once at once
                        aps.modify_job(job.name, next_run_time=now)
                    aps.resume()
                elif not leading and self.leading:
                    log.warning("scheduler: leadership lost; jobs paused")
                    aps.pause()
                self.leading = leading
                await asyncio.sleep(self._check_s)
        finally:
            aps.shutdown(wait=False)
            await self._stop_running()
            await self._lock.release()
            self.leading = False

    async def _stop_running(self) -> None:
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def scheduled_jobs(
    settings: Settings,
    engine: AsyncEngine,
    http: aiohttp.ClientSession,
    store: EventStore,
    rules: Callable[[], RuleSet | None],
    actions_due: asyncio.Event,
    clock: Callable[[], float],
) -> list[Job]:
    """Build the scheduled jobs from the service's resources."""
    access = JiraAccess(settings, engine, http, clock=clock)
    tick_s = settings.scheduler_interval_s
    retention = timedelta(days=settings.retention_days)
    maintenance = jobs.WebhookMaintenance(
        access, rules, timedelta(seconds=settings.webhooks_interval_s)
    )

    async def failed(now: datetime) -> int:
        return await jobs.poll_all_failed(access, store, now)

    async def retries(_now: datetime) -> None:
        await jobs.wake_due_actions(actions_due)

    async def prune(now: datetime) -> tuple[int, int]:
        return await jobs.prune(engine, now, retention)

    catch_up = CatchUp(
        access,
        store,
        rules,
        margin_s=settings.jira_catch_up_margin_s,
        max_changes=settings.jira_catch_up_max_changes,
    )
    table = [
        Job("webhooks", tick_s, maintenance),
        Job("catch-up", tick_s, catch_up),
        Job("failed-deliveries", tick_s, failed),
        Job("action-retries", tick_s, retries),
        Job("prune", PRUNE_INTERVAL_S, prune),
    ]
    off = set()
    if settings.jira_auth_mode != "connect":
        off.add("failed-deliveries")
    if settings.jira_auth_mode == "secret":
        off.add("webhooks")  # an administrator registers the webhooks in this mode
    if not settings.catch_up:
        off.add("catch-up")
    return [j for j in table if j.name not in off]
