"""The write path: a 2xx only after commit; concurrent deliveries share commits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import bindparam, select, text
from sqlalchemy import event as sa_event

from bot.core.delivery import Delivery
from bot.db.engine import alembic_config, create_engine, upgrade
from bot.db.models import events, rule_matches
from bot.db.store import LOADED_BATCH, LOADED_WITHIN_S, EventStore
from bot.db.writers import PostgresWriter, SqliteWriter, Writer, writer_for
from bot.errors import StoreUnavailable
from bot.settings import Settings
from tests.conftest import CLIENT_SECRET, ClientFactory, postgres_behind_proxy
from tests.helpers import PAYLOAD, headers, stored_count


def delivery(ident: str) -> Delivery:
    return Delivery(ident, 0, "jira:issue_updated", "OPS-1", json.dumps(PAYLOAD).encode())


async def test_concurrent_deliveries_share_commits(database_url: str) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    store = EventStore(engine)
    await store.start()
    try:
        results = await asyncio.gather(*(store.add("", delivery(f"g-{i}")) for i in range(200)))
    finally:
        await store.close()
        await engine.dispose()
    assert all(r.created for r in results)
    assert len({r.event_id for r in results}) == 200
    # 200 concurrent deliveries were written in far fewer transactions than rows.
    assert store.commits < 20


@contextlib.asynccontextmanager
async def serve_store(database_url: str) -> AsyncIterator[tuple[EventStore, Writer]]:
    """The event store and its engine's writer (on a SQLite file: the write thread)."""
    engine = create_engine(database_url)
    await upgrade(engine)
    store = EventStore(engine)
    await store.start()
    try:
        yield store, writer_for(engine)
    finally:
        await store.close()
        await engine.dispose()


async def stored_rows(database_url: str, *columns: Any) -> list[Any]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(select(*columns))).all())
    finally:
        await engine.dispose()


async def test_the_process_writer_shares_commits_and_dedupes(database_url: str) -> None:
    async with serve_store(database_url) as (store, writes):
        ids = [f"w-{i}" for i in range(200)] + ["w-7", "w-7"]  # Jira's redeliveries
        results = await asyncio.gather(*(store.add("", delivery(i)) for i in ids))
        again = await store.add("", delivery("w-0"))
    rows = await stored_rows(database_url, events.c.id, events.c.delivery_id, events.c.received_at)
    created = {r.event_id: i for i, r in zip(ids, results, strict=True) if r.created}
    assert len(created) == 200 and not again.created
    assert created == {r.id: r.delivery_id for r in rows}  # each answer names its own row
    assert all(r.received_at.tzinfo is not None for r in rows)  # read back as UTC times
    assert 1 <= store.commits <= 21  # 202 concurrent deliveries, then one more
    assert isinstance(writes, SqliteWriter if database_url.startswith("sqlite") else PostgresWriter)


async def test_a_batch_mixing_new_and_stored_deliveries_maps_each_answer(
    database_url: str,
) -> None:
    async with serve_store(database_url) as (store, _):
        stored = [await store.add("", delivery(f"m-{i}")) for i in (1, 3)]
        batch = [f"m-{i}" for i in range(5)]  # m-1 and m-3 are redeliveries
        results = await asyncio.gather(*(store.add("", delivery(i)) for i in batch))
    rows = {
        r.id: r.delivery_id
        for r in await stored_rows(database_url, events.c.id, events.c.delivery_id)
    }
    assert [r.created for r in results] == [True, False, True, False, True]
    assert {r.event_id: rows[r.event_id] for r in results if r.event_id} == {
        r.event_id: i for i, r in zip(batch, results, strict=True) if r.created
    }
    assert sorted(rows.values()) == batch and all(s.created for s in stored)
    assert store.commits == 3  # the five shared one transaction


async def test_a_batch_larger_than_one_insert_statement_maps_each_answer(
    database_url: str,
) -> None:
    async with serve_store(database_url) as (store, _):
        await store.add("", delivery("big-3"))  # stored before: a redelivery in part one
        # The first starts a commit alone, the other 699 queue for the next: on SQLite two
        # INSERTs of 500 rows at most, one with a redelivery among them and one without.
        ids = [f"big-{i}" for i in range(700)]
        results = await asyncio.gather(*(store.add("", delivery(i)) for i in ids))
    rows = {
        r.id: r.delivery_id
        for r in await stored_rows(database_url, events.c.id, events.c.delivery_id)
    }
    created = {r.event_id: i for i, r in zip(ids, results, strict=True) if r.created}
    assert len(created) == 699 and len(rows) == 700
    assert all(rows[event_id] == i for event_id, i in created.items())  # its own row each
    assert [i for i, r in zip(ids, results, strict=True) if not r.created] == ["big-3"]


