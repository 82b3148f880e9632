"""Migration 0003 gives stored events their outcome from their runs, and goes back."""

from __future__ import annotations

from datetime import UTC, datetime

from alembic import command
from sqlalchemy import text

from bot.db.engine import alembic_config, create_engine

EVENTS = [  # (event status, its runs' statuses) -> the outcome the migration gives
    ("processed", ["succeeded", "dead", "skipped"], "failed"),
    ("processed", ["succeeded"], "succeeded"),
    ("processed", [], "ignored"),
    ("processing", ["pending"], "running"),
    ("received", [], None),
]


async def test_existing_events_get_their_outcome(database_url: str) -> None:
    engine = create_engine(database_url)
    now = datetime(2026, 1, 1, tzinfo=UTC).replace(tzinfo=None)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(alembic_config(c), "0002"))
            for i, (status, runs, _) in enumerate(EVENTS, 1):
                await conn.execute(
                    text(
                        "INSERT INTO events (id, tenant, delivery_id, retry_count, webhook_event,"
                        " source, body, status, received_at, attempts)"
                        " VALUES (:i, '', :d, 0, 'x', 'live', :b, :s, :t, 0)"
                    ),
                    {"i": i, "d": f"d{i}", "b": b"{}", "s": status, "t": now},
                )
                for j, run in enumerate(runs):
                    await conn.execute(
                        text(
                            "INSERT INTO action_runs (event_id, rule_name, step_index, action,"
                            " idempotency_key, status, attempts, created_at, updated_at)"
                            " VALUES (:e, 'r', :j, 'a.b', :k, :s, 0, :t, :t)"
                        ),
                        {"e": i, "j": j, "k": f"{i}/{j}", "s": run, "t": now},
                    )
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(alembic_config(c), "head"))
            found = await conn.execute(text("SELECT id, outcome FROM events ORDER BY id"))
            assert [row.outcome for row in found] == [e[2] for e in EVENTS]
            await conn.run_sync(lambda c: command.downgrade(alembic_config(c), "0002"))
            left = await conn.execute(text("SELECT count(*) FROM events"))
            assert left.scalar_one() == len(EVENTS)
    finally:
        await engine.dispose()
