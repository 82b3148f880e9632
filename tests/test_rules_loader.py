"""Rule file checking: every error with its exact line, all files in one pass."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bot.core import apis
from bot.errors import RuleError
from bot.rules.conditions import AnyOf, ChangedCondition, FieldCondition, NotOf
from bot.rules.loader import check_rules, load_rules
from tests.helpers import REGISTRY, write_rules

REPO_RULES = Path(__file__).parent.parent / "rules"

HEAD = """\
rules:
  - name: r
    on:
      events: [jira:issue_updated]
"""
# A valid step; cases below replace parts of it.
STEP = """\
    do:
      - id: version
        action: ubiops.deployment_versions_create
        with:
          project_name: ml-prod
          deployment_name: churn
          data: {version: v1}
"""


def _errors(folder: Path, files: dict[str, str]) -> list[str]:
    """Return the errors of these files, with the folder prefix cut for readability."""
    write_rules(folder, files)
    ruleset, errors = check_rules(folder, REGISTRY)
    assert (ruleset is None) == bool(errors)
    return [e.removeprefix(f"{folder}/") for e in errors]


ERROR_CASES = [
    (
        "yaml syntax",
        HEAD + "    when: [\n" + STEP,
        ["r.yaml:7: YAML syntax error: expected the node content, but found '-'"],
    ),
    (
        "unknown rule key",
        HEAD + "    nmae: x\n" + STEP,
        [
            "r.yaml:5: unknown key 'nmae' in a rule "
            "(expected: name, description, enabled, on, when, concurrency, do, on_failure)"
        ],
    ),
    (
        "wrong types",
        HEAD.replace("name: r", "name: [r]") + "    enabled: yes\n" + STEP,
        [
            "r.yaml:2: name must be a string, not a list",
            "r.yaml:5: enabled must be true or false, not a string",
        ],
    ),
    (
        "missing keys",
        "rules:\n  - name: r\n    description: no on, no do\n",
        ["r.yaml:2: a rule needs 'on'", "r.yaml:2: a rule needs 'do'"],
    ),
    (
        "top level",
        "- name: r\n",
        ["r.yaml:1: a rule file must be a mapping, not a list"],
    ),
    (
        "duplicate key",
        HEAD + "    description: a\n    description: b\n" + STEP,
        ["r.yaml:6: duplicate key 'description' in a rule"],
    ),
    (
        "unknown event",
        HEAD.replace("jira:issue_updated", "jira:issue_moved") + STEP,
        [
            "r.yaml:4: unknown Jira webhook event 'jira:issue_moved' (expected: "
            "jira:issue_created, jira:issue_updated, jira:issue_deleted, comment_created, "
            "comment_updated, comment_deleted, issue_property_set, issue_property_deleted, or"
            " a Forge event: avi:jira:created:issue, avi:jira:updated:issue,"
            " avi:jira:deleted:issue, avi:jira:commented:issue, avi:jira:created:comment,"
            " avi:jira:updated:comment, avi:jira:deleted:comment)"
        ],
    ),
    (
        "unsupported jql",
        HEAD + "      jql: project = OPS AND priority = High\n" + STEP,
        [
            "r.yaml:5: on.jql: Jira's webhook filter cannot take this: column 19: field "
            "'priority' is not supported in a webhook filter (supported: issueKey, project, "
            "issuetype, status, assignee, reporter, issue.property[...], and cf[NNNNN] for the "
            "epic label field)"
        ],
    ),
    (
        "unknown operator",
        HEAD + "    when:\n      - field: issue.key\n        greater_than: 3\n" + STEP,
        [
            "r.yaml:6: a field condition needs exactly one operator (has none)",
            "r.yaml:7: unknown condition operator 'greater_than' (expected one of: equals, "
            "not_equals, in, not_in, contains, matches, exists)",
        ],
    ),
    (
        "two operators, no head, bad list",
        HEAD
        + "    when:\n"
        + "      - {field: issue.key, equals: A, in: [A]}\n"
        + "      - {equals: A}\n"
        + "      - {field: issue.key, in: A}\n"
        + STEP,
        [
            "r.yaml:6: a field condition needs exactly one operator (has equals, in)",
            "r.yaml:7: a condition needs exactly one of field, changed, all, any, not",
            "r.yaml:8: in takes a list, not a string",
        ],
    ),
    (
        "changed extras and combinator extras",
        HEAD
        + "    when:\n"
        + "      - {changed: status, too: Done}\n"
        + "      - any: []\n"
        + "        label: x\n"
        + STEP,
        [
            "r.yaml:6: unknown key 'too' next to changed: (expected from, to)",
            "r.yaml:7: any: needs at least one condition",
            "r.yaml:8: unknown key 'label' next to any:",
        ],
    ),
    (
        "invalid regular expression",
        HEAD + "    when:\n      - any:\n          - {field: issue.key, matches: '(OPS'}\n" + STEP,
        [
            "r.yaml:7: invalid regular expression '(OPS': "
            "missing ), unterminated subpattern at position 0"
        ],
    ),
    (
        "unknown action",
        HEAD + STEP.replace("deployment_versions_create", "deployment_version_create"),
        [
            "r.yaml:7: unknown action 'ubiops.deployment_version_create' "
            "(did you mean 'ubiops.deployment_versions_create'?)"
        ],
    ),
    (
        "unknown and missing parameters",
        HEAD + STEP.replace("          data: {version: v1}\n", "          dataa: {version: v1}\n"),
        [
            "r.yaml:8: ubiops.deployment_versions_create needs parameter 'data'",
            "r.yaml:11: ubiops.deployment_versions_create takes no parameter 'dataa' "
            "(it takes: data, deployment_name, project_name)",
        ],
    ),
    (
        "missing with altogether, and a mapping for a path parameter",
        HEAD
        + "    do:\n"
        + "      - action: ubiops.deployment_versions_get\n"
        + "      - action: ubiops.deployments_list\n"
        + "        with:\n"
        + "          project_name: {name: ml}\n"
        + "          labels: 'team:ml'\n",
        [
            "r.yaml:6: ubiops.deployment_versions_get needs parameter 'deployment_name'",
            "r.yaml:6: ubiops.deployment_versions_get needs parameter 'project_name'",
            "r.yaml:6: ubiops.deployment_versions_get needs parameter 'version'",
            "r.yaml:9: ubiops.deployments_list: project_name is a path parameter "
            "and takes a single value, not a mapping",
        ],
    ),
    (
        "template syntax error, inline and in a literal block",
        HEAD
        + STEP.replace("churn", "'{{ issue.key | lower }'").replace(
            "data: {version: v1}",
            "data:\n            version: |\n              a\n              {% if x %}b\n",
        ),
        [
            "r.yaml:10: template error in with.deployment_name: unexpected '}'",
            "r.yaml:14: template error in with.data.version: Unexpected end of template. "
            "Jinja was looking for the following tags: 'elif' or 'else' or 'endif'. The "
            "innermost block that needs to be closed is 'if'.",
        ],
    ),
    (
        "a sandbox escape: private names refused at load, not only when rendered",
        HEAD
        + STEP.replace("churn", "'{{ cycler.__init__.__globals__ }}'").replace(
            "version: v1", "version: \"{{ issue['_x'] }}\""
        ),
        [
            "r.yaml:10: with.deployment_name: templates may not read private names "
            "('__init__', '__globals__')",
            "r.yaml:11: with.data.version: templates may not read private names ('_x')",
        ],
    ),
    (
        "duplicate step id, steps.X not earlier",
        HEAD
        + "    do:\n"
        + "      - id: version\n"
        + "        action: ubiops.deployment_versions_get\n"
        + "        with: {project_name: p, deployment_name: d, version: '{{ steps.upload.id }}'}\n"
        + "      - id: upload\n"
        + "        action: ubiops.deployment_versions_get\n"
        + "        with: {project_name: p, deployment_name: d, version: \"{{ steps['nope'] }}\"}\n"
        + "      - id: version\n"
        + "        action: ubiops.deployment_versions_get\n"
        + "        with: {project_name: p, deployment_name: d, version: '{{ steps.version.x }}'}\n",
        [
            "r.yaml:8: with.version: steps.upload is not the id of an earlier step in this rule "
            "(it is defined at a later step; steps run in order)",
            "r.yaml:11: with.version: steps.nope is not the id of an earlier step in this rule",
            "r.yaml:12: duplicate step id 'version' (first at line 6)",
        ],
    ),
    (
        "bad step id",
        HEAD + STEP.replace("id: version", "id: my-version"),
        [
            "r.yaml:6: step id 'my-version' must be letters, digits and _ "
            "(templates read it as steps.my-version)"
        ],
    ),
    (
        "file parameter missing, outside the folder, not a string",
        HEAD
        + "    do:\n"
        + "      - action: ubiops.revisions_file_upload\n"
        + "        with: {project_name: p, deployment_name: d, version: v, file: nope.zip}\n"
        + "      - action: ubiops.revisions_file_upload\n"
        + "        with: {project_name: p, deployment_name: d, version: v, file: ../x.zip}\n"
        + "      - action: ubiops.revisions_file_upload\n"
        + "        with: {project_name: p, deployment_name: d, version: v, file: 3}\n",
        [
            "r.yaml:7: file: no file 'nope.zip' in the rules folder",
            "r.yaml:9: file: '../x.zip' is outside the rules folder",
            "r.yaml:11: file must be a path (a string), not a number",
        ],
    ),
    (
        "a download target need not exist but must stay in the folder",
        HEAD
        + "    do:\n"
        + "      - action: ubiops.revisions_file_download\n"
        + "        with: {project_name: p, deployment_name: d, version: v, revision_id: r,\n"
        + "               save_to: downloads/new.zip}\n"
        + "      - action: ubiops.revisions_file_download\n"
        + "        with: {project_name: p, deployment_name: d, version: v, revision_id: r,\n"
        + "               save_to: /etc/cron.d/x}\n",
        ["r.yaml:11: save_to: '/etc/cron.d/x' is outside the rules folder"],
    ),
    (
        "property keys without a property event",
        HEAD + "      property_keys: [deploy-env]\n" + STEP,
        [
            "r.yaml:5: on.property_keys narrows only the events issue_property_set and "
            "issue_property_deleted; add one of them to on.events"
        ],
    ),
    (
        "no property keys",
        "rules:\n  - name: r\n    on:\n      events: [issue_property_set]\n"
        "      property_keys: []\n" + STEP,
        ["r.yaml:5: on.property_keys must name at least one key"],
    ),
    (
        "property keys not strings",
        "rules:\n  - name: r\n    on:\n      events: [issue_property_set]\n"
        "      property_keys: [{a: b}]\n" + STEP,
        ["r.yaml:5: each entry of on.property_keys must be a string, not a mapping"],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_error(tmp_path: Path, text: str, expected: list[str]) -> None:
    assert _errors(tmp_path / "rules", {"r.yaml": text}) == expected


def test_every_error_of_every_file_in_one_pass_and_duplicate_names(tmp_path: Path) -> None:
    errors = _errors(
        tmp_path / "rules",
        {
            "a.yaml": HEAD + STEP,
            "b.yaml": "rules:\n  - name: other\n    on: {events: []}\n" + STEP,
            "c.yaml": "# a second file with the same rule name\n" + HEAD + STEP,
            "d.yaml": "rules: [\n",
        },
    )
    assert errors == [
        "b.yaml:3: on.events must name at least one event",
        f"c.yaml:3: duplicate rule name 'r' (first at {tmp_path / 'rules' / 'a.yaml'}:2)",
        "d.yaml:2: YAML syntax error: expected the node content, but found '<stream end>'",
    ]
    with pytest.raises(RuleError) as caught:
        load_rules(tmp_path / "rules", REGISTRY)
    assert len(caught.value.errors) == 3


def test_file_is_shown_as_the_folder_path_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_rules(tmp_path / "rules", {"r.yaml": HEAD + "    nmae: x\n" + STEP})
    monkeypatch.chdir(tmp_path)
    (relative,) = check_rules(Path("rules"), REGISTRY)[1]
    assert relative.startswith("rules/r.yaml:5: unknown key 'nmae'")
    (absolute,) = check_rules(tmp_path / "rules", REGISTRY)[1]
    assert absolute.startswith(f"{tmp_path}/rules/r.yaml:5: ")
    (dotted,) = check_rules(Path("./rules/../rules"), REGISTRY)[1]
    assert dotted.startswith("rules/../rules/r.yaml:5: ")


def test_missing_folder(tmp_path: Path) -> None:
    assert check_rules(tmp_path / "nope", REGISTRY) == (
        None,
        [f"{tmp_path / 'nope'}:0: rules folder not found"],
    )


def test_valid_rule_is_built_with_its_source_and_yaml_12_booleans(tmp_path: Path) -> None:
    folder = write_rules(
        tmp_path / "rules",
        {
            "a.yaml": """
            # a comment first
            rules:
              - name: deploy
                description: Roll out.
                enabled: false
                on:
                  events: [jira:issue_updated, jira:issue_created]
                  jql: project = OPS
                  fields: [status]
                when:
                  - {changed: status, to: on}
                  - any:
                      - {field: issue.fields.flag, equals: no}
                  - not: {field: issue.fields.x, exists: true}
                do:
                  - id: version
                    action: ubiops.deployment_versions_create
                    with:
                      project_name: ml
                      deployment_name: "{{ issue.key }}"
                      data: {version: v1, on: true}
            """,
            "empty.yaml": "# nothing yet\n",
        },
    )
    ruleset = load_rules(folder, REGISTRY)
    (rule,) = ruleset.rules
    assert (rule.name, rule.description, rule.enabled) == ("deploy", "Roll out.", False)
    assert rule.events == ("jira:issue_updated", "jira:issue_created")
    assert (rule.jql, rule.fields) == ("project = OPS", ("status",))
    assert rule.source == f"{folder / 'a.yaml'}:3"
    changed, any_of, not_of = rule.conditions
    assert changed == ChangedCondition("status", to="on", has_to=True)
    assert isinstance(any_of, AnyOf) and isinstance(not_of, NotOf)
    assert any_of.conditions == (
        FieldCondition("issue.fields.flag", "equals", "no", ("issue", "fields", "flag")),
    )
    (step,) = rule.steps
    assert (step.id, step.action, step.index, step.line) == (
        "version",
        "ubiops.deployment_versions_create",
        0,
        16,
    )
    assert step.with_ == {
        "project_name": "ml",
        "deployment_name": "{{ issue.key }}",
        "data": {"version": "v1", "on": True},
    }


def test_version_is_a_content_hash_over_names_and_bytes(tmp_path: Path) -> None:
    folder = write_rules(tmp_path / "rules", {"a.yaml": HEAD + STEP})
    first = load_rules(folder, REGISTRY).version
    assert load_rules(folder, REGISTRY).version == first
    (folder / "a.yaml").rename(folder / "b.yaml")
    assert load_rules(folder, REGISTRY).version != first
    (folder / "b.yaml").write_text(HEAD + STEP + "# comment\n")
    assert load_rules(folder, REGISTRY).version not in (first,)
    assert len(first) == 64


def test_example_rules_pass_with_the_test_registry(tmp_path: Path) -> None:
    ruleset = load_rules(REPO_RULES, REGISTRY)
    assert {r.name for r in ruleset.rules} == {
        "deploy-model-when-ready",
        "publish-web-config-on-done",
        "publish-web-config-on-comment",
    }


def test_example_rules_pass_with_the_real_registry(tmp_path: Path) -> None:
    # A copy, so the check cannot depend on anything but the shipped folder.
    shutil.copytree(REPO_RULES, tmp_path / "rules")
    ruleset, errors = check_rules(tmp_path / "rules")
    assert errors == []
    assert ruleset is not None and len(ruleset.rules) == 3
    assert "ubiops.deployment_versions_create" in apis.registry()


def test_yaml_error_names_where_the_unclosed_part_started(tmp_path: Path) -> None:
    text = HEAD + '    description: "unclosed\n' + STEP
    assert _errors(tmp_path / "rules", {"r.yaml": text}) == [
        "r.yaml:13: YAML syntax error: found unexpected end of stream "
        "(while scanning a quoted scalar at line 5)"
    ]


def test_property_keys_are_read_for_property_events(tmp_path: Path) -> None:
    text = (
        "rules:\n  - name: r\n    on:\n      events: [issue_property_set, jira:issue_updated]\n"
        "      jql: project = OPS\n      property_keys: [deploy-env, deploy-target]\n" + STEP
    )
    write_rules(tmp_path, {"r.yaml": text})
    [rule] = load_rules(tmp_path, REGISTRY).rules
    assert rule.property_keys == ("deploy-env", "deploy-target")
