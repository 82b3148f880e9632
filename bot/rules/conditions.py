"""Conditions of a rule's `when:` and how each one holds or fails on a payload.

Every `check` returns None when the condition holds, else the reason it failed, so the
engine and the dry run can say exactly which condition stopped a rule. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

MISSING: Final = object()  # a path that does not resolve (distinct from a JSON null)
_REPR_MAX = 80


class Condition(Protocol):
    """Anything that can hold or fail on a payload."""

    def check(self, payload: Mapping[str, Any]) -> str | None:
        """Return None when the condition holds, else why it does not."""
        ...

    def describe(self) -> str:
        """Return the condition as a short phrase for messages."""
        ...


def resolve(payload: Any, path: Sequence[str]) -> Any:
    """Follow a dotted path into dicts and lists (a numeric segment is a list index)."""
    value = payload
    for segment in path:
        if isinstance(value, Mapping):
            if segment not in value:
                return MISSING
            value = value[segment]
        elif isinstance(value, list) and segment.lstrip("-").isdigit():
            index = int(segment)
            if not -len(value) <= index < len(value):
                return MISSING
            value = value[index]
        else:
            return MISSING
    return value


def short(value: Any) -> str:
    """Return repr(value), cut to a length that fits in one message line."""
    text = repr(value)
    return text if len(text) <= _REPR_MAX else text[: _REPR_MAX - 3] + "..."


def _contains(actual: Any, expected: Any) -> bool:
    if isinstance(actual, list):
        return expected in actual
    return isinstance(actual, str) and isinstance(expected, str) and expected in actual


def _matches(actual: Any, pattern: re.Pattern[str]) -> bool:
    # bool is an int subclass; "True" matching a pattern would surprise more than help.
    if isinstance(actual, bool) or not isinstance(actual, str | int | float):
        return False
    return pattern.search(str(actual)) is not None


# operator -> (holds(actual, expected), what a failure says about actual and expected)
_OPERATORS: Final[dict[str, tuple[Callable[[Any, Any], bool], str]]] = {
    "equals": (lambda a, e: bool(a == e), "does not equal"),
    "not_equals": (lambda a, e: bool(a != e), "equals"),
    "in": (lambda a, e: a in e, "is not in"),
    "not_in": (lambda a, e: a not in e, "is in"),
    "contains": (_contains, "does not contain"),
    "matches": (_matches, "does not match"),
}
FIELD_OPERATORS: Final = (*_OPERATORS, "exists")


@dataclass(frozen=True, slots=True)
class FieldCondition:
    """`field: a.b.c` with one operator; a missing field fails all but `exists: false`."""

    path: str
    op: str
    expected: Any  # for `matches`, the compiled pattern
    segments: tuple[str, ...] = ()

    def check(self, payload: Mapping[str, Any]) -> str | None:
        actual = resolve(payload, self.segments or self.path.split("."))
        if self.op == "exists":
            # Jira sends `"assignee": null` when unassigned: null counts as not there.
            present = actual is not MISSING and actual is not None
            if present == self.expected:
                return None
            if present:
                return f"{self.path}: exists ({short(actual)})"
            return f"{self.path}: {'is missing' if actual is MISSING else 'is null'}"
        if actual is MISSING:
            return f"{self.path}: is missing"
        holds, failure = _OPERATORS[self.op]
        if holds(actual, self.expected):
            return None
        return f"{self.path}: {short(actual)} {failure} {short(self._shown_expected())}"

    def describe(self) -> str:
        return f"{self.path} {self.op} {short(self._shown_expected())}"

    def _shown_expected(self) -> Any:
        return self.expected.pattern if isinstance(self.expected, re.Pattern) else self.expected


@dataclass(frozen=True, slots=True)
class ChangedCondition:
    """`changed: status` with optional `from` / `to` against the changelog's strings."""

    field: str
    from_: str | None = None
    to: str | None = None
    has_from: bool = False
    has_to: bool = False

    def check(self, payload: Mapping[str, Any]) -> str | None:
        changelog = payload.get("changelog")
        items = changelog.get("items") if isinstance(changelog, Mapping) else None
        if not isinstance(items, list):
            return f"changed {self.field}: the event has no changelog"
        # Jira names a field by `field` (display name) and `fieldId`; accept either.
        candidates = [
            item
            for item in items
            if isinstance(item, Mapping) and self.field in (item.get("field"), item.get("fieldId"))
        ]
        if not candidates:
            return f"changed {self.field}: no changelog item for {self.field!r}"
        first_reason = ""
        for item in candidates:
            reason = self._mismatch(item)
            if reason is None:
                return None
            first_reason = first_reason or reason
        return f"changed {self.field}: {first_reason}"

    def _mismatch(self, item: Mapping[str, Any]) -> str | None:
        if self.has_from and item.get("fromString") != self.from_:
            return f"from {short(item.get('fromString'))}, not {short(self.from_)}"
        if self.has_to and item.get("toString") != self.to:
            return f"to {short(item.get('toString'))}, not {short(self.to)}"
        return None

    def describe(self) -> str:
        text = f"changed {self.field}"
        if self.has_from:
            text += f" from {short(self.from_)}"
        if self.has_to:
            text += f" to {short(self.to)}"
        return text


@dataclass(frozen=True, slots=True)
class AllOf:
    """Every inner condition holds; the reason is the first that does not."""

    conditions: tuple[Condition, ...]

    def check(self, payload: Mapping[str, Any]) -> str | None:
        return first_failure(self.conditions, payload)

    def describe(self) -> str:
        return "all(" + "; ".join(c.describe() for c in self.conditions) + ")"


@dataclass(frozen=True, slots=True)
class AnyOf:
    """At least one inner condition holds; the reason lists why each failed."""

    conditions: tuple[Condition, ...]

    def check(self, payload: Mapping[str, Any]) -> str | None:
        reasons: list[str] = []
        for condition in self.conditions:
            reason = condition.check(payload)
            if reason is None:
                return None
            reasons.append(reason)
        return "any: none held (" + "; ".join(reasons) + ")"

    def describe(self) -> str:
        return "any(" + "; ".join(c.describe() for c in self.conditions) + ")"


@dataclass(frozen=True, slots=True)
class NotOf:
    """The inner condition does not hold."""

    condition: Condition

    def check(self, payload: Mapping[str, Any]) -> str | None:
        if self.condition.check(payload) is None:
            return f"not: {self.condition.describe()} held"
        return None

    def describe(self) -> str:
        return f"not({self.condition.describe()})"


def first_failure(conditions: Sequence[Condition], payload: Mapping[str, Any]) -> str | None:
    """Return the reason of the first condition that fails, or None when all hold."""
    for condition in conditions:
        reason = condition.check(payload)
        if reason is not None:
            return reason
    return None