async def test_migration_moves_rule_misses_into_the_event(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(alembic_config(c), "0001"))
            await conn.execute(
                text(
                    "INSERT INTO events (id, tenant, delivery_id, retry_count, webhook_event,"
                    " source, body, status, received_at, attempts)"
                    " VALUES (1, '', 'd-1', 0, 'jira:issue_updated', 'live', x'7b7d',"
                    " 'processed', '2026-01-01 00:00:00.000000', 1)"
                )
            )
            await conn.execute(
                text(
                    "INSERT INTO rule_matches (event_id, rule_name, matched, reason,"
                    " ruleset_version) VALUES (1, 'a', 1, NULL, 'v'), (1, 'b', 0, 'no', 'v'),"
                    " (1, 'c', 0, 'not c', 'v')"
                )
            )
        await upgrade(engine)
        async with engine.connect() as conn:
            misses = (await conn.execute(select(events.c.rule_misses))).scalar_one()
            left = (await conn.execute(select(rule_matches.c.rule_name))).scalars().all()
    finally:
        await engine.dispose()
    assert misses == [{"rule": "b", "reason": "no"}, {"rule": "c", "reason": "not c"}]
    assert left == ["a"]


async def serving_one_delivery(make_client: ClientFactory, db_file: Path) -> tuple[Any, Settings]:
    """A service on the SQLite file `db_file` that has stored delivery "a"."""
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{db_file}", jira_client_secret=CLIENT_SECRET
    )
    client = await make_client(settings)
    assert (await client.post("/webhooks/jira", json=PAYLOAD, headers=headers("a"))).status == 202
    return client, settings


