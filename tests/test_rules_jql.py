"""The JQL checker accepts exactly what Jira's webhook filter takes."""

from __future__ import annotations

from typing import Any

import pytest

from bot.rules.jql import JqlError, Undecided, check_jql, jql_holds

ACCEPTED = [
    "project = OPS",
    "project = OPS AND issuetype = Deployment",
    'project IN (OPS, "ML Platform") AND status != "In Progress"',
    "issueKey = OPS-42 OR issuekey IN (OPS-1, OPS-2)",
    "(project = OPS OR project = ML) AND status NOT IN (Done, Closed)",
    "assignee = 5b10ac8d82e05b22cc7d4ef5 and reporter != 5b10a2844c20165700ede21g",
    "cf[10050] = churn-model",
    "issue.property[deploy].target = prod",
    "issue.property[deploy] = yes",
    "project=OPS AND status='Ready to deploy'",
    'status = "say \\"hi\\""',
    "((project = OPS))",
]


@pytest.mark.parametrize("jql", ACCEPTED)
def test_accepted(jql: str) -> None:
    assert check_jql(jql) is None


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
