"""End to end: deliveries in, rules matched, one UbiOps call per event, backlog drained.

Run: .venv/bin/python bench/pipeline.py [--duration 10] [--processes 1] [--rules 10]
`deploybot serve` runs in its own process(es) against the fake UbiOps server (a process
of its own too); the delivery sender runs here (32 concurrent connections). Deliveries are sent for
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from sqlalchemy import func, select

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bot.db.engine import create_engine
from bot.db.models import action_runs, events

UBIOPS_TOKEN = "bench-ubiops-token-" + "u" * 24


def spawn_fake_ubiops(workdir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """Run the fake UbiOps API in its own process; return it and its base URL."""
    port = harness.free_port()
    with (workdir / "fake-ubiops.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                harness.PYTHON,
                "-m",
                "bench.fake_ubiops",
                "--port",
                str(port),
                "--token",
                UBIOPS_TOKEN,
                *extra,
            ],
            cwd=harness.ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, f"http://127.0.0.1:{port}/v2.1"


async def start_fake_ubiops(workdir: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """Run the fake UbiOps, with the deployment the rule targets, once it answers."""
    proc, base_url = spawn_fake_ubiops(workdir, *extra)
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(headers={"Authorization": f"Token {UBIOPS_TOKEN}"}) as session:
        while True:
            try:
                async with session.post(
                    f"{base_url}/projects/ml-prod/deployments",
                    json={"name": "churn", "input_type": "structured", "output_type": "structured"},
                ) as resp:
                    resp.raise_for_status()
                    break
            except aiohttp.ClientConnectionError:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise
                await asyncio.sleep(0.1)
    return proc, base_url


async def fake_json(url: str) -> Any:
    """GET a JSON answer from the fake UbiOps (with its token)."""
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Token {UBIOPS_TOKEN}"}) as session,
        session.get(url) as resp,
    ):
        resp.raise_for_status()
        return await resp.json()


async def versions_created(base_url: str) -> int:
    """Count the versions the fake holds: one per UbiOps create that succeeded."""
    return len(await fake_json(f"{base_url}/projects/ml-prod/deployments/churn/versions"))


async def send(
    urls: list[str],
    duration_s: float,
    connections: int,
    most: int | None,
    rate: float | None = None,
    accepted_at: dict[str, float] | None = None,
) -> int:
    """POST deliveries (each its own id and issue key) for `duration_s`, as fast as the
    connections go or `rate` a second; return the 202s (their times by issue key, in
    `accepted_at`)."""
    token = harness.oauth_token()
    template = harness.issue_updated()
    numbers = itertools.count()
    accepted = 0
    started = time.monotonic()
    deadline = started + duration_s

    async def connection(session: aiohttp.ClientSession, url: str) -> None:
        nonlocal accepted
        while time.monotonic() < deadline:
            n = next(numbers)
            if most is not None and n >= most:
                return
            if rate:  # delivery n is due n / rate seconds after the start
                await asyncio.sleep(max(0.0, started + n / rate - time.monotonic()))
            template["issue"]["key"] = f"OPS-{n}"  # no await before dumps: no interleaving
            template["issue"]["id"] = str(100000 + n)  # another issue: its own change
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
                    if accepted_at is not None:
                        accepted_at[f"ops-{n}"] = time.monotonic()
                else:
                    raise RuntimeError(f"delivery answered {resp.status}")

    limit = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=limit) as session:
        await asyncio.gather(
            *(connection(session, urls[i % len(urls)]) for i in range(connections))
        )
    return accepted


async def creates_arrived(base_url: str) -> int:
    """How many distinct versions' creates the fake has seen (cheap: a count)."""
    count: int = await fake_json(base_url.rsplit("/v2.1", 1)[0] + "/bench/arrivals/count")
    return count


async def reaction_times(base_url: str, accepted_at: dict[str, float]) -> list[float]:
    """Per event, seconds from its delivery's 202 to its UbiOps create's arrival, sorted."""
    arrivals: dict[str, float] = await fake_json(base_url.rsplit("/v2.1", 1)[0] + "/bench/arrivals")
    return sorted(arrivals[k] - at for k, at in accepted_at.items() if k in arrivals)


def percentile(values: list[float], share: float) -> float:
    return values[min(len(values) - 1, int(share * len(values)))]


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


async def print_timeline(database_url: str, started: float) -> None:
    """Every second: events stored, still open, action runs open and succeeded."""
    engine = create_engine(database_url)
    query = select(
        select(func.count()).select_from(events).scalar_subquery(),
        select(func.count())
        .where(events.c.status.in_(("received", "processing")))
        .scalar_subquery(),
        select(func.count()).where(action_runs.c.status != "succeeded").scalar_subquery(),
        select(func.count()).where(action_runs.c.status == "succeeded").scalar_subquery(),
    )
    try:
        while True:
            await asyncio.sleep(1)
            async with engine.connect() as conn:
                stored, open_events, open_runs, done = (await conn.execute(query)).one()
            print(
                f"  {time.monotonic() - started:5.1f} s: events {stored} stored,"
                f" {open_events} open; action runs {open_runs} open, {done} succeeded",
                flush=True,
            )
    finally:
        await engine.dispose()


