"""The tenant cache: hits served without the database, unknown issuers bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.db import tenants as tenants_module
from bot.db.engine import create_engine, upgrade
from bot.db.tenants import Tenants


async def test_a_flood_of_unknown_issuers_keeps_the_cache_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tenants_module, "CACHE_MAX_ENTRIES", 50)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
    try:
        await upgrade(engine)
        known = Tenants(engine)
        await known.install("jira-known", "s" * 40, "https://example.atlassian.net")
        assert await known.active_secret("jira-known") == "s" * 40
        for i in range(500):
            assert await known.get(f"forged-{i}") is None
            assert len(known._cache) <= 50
        # the real tenant is still served, and still right
        assert await known.active_secret("jira-known") == "s" * 40
    finally:
        await engine.dispose()
