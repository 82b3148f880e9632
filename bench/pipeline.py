"""End to end: deliveries in, rules matched, one UbiOps call per event, backlog drained.

Run: .venv/bin/python bench/pipeline.py [--duration 10] [--processes 1] [--rules 10]
`deploybot serve` runs in its own process(es) against the fake UbiOps server, which runs
here with the delivery sender (32 concurrent connections). Deliveries are sent for
`--duration` seconds; then the bench waits until every event is processed and every
action run has succeeded, checks one UbiOps create per event, and prints sustained
events/s (events / time until the backlog is zero) and deploybot's peak RSS.
Set DEPLOYBOT_DATABASE_URL to bench PostgreSQL (use a fresh database).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from sqlalchemy import func, select

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bot.db.engine import create_engine
from bot.db.models import action_runs, events
from tests.fakes.ubiops import FakeUbiOps

UBIOPS_TOKEN = "bench-ubiops-token-" + "u" * 24


async def start_fake_ubiops() -> tuple[FakeUbiOps, web.AppRunner, str]:
    """Serve the fake UbiOps API on 127.0.0.1 with the deployment the rule targets."""
    fake = FakeUbiOps(token=UBIOPS_TOKEN, rate_limit_per_minute=10**9)
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base_url = f"http://127.0.0.1:{port}{fake.prefix}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base_url}/projects/ml-prod/deployments",
            json={"name": "churn", "input_type": "structured", "output_type": "structured"},
            headers={"Authorization": f"Token {UBIOPS_TOKEN}"},
        ) as resp,
    ):
        resp.raise_for_status()
    return fake, runner, base_url


async def send(urls: list[str], duration_s: float, connections: int, most: int | None) -> int:
    """POST deliveries (each its own id and issue key) for `duration_s`; return the 202s."""
    token = harness.oauth_token()
    template = harness.issue_updated()
    numbers = itertools.count()
    accepted = 0
    deadline = time.monotonic() + duration_s

    async def connection(session: aiohttp.ClientSession, url: str) -> None:
        nonlocal accepted
        while time.monotonic() < deadline:
            n = next(numbers)
            if most is not None and n >= most:
                return
            template["issue"]["key"] = f"OPS-{n}"  # no await before dumps: no interleaving
            body = orjson.dumps(template)
            headers = {
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
                "X-Atlassian-Webhook-Identifier": f"pipeline-{n}",
            }
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status == 202:
                    accepted += 1
                else:
                    raise RuntimeError(f"delivery answered {resp.status}")

    limit = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=limit) as session:
        await asyncio.gather(
            *(connection(session, urls[i % len(urls)]) for i in range(connections))
        )
    return accepted


async def backlog(database_url: str) -> tuple[int, int, int]:
    """Return (events not yet processed, action runs not yet succeeded, runs succeeded)."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            open_events = (
                await conn.execute(
                    select(func.count()).where(events.c.status.in_(("received", "processing")))
                )
            ).scalar_one()
            rows = await conn.execute(
                select(action_runs.c.status, func.count()).group_by(action_runs.c.status)
            )
            by_status: dict[str, int] = {str(r[0]): int(r[1]) for r in rows}
    finally:
        await engine.dispose()
    succeeded = int(by_status.pop("succeeded", 0))
    return int(open_events), sum(by_status.values()), succeeded


async def run(args: argparse.Namespace, workdir: Path, database_url: str) -> int:
    fake, runner, ubiops_url = await start_fake_ubiops()
    rules = harness.write_rules(workdir / "rules", args.rules, ubiops_call=True)
    ports = [harness.free_port() for _ in range(args.processes)]
    with contextlib.ExitStack() as stack:
        for port in ports:
            # Blocking start-up: nothing else runs on this loop yet but the fake, idle.
            await asyncio.to_thread(
                stack.enter_context,
                harness.deploybot(
                    workdir,
                    port,
                    database_url,
                    rules,
                    UBIOPS_API_URL=ubiops_url,
                    UBIOPS_API_TOKEN=UBIOPS_TOKEN,
                ),
            )
        _, _, succeeded_before = await backlog(database_url)  # migrated by now
        started = time.monotonic()
        urls = [f"http://127.0.0.1:{port}/webhooks/jira" for port in ports]
        accepted = await send(urls, args.duration, args.connections, args.events)
        sent_s = time.monotonic() - started
        deadline = time.monotonic() + args.drain_timeout
        while True:
            open_events, open_runs, succeeded = await backlog(database_url)
            if open_events == 0 and open_runs == 0 and succeeded - succeeded_before >= accepted:
                break
            if time.monotonic() > deadline:
                elapsed_s = time.monotonic() - started
                raise SystemExit(
                    f"FAILED: {accepted} events in, backlog not zero after {elapsed_s:.0f} s:"
                    f" {open_events} events, {open_runs} action runs open;"
                    f" {(succeeded - succeeded_before) / elapsed_s:.1f} UbiOps calls/s"
                )
            await asyncio.sleep(0.05)
        drained_s = time.monotonic() - started
        await asyncio.to_thread(stack.close)
    await runner.cleanup()
    creates = len(fake.calls("POST", r"/projects/ml-prod/deployments/churn/versions"))
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"deliveries {accepted} in {sent_s:.1f} s ({accepted / sent_s:.0f}/s in);"
        f" backlog zero after {drained_s:.1f} s"
    )
    print(f"sustained {accepted / drained_s:.0f} events/s end to end (goal >= 1000)")
    print(f"UbiOps creates {creates} for {accepted} events; peak RSS {peak_mib:.0f} MiB")
    if creates != accepted or succeeded - succeeded_before != accepted:
        raise SystemExit(f"FAILED: {creates} UbiOps calls, {succeeded} runs for {accepted} events")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of deliveries")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--processes", type=int, default=1, help="deploybot processes")
    parser.add_argument("--rules", type=int, default=10, help="rules (one matches each event)")
    parser.add_argument("--events", type=int, help="send at most this many deliveries")
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="seconds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="deploybot-pipeline-") as tmp:
        workdir = Path(tmp)
        database_url = os.environ.get(
            "DEPLOYBOT_DATABASE_URL", f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
        )
        engine = "PostgreSQL" if database_url.startswith("postgresql") else "SQLite (FULL)"
        print(f"{os.cpu_count()} cores, {engine}, {args.processes} deploybot process(es)")
        try:
            return asyncio.run(run(args, workdir, database_url))
        except (RuntimeError, SystemExit):
            print(harness.log_tail(workdir, lines=5), file=sys.stderr)
            raise


if __name__ == "__main__":
    sys.exit(main())