async def run(args: argparse.Namespace, workdir: Path, database_url: str) -> int:
    fake, ubiops_url = await start_fake_ubiops(workdir)
    try:
        return await _run(args, workdir, database_url, ubiops_url)
    finally:
        fake.terminate()
        await asyncio.to_thread(fake.wait, 10)


async def _run(args: argparse.Namespace, workdir: Path, database_url: str, ubiops_url: str) -> int:
    rules = harness.write_rules(workdir / "rules", args.rules, ubiops_call=True)
    ports = [harness.free_port() for _ in range(args.processes)]
    with contextlib.ExitStack() as stack:
        procs = []
        for port in ports:
            # Blocking start-up: nothing else runs on this loop yet but the fake, idle.
            proc = await asyncio.to_thread(
                stack.enter_context,
                harness.deploybot(
                    workdir,
                    port,
                    database_url,
                    rules,
                    UBIOPS_API_URL=ubiops_url,
                    UBIOPS_API_TOKEN=UBIOPS_TOKEN,
                    # The fake has no limit; the client's own limiter (240/min by
                    # default, for the real API) would measure only itself.
                    UBIOPS_RATE_LIMIT_PER_MINUTE="1000000",
                    DEPLOYBOT_WORKERS=str(args.workers),
                ),
            )
            procs.append(proc)
        spies = [
            harness.profile(p.pid, args.profile_s, args.profile / f"pipeline-{i}.txt")
            for i, p in enumerate(procs)
            if args.profile
        ]
        _, _, succeeded_before = await backlog(database_url)  # migrated by now
        arrived_before = await creates_arrived(ubiops_url)
        started = time.monotonic()
        urls = [f"http://127.0.0.1:{port}/webhooks/jira" for port in ports]
        timeline = (
            asyncio.create_task(print_timeline(database_url, started)) if args.timeline else None
        )
        accepted_at: dict[str, float] = {}
        accepted = await send(
            urls, args.duration, args.connections, args.events, args.rate, accepted_at
        )
        sent_s = time.monotonic() - started
        deadline = time.monotonic() + args.drain_timeout
        while True:
            # The database is counted once the fake has seen every create: counting it
            # every 50 ms cost PostgreSQL a fifth of a core (the service's own work).
            if await creates_arrived(ubiops_url) - arrived_before < accepted:
                if time.monotonic() > deadline:
                    raise SystemExit(f"FAILED: not every create arrived in {args.drain_timeout} s")
                await asyncio.sleep(0.05)
                continue
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
        if timeline is not None:
            timeline.cancel()
        busy_s = sum(harness.cpu_seconds(p.pid) for p in procs)
        for spy in spies:
            await asyncio.to_thread(spy.wait)
        await asyncio.to_thread(stack.close)
    creates = await versions_created(ubiops_url)
    reactions = await reaction_times(ubiops_url, accepted_at)
    # The largest child: the deploybot processes have exited by now (the fake has not).
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"deliveries {accepted} in {sent_s:.1f} s ({accepted / sent_s:.0f}/s in);"
        f" backlog zero after {drained_s:.1f} s"
    )
    print(f"sustained {accepted / drained_s:.0f} events/s end to end (goal >= 1000)")
    print(f"UbiOps creates {creates} for {accepted} events; peak RSS {peak_mib:.0f} MiB")
    if reactions:
        print(
            f"reaction, 202 to the UbiOps create: p50 {1000 * percentile(reactions, 0.5):.1f} ms,"
            f" p99 {1000 * percentile(reactions, 0.99):.1f} ms, max {1000 * reactions[-1]:.1f} ms"
            f" ({len(reactions)} events; goal p99 < 50 ms at --rate 50)"
        )
    sender_s = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"CPU seconds: deploybot {busy_s:.1f}, sender {sender_s.ru_utime + sender_s.ru_stime:.1f}"
        f" ({os.cpu_count()} cores x {drained_s:.1f} s = {(os.cpu_count() or 1) * drained_s:.0f});"
        # Steadier than events/s on a shared host: what one event costs deploybot.
        f" deploybot CPU per event {1000 * busy_s / max(accepted, 1):.2f} ms"
    )
    if creates != accepted or succeeded - succeeded_before != accepted:
        raise SystemExit(f"FAILED: {creates} UbiOps calls, {succeeded} runs for {accepted} events")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of deliveries")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--processes", type=int, default=1, help="deploybot processes")
    parser.add_argument("--rules", type=int, default=10, help="rules (one matches each event)")
    parser.add_argument(
        "--workers", type=int, default=64, help="DEPLOYBOT_WORKERS: concurrent action runs"
    )
    parser.add_argument("--events", type=int, help="send at most this many deliveries")
    parser.add_argument(
        "--rate", type=float, help="deliveries per second (a steady load); default: full speed"
    )
    parser.add_argument("--timeline", action="store_true", help="print the backlog every second")
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="seconds")
    parser.add_argument(
        "--profile", type=Path, help="folder for py-spy profiles (collapsed stacks) of deploybot"
    )
    parser.add_argument("--profile-s", type=float, default=10.0, help="seconds to profile")
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
