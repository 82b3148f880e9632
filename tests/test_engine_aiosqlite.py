"""Closing an aiosqlite connection that is being stopped returns instead of hanging."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiosqlite

from bot.db.engine import create_engine


async def test_close_while_a_stop_is_pending_does_not_wait_forever(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")  # installs the guard
    await engine.dispose()
    conn = await aiosqlite.connect(tmp_path / "other.sqlite")
    pending = conn.stop()  # e.g. SQLAlchemy terminating it; the worker has not run it yet
    # Unguarded, close() queued a second stop behind the worker's exit and never returned.
    with contextlib.suppress(ValueError):  # "Connection closed": it is stopping already
        await asyncio.wait_for(conn.close(), timeout=5)
    assert pending is not None
    await asyncio.wait_for(pending, timeout=5)
    assert conn.stop() is None
