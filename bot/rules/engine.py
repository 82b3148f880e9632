"""Match one Jira event against a rule set. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bot.core.webhook_plan import normalize_jql
from bot.rules.conditions import first_failure
from bot.rules.jql import JqlError, Undecided, jql_holds
from bot.rules.model import Evaluation, Miss, Rule, RuleSet


def matched_webhook_ids(payload: Mapping[str, Any]) -> list[int]:
    """The ids of the app's webhooks whose filter Jira matched for this delivery."""
    ids = payload.get("matchedWebhookIds")
    if not isinstance(ids, list):
        return []
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]


def evaluate(
    ruleset: RuleSet, payload: Mapping[str, Any], matched_jql: frozenset[str] | None = None
) -> Evaluation:
    """Return the rules of the payload's `webhookEvent` that match, and why the others miss.

    Jira evaluates a rule's `on.jql`, not us: it sends one delivery for all of the app's
    webhooks whose filter the issue passed, and names them (`matchedWebhookIds`).
    `matched_jql` holds those webhooks' JQL (whitespace-normalized); a rule with a JQL
    not among them misses. None: which webhooks matched is unknown (none of the ids is a
    registration we know of, or the payload names none: dry runs, replays of old
    payloads, static webhooks); the JQL is then decided on the payload's issue, and a
    query the payload cannot decide (an issue property, a field it does not carry)
    misses, with why: a filter is never silently skipped.
    """
    event = payload.get("webhookEvent")
    matched: list[Rule] = []
    missed: list[Miss] = []
    decided: dict[str, str] = {}
    # Only the index entry for this event is read: cost follows that event's rules only.
    for rule in ruleset.for_event(event) if isinstance(event, str) else ():
        reason: str | None = None
        if not rule.enabled:
            reason = "rule is disabled"
        elif rule.jql and matched_jql is not None:
            holds = normalize_jql(rule.jql) in matched_jql
            decided[rule.name] = f"decided by Jira: {'matched' if holds else 'not matched'}"
            if not holds:
                reason = f"jql: Jira did not match `{rule.jql}` for this issue"
        elif rule.jql:
            reason, decided[rule.name] = _jql_on_payload(rule.jql, payload)
        if reason is None:
            reason = first_failure(rule.conditions, payload)
        if reason is None:
            matched.append(rule)
        else:
            missed.append(Miss(rule.name, reason))
    return Evaluation(matched=matched, missed=missed, jql=decided)


def _jql_on_payload(jql: str, payload: Mapping[str, Any]) -> tuple[str | None, str]:
    """Decide a rule's JQL on the payload: (why it misses or None, how it was decided)."""
    try:
        holds = jql_holds(jql, payload)
    except (Undecided, JqlError) as exc:
        return (
            f"jql: `{jql}` cannot be decided on the event itself ({exc})",
            f"checked on the payload: undecided ({exc})",
        )
    if holds:
        return None, "checked on the payload (no webhook of ours named): holds"
    return (
        f"jql: `{jql}` does not hold for this issue (checked on the event itself)",
        "checked on the payload (no webhook of ours named): does not hold",
    )


def change_ref(payload: Mapping[str, Any], tenant: str = "") -> str | None:
    """Name the Jira change an event reports, the same whatever delivery brought it.

    `changelog.id` for issue events, `comment.id` (with its edit time, since each edit is
    a change of its own) for comment events; None when the payload names no change.
    """
    issue = payload.get("issue")
    issue_ref = None
    if isinstance(issue, Mapping):
        issue_ref = issue.get("id") or issue.get("key")
    event = payload.get("webhookEvent")
    if not isinstance(event, str) or not isinstance(issue_ref, str | int):
        return None
    if event.startswith("comment_"):
        comment = payload.get("comment")
        if not isinstance(comment, Mapping) or not isinstance(comment.get("id"), str | int):
            return None
        edited = comment.get("updated") if event == "comment_updated" else None
        suffix = f"@{edited}" if isinstance(edited, str | int) else ""
        change = f"{event}:{comment['id']}{suffix}"
    else:
        changelog = payload.get("changelog")
        if not isinstance(changelog, Mapping) or not isinstance(changelog.get("id"), str | int):
            return None
        change = f"changelog:{changelog['id']}"
    ref = f"{tenant}|{issue_ref}|{change}"
    # Stored in a unique key of at most 600 characters, beside a rule name of up to 255.
    return ref if len(ref) <= 300 and "\x00" not in ref else None
