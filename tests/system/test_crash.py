"""Crash: SIGKILL at random moments under full-speed deliveries loses and repeats nothing.

32 senders deliver unique identifiers as fast as the service answers, and re-send (as
Jira does) every identifier that got no answer or a 5xx. The service is killed with
SIGKILL five times at seeded random moments, while UbiOps creates are in flight (the
fake answers some of them slowly, so a kill lands between "request sent" and "answer
recorded"), and restarted each time. Afterwards: every identifier that got a 2xx is
stored exactly once, every stored event is processed, and the fake UbiOps received
exactly one create per event.

Set DEPLOYBOT_CRASH_SEED to replay a run's kill moments.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.engine import create_engine
from bot.db.models import action_runs, events
from tests.fakes.ubiops import FakeUbiOps, Fault
from tests.helpers import TOKEN, wait_for
from tests.system.harness import (
    Service,
    create_churn_deployment,
    deliver,
    serve,
    service_env,
    unprocessed_events,
    unsettled,
    version_rules,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
KILLS = 5
SENDERS = 32
MAX_DELIVERIES = 6000  # new identifiers at most: bounds the backlog left to settle
UP_S = (0.2, 1.2)  # a kill comes this long (uniform, seeded) after the service is healthy
SLOW_CREATE = Fault(kind="slow", delay_s=0.15, method="POST", path_contains="/versions")
SLOW_FRACTION = 0.3
SETTLE_TIMEOUT_S = 60

CREATES = r"/projects/ml-prod/deployments/churn/versions"  # the fake's recorded path
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Figures:
    """What one crash run did; written to test-artifacts/system-crash-<engine>.json."""

    engine: str
    seed: int
    kills: int = 0
    deliveries_sent: int = 0  # POSTs, re-sends included
    deliveries_acknowledged: int = 0  # identifiers that got a 2xx
    answered_503: int = 0
    unanswered: int = 0  # connection refused/reset: the service was down or died mid-request
    duplicates_answered: int = 0  # a re-send of an identifier already stored (200)
    events_stored: int = 0
    events_lost: int = 0  # acknowledged but not stored: must be 0
    events_stored_twice: int = 0  # must be 0
    events_not_processed: int = 0  # must be 0
    action_runs_interrupted: int = 0  # `running` when a kill came (their outcome unknown)
    events_interrupted: int = 0  # `processing` when a kill came
    creates_received: int = 0  # POST .../versions the fake UbiOps received
    creates_answered_409: int = 0  # a create meeting an object an earlier attempt made
    lookups_found_done: int = 0  # resumed creates that looked first and found their object
    duplicate_actions: int = 0  # creates beyond one per event: must be 0
    unexpected_statuses: dict[str, int] = field(default_factory=dict)  # must be empty
    settle_s: float = 0.0  # final restart to all settled (a figure, not asserted)
    kill_moments: list[dict[str, float]] = field(default_factory=list)


class Jira:
    """Deliver like Jira: unique identifiers, re-sent until they get a 2xx (4xx: recorded)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, figures: Figures) -> None:
        self.session, self.url, self.figures = session, url, figures
        self.generating = True
        self.issued = 0
        self.in_flight = 0
        self.resend: collections.deque[int] = collections.deque()
        self.acked: set[int] = set()
        self.acked_since_start = 0

    def _next(self) -> int | None:
        if self.resend:
            return self.resend.popleft()
        if self.generating and self.issued < MAX_DELIVERIES:
            self.issued += 1
            return self.issued - 1
        return None

    def done(self) -> bool:
        return not self.generating and not self.resend and self.in_flight == 0

    async def sender(self) -> None:
        f = self.figures
        while not self.done():
            n = self._next()
            if n is None:
                await asyncio.sleep(0.05)
                continue
            self.in_flight += 1
            try:
                status = await deliver(self.session, self.url, f"crash-{n}", f"OPS-{n}")
            finally:
                self.in_flight -= 1
            f.deliveries_sent += 1
            if status in (200, 202):
                f.duplicates_answered += status == 200
                self.acked.add(n)
                self.acked_since_start += 1
                continue
            if status is None:
                f.unanswered += 1
            elif status == 503:
                f.answered_503 += 1
            else:
                f.unexpected_statuses[str(status)] = f.unexpected_statuses.get(str(status), 0) + 1
                if status < 500:
                    continue  # Jira does not retry a 4xx: the delivery is gone
            self.resend.append(n)  # no answer or a 5xx: Jira tries again
            if status is None:
                await asyncio.sleep(0.05)  # the service is down: do not spin


async def interrupted_work(engine: AsyncEngine) -> tuple[int, int]:
    """Count the action runs and events a killed process held (none is alive now)."""
    async with engine.connect() as conn:
        runs = await conn.execute(
            select(func.count()).select_from(action_runs).where(action_runs.c.status == "running")
        )
        held = await conn.execute(
            select(func.count()).select_from(events).where(events.c.status == "processing")
        )
        return int(runs.scalar_one()), int(held.scalar_one())


def record_answers(app: web.Application, answers: list[tuple[str, str, int]]) -> None:
    """Append (method, path, status) of every answer the fake gives (outermost middleware)."""

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        answers.append((request.method, request.path, response.status))
        return response

    app.middlewares.insert(0, record)


