"""Hot reload on a real folder: a broken edit keeps the last good rule set."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from bot.rules.watcher import RuleWatcher
from tests.helpers import REGISTRY, wait_for

RULE = """\
rules:
  - name: {name}
    on: {{events: [jira:issue_updated]}}
    do:
      - action: genesys.post_webdeployments_configuration_versions_draft_publish
        with: {{configuration_id: abc}}
"""


def _write(path: Path, text: str) -> None:
    """Write and move the mtime forward, as a later save would."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    stat = path.stat()
    if stat.st_mtime_ns <= before:  # coarse clocks: make the save visible
        os.utime(path, ns=(stat.st_atime_ns, before + 1_000_000))


def test_reload_keeps_last_good_set(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    _write(rules / "a.yaml", RULE.format(name="first"))
    watcher = RuleWatcher(rules, REGISTRY)
    assert watcher.loaded and watcher.errors == []
    assert [r.name for r in watcher.current.rules] == ["first"]
    good = watcher.current
    assert watcher.check() is False  # nothing changed

    _write(rules / "a.yaml", RULE.format(name="second"))
    assert watcher.check() is True
    assert [r.name for r in watcher.current.rules] == ["second"]
    second = watcher.current
    assert second.version != good.version

    caplog.set_level(logging.WARNING, logger="bot.rules.watcher")
    broken = RULE.format(name="third").replace("abc}", "abc, nope: 1}")
    _write(rules / "a.yaml", broken + "  - name: x\n    on: {}\n")
    _write(rules / "b.yaml", "rules: [\n")
    assert watcher.check() is False
    assert watcher.current is second
    assert len(watcher.errors) == 4
    assert watcher.errors[0].startswith(f"{rules / 'a.yaml'}:6: genesys.post_webdeployments")
    assert watcher.errors[-1].startswith(f"{rules / 'b.yaml'}:2: YAML syntax error")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert all(second.version[:12] in w for w in warnings)
    assert watcher.check() is False  # the same broken files are not reported again
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 4

    (rules / "b.yaml").unlink()
    _write(rules / "a.yaml", RULE.format(name="second"))  # back to the rules in force
    assert watcher.check() is False
    assert watcher.errors == [] and watcher.current is second

    _write(rules / "c.yaml", RULE.format(name="third"))
    assert watcher.check() is True
    assert [r.name for r in watcher.current.rules] == ["second", "third"]


def test_broken_start_has_no_rules_until_fixed(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    watcher = RuleWatcher(rules, REGISTRY)
    assert not watcher.loaded and watcher.current.rules == ()
    assert watcher.errors == [f"{rules}:0: rules folder not found"]
    rules.mkdir()
    assert watcher.check() is True  # an empty folder is a good (empty) set
    assert watcher.loaded and watcher.errors == []


async def test_run_polls_until_cancelled(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    _write(rules / "a.yaml", RULE.format(name="first"))
    watcher = RuleWatcher(rules, REGISTRY)
    task = asyncio.create_task(watcher.run(0.01))
    _write(rules / "a.yaml", RULE.format(name="polled"))
    await wait_for(lambda: watcher.current.rules[0].name == "polled", timeout_s=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
