"""Ingest throughput: `deploybot serve` against a bare aiohttp handler, under the same load.

Run: .venv/bin/python bench/ingest.py [--duration 10] [--connections 32] [--rules 1000]
Needs wrk (Debian: `apt-get update && apt-get install -y wrk`). Each server runs in its
own process; wrk drives it from another with every request carrying its own delivery id
and a valid OAuth Bearer JWT, then the bench checks every 202 is a stored row.
Set DEPLOYBOT_DATABASE_URL to bench PostgreSQL instead of SQLite (use a fresh database);
`--processes 2` runs two servers, each loaded by its own wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.pipeline import UBIOPS_TOKEN, start_fake_ubiops

WRK_HINT = "wrk is not installed; on Debian: apt-get update && apt-get install -y wrk"

LUA = r"""
local token, body, prefix, ids_path = %(token)s, %(body)s, %(prefix)s, %(ids_path)s
local numbered = body:find("@N@", 1, true) ~= nil  -- --matching: each its own change
counter, accepted, ids = 0, 0, {}  -- globals: `done` reads them with thread:get
local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.path = "/webhooks/jira"
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. token
end

function request()
  counter = counter + 1
  wrk.headers["X-Atlassian-Webhook-Identifier"] = prefix .. "-" .. tid .. "-" .. counter
  if numbered then
    return wrk.format(nil, nil, nil, (body:gsub("@N@", %(number)s .. tid .. "0" .. counter)))
  end
  return wrk.format()
end

function response(status, headers, body)
  if status == 202 then
    accepted = accepted + 1
    ids[accepted] = body:match('"event_id": *(%%d+)')
  end
end

function done(summary, latency, requests)
  local total = 0
  local out = io.open(ids_path, "w")
  for _, thread in ipairs(threads) do
    total = total + thread:get("accepted")
    for _, id in ipairs(thread:get("ids")) do out:write(id, "\n") end
  end
  out:close()
  local s = summary.errors
  io.write(string.format(
    'RESULT {"requests": %%d, "duration_us": %%d, "accepted": %%d, "p50_us": %%d, ' ..
    '"p99_us": %%d, "non2xx": %%d, "socket_errors": %%d}\n',
    summary.requests, summary.duration, total, latency:percentile(50),
    latency:percentile(99), s.status, s.connect + s.read + s.write + s.timeout))
end
"""


@dataclass(frozen=True)
class Load:
    """One wrk run's outcome."""

    requests: int
    duration_us: int
    accepted: int
    p50_us: int
    p99_us: int
    non2xx: int
    socket_errors: int
    # The servers' CPU seconds during the run: the event loop's thread, and all threads.
    loop_cpu_s: float = float("nan")
    cpu_s: float = float("nan")

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6)


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string of ASCII is a valid Lua string literal


def run_wrk(port: int, args: argparse.Namespace, workdir: Path, connections: int) -> Load:
    """Drive one server with wrk; return what its `done` hook reported."""
    payload = harness.issue_updated()
    if args.matching:  # another issue and change each: a run of the rule each (one a change)
        payload["issue"].update(key="OPS-@N@", id="@N@")
        payload["changelog"]["id"] = "@N@"
    body = json.dumps(payload, ensure_ascii=True)
    script = workdir / f"deliveries-{port}.lua"
    script.write_text(
        LUA
        % {
            "token": lua_string(harness.oauth_token()),
            "body": lua_string(body),
            "prefix": lua_string(uuid.uuid4().hex[:12]),
            "ids_path": lua_string(str(ids_path(workdir, port))),
            "number": lua_string(str(uuid.uuid4().int % 10**6 + 10**6)),
        }
    )
    out = subprocess.run(
        [
            "wrk",
            f"-t{min(args.threads, connections)}",
            f"-c{connections}",
            f"-d{args.duration}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/webhooks/jira",
        ],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}{out.stderr}")
    found = re.search(r"^RESULT (.*)$", out.stdout, re.M)
    if found is None:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}")
    return Load(**json.loads(found.group(1)))


def ids_path(workdir: Path, port: int) -> Path:
    """Where wrk writes the event ids of the 202s it counted."""
    return workdir / f"accepted-{port}.txt"


def combined(loads: list[Load]) -> Load:
    """Sum concurrent loads; latency percentiles are the worst of them (conservative)."""
    return Load(
        requests=sum(x.requests for x in loads),
        duration_us=max(x.duration_us for x in loads),
        accepted=sum(x.accepted for x in loads),
        p50_us=max(x.p50_us for x in loads),
        p99_us=max(x.p99_us for x in loads),
        non2xx=sum(x.non2xx for x in loads),
        socket_errors=sum(x.socket_errors for x in loads),
    )


