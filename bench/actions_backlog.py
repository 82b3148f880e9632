"""Drain a backlog of stored action runs against the fake UbiOps; report actions/s and memory.

    .venv/bin/python -m bench.actions_backlog [--runs 10000] [--concurrency 16]
        [--database-url URL]

The fake UbiOps runs in its own process. The baseline is the same number of creates made
directly with UbiOpsClient (no database, no outbox) against the same fake in the same
run; the ratio says what durability (claim, render, record every attempt) costs.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import func, select

from bench.harness import seed_processed_events
from bot.db.engine import create_engine, upgrade
from bot.db.models import action_runs, utcnow
from bot.pipeline.executor import ActionExecutor
from bot.pipeline.processor import idempotency_key
from bot.services.runner import ActionRunner
from bot.services.ubiops import UbiOpsClient

TOKEN = "bench-ubiops-token"
BODY = b'{"webhookEvent": "jira:issue_updated", "issue": {"key": "OPS-%d"}}'
PROJECT, DEPLOYMENT = "ml-prod", "churn"


def _create(version: str) -> dict[str, Any]:
    return {
        "project_name": PROJECT,
        "deployment_name": DEPLOYMENT,
        "data": {"version": version, "environment": "python3-11"},
    }


async def _seed(database_url: str, runs: int) -> Any:
    engine = create_engine(database_url)
    await upgrade(engine)
    now = utcnow()
    async with engine.begin() as conn:
        await seed_processed_events(
            conn,
            runs,
            prefix="bench",
            body=BODY,
            now=now,
            run_of=lambda event_id: {
                "event_id": event_id,
                "rule_name": "bench",
                "step_index": 0,
                "action": "ubiops.deployment_versions_create",
                "idempotency_key": idempotency_key(event_id, "bench", 0),
                "status": "pending",
                "attempts": 0,
                # rendered per run from the stored event, as in production
                "params": _create("{{ issue.key | lower }}"),
                "created_at": now,
                "updated_at": now,
            },
        )
    return engine


async def _direct(base_url: str, runs: int, concurrency: int) -> float:
    """Baseline: the same creates, straight from the client, same concurrency."""
    async with aiohttp.ClientSession() as session:
        client = UbiOpsClient(session, base_url, TOKEN, per_minute=10**9)
        queue = iter(range(runs))
        started = time.perf_counter()

        async def worker() -> None:
            for i in queue:
                await client.call("deployment_versions_create", _create(f"direct-{i}"))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started


async def _drain(engine: Any, base_url: str, concurrency: int, rules_dir: Path) -> float:
    """Run the production executor loop until no run is left to do."""
    async with aiohttp.ClientSession() as session:
        runner = ActionRunner({"ubiops": UbiOpsClient(session, base_url, TOKEN, per_minute=10**9)})
        executor = ActionExecutor(engine, runner, rules_dir=rules_dir, concurrency=concurrency)
        started = time.perf_counter()
        task = asyncio.create_task(executor.run(poll_s=0.05))
        # By the status index: a count of the whole table would cost the process more CPU
        # than the runs it waits for.
        open_run = select(action_runs.c.id).where(
            action_runs.c.status.in_(("pending", "retrying", "running"))
        )
        while True:
            await asyncio.sleep(0.05)
            async with engine.connect() as conn:
                if (await conn.execute(open_run.limit(1))).first() is None:
                    break
        elapsed = time.perf_counter() - started
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return elapsed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return


async def run(args: argparse.Namespace, workdir: Path, port: int) -> dict[str, int]:
    """Seed the backlog, time the direct baseline, then drain the outbox."""
    base_url = f"http://127.0.0.1:{port}/v2.1"
    await _wait_port(port)
    async with aiohttp.ClientSession() as session:
        await UbiOpsClient(session, base_url, TOKEN).call(
            "deployments_create",
            {
                "project_name": PROJECT,
                "data": {"name": DEPLOYMENT, "input_type": "plain", "output_type": "plain"},
            },
        )
    database_url = args.database_url or f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
    engine = await _seed(database_url, args.runs)
    rss_seeded_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu_start = time.process_time()
    direct_s = await _direct(base_url, args.runs, args.concurrency)
    cpu_direct = time.process_time()
    drain_s = await _drain(engine, base_url, args.concurrency, workdir)
    direct_cpu, drain_cpu = cpu_direct - cpu_start, time.process_time() - cpu_direct
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(action_runs.c.status, func.count()).group_by(action_runs.c.status)
        )
        counts = {status: int(n) for status, n in rows}
    await engine.dispose()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    direct_rate, drain_rate = args.runs / direct_s, args.runs / drain_s
    print(f"database            {database_url.split('://')[0]}")
    print(f"action runs         {args.runs} (concurrency {args.concurrency})")
    print(f"direct client       {direct_rate:10.0f} calls/s   ({direct_s:.2f} s)")
    print(f"outbox drain        {drain_rate:10.0f} actions/s ({drain_s:.2f} s)")
    print(f"ratio drain/direct  {drain_rate / direct_rate:10.2f}")
    # Steadier than the rates on a shared host: this process's CPU (all its threads).
    print(f"CPU per call        {1e3 * direct_cpu / args.runs:10.3f} ms direct,", end="")
    print(f" {1e3 * drain_cpu / args.runs:.3f} ms drained")
    print(f"peak RSS            {peak_kib / 1024:10.1f} MiB", end="")
    print(f" (after seeding: {rss_seeded_kib / 1024:.1f} MiB)")
    print(f"final statuses      {counts}")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    port = _free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_ubiops", "--port", str(port), "--token", TOKEN],
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="deploybot-bench-") as tmp:
            counts = asyncio.run(run(args, Path(tmp), port))
    finally:
        fake.terminate()
        fake.wait(timeout=10)
    return 0 if counts == {"succeeded": args.runs} else 1


if __name__ == "__main__":
    sys.exit(main())
