"""The command line: events list/show as CONTRACT.md says, db upgrade, settings errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from bot.cli.main import main
from bot.settings import Settings
from tests.conftest import ClientFactory
from tests.helpers import PAYLOAD, headers, issue_updated, wait_for, write_rollout_rules


async def _store_three(make_client: ClientFactory, settings: Settings) -> None:
    client = await make_client(settings)
    for i in range(3):
        resp = await client.post("/webhooks/jira", json=PAYLOAD, headers=headers(f"cli-{i}"))
        assert resp.status == 202


def _run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, *argv: str
) -> tuple[int, str, str]:
    monkeypatch.setenv("DEPLOYBOT_DATABASE_URL", url)
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_events_list_and_show(
    make_client: ClientFactory,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await _store_three(make_client, settings)
    url = settings.database_url

    # The CLI runs its own event loop: call it from a worker thread.
    async def run(*argv: str) -> tuple[int, str, str]:
        return await asyncio.to_thread(_run, monkeypatch, capsys, url, *argv)

    # The worker processes the events (no rules here); wait until it has.
    rows: list[dict[str, Any]] = []

    async def processed() -> bool:
        code, out, _ = await run("events", "list", "--json")
        assert code == 0
        rows[:] = [json.loads(line) for line in out.splitlines()]
        return all(r["status"] == "processed" for r in rows)

    await wait_for(processed, timeout_s=10)
    assert [r["delivery_id"] for r in rows] == ["cli-2", "cli-1", "cli-0"]
    for key in ("id", "delivery_id", "webhook_event", "status", "received_at"):
        assert all(key in r for r in rows)
    code, out, _ = await run("events", "list", "--json", "--limit", "1", "--status", "processed")
    assert len(out.splitlines()) == 1
    code, out, _ = await run("events", "list", "--status", "failed")
    assert out == ""
    code, out, _ = await run("events", "show", str(rows[0]["id"]), "--json")
    shown = json.loads(out)
    assert shown["delivery_id"] == "cli-2"
    assert json.loads(shown["payload"]) == PAYLOAD
    assert shown["action_runs"] == []
    code, out, _ = await run("events", "show", str(rows[0]["id"]))
    assert "cli-2" in out
    code, _, err = await run("events", "show", "999999")
    assert code == 1
    assert "no event 999999" in err


async def test_text_mode_header_payload_and_match_lines(
    make_client: ClientFactory,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = await make_client(settings, rules_dir=write_rollout_rules(tmp_path))
    resp = await client.post(
        "/webhooks/jira", data=json.dumps(issue_updated("OPS-31")), headers=headers("d-31")
    )
    event_id = int((await resp.json())["event_id"])

    async def run(*argv: str) -> tuple[int, str, str]:
        return await asyncio.to_thread(_run, monkeypatch, capsys, settings.database_url, *argv)

    async def processed() -> bool:
        _, out, _ = await run("events", "show", str(event_id), "--json")
        return bool(json.loads(out)["status"] == "processed")

    await wait_for(processed, timeout_s=10)
    code, out, err = await run("events", "list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == [
        "id", "status", "outcome", "received_at", "webhook_event", "issue", "delivery_id",
    ]  # fmt: skip
    assert row.split()[0] == str(event_id) and "OPS-31" in row
    assert "Context impl" not in err and "non-transactional DDL" not in err
    code, out, _ = await run("events", "show", str(event_id))
    assert code == 0
    lines = out.splitlines()
    assert "  MATCH roll-out" in lines  # no dangling colon: a match has no reason
    assert any(line.startswith("  miss  only-hotfixes: ") for line in lines)
    payload = out[out.index("payload:\n") + len("payload:\n") :]
    assert json.loads(payload) == issue_updated("OPS-31")


def test_bad_setting_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEPLOYBOT_PORT", "http")
    assert main(["db", "upgrade"]) == 2
    assert "DEPLOYBOT_PORT must be a whole number" in capsys.readouterr().err
