"""docs/actions.md is `deploybot actions list --markdown`, and every example in it is a
step `deploybot rules check` accepts."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from bot.cli.actions import markdown, text_lines
from bot.rules.loader import check_rules, default_registry

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "actions.md"


def test_docs_actions_md_is_the_generated_reference() -> None:
    assert DOC.read_text() == markdown(), (
        "docs/actions.md is stale: run `deploybot actions list --markdown > docs/actions.md`"
    )


def test_the_command_prints_it() -> None:
    found = subprocess.run(
        [sys.executable, "-m", "bot", "actions", "list", "--markdown"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert found.stdout == DOC.read_text()
    plain = subprocess.run(
        [sys.executable, "-m", "bot", "actions", "list"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    assert plain.stdout.splitlines() == list(text_lines())


def test_every_action_is_documented_with_an_example_that_checks(tmp_path: Path) -> None:
    doc = DOC.read_text()
    names = re.findall(r"^### `([a-z_.]+)`$", doc, re.M)
    assert names == sorted(default_registry())
    examples = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    assert len(examples) == len(names)
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "model.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    rules = ["rules:"]
    for n, example in enumerate(examples):
        rules.append(
            f"  - name: example-{n}\n    on: {{events: [jira:issue_updated]}}\n    do:\n"
            + textwrap.indent(example, "      ")
        )
    (tmp_path / "examples.yaml").write_text("\n".join(rules))
    ruleset, errors = check_rules(tmp_path, http_allowed_hosts=("hooks.example.com",))
    assert errors == [] and ruleset is not None
    assert len(ruleset.rules) == len(names)
