"""The second edition's step and rule controls: `if`, `until`/`every`/`timeout`,
`fail_if`, `concurrency`, and the pure decisions made on them. Pure: no I/O.

A planned action run stores its step's controls in their raw (YAML) form, like its
`with:`, so that a run is self-contained across restarts and rule reloads; the
executor rebuilds the conditions from that form with `build_conditions`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from bot.errors import TemplateRenderError
from bot.rules.conditions import (
    AllOf,
    AnyOf,
    ChangedCondition,
    Condition,
    FieldCondition,
    NotOf,
    first_failure,
    short,
)
from bot.rules.model import Rule
from bot.rules.templates import build_context, compile_template

DEFAULT_EVERY_S: Final = 10.0
# Steps of `on_failure` are stored after those of `do`: their index starts here.
ON_FAILURE_BASE: Final = 1000
IF_SKIPPED: Final = "if: "  # how a step skipped by its own `if` begins its reason
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)(ms|s|m|h|d))+")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: object) -> float | None:
    """Return seconds for `10s`, `5m`, `2h`, `1h30m`, `1d` or a plain number of seconds."""
    if isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        return float(text) if text > 0 else None
    if not isinstance(text, str) or not _DURATION.fullmatch(text.strip()):
        return None
    seconds = sum(float(n) * _UNIT_S[unit] for n, unit in _PART.findall(text))
    return seconds if seconds > 0 else None


@dataclass(frozen=True, slots=True)
class TemplateCondition:
    """One template expression (`"{{ steps.smoke.success and result.ok }}"`) that is
    true or false; compiled from rule text only, rendered with the run's data."""

    source: str

    def check(self, payload: Mapping[str, Any]) -> str | None:
        from bot.rules.templates import compile_template  # templates imports model, not us

        try:
            value = compile_template(self.source).render(payload)
        except Exception as exc:  # an undefined name is the condition not holding
            return f"{self.source}: {exc}"
        # Truth as in Jinja's `{% if %}`: a non-empty string from data is true, even "False".
        return None if value else f"{self.source}: is {short(value)}"

    def describe(self) -> str:
        return self.source


def build_conditions(raw: Any) -> tuple[Condition, ...]:
    """Build conditions from their stored raw form (checked by the loader already)."""
    if isinstance(raw, str):
        return (TemplateCondition(raw),)
    if not isinstance(raw, list):
        raise TemplateRenderError(f"a stored condition is not a list: {short(raw)}")
    return tuple(_condition(item) for item in raw)


def _condition(raw: Any) -> Condition:
    if isinstance(raw, str):
        return TemplateCondition(raw)
    if not isinstance(raw, Mapping):
        raise TemplateRenderError(f"a stored condition is not a mapping: {short(raw)}")
    if "field" in raw:
        path = str(raw["field"])
        op = next(k for k in raw if k != "field")
        expected = raw[op]
        if op == "matches":
            expected = re.compile(str(expected))
        return FieldCondition(path, op, expected, tuple(path.split(".")))
    if "changed" in raw:
        return ChangedCondition(
            field=str(raw["changed"]),
            from_=None if raw.get("from") is None else str(raw["from"]),
            to=None if raw.get("to") is None else str(raw["to"]),
            has_from="from" in raw,
            has_to="to" in raw,
        )
    if "not" in raw:
        inner = raw["not"]
        return NotOf(
            AllOf(build_conditions(inner)) if isinstance(inner, list) else _condition(inner)
        )
    if "any" in raw:
        return AnyOf(build_conditions(raw["any"]))
    if "all" in raw:
        return AllOf(build_conditions(raw["all"]))
    raise TemplateRenderError(f"a stored condition has no known head: {short(raw)}")


@dataclass(frozen=True, slots=True)
class Control:
    """A step's controls in stored form (JSON): raw conditions, durations in seconds."""

    if_: Any = None
    until: Any = None
    fail_if: Any = None
    every_s: float = DEFAULT_EVERY_S
    timeout_s: float | None = None
    # The rule has `on_failure` steps: a finished run must stand them down.
    has_on_failure: bool = False

    def to_json(self) -> dict[str, Any] | None:
        """The stored form; None for a step with no controls (most steps of most rules)."""
        data: dict[str, Any] = {}
        for key, value in (("if", self.if_), ("until", self.until), ("fail_if", self.fail_if)):
            if value is not None:
                data[key] = value
        if self.until is not None:
            data["every_s"] = self.every_s
            data["timeout_s"] = self.timeout_s
        if self.has_on_failure:
            data["has_on_failure"] = True
        return data or None

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Control:
        if not data:
            return cls()
        timeout = data.get("timeout_s")
        return cls(
            if_=data.get("if"),
            until=data.get("until"),
            fail_if=data.get("fail_if"),
            every_s=float(data.get("every_s") or DEFAULT_EVERY_S),
            timeout_s=None if timeout is None else float(timeout),
            has_on_failure=bool(data.get("has_on_failure")),
        )


def check(raw: Any, context: Mapping[str, Any]) -> str | None:
    """Return None when the stored conditions hold on `context`, else why not."""
    return first_failure(build_conditions(raw), context)


def describe(raw: Any) -> str:
    """The stored conditions as a short phrase (for `rules test` and messages)."""
    return "; ".join(c.describe() for c in build_conditions(raw))


_RUN_TIME_ROOTS: Final = ("steps", "result", "failure")


def run_time_reads(raw: Any) -> list[str]:
    """The names stored conditions read that only a run knows (steps, result, failure)."""
    from bot.rules.templates import root_names

    found: list[str] = []
    for condition in build_conditions(raw):
        for name in _reads(condition, root_names):
            if name.split(".")[0] in _RUN_TIME_ROOTS and name not in found:
                found.append(name)
    return found


def _reads(condition: Condition, root_names: Any) -> list[str]:
    if isinstance(condition, FieldCondition):
        return [".".join(condition.path.split(".")[:2])]
    if isinstance(condition, TemplateCondition):
        return sorted(root_names(condition.source))
    if isinstance(condition, AllOf | AnyOf):
        return [name for inner in condition.conditions for name in _reads(inner, root_names)]
    if isinstance(condition, NotOf):
        return _reads(condition.condition, root_names)
    return []


def failure_context(
    *,
    step_index: int,
    step_id: str | None,
    action: str,
    error: str | None,
    attempts: int,
    status_code: int | None,
) -> dict[str, Any]:
    """What `on_failure` steps see as `failure`."""
    return {
        "step": step_index + 1,
        "step_id": step_id,
        "action": action,
        "error": error,
        "attempts": attempts,
        "status_code": status_code,
    }


def concurrency_key(rule: Rule, payload: dict[str, Any], event_id: int) -> str:
    """Render a rule's concurrency key for one event (raises TemplateRenderError)."""
    assert rule.concurrency is not None
    try:
        value = compile_template(rule.concurrency).render(
            build_context(payload, event_id=str(event_id))
        )
    except Exception as exc:
        raise TemplateRenderError(f"concurrency: {exc}") from exc
    key = str(value)
    if not key or len(key) > 500 or "\x00" in key:
        raise TemplateRenderError(f"concurrency: the key {key[:80]!r} is empty or unusable")
    return key
