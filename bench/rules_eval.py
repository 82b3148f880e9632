"""Per-event evaluation cost of the rule engine with 10, 100 and 1,000 rules.

Run: .venv/bin/python bench/rules_eval.py
Two layouts: rules spread evenly over Jira's 8 webhook events (cost grows with the
rules of the event), and 10 rules for the evaluated event among N (the index keeps
the cost flat: the other events' rules are never looked at).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot.core.catalog import Operation, Param
from bot.rules.engine import evaluate
from bot.rules.loader import JIRA_EVENTS, load_rules

SIZES = (10, 100, 1000)
ROUNDS, ROUND_S = 5, 0.1  # best of 5 rounds of 0.1 s: the whole run stays well under 20 s
REGISTRY = {
    "genesys.publish": Operation(
        "genesys", "publish", "POST", "/c/{id}/publish", (Param("id", "path", required=True),)
    )
}
PAYLOAD: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "tests" / "data" / "jira_issue_updated.json").read_text()
)


def rule_yaml(i: int, event: str) -> str:
    """Return one realistic rule: a changelog check, a field test, and a combinator."""
    return f"""
  - name: rule-{i}
    on:
      events: [{event}]
      jql: project = OPS
    when:
      - changed: status
        to: Ready to deploy
      - field: issue.fields.labels
        contains: model-x
      - any:
          - field: issue.fields.priority.name
            in: [High, Highest]
          - field: issue.fields.summary
            matches: "(?i)hotfix-{i}"
      - field: issue.fields.customfield_10050
        equals: model-{i % 7}
    do:
      - action: genesys.publish
        with: {{id: "{{{{ issue.key }}}}"}}
"""


def per_event_us(events: list[str]) -> float:
    """Load rules for these events and return microseconds per evaluation."""
    with tempfile.TemporaryDirectory() as folder:
        text = "rules:" + "".join(rule_yaml(i, e) for i, e in enumerate(events))
        (Path(folder) / "bench.yaml").write_text(text)
        ruleset = load_rules(Path(folder), REGISTRY)
    return _time(lambda: evaluate(ruleset, PAYLOAD))


def _time(call: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(ROUNDS):  # the best round is the least disturbed by GC and other load
        runs = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < ROUND_S:
            for _ in range(20):
                call()
            runs += 20
        best = min(best, elapsed / runs * 1e6)
    return best


def main() -> None:
    """Print the cost per event and the ratio against the 10-rule run for both layouts."""
    updated = "jira:issue_updated"
    others = [e for e in JIRA_EVENTS if e != updated]
    layouts: dict[str, Callable[[int], list[str]]] = {
        "spread over 8 events": lambda n: [JIRA_EVENTS[i % len(JIRA_EVENTS)] for i in range(n)],
        "10 for this event": lambda n: [updated] * 10 + [others[i % 7] for i in range(n - 10)],
    }
    for title, layout in layouts.items():
        print(f"{title}:")
        base = 0.0
        for size in SIZES:
            events = layout(size)
            us = per_event_us(events)
            base = base or us
            considered = events.count(updated)
            print(
                f"  {size:>5} rules ({considered:>4} for {updated}): "
                f"{us:9.1f} us/event  x{us / base:6.1f}"
            )


if __name__ == "__main__":
    main()