async def test_sigkill_under_full_speed_deliveries_loses_and_repeats_nothing(
    database_url: str, tmp_path: Path
) -> None:
    engine_name = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    seed = int(os.environ.get("DEPLOYBOT_CRASH_SEED") or random.SystemRandom().randrange(10**6))
    print(f"\ncrash test on {engine_name}: seed {seed} (DEPLOYBOT_CRASH_SEED={seed} replays it)")
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    figures = Figures(engine=engine_name, seed=seed)

    fake = FakeUbiOps(token=TOKEN)
    fake.fail_fraction(SLOW_FRACTION, SLOW_CREATE, seed=seed)  # slow, not failed: see Fault
    answers: list[tuple[str, str, int]] = []
    fake_app = fake.app()
    record_answers(fake_app, answers)
    # A real API finishes a request whose client died: the create lands, the answer is lost.
    fake_runner, fake_origin = await serve(fake_app)
    fake_url = fake_origin + fake.prefix
    rules = version_rules(tmp_path)
    env = service_env(
        database_url,
        rules,
        UBIOPS_API_URL=fake_url,
        UBIOPS_API_TOKEN=TOKEN,
        UBIOPS_RATE_LIMIT_PER_MINUTE="1000000",
        # Default leases (60 s, 120 s): each restart takes back its killed predecessor's
        # events and runs at once (bot/pipeline/liveness.py), well within SETTLE_TIMEOUT_S.
        DEPLOYBOT_WORKERS="48",
    )
    service = Service(env, tmp_path, tmp_path / "serve.log")
    engine = create_engine(database_url)
    connector = aiohttp.TCPConnector(limit=SENDERS + 8)
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await create_churn_deployment(session, fake_url, TOKEN)
            jira = Jira(session, service.url, figures)
            senders = [asyncio.create_task(jira.sender()) for _ in range(SENDERS)]
            try:
                for _ in range(KILLS):
                    await service.start(session)
                    jira.acked_since_start = 0
                    up_s = rng.uniform(*UP_S)
                    await asyncio.sleep(up_s)

                    async def flowing() -> bool:
                        return jira.acked_since_start > 0 or jira.issued >= MAX_DELIVERIES

                    await wait_for(flowing, timeout_s=20)  # kill with deliveries in progress
                    await service.kill()
                    figures.kills += 1
                    runs, held = await interrupted_work(engine)
                    figures.action_runs_interrupted += runs
                    figures.events_interrupted += held
                    figures.kill_moments.append(
                        {
                            "up_s": round(up_s, 3),
                            "acknowledged_before": len(jira.acked),
                            "creates_sent_before": len(fake.calls("POST", CREATES)),
                            "action_runs_interrupted": runs,
                            "events_interrupted": held,
                        }
                    )
                await service.start(session)
                restarted = loop.time()
                jira.generating = False  # the senders now only re-send what is unanswered
                await asyncio.wait_for(asyncio.gather(*senders), SETTLE_TIMEOUT_S)
            finally:
                for task in senders:
                    task.cancel()
                await asyncio.gather(*senders, return_exceptions=True)

            async def settled() -> bool:
                return await unsettled(engine) == 0

            await wait_for(settled, timeout_s=SETTLE_TIMEOUT_S)
            figures.settle_s = round(loop.time() - restarted, 1)
            code, _ = await service.stop(20)
            assert code == 0, service.log.read_text()[-3000:]
        async with engine.connect() as conn:
            stored = (await conn.execute(select(events.c.delivery_id))).scalars().all()
            not_processed = await unprocessed_events(conn)
            counted = await conn.execute(
                select(action_runs.c.status, func.count()).group_by(action_runs.c.status)
            )
            run_statuses: dict[str, int] = {str(s): int(n) for s, n in counted.all()}
    finally:
        if service.proc is not None and service.proc.returncode is None:
            await service.kill()
        await engine.dispose()
        await fake_runner.cleanup()

    acked = {f"crash-{n}" for n in jira.acked}
    creates = collections.Counter(r.json["version"] for r in fake.calls("POST", CREATES))
    figures.deliveries_acknowledged = len(acked)
    figures.events_stored = len(set(stored))
    figures.events_lost = len(acked - set(stored))
    figures.events_stored_twice = len(stored) - len(set(stored))
    figures.events_not_processed = int(not_processed)
    figures.creates_received = sum(creates.values())
    creates_path = f"{fake.prefix}/projects/ml-prod/deployments/churn/versions"
    figures.creates_answered_409 = answers.count(("POST", creates_path, 409))
    figures.lookups_found_done = sum(
        m == "GET" and p.startswith(creates_path + "/") and status == 200
        for m, p, status in answers
    )
    figures.duplicate_actions = sum(count - 1 for count in creates.values())
    ARTIFACTS.mkdir(exist_ok=True)
    report = json.dumps(asdict(figures), indent=2)
    (ARTIFACTS / f"system-crash-{engine_name}.json").write_text(report + "\n")
    print(report)

    assert figures.kills == KILLS
    assert figures.unexpected_statuses == {}, figures  # only 202, 200 (duplicate), 503
    assert figures.events_lost == 0, sorted(acked - set(stored))[:20]
    assert figures.events_stored_twice == 0, figures
    assert set(stored) <= {f"crash-{n}" for n in range(jira.issued)}
    assert figures.events_not_processed == 0, figures
    assert run_statuses == {"succeeded": len(stored)}, run_statuses  # one run per event, done
    versions = fake.version_names("ml-prod", "churn")
    assert sorted(versions) == sorted(f"ops-{d.removeprefix('crash-')}" for d in stored)
    assert figures.duplicate_actions == 0, [v for v, c in creates.items() if c > 1][:20]
    assert set(creates) == set(versions)  # exactly one create per event
