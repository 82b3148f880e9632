"""The loaded rule set: rules, their steps, and the per-event index. Pure: no I/O."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from bot.rules.conditions import Condition


@dataclass(frozen=True, slots=True)
class Step:
    """One `do:` entry: an action with its raw `with:` parameters."""

    id: str | None
    action: str
    with_: Mapping[str, Any]
    index: int  # 0-based position in the rule's `do:`
    line: int = 0
    base_dir: Path = Path(".")  # the rules folder: `file` parameters are relative to it
    file_params: frozenset[str] = frozenset()
    # `with_` with every template string replaced by its compiled template (templates.py).
    compiled: Any = field(default=None, compare=False, repr=False)
    # `if`, `until`, `every`, `timeout`, `fail_if` (workflow.Control); None: none given.
    control: Any = None


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: when an event of `events` meets every condition, run `steps` in order."""

    name: str
    description: str
    enabled: bool
    events: tuple[str, ...]
    jql: str | None
    fields: tuple[str, ...]
    conditions: tuple[Condition, ...]
    steps: tuple[Step, ...]
    source_file: str
    source_line: int
    property_keys: tuple[str, ...] = ()  # on.property_keys: Jira's issuePropertyKeysFilter
    # The concurrency key's template source; runs whose keys render equal run one at a time.
    concurrency: str | None = None
    pending_latest: bool = False  # `pending: latest`: only the newest waiting run is kept
    on_failure: tuple[Step, ...] = ()  # run once when a step of `do` is dead

    @property
    def source(self) -> str:
        return f"{self.source_file}:{self.source_line}"


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Every rule of a rules folder, indexed by Jira event name."""

    rules: tuple[Rule, ...]
    version: str  # sha256 over the sorted file names and bytes
    base_dir: Path
    by_event: Mapping[str, tuple[Rule, ...]] = field(compare=False, repr=False)

    @classmethod
    def build(cls, rules: Iterable[Rule], version: str, base_dir: Path) -> RuleSet:
        """Build a rule set and its event index."""
        rules = tuple(rules)
        index: dict[str, list[Rule]] = {}
        for rule in rules:
            for event in dict.fromkeys(rule.events):
                index.setdefault(event, []).append(rule)
        by_event = MappingProxyType({event: tuple(rs) for event, rs in index.items()})
        return cls(rules=rules, version=version, base_dir=base_dir, by_event=by_event)

    @classmethod
    def empty(cls, base_dir: Path) -> RuleSet:
        """Return the rule set of an empty folder."""
        return cls.build((), content_version({}), base_dir)

    def for_event(self, event: str) -> tuple[Rule, ...]:
        """Return the rules that listen to `event`, in file order."""
        return self.by_event.get(event, ())

    def get(self, name: str) -> Rule | None:
        """Return the rule called `name`, if any."""
        return next((rule for rule in self.rules if rule.name == name), None)

    @property
    def events(self) -> frozenset[str]:
        return frozenset(self.by_event)


def content_version(files: Mapping[str, bytes]) -> str:
    """Hash file names and contents in name order (lengths keep the framing unambiguous)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        encoded = name.encode()
        digest.update(b"%d:%s%d:" % (len(encoded), encoded, len(data)))
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Miss:
    """A rule for this event that did not match, and the first reason why."""

    rule_name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The rules an event matched and, for the others of its event, why not."""

    matched: list[Rule]
    missed: list[Miss]
    # How each rule's `on.jql` was decided: by Jira (the delivery names the webhooks it
    # matched) or on the payload itself (a delivery naming no webhook of ours).
    jql: dict[str, str] = field(default_factory=dict)