def drive(ports: list[int], args: argparse.Namespace, workdir: Path, pids: list[int]) -> Load:
    """Split the connections over the servers, one wrk per server, run at once; count
    the servers' CPU time meanwhile (steadier than req/s on a shared host)."""
    share = max(args.connections // len(ports), 1)

    def cpu() -> tuple[float, float]:
        loop = sum(harness.cpu_seconds(pid, thread=pid) for pid in pids)
        return loop, sum(harness.cpu_seconds(pid) for pid in pids)

    loop_before, all_before = cpu()
    load = combined(asyncio.run(_drive_all(ports, args, workdir, share)))
    loop_after, all_after = cpu()
    return replace(load, loop_cpu_s=loop_after - loop_before, cpu_s=all_after - all_before)


async def _drive_all(
    ports: list[int], args: argparse.Namespace, workdir: Path, connections: int
) -> list[Load]:
    return list(
        await asyncio.gather(
            *(asyncio.to_thread(run_wrk, port, args, workdir, connections) for port in ports)
        )
    )


async def missing_rows(database_url: str, event_ids: list[int]) -> int:
    """Count the acknowledged event ids that are not stored rows."""
    from sqlalchemy import select

    from bot.db.engine import create_engine
    from bot.db.models import events

    engine = create_engine(database_url)
    try:
        found = 0
        async with engine.connect() as conn:
            for start in range(0, len(event_ids), 500):
                chunk = event_ids[start : start + 500]
                rows = await conn.execute(select(events.c.id).where(events.c.id.in_(chunk)))
                found += len(rows.all())
        return len(set(event_ids)) - found + (len(event_ids) - len(set(event_ids)))
    finally:
        await engine.dispose()


def bare_server(port: int) -> None:
    """Serve the baseline: read the body, answer 202 (run_app and its loop, like serve)."""
    from aiohttp import web

    from bot.cli.main import event_loop

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"event_id": 1}, status=202)

    async def ready(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_post("/webhooks/jira", handler)
    app.router.add_get("/readyz", ready)
    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=None,
        loop=event_loop(),  # the loop `serve` runs on (uvloop when installed)
    )


def report(name: str, load: Load) -> None:
    print(
        f"{name:<28} {load.rps:>9.0f} req/s   p50 {load.p50_us / 1000:6.2f} ms   "
        f"p99 {load.p99_us / 1000:6.2f} ms   202s {load.accepted}   "
        f"non-2xx {load.non2xx}   socket errors {load.socket_errors}"
    )
    per_request_us = 1e6 / max(load.requests, 1)
    print(
        f"{'':<28} CPU per request: event loop {load.loop_cpu_s * per_request_us:.0f} us,"
        f" process {load.cpu_s * per_request_us:.0f} us"
    )


def bench_deploybot(
    name: str,
    rule_count: int,
    args: argparse.Namespace,
    workdir: Path,
    database_url: str,
    ubiops_url: str | None = None,
) -> Load:
    """Run `deploybot serve` (x processes) with `rule_count` rules; check rows against 202s.
    With `ubiops_url`, the rules are one 3-step rule every delivery matches, acting there."""
    if ubiops_url:
        rules = harness.write_matching_rule(workdir / "rules-matching")
        extra = {
            "UBIOPS_API_URL": ubiops_url,
            "UBIOPS_API_TOKEN": UBIOPS_TOKEN,
            "UBIOPS_RATE_LIMIT_PER_MINUTE": "1000000",
        }
    else:
        rules = harness.write_rules(workdir / f"rules-{rule_count}", rule_count)
        extra = {}
    ports = [harness.free_port() for _ in range(args.processes)]
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(harness.deploybot(workdir, port, database_url, rules, **extra))
            for port in ports
        ]
        spies = [
            harness.profile(proc.pid, args.duration, args.profile / f"{name}-{i}.txt")
            for i, proc in enumerate(procs)
            if args.profile
        ]
        load = drive(ports, args, workdir, [proc.pid for proc in procs])
        for spy in spies:
            spy.wait()
    report(name, load)
    event_ids = [int(x) for p in ports for x in ids_path(workdir, p).read_text().split()]
    missing = asyncio.run(missing_rows(database_url, event_ids))
    if len(event_ids) != load.accepted or missing:
        raise SystemExit(
            f"FAILED: {load.accepted} 202s, {len(event_ids)} event ids, {missing} not stored"
        )
    print(f"{'':<28} every 202 is a stored row ({load.accepted} checked)")
    if ubiops_url:
        print(f"{'':<28} action runs at the end: {asyncio.run(run_statuses(database_url))}")
    return load


