"""Match one Jira event against a rule set. Pure: no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bot.rules.conditions import first_failure
from bot.rules.model import Evaluation, Miss, Rule, RuleSet


def evaluate(ruleset: RuleSet, payload: Mapping[str, Any]) -> Evaluation:
    """Return the rules of the payload's `webhookEvent` that match, and why the others miss."""
    event = payload.get("webhookEvent")
    matched: list[Rule] = []
    missed: list[Miss] = []
    # Only the index entry for this event is read: cost follows that event's rules only.
    for rule in ruleset.for_event(event) if isinstance(event, str) else ():
        reason = "rule is disabled" if not rule.enabled else first_failure(rule.conditions, payload)
        if reason is None:
            matched.append(rule)
        else:
            missed.append(Miss(rule.name, reason))
    return Evaluation(matched=matched, missed=missed)
