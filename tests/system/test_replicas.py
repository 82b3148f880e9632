"""Three replicas on one PostgreSQL database: everything happens once, the leader included.

Three `bot serve` processes share one database. Each delivery is sent to every replica
at once (Jira's retries meet a load balancer that picks another replica): each event
is stored once, processed once, and makes one UbiOps create. The scheduled jobs run on
one replica only: a Connect tenant is installed, so the leader polls Jira's failed
deliveries every tick (1 s here), and syncs the rules' webhook. The fake Jira learns
from the kernel which process sent each request (`peer_pid`): before the leader is
killed with SIGKILL every Jira call comes from it, afterwards every one comes from one
other replica, which took over; the webhook is registered once, failed deliveries
(duplicates of live ones, and ones Jira never delivered) are stored once.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.engine import create_engine, upgrade
from bot.db.models import action_runs, events
from bot.db.tenants import Tenants
from tests.conftest import PG_URL_ENV, postgres_database
from tests.fakes.jira import FakeJira, issue_updated_payload
from tests.fakes.ubiops import FakeUbiOps
from tests.helpers import TOKEN, wait_for
from tests.system.harness import (
    Service,
    create_churn_deployment,
    free_port,
    peer_pid,
    serve,
    service_env,
    unprocessed_events,
    unsettled,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="attributes requests to processes via /proc"
)

REPLICAS = 3
TICK_S = 1.0  # DEPLOYBOT_SCHEDULER_INTERVAL_S: the failed-deliveries poll runs every tick
FIRST_BATCH = 120  # deliveries while all three replicas run
SECOND_BATCH = 60  # deliveries to the two survivors after the leader is killed
POLLS_PER_LEADER = 6  # ticks observed per leader before moving on
LEADS = "scheduler: this replica leads; running jobs"
FAILED_PATH = "/rest/api/3/webhook/failed"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RULES = """
rules:
  - name: version-per-issue
    on: {events: [jira:issue_updated], jql: project = OPS}
    when: [{changed: status, to: Ready to deploy}]
    do:
      - action: ubiops.deployment_versions_create
        with:
          project_name: ml-prod
          deployment_name: churn
          data: {version: "{{ issue.key | lower }}", environment: python3-11}