async def run_statuses(database_url: str) -> dict[str, int]:
    """Action runs by status (the matching rule's runs, acted on during the load)."""
    from sqlalchemy import func, select

    from bot.db.engine import create_engine
    from bot.db.models import action_runs

    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            query = select(action_runs.c.status, func.count()).group_by(action_runs.c.status)
            return {str(status): int(n) for status, n in await conn.execute(query)}
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per server")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--rules", type=int, default=1000, help="size of the large rule set")
    parser.add_argument("--processes", type=int, default=1, help="deploybot processes")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat bare / deploybot in turn; ratios per round and their median (a host's "
        "speed drifts over minutes: a ratio of neighbouring runs is steadier)",
    )
    parser.add_argument(
        "--profile", type=Path, help="folder for py-spy profiles (collapsed stacks) of deploybot"
    )
    parser.add_argument(
        "--matching",
        action="store_true",
        help="every delivery matches a 3-step rule acting on a fake UbiOps (its own process)",
    )
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_server is not None:
        bare_server(args.bare_server)
        return 0
    if shutil.which("wrk") is None:
        print(WRK_HINT, file=sys.stderr)
        return 2
    args.duration = max(round(args.duration), 1)
    with tempfile.TemporaryDirectory(prefix="deploybot-bench-") as tmp:
        workdir = Path(tmp)
        database_url = os.environ.get("DEPLOYBOT_DATABASE_URL", "")
        engine = "PostgreSQL" if database_url.startswith("postgresql") else "SQLite (FULL)"
        print(
            f"{args.connections} connections, {args.duration} s each, {os.cpu_count()} cores, "
            f"{engine}, {args.processes} deploybot process(es), {args.rounds} round(s)"
        )
        # One fake UbiOps for every round: a PostgreSQL database is kept from one round to
        # the next, and the runs a round left go on against the same service in the next.
        fake, ubiops_url = asyncio.run(start_fake_ubiops(workdir)) if args.matching else (None, "")
        try:
            rounds = [
                one_round(args, workdir, database_url, i, ubiops_url) for i in range(args.rounds)
            ]
        except RuntimeError:
            print(harness.log_tail(workdir), file=sys.stderr)
            raise
        finally:
            if fake is not None:
                fake.terminate()
                fake.wait(10)
    labels = ("matching 3-step rule",) if args.matching else ("10 rules", f"{args.rules} rules")
    for i, (bare, *results) in enumerate(rounds):
        ratios = ", ".join(
            f"{label} {load.rps / bare.rps:.2f}"
            for label, load in zip(labels, results, strict=True)
        )
        print(f"round {i + 1}: ratio deploybot/bare {ratios}")
    for column, label in enumerate(labels, start=1):
        ratio = statistics.median(r[column].rps / r[0].rps for r in rounds)
        p99_ms = statistics.median(r[column].p99_us for r in rounds) / 1000
        verdict = "meets" if ratio >= 0.40 and p99_ms < 25 else "misses"
        median = "median " if len(rounds) > 1 else ""
        print(
            f"{median}ratio deploybot/bare ({label}): {ratio:.2f}, p99 {p99_ms:.1f} ms"
            f" ({verdict} >= 0.40, p99 < 25 ms)"
        )
    return 0


def one_round(
    args: argparse.Namespace, workdir: Path, database_url: str, index: int, ubiops_url: str
) -> tuple[Load, ...]:
    """The bare handler, then deploybot with 10 and with `--rules` rules, in turn."""
    # SQLite: a fresh file each round; a PostgreSQL database is the caller's.
    database_url = database_url or f"sqlite+aiosqlite:///{workdir / f'bench-{index}.db'}"
    port = harness.free_port()
    with harness.process(
        [harness.PYTHON, __file__, "--bare-server", str(port)],
        dict(os.environ),
        workdir,
        f"http://127.0.0.1:{port}/readyz",
        workdir / "bare.log",
    ) as bare_proc:
        bare = drive([port], args, workdir, [bare_proc.pid])
    report("bare aiohttp", bare)
    if args.matching:
        return bare, bench_deploybot(
            "deploybot (matching)", 1, args, workdir, database_url, ubiops_url
        )
    return (
        bare,
        bench_deploybot("deploybot (10 rules)", 10, args, workdir, database_url),
        bench_deploybot(f"deploybot ({args.rules} rules)", args.rules, args, workdir, database_url),
    )


if __name__ == "__main__":
    sys.exit(main())
