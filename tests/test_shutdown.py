"""SIGTERM during a burst: every acknowledged delivery is stored once and acted on once."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
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
from tests.helpers import EXAMPLE_RULES, TOKEN, wait_for
from tests.system.harness import (
    VERSION_PER_ISSUE_RULE,
    Service,
    create_churn_deployment,
    deliver,
    service_env,
    unsettled,
)

SHUTDOWN_TIMEOUT_S = 10.0  # the default DEPLOYBOT_SHUTDOWN_TIMEOUT_S
BURST = 300
SIGTERM_AFTER = 40  # answers seen before the signal is sent

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


async def test_sigterm_mid_burst_loses_and_repeats_nothing(
    tmp_path: Path, aiohttp_server: Callable[..., Any]
) -> None:
    fake = FakeUbiOps(token=TOKEN)
    fake_server: TestServer = await aiohttp_server(fake.app())
    fake_url = str(fake_server.make_url(fake.prefix))
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "versions.yaml").write_text(VERSION_PER_ISSUE_RULE)
    shutil.copytree(EXAMPLE_RULES / "artifacts", rules / "artifacts")
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'deploybot.db'}"
    env = service_env(
        database_url,
        rules,
        DEPLOYBOT_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_TIMEOUT_S),
        UBIOPS_API_URL=fake_url,
        UBIOPS_API_TOKEN=TOKEN,
    )
    service = Service(env, tmp_path, tmp_path / "serve.log")
    connector = aiohttp.TCPConnector(limit=64)
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await create_churn_deployment(session, fake_url, TOKEN)
        await service.start(session)
        answered = asyncio.Event()
        statuses: dict[int, int | None] = {}

        async def one(index: int) -> None:
            statuses[index] = await deliver(session, service.url, f"burst-{index}", f"OPS-{index}")
            if len(statuses) >= SIGTERM_AFTER:
                answered.set()

        burst = [asyncio.create_task(one(i)) for i in range(BURST)]
        await answered.wait()
        code, took_s = await service.stop(SHUTDOWN_TIMEOUT_S + 10)
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
                return await unsettled(engine) == 0

            await wait_for(settled, timeout_s=60)
            async with engine.connect() as conn:
                stored = (await conn.execute(select(events.c.delivery_id))).scalars().all()
                runs = (await conn.execute(select(func.count()).select_from(action_runs))).scalar()
        finally:
            await engine.dispose()
        code, _ = await service.stop(SHUTDOWN_TIMEOUT_S + 10)
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
