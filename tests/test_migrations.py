"""The migrations and the models describe one schema, on both engines, both ways."""

from __future__ import annotations

from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect

from bot.db.engine import alembic_config, create_engine, require_postgres, upgrade
from bot.db.models import metadata
from bot.errors import SettingsError


def _differences(conn: Connection) -> list[Any]:
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names()) - {"alembic_version"}


async def test_models_and_migrations_agree(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        async with engine.connect() as conn:
            differences = await conn.run_sync(_differences)
        assert differences == []
    finally:
        await engine.dispose()


async def test_upgrade_downgrade_upgrade(database_url: str) -> None:
    engine = create_engine(database_url)

    def downgrade_all(conn: Connection) -> None:
        command.downgrade(alembic_config(conn), "base")

    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            assert await conn.run_sync(_tables) == set(metadata.tables)
            await conn.run_sync(downgrade_all)
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == set()
        await upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == set(metadata.tables)
            assert await conn.run_sync(_differences) == []
    finally:
        await engine.dispose()


def test_a_postgresql_server_older_than_12_is_refused_by_name() -> None:
    """The processor sets plan_cache_mode (PostgreSQL 12): an older server is refused at
    `db upgrade` / start-up, saying why, rather than failing every batch later."""
    with pytest.raises(SettingsError, match=r"PostgreSQL 12 or later is needed \(11\.22\)"):
        require_postgres((11, 22))
    require_postgres((12, 0))
    require_postgres((15, 4))
    require_postgres(None)  # not connected yet: nothing to say
