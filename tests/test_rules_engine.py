"""Every condition operator and combinator on realistic Jira payloads."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from bot.rules.conditions import resolve
from bot.rules.engine import evaluate
from bot.rules.loader import load_rules
from tests.helpers import REGISTRY, payload, write_rules

_STEP = """
    do:
      - action: genesys.post_webdeployments_configuration_versions_draft_publish
        with: {configuration_id: abc}
"""


def _rule(name: str, when: str, events: str = "[jira:issue_updated]", extra: str = "") -> str:
    when_block = textwrap.indent(textwrap.dedent(when).strip("\n"), "      ")
    step_block = textwrap.indent(textwrap.dedent(_STEP).strip("\n"), "    ")
    return (
        f"  - name: {name}\n{extra}    on:\n      events: {events}\n"
        f"    when:\n{when_block}\n{step_block}\n"
    )


def _reason(tmp_path: Path, when: str, event: dict[str, Any]) -> str | None:
    """Load one rule with this `when:` and return None on a match, else the miss reason."""
    write_rules(tmp_path, {"r.yaml": "rules:\n" + _rule("r", when, f"[{event['webhookEvent']}]")})
    result = evaluate(load_rules(tmp_path, REGISTRY), event)
    if result.matched:
        return None
    (miss,) = result.missed
    return miss.reason


UPDATED = "jira_issue_updated"
CREATED = "jira_issue_created"
COMMENT = "jira_comment_created"

CASES = [
    # equals / not_equals
    (UPDATED, "- {field: issue.fields.status.name, equals: Ready to deploy}", None),
    (
        UPDATED,
        "- {field: issue.fields.status.name, equals: Done}",
        "issue.fields.status.name: 'Ready to deploy' does not equal 'Done'",
    ),
    (UPDATED, "- {field: issue.fields.project.key, not_equals: ML}", None),
    (
        UPDATED,
        "- {field: issue.fields.project.key, not_equals: OPS}",
        "issue.fields.project.key: 'OPS' equals 'OPS'",
    ),
    (UPDATED, "- {field: issue.fields.status.statusCategory.id, equals: 4}", None),
    # in / not_in
    (UPDATED, "- {field: issue.fields.priority.name, in: [High, Highest]}", None),
    (
        CREATED,
        "- {field: issue.fields.status.name, in: [Done]}",
        "issue.fields.status.name: 'Open' is not in ['Done']",
    ),
    (CREATED, "- {field: issue.fields.status.name, not_in: [Done, Closed]}", None),
    (
        CREATED,
        "- {field: issue.fields.status.name, not_in: [Open]}",
        "issue.fields.status.name: 'Open' is in ['Open']",
    ),
    # contains: list membership and substring
    (UPDATED, "- {field: issue.fields.labels, contains: model-x}", None),
    (
        CREATED,
        "- {field: issue.fields.labels, contains: model-x}",
        "issue.fields.labels: [] does not contain 'model-x'",
    ),
    (COMMENT, "- {field: comment.body, contains: /publish}", None),
    (
        COMMENT,
        "- {field: comment.author, contains: Mia}",
        "comment.author: {'accountId': '5b10ac8d82e05b22cc7d4ef5', 'displayName': 'Mia Krystof', "
        "'acti... "
        "does not contain 'Mia'",
    ),
    # matches (re.search)
    (CREATED, "- {field: issue.fields.summary, matches: '(?i)hotfix'}", None),
    (
        UPDATED,
        "- {field: issue.fields.summary, matches: '^HOTFIX'}",
        "issue.fields.summary: 'Roll out churn model v7' does not match '^HOTFIX'",
    ),
    (UPDATED, "- {field: issue.id, matches: '^100'}", None),
    # exists: null counts as absent
    (UPDATED, "- {field: issue.fields.assignee, exists: true}", None),
    (CREATED, "- {field: issue.fields.assignee, exists: true}", "issue.fields.assignee: is null"),
    (CREATED, "- {field: issue.fields.assignee, exists: false}", None),
    (CREATED, "- {field: issue.fields.nope, exists: false}", None),
    (CREATED, "- {field: issue.fields.nope, exists: true}", "issue.fields.nope: is missing"),
    (
        UPDATED,
        "- {field: issue.fields.customfield_10050, exists: false}",
        "issue.fields.customfield_10050: exists ('churn-model')",
    ),
    # a missing field fails every value operator
    (CREATED, "- {field: issue.fields.nope, not_equals: x}", "issue.fields.nope: is missing"),
    # numeric segments index lists
    (UPDATED, "- {field: issue.fields.components.0.name, equals: churn}", None),
    (UPDATED, "- {field: changelog.items.-1.fieldId, equals: fixVersions}", None),
    (UPDATED, "- {field: issue.fields.labels.5, exists: false}", None),
    # changed: by field or fieldId, optional from/to against fromString/toString
    (UPDATED, "- changed: status", None),
    (UPDATED, "- {changed: status, from: In Review, to: Ready to deploy}", None),
    (UPDATED, "- {changed: fixVersions, from: null, to: '2024.06'}", None),
    (UPDATED, "- {changed: Fix Version, to: '2024.06'}", None),
    (
        UPDATED,
        "- {changed: status, to: Done}",
        "changed status: to 'Ready to deploy', not 'Done'",
    ),
    (
        UPDATED,
        "- {changed: status, from: Open}",
        "changed status: from 'In Review', not 'Open'",
    ),
    (
        UPDATED,
        "- changed: assignee",
        "changed assignee: no changelog item for 'assignee'",
    ),
    (CREATED, "- changed: status", "changed status: the event has no changelog"),
    # combinators
    (
        CREATED,
        """
        - any:
            - {field: issue.fields.priority.name, in: [High, Highest]}
            - {field: issue.fields.summary, matches: '(?i)hotfix'}
        """,
        None,
    ),
    (
        UPDATED,
        """
        - any:
            - {field: issue.fields.priority.name, in: [Highest]}
            - {field: issue.fields.summary, matches: '(?i)hotfix'}
        """,
        "any: none held (issue.fields.priority.name: 'High' is not in ['Highest']; "
        "issue.fields.summary: 'Roll out churn model v7' does not match '(?i)hotfix')",
    ),
    (
        UPDATED,
        """
        - all:
            - {field: issue.fields.project.key, equals: OPS}
            - {field: issue.fields.issuetype.name, equals: Bug}
        """,
        "issue.fields.issuetype.name: 'Deployment' does not equal 'Bug'",
    ),
    (CREATED, "- not: {field: issue.fields.status.name, in: [Done, Closed]}", None),
    (
        CREATED,
        "- not: {field: issue.fields.status.name, equals: Open}",
        "not: issue.fields.status.name equals 'Open' held",
    ),
    (
        UPDATED,
        """
        - not:
            - {field: issue.fields.project.key, equals: OPS}
            - changed: status
        """,
        "not: all(issue.fields.project.key equals 'OPS'; changed status) held",
    ),
    # the first failing condition is the one reported
    (
        UPDATED,
        """
        - {field: issue.fields.project.key, equals: OPS}
        - {field: issue.fields.labels, contains: wip}
        - {field: issue.fields.status.name, equals: Done}
        """,
        "issue.fields.labels: ['model-x', 'q2'] does not contain 'wip'",
    ),
]


@pytest.mark.parametrize(("fixture", "when", "reason"), CASES)
def test_condition(tmp_path: Path, fixture: str, when: str, reason: str | None) -> None:
    assert _reason(tmp_path, when, payload(fixture)) == reason


def test_only_rules_of_the_event_are_considered_and_disabled_never_match(tmp_path: Path) -> None:
    always = "- {field: issue.key, exists: true}"
    text = "rules:\n" + "".join(
        [
            _rule("on-update", always),
            _rule("on-create", always, "[jira:issue_created]"),
            _rule("on-both", always, "[jira:issue_created, jira:issue_updated]"),
            _rule("off", always, extra="    enabled: false\n"),
        ]
    )
    ruleset = load_rules(write_rules(tmp_path, {"r.yaml": text}), REGISTRY)
    updated = evaluate(ruleset, payload(UPDATED))
    assert [r.name for r in updated.matched] == ["on-update", "on-both"]
    assert [(m.rule_name, m.reason) for m in updated.missed] == [("off", "rule is disabled")]
    created = evaluate(ruleset, payload(CREATED))
    assert [r.name for r in created.matched] == ["on-create", "on-both"]
    assert evaluate(ruleset, {"webhookEvent": "comment_deleted"}).matched == []
    assert evaluate(ruleset, {"no": "event"}).matched == []


def test_index_holds_only_the_rules_of_each_event(tmp_path: Path) -> None:
    always = "- {field: issue.key, exists: true}"
    text = "rules:\n" + "".join(_rule(f"r{i}", always, "[comment_created]") for i in range(50))
    text += _rule("update", always)
    ruleset = load_rules(write_rules(tmp_path, {"r.yaml": text}), REGISTRY)
    assert [r.name for r in ruleset.for_event("jira:issue_updated")] == ["update"]
    assert len(ruleset.for_event("comment_created")) == 50
    assert ruleset.events == {"comment_created", "jira:issue_updated"}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("issue.key", "OPS-42"),
        ("issue.fields.labels.1", "q2"),
        ("issue.fields.labels.-1", "q2"),
        ("issue.fields.description", None),
        ("changelog.items.0.toString", "Ready to deploy"),
    ],
)
def test_resolve_paths(path: str, expected: Any) -> None:
    assert resolve(payload(UPDATED), path.split(".")) == expected


@pytest.mark.parametrize(
    "path", ["issue.nope", "issue.fields.labels.2", "issue.fields.labels.x", "issue.key.0"]
)
def test_resolve_missing(path: str) -> None:
    from bot.rules.conditions import MISSING

    assert resolve(payload(UPDATED), path.split(".")) is MISSING


def test_rules_package_imports_neither_aiohttp_nor_sqlalchemy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, pkgutil, importlib, bot.rules, bot.cli.rules; "
        "[importlib.import_module(m.name) "
        "for m in pkgutil.iter_modules(bot.rules.__path__, 'bot.rules.')]; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'sqlalchemy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