"""


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    base = os.environ.get(PG_URL_ENV)
    if not base:
        pytest.skip(f"replicas share a PostgreSQL database: set {PG_URL_ENV}")
    async with postgres_database(base) as url:
        yield url


@dataclass(frozen=True)
class JiraCall:
    """One REST call the fake Jira received, and the replica process that made it."""

    at: float  # time.monotonic()
    method: str
    path: str
    pid: int | None


def attribute_calls(
    fake: FakeJira, app: web.Application, pids: Callable[[], list[int]], calls: list[JiraCall]
) -> None:
    """Record every request to `app` with the pid of the process that sent it."""

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        own = transport.get_extra_info("sockname") if transport is not None else None
        pid = None if peer is None or own is None else peer_pid(peer[1], own[1], pids())
        path = request.path.removeprefix(fake.base_path)
        calls.append(JiraCall(time.monotonic(), request.method, path, pid))
        return await handler(request)

    app.middlewares.insert(0, record)


def leader_runs(calls: list[JiraCall]) -> list[tuple[int | None, int]]:
    """Collapse the callers into runs: [(pid, how many calls in a row), ...]."""
    runs: list[tuple[int | None, int]] = []
    for call in calls:
        if runs and runs[-1][0] == call.pid:
            runs[-1] = (call.pid, runs[-1][1] + 1)
        else:
            runs.append((call.pid, 1))
    return runs


async def test_three_replicas_store_process_and_schedule_everything_once(
    pg_url: str, tmp_path: Path
) -> None:
    ubiops = FakeUbiOps(token=TOKEN)
    ubiops_runner, ubiops_origin = await serve(ubiops.app())
    ubiops_url = ubiops_origin + ubiops.prefix
    jira = FakeJira(mode="connect")
    calls: list[JiraCall] = []
    jira_app = jira.make_app()
    replicas: list[Service] = []

    def pids() -> list[int]:
        return [r.proc.pid for r in replicas if r.proc is not None]

    attribute_calls(jira, jira_app, pids, calls)
    jira_runner, jira.origin = await serve(jira_app)

    engine = create_engine(pg_url)
    await upgrade(engine)
    await Tenants(engine).install(jira.client_key, jira.shared_secret, jira.base_url)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "versions.yaml").write_text(RULES)
    # The address Jira delivers to (a load balancer's): the JWT's qsh is relative to it.
    public_url = f"http://127.0.0.1:{free_port()}"
    replicas += [
        Service(
            service_env(
                pg_url,
                rules,
                JIRA_AUTH_MODE="connect",
                JIRA_APP_KEY=jira.app_key,
                DEPLOYBOT_PUBLIC_URL=public_url,
                DEPLOYBOT_SCHEDULER_INTERVAL_S=str(TICK_S),
                DEPLOYBOT_LEASE_S="3",
                UBIOPS_API_URL=ubiops_url,
                UBIOPS_API_TOKEN=TOKEN,
                UBIOPS_RATE_LIMIT_PER_MINUTE="1000000",
            ),
            tmp_path,
            tmp_path / f"replica-{i}.log",
        )
        for i in range(REPLICAS)
    ]
    statuses: dict[str, list[int | None]] = {}

    async def post(session: aiohttp.ClientSession, replica: Service, n: int) -> int | None:
        url = replica.url + "/webhooks/jira"
        headers = jira.delivery_headers(
            public_url + "/webhooks/jira", identifier=f"rep-{n}", retry=None
        )
        body = json.dumps(issue_updated_payload(key=f"OPS-{n}")).encode()
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def deliver_everywhere(
        session: aiohttp.ClientSession, targets: list[Service], numbers: range
    ) -> None:
        """Send each delivery to every target at once, the first copy rotating."""
        gate = asyncio.Semaphore(16)

        async def one(n: int) -> None:
            order = targets[n % len(targets) :] + targets[: n % len(targets)]
            async with gate:
                statuses[f"rep-{n}"] = list(
                    await asyncio.gather(*(post(session, r, n) for r in order))
                )

        await asyncio.gather(*(one(n) for n in numbers))

    def fail(n: int) -> None:
        """Make Jira list delivery n as failed, at the current time (as Jira stamps it)."""
        body = json.dumps(issue_updated_payload(key=f"OPS-{n}"))
        jira.add_failure(
            body,
            public_url + "/webhooks/jira",
            id=f"rep-{n}",
            failure_time_ms=int(time.time() * 1000),
        )

    def polls_by(pid: int) -> int:
        return sum(c.method == "GET" and c.path == FAILED_PATH and c.pid == pid for c in calls)

    def leader_of(candidates: list[Service]) -> Service:
        leading = [r for r in candidates if any(x["msg"] == LEADS for x in r.log_lines())]
        assert len(leading) == 1, [r.log.read_text()[-2000:] for r in candidates]
        return leading[0]

    timeout = aiohttp.ClientTimeout(total=20)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await create_churn_deployment(session, ubiops_url, TOKEN)
            await asyncio.gather(*(r.start(session) for r in replicas))

            # --- all three up: deliveries everywhere, failed deliveries, one leader -------
            await deliver_everywhere(session, replicas, range(FIRST_BATCH))
            for n in range(0, FIRST_BATCH, 6):  # Jira also lists some as failed: duplicates
                fail(n)
            for n in range(1000, 1010):  # ...and some only as failed: stored by the poll
                fail(n)

            async def first_leader_settled() -> bool:
                led = [p for p in pids() if polls_by(p) >= POLLS_PER_LEADER]
                return (
                    bool(led)
                    and await unsettled(engine) == 0
                    and await count(engine) == (FIRST_BATCH + 10)
                )

            await wait_for(first_leader_settled, timeout_s=30)
            first = leader_of(replicas)
            assert first.proc is not None
            first_pid = first.proc.pid

            # --- SIGKILL the leader: another replica takes over -----------------------------
            await first.kill()
            killed_at = time.monotonic()
            survivors = [r for r in replicas if r is not first]
            survivor_pids = [r.proc.pid for r in survivors if r.proc is not None]
            await deliver_everywhere(
                session, survivors, range(FIRST_BATCH, FIRST_BATCH + SECOND_BATCH)
            )
            for n in range(2000, 2005):  # only the new leader can store these
                fail(n)

            async def second_leader_settled() -> bool:
                led = [p for p in survivor_pids if polls_by(p) >= POLLS_PER_LEADER]
                expected = FIRST_BATCH + 10 + SECOND_BATCH + 5
                return (
                    bool(led) and await unsettled(engine) == 0 and await count(engine) == (expected)
                )

            await wait_for(second_leader_settled, timeout_s=40)
            second = leader_of(survivors)
            assert second.proc is not None
            second_pid = second.proc.pid
            # Observation ends here: a leader stopping hands the lock to a survivor on purpose.
            stopping_at = time.monotonic()
            for replica in sorted(survivors, key=lambda r: r is second):  # the leader last
                code, _ = await replica.stop(20)
                assert code == 0, replica.log.read_text()[-3000:]

        async with engine.connect() as conn:
            stored = (await conn.execute(select(events.c.delivery_id))).scalars().all()
            not_processed = await unprocessed_events(conn)
            run_rows = (
                await conn.execute(select(action_runs.c.event_id, action_runs.c.status))
            ).all()
    finally:
        for replica in replicas:
            if replica.proc is not None and replica.proc.returncode is None:
                await replica.kill()
        await engine.dispose()
        await jira_runner.cleanup()
        await ubiops_runner.cleanup()

    expected_ids = (
        {f"rep-{n}" for n in range(FIRST_BATCH + SECOND_BATCH)}
        | {f"rep-{n}" for n in range(1000, 1010)}
        | {f"rep-{n}" for n in range(2000, 2005)}
    )
    creates = collections.Counter(
        r.json["version"]
        for r in ubiops.calls("POST", r"/projects/ml-prod/deployments/churn/versions")
    )
    stored_by = {
        str(i): sum(line["msg"] == "delivery stored" for line in r.log_lines())
        for i, r in enumerate(replicas)
    }
    first_calls = [c for c in calls if c.at < killed_at]
    later_calls = [c for c in calls if killed_at <= c.at < stopping_at]
    first_polls = [c for c in first_calls if c.path == FAILED_PATH]
    later_polls = [c for c in later_calls if c.path == FAILED_PATH]
    first_span_s = first_polls[-1].at - first_polls[0].at if first_polls else 0.0
    second_span_s = later_polls[-1].at - later_polls[0].at if later_polls else 0.0
    registrations = [c for c in calls if c.method == "POST" and c.path == "/rest/api/3/webhook"]
    number = {r.proc.pid: i for i, r in enumerate(replicas) if r.proc is not None}
    figures = {
        "deliveries": len(statuses),
        "copies_sent": sum(len(s) for s in statuses.values()),
        "answers": dict(collections.Counter(str(s) for v in statuses.values() for s in v)),
        "stored_by_replica": stored_by,
        "events_stored": len(stored),
        "creates_received": sum(creates.values()),
        "duplicate_actions": sum(c - 1 for c in creates.values()),
        "jira_calls_by_first_leader": len(first_calls),
        "failed_polls_first_leader": len(first_polls),
        "first_leader_polls_span_s": round(first_span_s, 1),
        "jira_calls_after_kill": len(later_calls),
        "failed_polls_second_leader": len(later_polls),
        "second_leader_polls_span_s": round(second_span_s, 1),
        "caller_runs": [(None if p is None else number.get(p), n) for p, n in leader_runs(calls)],
        "takeover_s": round(later_polls[0].at - killed_at, 1) if later_polls else None,
        "webhook_registrations": len(registrations),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "system-replicas-postgresql.json").write_text(json.dumps(figures, indent=2))
    print("\n" + json.dumps(figures, indent=2))

    # Deliveries: every copy answered; one 202 per identifier, the other copies 200.
    assert all(
        sorted(s, key=str) == [200, 200, 202]
        for d, s in statuses.items()
        if int(d.removeprefix("rep-")) < FIRST_BATCH
    ), statuses
    assert all(
        sorted(s, key=str) == [200, 202]
        for d, s in statuses.items()
        if int(d.removeprefix("rep-")) >= FIRST_BATCH
    ), statuses
    assert sum(stored_by.values()) == FIRST_BATCH + SECOND_BATCH
    assert sum(n > 0 for n in stored_by.values()) == REPLICAS  # spread over all three
    # Stored once, processed once, one action each.
    assert sorted(stored) == sorted(expected_ids)
    assert not_processed == 0
    assert sorted(event_id for event_id, _ in run_rows) == sorted(
        {event_id for event_id, _ in run_rows}
    )
    assert len(run_rows) == len(stored) and {s for _, s in run_rows} == {"succeeded"}
    assert creates == collections.Counter(f"ops-{d.removeprefix('rep-')}" for d in expected_ids)
    # Jobs: only the leader calls Jira; after the kill, only the one replica that took over.
    assert second_pid != first_pid
    assert {c.pid for c in first_calls} == {first_pid}, leader_runs(first_calls)
    # A call the killed leader had already sent may be read just after its death: no pid.
    grace = [c for c in later_calls if c.pid is None and c.at < killed_at + 1.0]
    assert {c.pid for c in later_calls if c not in grace} == {second_pid}, leader_runs(later_calls)
    assert len(first_polls) >= POLLS_PER_LEADER and len(later_polls) >= POLLS_PER_LEADER
    # Once per tick: polls are a tick apart (a second runner would double them); +2 allows
    # for a new leader's immediate run next to the first scheduled one.
    assert len(first_polls) <= first_span_s / TICK_S + 2, [c.at for c in first_polls]
    assert len(later_polls) <= second_span_s / TICK_S + 2, [c.at for c in later_polls]
    # The webhook job: registered once (the new leader finds it and keeps it).
    assert len(registrations) == 1
    assert len(jira.live()) == 1


async def count(engine: AsyncEngine) -> int:
    """How many events are stored."""
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(events))).scalar_one())
