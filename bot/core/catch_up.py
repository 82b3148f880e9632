"""Catch-up of Jira changes no delivery brought: the pure half (JQL, paging, payloads).

OAuth 2.0 apps and admin webhooks get no failed-delivery list from Jira (that API is
Connect's), so a gap (deploybot down, a webhook lapsed) is found by asking Jira which
issues changed since, and reading their changelogs. Each change becomes the
`jira:issue_updated` payload a delivery would have carried: the issue as Jira shows it
now (its fields are today's, not as they were at the change) with that change's
changelog entry (`changelog.id` as in a delivery, so the workflow issue's "one action
per Jira change" holds across both).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

SEARCH_PATH = "/rest/api/3/search/jql"
SOURCE = "catch-up"


def filter_jql(jqls: Iterable[str | None]) -> str | None:
    """The rules' filters as one JQL (None: a rule without a filter takes every issue)."""
    parts: list[str] = []
    for jql in jqls:
        if jql is None or not jql.strip():
            return None
        if jql not in parts:
            parts.append(jql)
    if len(parts) == 1:
        return parts[0]
    return " OR ".join(f"({part})" for part in parts) if parts else None


def search_jql(filters: str | None, since: float, now: float) -> str:
    """Issues matching `filters` updated since `since` (epoch s), oldest change first.

    A relative date (`-Nm`) is measured on Jira's clock and needs no time zone (an
    absolute one is read in the app user's zone); it is rounded up to whole minutes.
    """
    minutes = max(1, math.ceil((now - since) / 60.0))
    updated = f'updated >= "-{minutes}m"'
    where = f"({filters}) AND {updated}" if filters else updated
    return f"{where} ORDER BY updated ASC"


def jira_time(value: Any) -> float | None:
    """Epoch seconds of Jira's `2024-01-03T10:00:00.000+0000` (None if it is not one)."""
    if not isinstance(value, str):
        return None
    for layout in ("%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S%z"):
        try:
            return datetime.strptime(value, layout).timestamp()
        except ValueError:
            continue
    return None


def delivery_id(issue_id: str, change_id: str) -> str:
    """The synthesized delivery's id: the same for every catch-up of one change."""
    return f"catch-up:{issue_id}:{change_id}"


def changes_since(histories: Iterable[Any], since: float) -> list[tuple[float, Mapping[str, Any]]]:
    """The changelog entries created at or after `since`, with their time, oldest first."""
    found: list[tuple[float, Mapping[str, Any]]] = []
    for history in histories:
        if not isinstance(history, Mapping):
            continue
        created = jira_time(history.get("created"))
        change_id = history.get("id")
        if created is None or not isinstance(change_id, str | int) or created < since:
            continue
        if not isinstance(history.get("items"), list):
            continue
        found.append((created, history))
    found.sort(key=lambda pair: pair[0])
    return found


def synthesized_payload(
    issue: Mapping[str, Any], history: Mapping[str, Any], created: float
) -> dict[str, Any]:
    """The `jira:issue_updated` payload Jira would have delivered for this change."""
    payload: dict[str, Any] = {
        "timestamp": int(created * 1000),
        "webhookEvent": "jira:issue_updated",
        "issue_event_type_name": "issue_generic",
        "issue": {k: issue[k] for k in ("id", "key", "self", "fields") if k in issue},
        "changelog": {"id": str(history["id"]), "items": history["items"]},
        "deliveredBy": SOURCE,
    }
    author = history.get("author")
    if isinstance(author, Mapping):
        payload["user"] = dict(author)
    return payload


def changelog_ids(payloads: Iterable[Mapping[str, Any]]) -> set[tuple[str, str]]:
    """(issue id, changelog id) of stored `jira:issue_updated` payloads."""
    seen: set[tuple[str, str]] = set()
    for payload in payloads:
        issue, changelog = payload.get("issue"), payload.get("changelog")
        if not isinstance(issue, Mapping) or not isinstance(changelog, Mapping):
            continue
        issue_id, change_id = issue.get("id"), changelog.get("id")
        if isinstance(issue_id, str | int) and isinstance(change_id, str | int):
            seen.add((str(issue_id), str(change_id)))
    return seen