async def test_sqlite_file_gone_gives_503_then_recovers(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    db_file = tmp_path / "deploybot.db"
    client, settings = await serving_one_delivery(make_client, db_file)
    # The database disappears: its file is replaced by a directory nothing can open.
    moved = tmp_path / "moved.db"
    shutil.move(db_file, moved)
    db_file.mkdir()
    resp = await client.post("/webhooks/jira", json=PAYLOAD, headers=headers("b"))
    assert resp.status == 503
    assert resp.headers["Retry-After"]
    assert (await client.get("/readyz")).status == 503
    db_file.rmdir()
    shutil.move(moved, db_file)
    # Jira's retry of the same delivery is now stored, exactly once.
    assert (await client.post("/webhooks/jira", json=PAYLOAD, headers=headers("b"))).status == 202
    assert await stored_count(settings) == 2


async def test_writes_failing_while_reads_work_make_readyz_503_until_one_commits(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    # A read-only database still answers SELECT 1: readiness must also follow the writes.
    db_file = tmp_path / "deploybot.db"
    client, settings = await serving_one_delivery(make_client, db_file)
    engine = create_engine(settings.database_url)
    refuse = (
        "CREATE TRIGGER refuse BEFORE INSERT ON events"
        " BEGIN SELECT RAISE(ABORT, 'attempt to write a readonly database'); END"
    )
    try:
        async with engine.begin() as conn:
            await conn.execute(text(refuse))
        resp = await client.post("/webhooks/jira", json=PAYLOAD, headers=headers("b"))
        assert resp.status == 503
        ready = await client.get("/readyz")
        assert ready.status == 503
        reason = (await ready.json())["database"]
        assert "writes failing" in reason and "readonly" in reason
        assert "OPS-7" not in reason  # the issue key of PAYLOAD: no statement parameters
        async with engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER refuse"))
        assert (await client.get("/readyz")).status == 503  # no commit yet says otherwise
        resp = await client.post("/webhooks/jira", json=PAYLOAD, headers=headers("b"))
        assert resp.status == 202
        assert (await client.get("/readyz")).status == 200
    finally:
        await engine.dispose()


async def test_busy_while_commits_take_many_deliveries_at_once(database_url: str) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    now = [1000.0]
    store = EventStore(engine, clock=lambda: now[0])
    await store.start()
    try:
        for i in range(LOADED_BATCH):  # one at a time: each has a commit of its own
            await store.add("", delivery(f"one-{i}"))
        assert not store.busy()
        # The first starts a commit alone, the others queue behind it and share the next.
        await asyncio.gather(*(store.add("", delivery(f"many-{i}")) for i in range(20)))
        assert store.busy()
        await store.add("", delivery("alone"))  # one commit of one does not end the load
        assert store.busy()
        now[0] += 2 * LOADED_WITHIN_S  # and no commit of many since
        assert not store.busy()
    finally:
        await store.close()
        await engine.dispose()


async def test_an_old_write_failure_is_forgotten(database_url: str) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    store = EventStore(engine)
    await store.start()
    try:
        async with engine.begin() as conn:
            await conn.execute(text("ALTER TABLE events RENAME TO events_away"))
        with pytest.raises(StoreUnavailable):
            await store.add("", delivery("x"))
        assert store.write_trouble() is not None
        assert store.write_trouble(within_s=0.0) is None
    finally:
        await store.close()
        await engine.dispose()


async def test_postgres_connection_killed_mid_insert_gives_5xx(make_client: ClientFactory) -> None:
    async with postgres_behind_proxy() as (direct_url, via_proxy, proxy):
        settings = Settings(database_url=via_proxy, jira_client_secret=CLIENT_SECRET)
        client = await make_client(settings)
        ok = await client.post("/webhooks/jira", json=PAYLOAD, headers=headers("p-1"))
        assert ok.status == 202
        # The connection dies while the INSERT's parameters are on the wire (asyncpg
        # sends a prepared statement's SQL only once, its parameters every time).
        proxy.cut_on = b"p-2-marker"
        resp = await client.post("/webhooks/jira", json=PAYLOAD, headers=headers("p-2-marker"))
        assert resp.status == 503 and "unavailable" in (await resp.json())["error"]
        assert proxy.cuts == 1
        checked = Settings(database_url=direct_url)
        assert await stored_count(checked) == 1
        # The pool recovers by itself; Jira's retry is stored once.
        proxy.cut_on = None
        retry = await client.post("/webhooks/jira", json=PAYLOAD, headers=headers("p-2-marker"))
        assert retry.status == 202
        assert await stored_count(checked) == 2


async def test_the_driver_connection_is_held_pinged_after_idle_and_dropped_when_broken(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgresWriter.run_driver serves PostgreSQL (asyncpg) alone")
    from sqlalchemy.exc import DBAPIError

    from bot.db import writers as engine_mod

    engine = create_engine(database_url)
    writes = writer_for(engine)
    assert isinstance(writes, PostgresWriter)
    checkouts = 0

    def count(*_args: Any) -> None:
        nonlocal checkouts
        checkouts += 1

    sa_event.listen(engine.sync_engine.pool, "checkout", count)

    async def pid(driver: Any) -> int:
        return int(await driver.fetchval("SELECT pg_backend_pid()"))

    async def divide(driver: Any) -> int:
        return int(await driver.fetchval("SELECT 1 / 0"))

    try:
        first = await writes.run_driver(pid)
        assert await writes.run_driver(pid) == first and checkouts == 1  # held: no ping
        with pytest.raises(DBAPIError) as refused:  # the server refusing: kept
            await writes.run_driver(divide)
        assert type(refused.value.orig).__name__ == "DivisionByZeroError"
        assert await writes.run_driver(pid) == first and checkouts == 1
        monkeypatch.setattr(engine_mod, "DRIVER_IDLE_S", 0.0)  # idle: back to the pool
        await writes.run_driver(pid)
        assert checkouts == 2
        monkeypatch.setattr(engine_mod, "DRIVER_IDLE_S", 30.0)

        async def kill(driver: Any) -> None:  # the backend dies under the statement
            await driver.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        with pytest.raises(DBAPIError) as broken:
            await writes.run_driver(kill)
        assert broken.value.connection_invalidated
        assert await writes.run_driver(pid) != first  # a new connection, and it works
        await writes.close()
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await writes.close()
        await engine.dispose()


async def test_json_columns_keep_values_orjson_cannot_write(database_url: str) -> None:
    """JSON columns are written with orjson, and with the standard library where orjson
    refuses (integers beyond 64 bits, non-string keys): every value still saves, exactly."""
    value = {"big": 2**70, "text": "déploiement", "nested": [1.5, None, {"ok": True}]}
    async with serve_store(database_url) as (store, writes):
        stored = await store.add("", delivery("json-1"))
        set_misses = (
            events.update()
            .where(events.c.id == stored.event_id)
            .values(rule_misses=bindparam("v", type_=events.c.rule_misses.type))
        )
        for misses, expected in ((value, value), ({1: "one"}, {"1": "one"})):
            await writes.run(lambda conn, v: conn.execute(set_misses, {"v": v}), misses)
            [(read,)] = await stored_rows(database_url, events.c.rule_misses)
            assert read == expected
