"""PostgreSQL's pooled connections are pinged at checkout only after sitting idle
(bot/db/engine.py): a transaction right after another costs no extra round trips, and a
connection that died while idle is replaced before it is used. Real PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from bot.db import engine as engine_module
from bot.db.engine import create_engine


@pytest.fixture
def postgres_url(database_url: str) -> str:
    if not database_url.startswith("postgresql"):
        pytest.skip("the pool's ping is PostgreSQL's")
    return database_url


async def _driver(conn: Any) -> Any:
    return (await conn.get_raw_connection()).driver_connection


async def test_back_to_back_transactions_send_no_ping(postgres_url: str) -> None:
    engine = create_engine(postgres_url, pool_size=1)
    sent: list[str] = []
    try:
        async with engine.connect() as conn:
            (await _driver(conn)).add_query_logger(lambda record: sent.append(record.query))
        for _ in range(5):
            async with engine.begin() as conn:
                await conn.execute(text("SELECT 1"))
        # SQLAlchemy's pre-ping was a transaction of its own before each (BEGIN, `;`,
        # ROLLBACK); the driver logs the statements it sends as text.
        assert sent == ["BEGIN;", "COMMIT;"] * 5
    finally:
        await engine.dispose()


async def test_a_connection_that_died_while_idle_is_replaced_at_checkout(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_engine(postgres_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            victim = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with engine.connect() as other:  # the server ends the idle connection
            await other.execute(text("SELECT 1"))
        import asyncpg

        admin = await asyncpg.connect(postgres_url.replace("postgresql+asyncpg", "postgresql"))
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", victim)
        finally:
            await admin.close()
        monkeypatch.setattr(engine_module, "DRIVER_IDLE_S", 0.0)  # it has sat idle long enough
        async with engine.begin() as conn:
            now = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        assert now != victim
    finally:
        await engine.dispose()
