"""The second edition of the rule language: checks with file:line, stored conditions,
durations, typed templates. Pure: no database, no network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.errors import TemplateRenderError
from bot.rules.loader import check_rules
from bot.rules.templates import compile_template
from bot.rules.workflow import Control, build_conditions, check, parse_duration
from tests.helpers import write_rules

HEAD = """\
rules:
  - name: r
    on:
      events: [jira:issue_updated]
"""
CREATE = """\
      - id: version
        action: ubiops.deployment_versions_create
        with: {project_name: p, deployment_name: d, data: {version: v1}}
"""
GET = """\
      - id: build
        action: ubiops.revisions_get
        with: {project_name: p, deployment_name: d, version: v1, revision_id: r}
"""


def _errors(folder: Path, text: str) -> list[str]:
    write_rules(folder, {"r.yaml": text})
    ruleset, errors = check_rules(folder)
    assert (ruleset is None) == bool(errors)
    return [e.removeprefix(f"{folder}/") for e in errors]


CASES = [
    (
        "if reads a step that does not exist",
        HEAD + "    do:\n" + CREATE + GET + "        if: [{field: steps.nope.x, exists: true}]\n",
        ["r.yaml:12: if: steps.nope is not the id of an earlier step"],
    ),
    (
        "if reads a later step",
        HEAD + "    do:\n" + GET + "        if: [{field: steps.version.x, equals: 1}]\n" + CREATE,
        [
            "r.yaml:9: if: steps.version is not the id of an earlier step "
            "(it is defined at a later step; steps run in order)"
        ],
    ),
    (
        "until without a timeout",
        HEAD + "    do:\n" + GET + "        until: [{field: result.status, equals: success}]\n",
        [
            "r.yaml:9: until needs a timeout (e.g. timeout: 2h): a wait must end even if "
            "the condition never holds"
        ],
    ),
    (
        "a bad duration",
        HEAD
        + "    do:\n"
        + GET
        + "        until: [{field: result.status, equals: success}]\n"
        + "        every: soon\n        timeout: 2h\n",
        ["r.yaml:10: every: 'soon' is not a duration (e.g. 30s, 10m, 2h, 1h30m, 1d)"],
    ),
    (
        "every without until",
        HEAD + "    do:\n" + GET + "        every: 10s\n",
        ["r.yaml:9: every belongs to until: (a step without until is called once)"],
    ),
    (
        "if reads result",
        HEAD + "    do:\n" + GET + "        if: [{field: result.status, equals: x}]\n",
        ["r.yaml:9: if: result is this step's answer: only until/fail_if read it"],
    ),
    (
        "a do step reads failure",
        HEAD + "    do:\n" + GET + '        if: "{{ failure.error }}"\n',
        ["r.yaml:9: if: failure is only known to on_failure steps"],
    ),
    (
        "a string condition with text around it",
        HEAD + "    do:\n" + GET + '        if: "yes {{ issue.key }}"\n',
        ['r.yaml:9: if: a string condition is one template expression, "{{ ... }}"'],
    ),
    (
        "a concurrency key reading steps",
        HEAD + '    concurrency: "m/{{ steps.version.version }}"\n    do:\n' + CREATE,
        [
            "r.yaml:5: concurrency: the key cannot render: it reads steps (a key is "
            "rendered when the event is planned, from the payload: changelog, comment, "
            "event, issue, issue_event_type_name, matchedWebhookIds, property, timestamp, "
            "user, webhookEvent)"
        ],
    ),
    (
        "a concurrency key with a misspelt name",
        HEAD + '    concurrency: "m/{{ isue.key }}"\n    do:\n' + CREATE,
        ["r.yaml:5: concurrency: the key cannot render: it reads isue (a key is rendered"],
    ),
    (
        "pending other than latest",
        HEAD + '    concurrency: {key: "m", pending: oldest}\n    do:\n' + CREATE,
        ["r.yaml:5: concurrency.pending: 'oldest' is not known (expected: latest)"],
    ),
    (
        "an on_failure step reads an unknown step",
        HEAD
        + "    do:\n"
        + CREATE
        + "    on_failure:\n"
        + GET.replace("version: v1", 'version: "{{ steps.nope.version }}"'),
        ["r.yaml:12: with.version: steps.nope is not the id of an earlier step in this rule"],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_misuse_is_reported_with_its_line(tmp_path: Path, text: str, expected: list[str]) -> None:
    errors = _errors(tmp_path / "rules", text)
    assert len(errors) == len(expected), errors
    for error, start in zip(errors, expected, strict=True):
        assert error.startswith(start), error


def test_a_full_workflow_loads_with_its_controls(tmp_path: Path) -> None:
    text = (
        HEAD
        + '    concurrency: {key: "ubiops/{{ issue.fields.customfield_10050 }}", pending: latest}\n'
        + "    do:\n"
        + CREATE
        + GET
        + "        until:\n"
        + "          - any: [{field: result.status, equals: success}, "
        + "{field: result.status, equals: failed}]\n"
        + "        every: 1m30s\n        timeout: 2h\n"
        + "        fail_if: [{field: result.status, equals: failed}]\n"
        + "      - action: ubiops.deployments_get\n"
        + "        if: \"{{ steps.build.status == 'success' }}\"\n"
        + "        with: {project_name: p, deployment_name: d}\n"
        + "    on_failure:\n"
        + "      - action: ubiops.deployment_versions_delete\n"
        + "        if: [{field: steps.version, exists: true}]\n"
        + '        with: {project_name: p, deployment_name: d, version: "{{ failure.step_id }}"}\n'
    )
    write_rules(tmp_path / "rules", {"r.yaml": text})
    ruleset, errors = check_rules(tmp_path / "rules")
    assert errors == []
    assert ruleset is not None
    rule = ruleset.rules[0]
    assert (rule.concurrency, rule.pending_latest) == (
        "ubiops/{{ issue.fields.customfield_10050 }}",
        True,
    )
    build = rule.steps[1].control
    assert (build.every_s, build.timeout_s, build.has_on_failure) == (90.0, 7200.0, True)
    # The stored form round-trips and decides the same.
    stored = Control.from_json(build.to_json())
    assert check(stored.until, {"result": {"status": "building"}}) is not None
    assert check(stored.until, {"result": {"status": "failed"}}) is None
    assert check(stored.fail_if, {"result": {"status": "failed"}}) is None
    assert [s.index for s in rule.on_failure] == [1000]
    assert check(rule.steps[2].control.if_, {"steps": {"build": {"status": "success"}}}) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("10m", 600.0), ("2h", 7200.0), ("1h30m", 5400.0), ("1d", 86400.0),
     ("500ms", 0.5), (30, 30.0), ("0s", None), ("10", None), ("ten", None), (True, None),
     (-5, None), ("1h 30m", None)],
)  # fmt: skip
def test_durations(text: Any, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


SMOKE_OK = {"field": "steps.smoke.success", "equals": True}


@pytest.mark.parametrize(
    ("raw", "context", "holds"),
    [
        ([SMOKE_OK], {"steps": {"smoke": {"success": True}}}, True),
        ([SMOKE_OK], {"steps": {"smoke": {"success": "true"}}}, False),
        ([{"not": {"field": "result.x", "exists": True}}], {"result": {}}, True),
        ([{"any": [{"field": "a", "equals": 1}, {"field": "a", "matches": "^2"}]}],
         {"a": "22"}, True),
        ("{{ result.n > 2 }}", {"result": {"n": 3}}, True),
        ("{{ result.n > 2 }}", {"result": {"n": 1}}, False),
        ("{{ result.missing }}", {"result": {}}, False),  # undefined: does not hold
        ("{{ result.text }}", {"result": {"text": "False"}}, True),  # data stays data
    ],
)  # fmt: skip
def test_stored_conditions_decide(raw: Any, context: dict[str, Any], holds: bool) -> None:
    assert (check(raw, context) is None) is holds


def test_a_stored_condition_of_unknown_shape_is_an_error() -> None:
    with pytest.raises(TemplateRenderError):
        build_conditions({"field": "x"})


@pytest.mark.parametrize(
    ("source", "context", "value"),
    [
        ("{{ x }}", {"x": 3}, 3),
        ("{{ x }}", {"x": 2.5}, 2.5),
        ("{{ x }}", {"x": True}, True),
        ("{{ x }}", {"x": None}, None),
        ("{{ x }}", {"x": ["en-us", "fr"]}, ["en-us", "fr"]),
        ("{{ x }}", {"x": {"a": [1]}}, {"a": [1]}),
        ("{{ x + ['de'] }}", {"x": ["en-us"]}, ["en-us", "de"]),
        ("{{ x | default(3) }}", {}, 3),
        ("{{x}}", {"x": 1}, 1),
        ("{{- x -}}", {"x": 1}, 1),
        ("v{{ x }}", {"x": 1}, "v1"),  # text around it: a string
        ("{{ x }} ", {"x": 1}, "1 "),
        ("{{ x }}{{ y }}", {"x": 1, "y": 2}, "12"),
        # Values from data are data: a string that looks like a list or a template stays.
        ("{{ x }}", {"x": "['en-us']"}, "['en-us']"),
        ("{{ x }}", {"x": "{{ 7 * 7 }}"}, "{{ 7 * 7 }}"),
        ("{{ x }}", {"x": "3"}, "3"),
    ],
)
def test_a_single_expression_keeps_its_type(
    source: str, context: dict[str, Any], value: Any
) -> None:
    rendered = compile_template(source).render(context)
    assert rendered == value
    assert type(rendered) is type(value)


def test_a_single_expression_is_strict_and_sandboxed() -> None:
    with pytest.raises(Exception, match="has no attribute 'missing'"):
        compile_template("{{ x.missing }}").render({"x": {}})
    with pytest.raises(Exception, match="is undefined"):
        compile_template("{{ nothing }}").render({})
    with pytest.raises(Exception, match="unsafe"):
        compile_template("{{ x.__class__ }}").render({"x": {}})


def test_rules_test_says_what_each_control_decides_and_what_it_cannot_know(
    tmp_path: Path,
) -> None:
    from bot.rules.dryrun import dry_run
    from bot.rules.loader import load_rules

    text = (
        "rules:\n  - name: r\n    on: {events: [jira:issue_updated], jql: project = OPS}\n"
        + '    concurrency: "m/{{ issue.key }}"\n'
        + "    do:\n"
        + CREATE
        + "        if: [{field: issue.fields.summary, matches: hotfix}]\n"
        + GET
        + "        until: [{field: result.status, equals: success}]\n"
        + "        every: 1m\n        timeout: 1h\n"
        + "        fail_if: [{field: result.status, equals: failed}]\n"
        + "      - action: ubiops.deployments_get\n"
        + "        if: \"{{ steps.build.status == 'success' }}\"\n"
        + "        with: {project_name: p, deployment_name: d}\n"
        + "    on_failure:\n"
        + "      - action: ubiops.deployments_get\n"
        + '        with: {project_name: p, deployment_name: "{{ failure.step_id }}"}\n'
    )
    write_rules(tmp_path / "rules", {"r.yaml": text})
    ruleset = load_rules(tmp_path / "rules")
    payload = {
        "webhookEvent": "jira:issue_updated",
        "issue": {"key": "OPS-1", "fields": {"project": {"key": "OPS"}, "summary": "Routine"}},
    }
    out = dry_run(ruleset, payload)
    assert "jql `project = OPS`: checked on the payload (no webhook of ours named): holds" in out
    assert "concurrency key: 'm/OPS-1': one run of this key at a time" in out
    assert (
        "if issue.fields.summary matches 'hotfix': does not hold "
        "(issue.fields.summary: 'Routine' does not match 'hotfix'): the step would be skipped"
    ) in out
    assert (
        "until result.status equals 'success': the answer is checked after each call, "
        "every 60s, timeout 3600s (not known before running)"
    ) in out
    assert "fail_if result.status equals 'failed': checked on the answer" in out
    assert (
        "if {{ steps.build.status == 'success' }}: not known before running "
        "(reads steps, the results of earlier steps)"
    ) in out
    assert "on_failure (only when a step above is dead; `failure` unknown now):" in out
    assert (
        "~failure.step_id~ is a placeholder: what failed is only known when a step is dead" in out
    )
    other = {**payload, "issue": {"key": "FOO-1", "fields": {"project": {"key": "FOO"}}}}
    assert "does not hold for this issue (checked on the event itself)" in dry_run(ruleset, other)


_ISSUE = {"id": "10042", "key": "OPS-42"}


@pytest.mark.parametrize(
    ("payload", "ref"),
    [
        (
            {"webhookEvent": "jira:issue_updated", "issue": _ISSUE, "changelog": {"id": "77"}},
            "t|10042|changelog:77",
        ),
        (  # the key when the id is missing
            {"webhookEvent": "jira:issue_updated", "issue": {"key": "OPS-1"},
             "changelog": {"id": 5}},
            "t|OPS-1|changelog:5",
        ),
        (
            {"webhookEvent": "comment_created", "issue": _ISSUE, "comment": {"id": "9"}},
            "t|10042|comment_created:9",
        ),
        (  # each edit of a comment is a change of its own
            {"webhookEvent": "comment_updated", "issue": _ISSUE,
             "comment": {"id": "9", "updated": "2026-12-04T10:00:00.000+0000"}},
            "t|10042|comment_updated:9@2026-12-04T10:00:00.000+0000",
        ),
        ({"webhookEvent": "jira:issue_updated", "issue": _ISSUE}, None),  # no changelog
        ({"webhookEvent": "jira:issue_created", "issue": _ISSUE, "changelog": {}}, None),
        ({"webhookEvent": "comment_created", "issue": _ISSUE, "comment": {"id": None}}, None),
        ({"webhookEvent": "jira:issue_updated", "changelog": {"id": "1"}}, None),  # no issue
        (
            {"webhookEvent": "jira:issue_updated", "issue": _ISSUE,
             "changelog": {"id": "x" * 400}},
            None,  # too long for the key column: no deduplication rather than a failure
        ),
    ],
)  # fmt: skip
def test_the_change_an_event_reports(payload: dict[str, Any], ref: str | None) -> None:
    from bot.rules.engine import change_ref

    assert change_ref(payload, "t") == ref
