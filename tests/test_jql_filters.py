"""A rule's `on.jql` holds: Jira names the webhooks whose filter an issue passed.

All of the app's webhooks deliver to one URL, so a delivery sent for one rule's JQL
reaches every rule of its event. The payload's `matchedWebhookIds` says which filters the
issue passed; a rule whose JQL is not among them misses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.core.delivery import Delivery
from bot.core.webhook_plan import RegisteredWebhook, WebhookSpec
from bot.db.engine import create_engine, upgrade
from bot.db.models import events, rule_matches
from bot.db.registrations import Registrations, WebhookFilters
from bot.db.store import EventStore
from bot.pipeline.processor import EventProcessor
from bot.rules.engine import evaluate, matched_webhook_ids
from bot.rules.loader import load_rules
from tests.fakes.jira import issue_updated_payload
from tests.helpers import REGISTRY, write_rules

RULES = """
rules:
  - name: ops
    on:
      events: [jira:issue_updated]
      jql: project = OPS
    do:
      - action: genesys.post_webdeployments_configuration_versions_draft_publish
        with: {configuration_id: abc}
  - name: hr
    on:
      events: [jira:issue_updated]
      jql: "project   =  HR"
    do:
      - action: genesys.post_webdeployments_configuration_versions_draft_publish
        with: {configuration_id: abc}
"""
TENANT = "tenant-a"


def hook(webhook_id: int, jql: str) -> RegisteredWebhook:
    return RegisteredWebhook(webhook_id, WebhookSpec(("jira:issue_updated",), jql), None)


def outcome(evaluation: Any) -> tuple[list[str], dict[str, str]]:
    return [r.name for r in evaluation.matched], {m.rule_name: m.reason for m in evaluation.missed}


def test_a_rule_whose_jql_jira_did_not_match_misses(tmp_path: Path) -> None:
    ruleset = load_rules(write_rules(tmp_path, {"r.yaml": RULES}), REGISTRY)
    payload = issue_updated_payload(project="OPS")
    matched, missed = outcome(evaluate(ruleset, payload, frozenset({"project = OPS"})))
    assert matched == ["ops"]
    assert missed == {"hr": "jql: Jira did not match `project   =  HR` for this issue"}
    # Whitespace is not part of the filter (the webhook holds the normalized JQL).
    both = frozenset({"project = OPS", "project = HR"})
    assert outcome(evaluate(ruleset, payload, both)) == (["ops", "hr"], {})
    # Unknown webhooks: the JQL is decided on the payload's own issue, never skipped.
    assert outcome(evaluate(ruleset, payload, None)) == (
        ["ops"],
        {"hr": "jql: `project   =  HR` does not hold for this issue (checked on the event itself)"},
    )
    other = issue_updated_payload(project="FOO")
    assert outcome(evaluate(ruleset, other, None))[0] == []


@pytest.mark.parametrize(
    ("ids", "expected"),
    [([3, 7], [3, 7]), (None, []), ("7", []), ([True, "7", 7.0, 8], [8])],
)
def test_matched_webhook_ids_takes_integers_only(ids: Any, expected: list[int]) -> None:
    payload: dict[str, Any] = {"webhookEvent": "jira:issue_updated"}
    if ids is not None:
        payload["matchedWebhookIds"] = ids
    assert matched_webhook_ids(payload) == expected


async def test_webhook_filters_read_a_new_registration_soon_not_per_delivery(
    database_url: str,
) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    now = [0.0]
    filters = WebhookFilters(engine, max_age_s=60, unknown_s=1, clock=lambda: now[0])
    try:
        await Registrations(engine).replace(TENANT, [hook(10, "project = OPS")])
        assert await filters.matched_jql(TENANT, [10]) == frozenset({"project = OPS"})
        assert await filters.matched_jql("other-tenant", [10]) is None  # ids are per tenant
        await Registrations(engine).replace(
            TENANT, [hook(10, "project = OPS"), hook(11, "project = HR")]
        )
        now[0] = 0.5  # an unknown id within `unknown_s` of the last read: not read again
        assert await filters.matched_jql(TENANT, [11]) is None
        now[0] = 1.5
        assert await filters.matched_jql(TENANT, [10, 11, 12]) == frozenset(
            {"project = OPS", "project = HR"}
        )
        await Registrations(engine).replace(TENANT, [hook(11, "project = HR")])
        now[0] = 62  # older than `max_age_s`: read again, webhook 10 is gone
        assert await filters.matched_jql(TENANT, [10]) is None
    finally:
        await engine.dispose()


async def test_the_processor_plans_only_the_rules_whose_jql_jira_matched(
    database_url: str, tmp_path: Path
) -> None:
    ruleset = load_rules(write_rules(tmp_path, {"r.yaml": RULES}), REGISTRY)
    engine = create_engine(database_url)
    await upgrade(engine)
    await Registrations(engine).replace(
        TENANT, [hook(10, "project = OPS"), hook(11, "project = HR")]
    )
    store = EventStore(engine)
    await store.start()
    sent = {"ops-only": [10], "both": [10, 11], "unknown": [99], "none": []}
    try:
        ids = {}
        for name, webhook_ids in sent.items():
            body = json.dumps(issue_updated_payload(webhook_ids=webhook_ids)).encode()
            stored = await store.add(TENANT, Delivery(name, 0, "jira:issue_updated", "OPS-1", body))
            ids[stored.event_id] = name
        await store.close()
        assert await EventProcessor(engine, lambda: ruleset).run_once() == len(sent)
        async with engine.connect() as conn:
            rows = await conn.execute(select(rule_matches.c.event_id, rule_matches.c.rule_name))
            planned: dict[str, list[str]] = {}
            for r in rows:
                planned.setdefault(ids[r.event_id], []).append(r.rule_name)
            misses = {
                ids[r.id]: r.rule_misses
                for r in await conn.execute(select(events.c.id, events.c.rule_misses))
            }
    finally:
        await engine.dispose()
    assert {k: sorted(v) for k, v in planned.items()} == {
        "ops-only": ["ops"],
        "both": ["hr", "ops"],
        # No webhook we registered: the JQL is decided on the payload (an OPS issue).
        "unknown": ["ops"],
        "none": ["ops"],
    }
    assert misses["ops-only"] == [
        {"rule": "hr", "reason": "jql: Jira did not match `project   =  HR` for this issue"}
    ]
