"""SIGTERM during a burst: every acknowledged delivery is stored once and acted on once."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from sqlalchemy import func, select

from bot.db.engine import create_engine
from bot.db.models import action_runs, events
from tests.conftest import CLIENT_SECRET
from tests.fakes.ubiops import FakeUbiOps
from tests.signing import oauth_token
from tests.test_pipeline import EXAMPLE_RULES, TOKEN, issue_updated, wait_for

SHUTDOWN_TIMEOUT_S = 5.0
BURST = 300
SIGTERM_AFTER = 40  # answers seen before the signal is sent
RULE = """
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

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Service:
    """`python -m bot serve` in a subprocess."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.env, self.cwd, self.log = env, cwd, log
        self.url = f"http://127.0.0.1:{env['DEPLOYBOT_PORT']}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, session: aiohttp.ClientSession) -> None:
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

        await wait_for(healthy, timeout_s=30)

    async def stop(self) -> tuple[int, float]:
        """Send SIGTERM; return the exit code and the seconds it took."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.proc.wait(), SHUTDOWN_TIMEOUT_S + 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise
        return code, time.monotonic() - started


async def deliver(session: aiohttp.ClientSession, url: str, index: int) -> int | None:
    """Send one signed delivery; return its status, None when it was not answered."""
    body = json.dumps(issue_updated(f"OPS-{index}"))
    headers = {
        "Authorization": f"Bearer {oauth_token(CLIENT_SECRET)}",
        "Content-Type": "application/json",
        "X-Atlassian-Webhook-Identifier": f"burst-{index}",
    }
    try:
        async with session.post(url + "/webhooks/jira", data=body, headers=headers) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def test_sigterm_mid_burst_loses_and_repeats_nothing(
    tmp_path: Path, aiohttp_server: Callable[..., Any]
) -> None:
    fake = FakeUbiOps(token=TOKEN)
    fake_server: TestServer = await aiohttp_server(fake.app())
    fake_url = str(fake_server.make_url(fake.prefix))
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "versions.yaml").write_text(RULE)
    shutil.copytree(EXAMPLE_RULES / "artifacts", rules / "artifacts")
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'deploybot.db'}"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DEPLOYBOT_DATABASE_URL": database_url,
        "DEPLOYBOT_RULES_DIR": str(rules),
        "DEPLOYBOT_HOST": "127.0.0.1",
        "DEPLOYBOT_PORT": str(free_port()),
        "DEPLOYBOT_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_TIMEOUT_S),
        "DEPLOYBOT_LOG_FORMAT": "json",
        "JIRA_CLIENT_SECRET": CLIENT_SECRET,
        "UBIOPS_API_URL": fake_url,
        "UBIOPS_API_TOKEN": TOKEN,
    }
    service = Service(env, tmp_path, tmp_path / "serve.log")
    connector = aiohttp.TCPConnector(limit=64)
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await fake_session_setup(session, fake_url)
        await service.start(session)
        answered = asyncio.Event()
        statuses: dict[int, int | None] = {}

        async def one(index: int) -> None:
            statuses[index] = await deliver(session, service.url, index)
            if len(statuses) >= SIGTERM_AFTER:
                answered.set()

        burst = [asyncio.create_task(one(i)) for i in range(BURST)]
        await answered.wait()
        code, took_s = await service.stop()
        await asyncio.gather(*burst)
        assert code == 0, service.log.read_text()
        assert took_s < SHUTDOWN_TIMEOUT_S
        acked = {f"burst-{i}" for i, status in statuses.items() if status == 202}
        assert SIGTERM_AFTER <= len(acked) < BURST, "the signal came in the middle of the burst"
        assert set(statuses.values()) <= {202, None}

        await service.start(session)
        engine = create_engine(database_url)
        try:

            async def settled() -> bool:
                async with engine.connect() as conn:
                    busy = (
                        await conn.execute(
                            select(func.count())
                            .select_from(events)
                            .where(events.c.status != "processed")
                        )
                    ).scalar_one() + (
                        await conn.execute(
                            select(func.count())
                            .select_from(action_runs)
                            .where(action_runs.c.status != "succeeded")
                        )
                    ).scalar_one()
                return busy == 0

            await wait_for(settled, timeout_s=60)
            async with engine.connect() as conn:
                stored = (await conn.execute(select(events.c.delivery_id))).scalars().all()
                runs = (await conn.execute(select(func.count()).select_from(action_runs))).scalar()
        finally:
            await engine.dispose()
        code, _ = await service.stop()
        assert code == 0

    assert len(stored) == len(set(stored))  # stored once
    assert acked <= set(stored)  # nothing acknowledged was lost
    assert runs == len(stored)  # one action run per event
    versions = fake.version_names("ml-prod", "churn")
    assert len(versions) == len(set(versions)) == len(stored)  # acted on once
    assert {f"ops-{d.removeprefix('burst-')}" for d in acked} <= set(versions)
    log = service.log.read_text()
    assert CLIENT_SECRET not in log and TOKEN not in log
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert sum(line["msg"] == "deploybot stopped" for line in lines) == 2


async def fake_session_setup(session: aiohttp.ClientSession, fake_url: str) -> None:
    """Create the deployment the rule adds versions to."""
    from bot.services.ubiops import UbiOpsClient

    await UbiOpsClient(session, fake_url, TOKEN).call(
        "deployments_create",
        {
            "project_name": "ml-prod",
            "data": {"name": "churn", "input_type": "structured", "output_type": "structured"},
        },
    )
