"""Shared fixtures: a database per test on each engine, and settings for the app."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from bot.settings import Settings
from bot.web.app import create_app
from tests.fakes.tcp_proxy import TcpProxy

PG_URL_ENV = "DEPLOYBOT_TEST_POSTGRES_URL"
CLIENT_SECRET = "oauth-client-secret-" + "0123456789abcdef" * 3

ClientFactory = Callable[..., Any]


def _admin_dsn(url: str) -> str:
    return str(URL(url.replace("postgresql+asyncpg://", "postgresql://")).with_path("/postgres"))


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty database: a SQLite file, or a PostgreSQL database of its own."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'deploybot.db'}"
        return
    base = os.environ.get(PG_URL_ENV)
    if not base:
        pytest.skip(f"PostgreSQL tests need {PG_URL_ENV} (set by .ci/run)")
    async with postgres_database(base) as url:
        yield url


class postgres_database:  # used like a function: `async with postgres_database(url)`
    """Create a throw-away PostgreSQL database and drop it afterwards."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.name = f"deploybot_test_{uuid.uuid4().hex[:12]}"

    async def __aenter__(self) -> str:
        import asyncpg

        conn = await asyncpg.connect(_admin_dsn(self.base_url))
        try:
            await conn.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            await conn.close()
        return str(URL(self.base_url).with_path(f"/{self.name}"))

    async def __aexit__(self, *_exc: object) -> None:
        import asyncpg

        conn = await asyncpg.connect(_admin_dsn(self.base_url))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    (tmp_path / "rules").mkdir(exist_ok=True)
    return Settings(
        database_url=database_url,
        rules_dir=tmp_path / "rules",
        jira_client_secret=CLIENT_SECRET,
    )


@pytest.fixture
async def make_client(
    aiohttp_client: Callable[..., Any],
) -> ClientFactory:
    """Start deploybot on a real localhost port with the given settings."""

    async def start(settings: Settings, **changes: Any) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = await aiohttp_client(
            create_app(replace(settings, **changes))
        )
        return client

    return start


@contextlib.asynccontextmanager
async def postgres_behind_proxy() -> AsyncIterator[tuple[str, str, TcpProxy]]:
    """A throw-away PostgreSQL database with a TCP proxy in front that can cut connections:
    (its URL, its URL through the proxy, the proxy). Skips where PostgreSQL is not set."""
    base = os.environ.get(PG_URL_ENV)
    if not base:
        pytest.skip(f"PostgreSQL tests need {PG_URL_ENV} (set by .ci/run)")
    async with postgres_database(base) as direct_url:
        target = URL(direct_url)
        proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432)
        await proxy.start()
        try:
            yield direct_url, str(target.with_host("127.0.0.1").with_port(proxy.port)), proxy
        finally:
            await proxy.close()
