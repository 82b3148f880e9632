"""Run `python -m bot serve` as a real process and drive it: the system tests' toolkit."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.db.models import action_runs, events
from tests.conftest import CLIENT_SECRET
from tests.helpers import EXAMPLE_RULES, issue_updated, wait_for
from tests.signing import oauth_token


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def service_env(database_url: str, rules_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of one service process: its own port, JSON logs, the given extras."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "DEPLOYBOT_DATABASE_URL": database_url,
        "DEPLOYBOT_RULES_DIR": str(rules_dir),
        "DEPLOYBOT_HOST": "127.0.0.1",
        "DEPLOYBOT_PORT": str(free_port()),
        "DEPLOYBOT_LOG_FORMAT": "json",
        "JIRA_CLIENT_SECRET": CLIENT_SECRET,
        **extra,
    }


class Service:
    """`python -m bot serve` in a subprocess, its stderr appended to `log`."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.env, self.cwd, self.log = env, cwd, log
        self.url = f"http://127.0.0.1:{env['DEPLOYBOT_PORT']}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, session: aiohttp.ClientSession, timeout_s: float = 30) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot", "serve", env=self.env, cwd=self.cwd, stderr=log
            )

        async def healthy() -> bool:
            assert self.proc is not None and self.proc.returncode is None, self.log.read_text()
            try:
                async with session.get(self.url + "/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(healthy, timeout_s=timeout_s)

    async def stop(self, timeout_s: float) -> tuple[int, float]:
        """Send SIGTERM; return the exit code and the seconds it took (SIGKILL past the bound)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise
        return code, time.monotonic() - started

    async def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs."""
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    def log_lines(self) -> list[dict[str, object]]:
        """The JSON log lines written so far."""
        text = self.log.read_text()
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def deliver(
    session: aiohttp.ClientSession, url: str, delivery_id: str, issue_key: str, retry: int = 0
) -> int | None:
    """Send one signed issue-updated delivery (Jira's `retry`-th redelivery when > 0);
    return its status, None when not answered."""
    body = json.dumps(issue_updated(issue_key))
    headers = {
        "Authorization": f"Bearer {oauth_token(CLIENT_SECRET)}",
        "Content-Type": "application/json",
        "X-Atlassian-Webhook-Identifier": delivery_id,
    }
    if retry:
        headers["X-Atlassian-Webhook-Retry"] = str(retry)
    try:
        async with session.post(url + "/webhooks/jira", data=body, headers=headers) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return None


def version_rules(tmp_path: Path) -> Path:
    """A rules folder with VERSION_PER_ISSUE_RULE and the example artifacts it uploads."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "versions.yaml").write_text(VERSION_PER_ISSUE_RULE)
    shutil.copytree(EXAMPLE_RULES / "artifacts", rules / "artifacts")
    return rules


async def unprocessed_events(conn: AsyncConnection) -> int:
    """How many stored events are not (yet) processed."""
    found = await conn.execute(
        select(func.count()).select_from(events).where(events.c.status != "processed")
    )
    return int(found.scalar_one())


async def unsettled(engine: AsyncEngine) -> int:
    """Events not yet processed plus action runs not yet finished (succeeded or dead)."""
    async with engine.connect() as conn:
        pending_events = await unprocessed_events(conn)
        pending_runs = (
            await conn.execute(
                select(func.count())
                .select_from(action_runs)
                .where(action_runs.c.status.not_in(["succeeded", "dead"]))
            )
        ).scalar_one()
    return pending_events + int(pending_runs)


async def create_churn_deployment(
    session: aiohttp.ClientSession, fake_url: str, token: str
) -> None:
    """Create the UbiOps deployment that the version-per-issue rule adds versions to."""
    from bot.services.ubiops import UbiOpsClient

    await UbiOpsClient(session, fake_url, token).call(
        "deployments_create",
        {
            "project_name": "ml-prod",
            "data": {"name": "churn", "input_type": "structured", "output_type": "structured"},
        },
    )


VERSION_PER_ISSUE_RULE = """
rules:
  - name: version-per-issue
    on: {events: [jira:issue_updated]}
    when: [{changed: status, to: Ready to deploy}]
    do:
      - action: ubiops.deployment_versions_create
        with:
          project_name: ml-prod
          deployment_name: churn
          data: {version: "{{ issue.key | lower }}", environment: python3-11}
"""


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve `app` on a free loopback port; return the runner (clean it up) and its origin.

    Unlike pytest-aiohttp's test server, a handler keeps running when its client goes
    away, as on a real API server: a create sent just before a SIGKILL still lands, and
    only its answer is lost.
    """
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def peer_pid(peer_port: int, server_port: int, pids: list[int]) -> int | None:
    """Return which of `pids` owns the loopback client socket `peer_port` -> `server_port`.

    Linux only (/proc): the kernel's socket table gives the client end's inode, and the
    process whose file descriptors include that socket is the sender. None when no
    listed process holds it (it has died, or the connection is already gone).
    """
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                cols = line.split()
                local, remote = cols[1].rsplit(":", 1)[1], cols[2].rsplit(":", 1)[1]
                if int(local, 16) == peer_port and int(remote, 16) == server_port:
                    inode = cols[9]
    if inode is None or inode == "0":
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None
