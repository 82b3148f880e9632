"""1,000 runs waiting on `until` (`every: 10m`): what they cost between their checks.

    .venv/bin/python -m bench.waiting [--runs 1000] [--duration 20] [--ticks 300]
        [--database-url URL]

Two figures:
- the service's CPU between checks: `deploybot serve` runs `--duration` seconds over a
  database holding `--runs` waiting runs (next check 10 minutes away), and, for the
  baseline, over the same database without them; CPU seconds / wall seconds is the
  share of one core (bound: 2%).
- the due-check per tick: the executor's claim (the query that finds due runs; none is
  due), timed `--ticks` times in this process against the same database (bound: 1 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete
from yarl import URL

if __package__ in (None, ""):  # run as a script: bench/waiting.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import cpu_seconds, deploybot, free_port, seed_processed_events
from bot.db.engine import create_engine, upgrade
from bot.db.models import action_runs, events, utcnow
from bot.pipeline.executor import ActionExecutor
from bot.rules.workflow import Control
from bot.services.runner import ActionRunner

BODY = b'{"webhookEvent": "jira:issue_updated", "issue": {"key": "OPS-%d"}}'
UNTIL = [{"field": "result.status", "in": ["success", "failed"]}]


async def seed(database_url: str, runs: int) -> None:
    """Store `runs` events, each with one step waiting on `until`, due in 10 minutes."""
    engine = create_engine(database_url)
    await upgrade(engine)
    now = utcnow()
    control = Control(until=UNTIL, every_s=600.0, timeout_s=7200.0).to_json()
    async with engine.begin() as conn:
        await conn.execute(delete(action_runs))
        await conn.execute(delete(events))
        await seed_processed_events(
            conn,
            runs,
            prefix="wait",
            body=BODY,
            now=now,
            run_of=lambda event_id: {
                "event_id": event_id,
                "rule_name": "rollout",
                "step_index": 0,
                "step_id": "build",
                "action": "ubiops.revisions_get",
                "idempotency_key": f"{event_id}:rollout:0",
                "status": "waiting",
                "attempts": 1,
                "next_attempt_at": now + timedelta(minutes=10),
                "waiting_since": now,
                "params": {"project_name": "ml-prod"},
                "control": control,
                "result": {"status": "building"},
                "concurrency_key": f"ubiops/ml-prod/model-{event_id % 50}",
                "created_at": now,
                "updated_at": now,
            },
        )
    await engine.dispose()


async def due_check_ms(database_url: str, ticks: int) -> list[float]:
    """Time the executor's claim `ticks` times (nothing is due: the cost of looking)."""
    engine = create_engine(database_url)
    executor = ActionExecutor(engine, ActionRunner({}), rules_dir=Path("."))
    took: list[float] = []
    try:
        for _ in range(ticks):
            started = time.perf_counter()
            claimed = await executor.claim(16)
            took.append((time.perf_counter() - started) * 1000)
            assert claimed == [], "a run was due: the benchmark measures idle waits"
    finally:
        await engine.dispose()
    return took


def service_cpu_share(workdir: Path, database_url: str, duration_s: float) -> float:
    """CPU seconds per wall second of `deploybot serve` over `duration_s`, after start-up."""
    rules = workdir / "rules"
    rules.mkdir(exist_ok=True)
    with deploybot(workdir, free_port(), database_url, rules) as proc:
        time.sleep(2.0)  # start-up (migrations, first reads) is not "between checks"
        cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(duration_s)
        return (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - wall0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--ticks", type=int, default=300)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, _own_database(args.database_url) as own_url:
        workdir = Path(tmp)
        url = own_url or f"sqlite+aiosqlite:///{workdir / 'waiting.db'}"
        engine_name = url.split("+")[0]
        asyncio.run(seed(url, 0))
        idle = service_cpu_share(workdir, url, args.duration)
        empty = sorted(asyncio.run(due_check_ms(url, args.ticks)))
        asyncio.run(seed(url, args.runs))
        loaded = service_cpu_share(workdir, url, args.duration)
        took = sorted(asyncio.run(due_check_ms(url, args.ticks)))
    p50, p99 = _p(took, 0.5), _p(took, 0.99)
    print(f"engine {engine_name}; {args.runs} runs waiting on until (every 10m)")
    print(
        f"service CPU between checks: {loaded * 100:.2f}% of a core with {args.runs} waiting "
        f"({idle * 100:.2f}% with none; ratio {loaded / idle if idle else float('nan'):.2f}); "
        f"bound 2%: {'met' if loaded < 0.02 else 'NOT met'}"
    )
    print(
        f"due-check per tick (claim, nothing due): median {p50:.3f} ms, p99 {p99:.3f} ms "
        f"over {len(took)} ticks (no runs: median {_p(empty, 0.5):.3f} ms, p99 "
        f"{_p(empty, 0.99):.3f} ms; ratio of medians {p50 / _p(empty, 0.5):.2f}); "
        f"bound 1 ms (median): {'met' if p50 < 1.0 else 'NOT met'}"
    )
    return 0


@contextlib.contextmanager
def _own_database(url: str | None) -> Iterator[str | None]:
    """A throw-away PostgreSQL database beside the one `url` names (the bench empties its
    tables, so it never runs in a database someone else uses); None for SQLite."""
    if url is None or not url.startswith("postgresql"):
        yield url
        return
    import asyncpg

    base = URL(url)
    admin = str(base.with_scheme("postgresql").with_path("/postgres"))
    name = f"deploybot_bench_waiting_{uuid.uuid4().hex[:12]}"

    async def admin_sql(sql: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin_sql(f'CREATE DATABASE "{name}"'))
    try:
        yield str(base.with_path(f"/{name}"))
    finally:
        asyncio.run(admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _p(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * q))]


if __name__ == "__main__":
    sys.exit(main())
