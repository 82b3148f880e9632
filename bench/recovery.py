"""Resume after a crash: SIGKILL a `deploybot serve` with events and action runs in flight,
then measure how long until every claim it held is taken back.

Run: .venv/bin/python bench/recovery.py [--rate 100] [--send-s 2] [--post-delay-s 1]
     .venv/bin/python bench/recovery.py --postgres postgresql+asyncpg://postgres@127.0.0.1/x
SQLite (default): one process is killed and started again on the same database; the
figure is from the restart's spawn to the moment no event or run is held by the dead
process any more (and to its /readyz, for comparison). PostgreSQL (`--postgres`, a base
URL: the bench creates a throw-away database there and drops it): two replicas, one is
killed, the figure is from the kill to the survivor holding all of its claims. Creates
at the fake UbiOps are slow (`--post-delay-s`), so runs are mid-call when the process
dies; at the end the bench checks one version per event (nothing was done twice).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import func, select

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.pipeline import UBIOPS_TOKEN, backlog, send, start_fake_ubiops, versions_created
from bot.db.engine import create_engine
from bot.db.models import action_runs, events, processes


def spawn(
    workdir: Path, port: int, database_url: str, ubiops_url: str, host: str | None = None
) -> subprocess.Popen[bytes]:
    """Start `deploybot serve`; with `host`, under a host name of its own (`unshare`, as
    root: another machine as far as the others can tell, so only its heartbeat counts)."""
    env = harness.serve_env(
        workdir,
        port,
        database_url,
        workdir / "rules",
        UBIOPS_API_URL=ubiops_url,
        UBIOPS_API_TOKEN=UBIOPS_TOKEN,
        UBIOPS_RATE_LIMIT_PER_MINUTE="1000000",
    )
    log = (workdir / f"deploybot-{port}-{time.monotonic_ns()}.log").open("wb")
    command = [harness.PYTHON, "-m", "bot", "serve"]
    if host:
        shell = f"hostname {host} && exec {' '.join(command)}"
        command = ["unshare", "--uts", "sh", "-c", shell]
    return subprocess.Popen(
        command,
        env=env,
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


async def held(database_url: str, owners: set[str] | None = None) -> dict[str, int]:
    """Claims in flight by owner: events being evaluated, runs running."""
    engine = create_engine(database_url)
    counts: dict[str, int] = {}
    try:
        async with engine.connect() as conn:
            for table, status in ((events, "processing"), (action_runs, "running")):
                query = (
                    select(table.c.lease_owner, func.count())
                    .where(table.c.status == status, table.c.lease_owner.is_not(None))
                    .group_by(table.c.lease_owner)
                )
                for owner, count in await conn.execute(query):
                    if owners is None or owner in owners:
                        counts[owner] = counts.get(owner, 0) + int(count)
    finally:
        await engine.dispose()
    return counts


async def until_released(database_url: str, owners: set[str], timeout_s: float) -> float:
    """Seconds (monotonic clock) at which `owners` hold nothing any more."""
    deadline = time.monotonic() + timeout_s
    while await held(database_url, owners):
        if time.monotonic() > deadline:
            raise SystemExit(f"FAILED: claims of {owners} still held after {timeout_s:.0f} s")
        await asyncio.sleep(0.02)
    return time.monotonic()


async def kill_in_flight(
    args: argparse.Namespace, victim: subprocess.Popen[bytes], urls: list[str], database_url: str
) -> tuple[int, set[str], dict[str, int]]:
    """Send deliveries, SIGKILL `victim` while they are in flight; return the 202s and
    the claims the dead process held."""
    engine = create_engine(database_url)
    async with engine.connect() as conn:
        found = (
            await conn.execute(select(processes.c.id).where(processes.c.pid == victim.pid))
        ).all()
    await engine.dispose()
    if len(found) != 1:
        raise SystemExit(f"FAILED: {len(found)} process rows for pid {victim.pid}")
    owners = {f"events-{found[0].id}", f"actions-{found[0].id}"}
    sender = asyncio.create_task(send(urls, 3600, 8, None, args.rate))
    await asyncio.sleep(args.send_s)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    sender.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await sender
    # The 202s are the rows stored (the sender's own count stopped with it).
    engine = create_engine(database_url)
    async with engine.connect() as conn:
        accepted = int((await conn.execute(select(func.count()).select_from(events))).scalar_one())
    await engine.dispose()
    before = await held(database_url, owners)
    return accepted, set(before), before


async def drain(database_url: str, ubiops_url: str, accepted: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        open_events, open_runs, succeeded = await backlog(database_url)
        if open_events == 0 and open_runs == 0 and succeeded >= accepted:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"FAILED: {open_events} events, {open_runs} runs still open")
        await asyncio.sleep(0.1)
    creates = await versions_created(ubiops_url)
    print(f"events {accepted}, UbiOps versions {creates} (one per event: nothing done twice)")
    if creates != accepted:
        raise SystemExit("FAILED: a create was repeated or lost")


async def run(args: argparse.Namespace, workdir: Path, database_url: str) -> None:
    harness.write_rules(workdir / "rules", 1, ubiops_call=True)
    fake, ubiops_url = await start_fake_ubiops(workdir, "--post-delay-s", str(args.post_delay_s))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        replicas = 2 if args.postgres else 1
        ports = [harness.free_port() for _ in range(replicas)]
        for i, port in enumerate(ports):
            host = "replica-a" if args.postgres and i == 0 and not args.same_host else None
            procs.append(spawn(workdir, port, database_url, ubiops_url, host))
            await asyncio.to_thread(harness.wait_http, f"http://127.0.0.1:{port}/readyz")
        urls = [f"http://127.0.0.1:{p}/webhooks/jira" for p in ports]
        accepted, owners, before = await kill_in_flight(args, procs[0], urls[:1], database_url)
        print(f"killed with {sum(before.values())} claims in flight: {before}")
        if not owners:
            raise SystemExit("FAILED: nothing was in flight; raise --rate or --post-delay-s")
        if args.postgres:
            killed = time.monotonic()
            done = await until_released(database_url, owners, args.timeout)
            print(
                f"survivor took over every claim {done - killed:.2f} s after the kill (goal < 15 s)"
            )
        else:
            restarted = time.monotonic()
            procs[0] = spawn(workdir, ports[0], database_url, ubiops_url)
            done = await until_released(database_url, owners, args.timeout)
            await asyncio.to_thread(harness.wait_http, f"http://127.0.0.1:{ports[0]}/readyz")
            print(
                f"restarted process resumed every claim {done - restarted:.2f} s after its"
                f" spawn (ready at {time.monotonic() - restarted:.2f} s; goal < 5 s)"
            )
        await drain(database_url, ubiops_url, accepted, args.timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        fake.terminate()
        fake.wait(10)


async def with_database(args: argparse.Namespace, workdir: Path) -> None:
    if not args.postgres:
        await run(args, workdir, f"sqlite+aiosqlite:///{workdir / 'bench.db'}")
        return
    import asyncpg
    from yarl import URL

    base = URL(args.postgres)
    admin = str(base.with_scheme("postgresql").with_path("/postgres"))
    name = f"deploybot_bench_{uuid.uuid4().hex[:12]}"  # a throw-away database of its own
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    try:
        await run(args, workdir, str(base.with_path(f"/{name}")))
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="deliveries per second")
    parser.add_argument("--send-s", type=float, default=2.0, help="seconds before the kill")
    parser.add_argument("--post-delay-s", type=float, default=1.0, help="each UbiOps create")
    parser.add_argument("--postgres", help="a PostgreSQL URL: two replicas, one killed")
    parser.add_argument(
        "--same-host",
        action="store_true",
        help="PostgreSQL: both replicas on this host (the dead pid is seen at once)",
    )
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args(argv)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="deploybot-recovery-") as tmp:
        try:
            asyncio.run(with_database(args, Path(tmp)))
        except (RuntimeError, SystemExit):
            print(harness.log_tail(Path(tmp), lines=5), file=sys.stderr)
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
