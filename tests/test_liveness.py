"""A dead process's claims are taken back at once (bot/pipeline/liveness.py): by its
restarted successor on the same host (its pid is gone), by any replica once its heartbeat
is silent; a live holder's claims are left alone. Real database (both engines), the
real fake UbiOps, real processes killed for the dead ones."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select

from bot.core.delivery import Delivery
from bot.db.models import processes, utcnow
from bot.db.queries import get_event
from bot.pipeline.liveness import (
    DEAD_AFTER_BEATS,
    Liveness,
    ProcessIdentity,
    _start_time,
    is_dead,
    pid_alive,
)
from bot.pipeline.processor import EventProcessor
from bot.rules import workflow
from tests.helpers import wait_for
from tests.workflow_world import Env, _uploads, drive, issue_updated
from tests.workflow_world import env as env  # the fixture


@pytest.fixture
def dead_process() -> Iterator[ProcessIdentity]:
    """The identity of a process of this host that ran and was SIGKILLed."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = ProcessIdentity.current()  # the child shares this host and pid namespace
        identity = ProcessIdentity("deadbeef", me.host, child.pid, _start_time(child.pid))
        assert pid_alive(child.pid, identity.started)
        yield identity
    finally:
        child.kill()
        child.wait()


def _kill(identity: ProcessIdentity) -> None:
    os.kill(identity.pid, signal.SIGKILL)
    os.waitpid(identity.pid, 0)


async def _claims_of(env: Env, identity: ProcessIdentity) -> tuple[int, int, int]:
    """`identity`'s process: a run holding its rule's concurrency key, an event being
    evaluated; and a run of the same key queued behind the first. Returns their ids."""
    holder = await env.deliver(issue_updated("OPS-1"), "d-1")
    queued = await env.deliver(issue_updated("OPS-2"), "d-2")
    crashed = env.executor(lease_s=120, owner=identity.actions_owner)
    assert [r.event_id for r in await crashed.claim(4)] == [holder]
    stored = await env.store.add(
        "", Delivery("d-3", 0, "jira:issue_updated", "OPS-3", b'{"webhookEvent": "x"}')
    )
    assert stored.event_id is not None
    evaluating = EventProcessor(
        env.engine, env.processor._rules, clock=env.clock, owner=identity.events_owner
    )
    assert [c.id for c in await evaluating.claim()] == [stored.event_id]
    return holder, queued, stored.event_id


async def test_a_restarted_process_takes_back_its_dead_predecessors_claims_at_once(
    env: Env, dead_process: ProcessIdentity
) -> None:
    await Liveness(env.engine, dead_process, clock=env.clock).beat()
    holder, queued, evaluating = await _claims_of(env, dead_process)
    _kill(dead_process)
    survivor = env.executor(lease_s=120)
    assert await survivor.claim(4) == []  # leases alone would hold them for 60-120 s
    # The successor starts on the same host: its predecessor's pid is gone.
    woken: list[bool] = []
    assert (
        await Liveness(env.engine, clock=env.clock, on_reclaimed=lambda: woken.append(True)).beat()
        == 2
    )
    assert woken == [True]
    # No time passes: the event is claimed again, and the run, resumed, looks first.
    assert [c.id for c in await env.processor.claim()] == [evaluating]
    resumed = await survivor.claim(4)
    assert [(r.event_id, r.step_index, r.resumed) for r in resumed] == [(holder, 0, True)]
    await survivor.release()
    await drive(env.executor(), env.clock)
    # The key went on from the holder to the queued run; nothing was created twice.
    assert (await env.statuses(holder))[:5] == ["succeeded"] * 5
    assert (await env.statuses(queued))[:5] == ["succeeded"] * 5
    assert env.fake.version_names("ml-prod", "churn").count("ops-1") == 1
    assert _uploads(env.fake, "ops-1") == 1
    async with env.engine.connect() as conn:  # the dead process's row is gone
        ids = (await conn.execute(select(processes.c.id))).scalars().all()
    assert dead_process.id not in ids


async def test_a_live_holders_claims_are_left_alone_until_its_heartbeat_stops(
    env: Env,
) -> None:
    # Another replica (another host) and another process of this host (this one's pid,
    # alive), both beating.
    me = ProcessIdentity.current()
    elsewhere = ProcessIdentity("replica2", "other-host", me.pid, "1")
    here = ProcessIdentity("sibling", me.host, me.pid, me.started)
    for identity in (elsewhere, here):
        await Liveness(env.engine, identity, clock=env.clock).beat()
    holder = await env.deliver(issue_updated("OPS-4"), "d-4")
    assert await env.executor(owner=elsewhere.actions_owner).claim(1)
    other = await env.deliver(issue_updated("OPS-5", "fraud"), "d-5")
    assert await env.executor(owner=here.actions_owner).claim(1)
    watcher = Liveness(env.engine, clock=env.clock, heartbeat_s=2.0)
    env.clock.advance(seconds=2.0 * DEAD_AFTER_BEATS - 1)
    assert await watcher.beat() == 0
    assert await env.executor().claim(4) == []
    # Both fall silent: after DEAD_AFTER_BEATS heartbeats, another process takes over.
    env.clock.advance(seconds=2)
    assert await watcher.beat() == 2
    taken = await env.executor().claim(4)
    assert sorted(r.event_id for r in taken) == [holder, other]


