"""Which worker processes are alive, so that a dead one's claims are taken back at once.

Each process has an identity (a fresh id, its host, pid and the kernel's start time of
that pid) in the `processes` table and beats a heartbeat there. Its processor and
executor claim as `events-<id>` and `actions-<id>`. At start-up and at every beat a
process looks at the others: one on the same host whose pid is gone (or now another
process) is dead at once, which is how a restarted process knows its predecessor's
claims are orphaned; one silent for DEAD_AFTER_BEATS heartbeats is dead wherever it ran
(another replica). A dead process's leases are expired, so the ordinary claims take its
events and runs at once; a resumed run's creates still look first (executor). Leases
stay the last resort for claims of a process with no row (older versions).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.claims import EXPIRED
from bot.db.models import action_runs, events, processes, upsert, utcnow
from bot.db.writers import writer_for
from bot.pipeline.wakeup import wait_until_set

log = logging.getLogger(__name__)

DEAD_AFTER_BEATS = 5  # silent this many heartbeats: dead (a loaded loop beats late)


def _start_time(pid: int) -> str:
    """The kernel's start time of `pid` (ticks since boot), '' where unknown.

    With the pid it names one process: a pid reused after a restart (pid 1 in a
    container, every time) has another start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    # The command name in parentheses may hold spaces; fields follow its last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else ""


def _host() -> str:
    """Where this process's pid means something: the host name and the pid namespace.

    Containers sharing the host's name (host networking) each have a pid namespace of
    their own, where another's pid is absent though it runs: they only see heartbeats.
    """
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()} {namespace}"[:255]


def pid_alive(pid: int, started: str) -> bool:
    """Whether the process `pid` that started at `started` still runs on this host."""
    if os.path.isdir("/proc/self"):
        return bool(started) and _start_time(pid) == started
    try:  # no /proc: a reused pid looks alive (its claims then wait for their leases)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ProcessIdentity:
    id: str
    host: str
    pid: int
    started: str

    @classmethod
    def current(cls) -> ProcessIdentity:
        pid = os.getpid()
        return cls(uuid.uuid4().hex[:16], _host(), pid, _start_time(pid))

    @property
    def events_owner(self) -> str:
        return f"events-{self.id}"

    @property
    def actions_owner(self) -> str:
        return f"actions-{self.id}"


def is_dead(
    row: Any,
    me: ProcessIdentity,
    now: datetime,
    dead_after: timedelta,
    alive: Callable[[int, str], bool] = pid_alive,
) -> bool:
    """Whether the process of `row` (a `processes` row) is dead, as `me` sees it."""
    if row.id == me.id:
        return False
    if row.heartbeat_at < now - dead_after:
        return True
    return bool(row.host == me.host and not alive(row.pid, row.started))


class Liveness:
    """This process's heartbeat, and the taking back of dead processes' claims."""

    def __init__(
        self,
        engine: AsyncEngine,
        identity: ProcessIdentity | None = None,
        *,
        heartbeat_s: float = 2.0,
        clock: Callable[[], datetime] = utcnow,
        on_reclaimed: Callable[[], None] | None = None,
        alive: Callable[[int, str], bool] = pid_alive,
    ) -> None:
        self._writes = writer_for(engine)
        self.identity = identity or ProcessIdentity.current()
        self.heartbeat_s = heartbeat_s
        self._dead_after = timedelta(seconds=heartbeat_s * DEAD_AFTER_BEATS)
        self._clock = clock
        self.on_reclaimed = on_reclaimed
        self._alive = alive
        self._stop = asyncio.Event()

    def _beat(self, conn: Connection, now: datetime) -> tuple[list[str], int]:
        me = self.identity
        row = {"host": me.host, "pid": me.pid, "started": me.started, "heartbeat_at": now}
        conn.execute(
            upsert(processes, conn.dialect.name)
            .values(id=me.id, started_at=now, **row)
            .on_conflict_do_update(index_elements=["id"], set_={"heartbeat_at": now})
        )
        rows = conn.execute(select(processes)).all()
        dead = [r.id for r in rows if is_dead(r, me, now, self._dead_after, self._alive)]
        if not dead:
            return [], 0
        taken = conn.execute(
            update(events)
            .where(
                events.c.lease_owner.in_([f"events-{d}" for d in dead]),
                events.c.status == "processing",
            )
            .values(lease_until=EXPIRED)
        ).rowcount
        taken += conn.execute(
            update(action_runs)
            .where(
                action_runs.c.lease_owner.in_([f"actions-{d}" for d in dead]),
                action_runs.c.status == "running",
            )
            .values(lease_until=EXPIRED)
        ).rowcount
        conn.execute(delete(processes).where(processes.c.id.in_(dead)))
        return dead, taken

    async def beat(self, *, durable: bool = False) -> int:
        """Record this process alive; take back dead ones' claims. Returns how many."""
        write = self._writes.run if durable else self._writes.run_relaxed
        dead, taken = await write(self._beat, self._clock())
        if dead:
            log.warning(
                "processes %s are gone: %d of their claims taken back", ", ".join(dead), taken
            )
            if self.on_reclaimed is not None:
                self.on_reclaimed()
        return taken

    async def run(self) -> None:
        """Beat until `stop`; a database error skips a beat (others may then take over)."""
        while not self._stop.is_set():
            await wait_until_set(self._stop, self.heartbeat_s)
            if self._stop.is_set():
                return
            try:
                await self.beat()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("heartbeat skipped: database error: %s", exc)
            except Exception:  # silent, this process would be taken over while it works
                log.exception("heartbeat failed")

    async def stop(self) -> None:
        """Stop beating and remove this process's row (its claims were given back)."""
        self._stop.set()
        me = self.identity.id
        await self._writes.run(
            lambda conn: conn.execute(delete(processes).where(processes.c.id == me))
        )
