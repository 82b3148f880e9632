"""The JQL checker accepts exactly what Jira's webhook filter takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.errors import SettingsError
from bot.rules.jql import JqlError, Undecided, check_jql, jql_holds
from bot.rules.loader import check_rules
from bot.settings import from_env

ACCEPTED = [
    "project = OPS",
    "project = OPS AND issuetype = Deployment",
    'project IN (OPS, "ML Platform") AND status != "In Progress"',
    "issueKey = OPS-42 OR issuekey IN (OPS-1, OPS-2)",
    "(project = OPS OR project = ML) AND status NOT IN (Done, Closed)",
    "assignee = 5b10ac8d82e05b22cc7d4ef5 and reporter != 5b10a2844c20165700ede21g",
    "issue.property[deploy].target = prod",
    "issue.property[deploy] = yes",
    "project=OPS AND status='Ready to deploy'",
    'status = "say \\"hi\\""',
    "((project = OPS))",
]


@pytest.mark.parametrize("jql", ACCEPTED)
def test_accepted(jql: str) -> None:
    assert check_jql(jql) is None


@pytest.mark.parametrize("named", ["customfield_10011", "cf[10011]", "10011", "CF[10011]"])
def test_the_epic_label_custom_field_is_accepted_once_named(named: str) -> None:
    jql = 'project = OPS AND cf[10011] IN ("Q3 models", churn)'
    assert check_jql(jql, epic_label_field=named) is None


@pytest.mark.parametrize(
    ("jql", "epic_label", "message"),
    [
        # Jira's webhook filter documents cf[id] only for the epic label field
        (
            "cf[10050] = churn-model",
            None,
            "column 1: custom field 'cf[10050]': Jira's webhook filter takes only the epic"
            " label custom field (set JIRA_EPIC_LABEL_FIELD to its id if this is it)",
        ),
        (
            "project = OPS AND cf[10050] = churn-model",
            "customfield_10011",
            "column 19: custom field 'cf[10050]': Jira's webhook filter takes only the epic"
            " label custom field (the epic label field is cf[10011])",
        ),
        ("cf[10011] = x", "summary", "column 1: custom field 'cf[10011]'"),
    ],
)
def test_other_custom_fields_are_refused(jql: str, epic_label: str | None, message: str) -> None:
    problem = check_jql(jql, epic_label_field=epic_label)
    assert problem is not None and problem.startswith(message), problem


REFUSED = [
    ("", "empty query"),
    ("priority = High", "column 1: field 'priority' is not supported in a webhook filter"),
    ("project ~ OPS", "column 9: operator '~' is not supported in a webhook filter"),
    ("project > 3", "column 9: operator '>' is not supported"),
    ("project IS EMPTY", "column 9: operator 'IS' is not supported"),
    ("status WAS Done", "column 8: operator 'WAS' is not supported"),
    ("project = OPS ORDER BY key", "column 15: ORDER BY is not supported"),
    ("NOT project = OPS", "column 1: a leading NOT is not supported"),
    ("assignee = currentUser()", "column 12: functions such as currentUser() are not supported"),
    ("project IN OPS", "column 12: IN and NOT IN take a parenthesised list"),
    ("project = (OPS, ML)", "column 11: a list of values needs IN or NOT IN"),
    ("project = OPS AND", "column 18: expected a field, found the end of the query"),
    ("(project = OPS", "column 15: expected ')', found the end of the query"),
    ("project = OPS)", "column 14: unbalanced ')'"),
    ("project = 'OPS", "column 11: unterminated quoted string"),
    ("project", "column 8: expected an operator after 'project'"),
    ("project = OPS status = Done", "column 15: expected AND, OR or the end, found 'status'"),
    ("project IN (OPS ML)", "column 17: expected ',' or ')', found 'ML'"),
    ("cf[abc] = 1", "column 1: field 'cf[abc]' is not supported"),
    ("project = AND", "column 11: expected a value, found 'AND'"),
]


@pytest.mark.parametrize(("jql", "message"), REFUSED)
def test_refused(jql: str, message: str) -> None:
    problem = check_jql(jql)
    assert problem is not None and problem.startswith(message), problem


def test_rules_check_takes_the_epic_label_field_from_the_settings(tmp_path: Path) -> None:
    rule = (
        "rules:\n  - name: epic\n    on:\n      events: [jira:issue_updated]\n"
        "      jql: project = OPS AND cf[10011] = churn\n"
        "    do:\n      - action: ubiops.deployments_list\n        with: {project_name: p}\n"
    )
    (tmp_path / "r.yaml").write_text(rule)
    ruleset, errors = check_rules(tmp_path)
    assert ruleset is None
    assert errors == [
        f"{tmp_path / 'r.yaml'}:5: on.jql: Jira's webhook filter cannot take this: column 19:"
        " custom field 'cf[10011]': Jira's webhook filter takes only the epic label custom"
        " field (set JIRA_EPIC_LABEL_FIELD to its id if this is it); test other fields in"
        " `when:`"
    ]
    settings = from_env({"JIRA_EPIC_LABEL_FIELD": "customfield_10011"}, dotenv=None)
    ruleset, errors = check_rules(tmp_path, epic_label_field=settings.jira_epic_label_field)
    assert errors == [] and ruleset is not None
    with pytest.raises(SettingsError, match="JIRA_EPIC_LABEL_FIELD"):
        from_env({"JIRA_EPIC_LABEL_FIELD": "Epic Name"}, dotenv=None)


_ISSUE: dict[str, Any] = {
    "webhookEvent": "jira:issue_updated",
    "issue": {
        "id": "10042",
        "key": "OPS-42",
        "fields": {
            "project": {"id": "10000", "key": "OPS", "name": "Operations"},
            "issuetype": {"id": "10005", "name": "Deployment"},
            "status": {"id": "10001", "name": "Ready to deploy"},
            "assignee": None,
            "reporter": {"accountId": "abc-123", "displayName": "Ada"},
            "customfield_10050": "churn",
            "customfield_10060": {"id": "7", "value": "Blue"},
            "customfield_10070": [{"value": "a"}, {"value": "b"}],
        },
    },
}


@pytest.mark.parametrize(
    ("jql", "holds"),
    [
        ("project = OPS", True),
        ("project = ops", True),  # Jira compares names and keys case-insensitively
        ("project = 10000", True),
        ("project = Operations", True),
        ("project = FOO", False),
        ("project != FOO", True),
        ("project IN (FOO, OPS)", True),
        ("project NOT IN (FOO, OPS)", False),
        ('issueKey = "OPS-42"', True),
        ("issueKey = OPS-41", False),
        ('status = "Ready to deploy" AND issuetype = Deployment', True),
        ("status = Done OR issuetype = Deployment", True),
        ("(status = Done OR status = Open) AND project = OPS", False),
        ("assignee = EMPTY", True),
        ("assignee != abc-123", False),  # an empty field matches no != (as in Jira)
        ("reporter = abc-123", True),
        ("cf[10050] = churn", True),
        ("cf[10060] = Blue", True),
        ("cf[10070] IN (b, c)", True),
        ("cf[10070] NOT IN (a)", False),
    ],
)
def test_jql_decided_on_the_payload(jql: str, holds: bool) -> None:
    assert jql_holds(jql, _ISSUE) is holds


@pytest.mark.parametrize(
    "jql",
    ["issue.property[deploy].ready = true", "cf[99999] = x", "labels = a"],
)
def test_jql_the_payload_cannot_decide_is_said(jql: str) -> None:
    with pytest.raises((Undecided, JqlError)):
        jql_holds(jql, _ISSUE)