class AnswerLost:
    """A worker's writer whose next transaction commits and then fails as if the
    connection dropped between the server's COMMIT and its reply (the database went
    away at that moment): the worker cannot know what it leased."""

    def __init__(self, writer: Any) -> None:
        self._writer, self.lost = writer, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    async def run_relaxed(self, fn: Any, *args: Any) -> Any:
        result = await self._writer.run_relaxed(fn, *args)
        if not self.lost:
            self.lost += 1
            raise OSError("connection reset by peer (the answer to a COMMIT)")
        return result


@contextlib.asynccontextmanager
async def _running(worker_run: Any) -> AsyncIterator[None]:
    """A worker's loop running in the background (as `serve` runs it)."""
    task = asyncio.create_task(worker_run(poll_s=0.02))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_runs_a_claim_leased_before_its_answer_was_lost_are_resumed_by_their_live_owner(
    env: Env,
) -> None:
    """The database fails right after committing a claim: the runs are leased to this
    live process (no other takes them back) for the whole lease, on a clock that does not
    move here. Its executor takes them back at its next claim, and the resumed create
    looks first."""
    first = await env.deliver(issue_updated("OPS-6"), "d-6")
    second = await env.deliver(issue_updated("OPS-7", "fraud"), "d-7")
    executor = env.executor(lease_s=120)
    writer = executor._writes = AnswerLost(executor._writes)  # type: ignore[assignment]

    async def created() -> bool:
        return [(await env.statuses(e))[0] for e in (first, second)] == ["succeeded"] * 2

    async with _running(executor.run):
        await wait_for(created, timeout_s=10)
    assert writer.lost == 1
    assert [r["attempts"] for e in (first, second) for r in (await env.runs(e))[:1]] == [2, 2]
    for deployment, version in (("churn", "ops-6"), ("fraud", "ops-7")):
        assert env.fake.version_names("ml-prod", deployment) == [version]


async def test_events_a_claim_leased_before_its_answer_was_lost_are_evaluated_by_their_live_owner(
    env: Env,
) -> None:
    event_id = await env.store_only(issue_updated("OPS-8"), "d-8")
    processor = EventProcessor(env.engine, env.processor._rules, clock=env.clock, lease_s=60)
    writer = processor._writes = AnswerLost(processor._writes)  # type: ignore[assignment]

    async def evaluated() -> bool:
        shown = await get_event(env.engine, event_id)
        return shown is not None and shown["status"] == "processed"

    async with _running(processor.run):
        await wait_for(evaluated, timeout_s=10)
    assert writer.lost == 1
    assert await env.statuses(event_id)  # its rule's runs are planned, once


async def test_a_bug_in_a_worker_loop_is_logged_and_the_loop_goes_on(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception (a bug, not a database error) once in the processor's batch
    and once after the executor's claim committed: each loop logs it, gives back what it
    had leased, and goes on. Before, the loop's task ended and the service, still ready,
    acted on nothing more."""
    failures = {"batch": 1, "claim": 1}

    def once(name: str, real: Any) -> Any:
        def maybe_fail(*args: Any, **kwargs: Any) -> Any:
            if failures[name]:
                failures[name] -= 1
                raise RuntimeError(f"a bug in the {name}")
            return real(*args, **kwargs)

        return maybe_fail

    monkeypatch.setattr(
        EventProcessor, "process_batch", once("batch", EventProcessor.process_batch)
    )
    # Read after the claim's commit, for each run claimed.
    monkeypatch.setattr(workflow.Control, "from_json", once("claim", workflow.Control.from_json))
    event_id = await env.store_only(issue_updated("OPS-9"), "d-9")
    processor = EventProcessor(env.engine, env.processor._rules, clock=env.clock, lease_s=60)
    executor = env.executor(lease_s=120)

    async def created() -> bool:
        runs = await env.runs(event_id)
        return bool(runs) and runs[0]["status"] == "succeeded"

    async with _running(processor.run), _running(executor.run):
        await wait_for(created, timeout_s=10)
    assert failures == {"batch": 0, "claim": 0}
    assert "a bug in the batch" in caplog.text and "a bug in the claim" in caplog.text
    assert env.fake.version_names("ml-prod", "churn") == ["ops-9"]


def test_a_reused_pid_or_a_silent_process_is_dead() -> None:
    me = ProcessIdentity.current()
    now = utcnow()
    after = timedelta(seconds=10)

    def row(**kw: object) -> SimpleNamespace:
        fields = {"id": "x", "host": me.host, "pid": me.pid, "started": me.started}
        return SimpleNamespace(**{**fields, "heartbeat_at": now, **kw})

    assert not is_dead(row(), me, now, after)  # this very process, another id
    assert is_dead(row(started="0"), me, now, after)  # the pid now names another process
    assert not is_dead(row(host="elsewhere", started="0"), me, now, after)  # can't tell
    assert is_dead(row(host="elsewhere", heartbeat_at=now - after * 2), me, now, after)
    assert not is_dead(row(id=me.id, heartbeat_at=now - after * 2), me, now, after)


def test_the_host_names_the_pid_namespace() -> None:
    # Two containers with the host's name (host networking) have their own pids: a pid
    # absent from one's /proc says nothing about a process of the other.
    if not os.path.exists("/proc/self/ns/pid"):
        pytest.skip("no pid namespaces here")
    assert ProcessIdentity.current().host == (
        f"{socket.gethostname()} {os.readlink('/proc/self/ns/pid')}"
    )
