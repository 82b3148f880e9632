"""Load and check a folder of `*.yaml` rule files, reporting every error with its line.

The files are composed to YAML nodes (which keep their start line) and checked node by
node, so one pass reports every error of every file as `file:line: message`; the file
is shown as the folder path given plus the file name. Only a set without errors is
built into a RuleSet.
"""

from __future__ import annotations

import difflib
import os.path
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import yaml
from jinja2 import TemplateSyntaxError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from bot.core import apis, catalog
from bot.core.catalog import Param
from bot.core.forge import FORGE_EVENTS
from bot.core.hosts import host_problem
from bot.errors import RuleError
from bot.rules import templates, workflow
from bot.rules.conditions import (
    FIELD_OPERATORS,
    AllOf,
    AnyOf,
    ChangedCondition,
    Condition,
    FieldCondition,
    NotOf,
)
from bot.rules.jql import check_jql
from bot.rules.model import Rule, RuleSet, Step, content_version

# Jira's dynamic webhooks take only these events.
JIRA_EVENTS: Final = (
    "jira:issue_created",
    "jira:issue_updated",
    "jira:issue_deleted",
    "comment_created",
    "comment_updated",
    "comment_deleted",
    "issue_property_set",
    "issue_property_deleted",
)
_RULE_KEYS: Final = (
    "name",
    "description",
    "enabled",
    "on",
    "when",
    "concurrency",
    "do",
    "on_failure",
)
_ON_KEYS: Final = ("events", "jql", "fields", "property_keys")
# The events Jira's issuePropertyKeysFilter narrows.
_PROPERTY_EVENTS: Final = ("issue_property_set", "issue_property_deleted")
_STEP_KEYS: Final = ("id", "action", "with", "if", "until", "every", "timeout", "fail_if")
# What a concurrency key may read: it is rendered when the event is planned, before any
# step ran (so no `steps`), from the payload's top-level names and `event`.
_PAYLOAD_NAMES: Final = frozenset(
    {
        "issue",
        "user",
        "changelog",
        "comment",
        "webhookEvent",
        "issue_event_type_name",
        "timestamp",
        "matchedWebhookIds",
        "property",
        "event",
    }
)
_HEADS: Final = ("field", "changed", "all", "any", "not")
# Local paths (an upload's file, a download's target) are relative to the rules folder.
_PATH_LOCATIONS: Final = frozenset({"file", "download"})
_STEP_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_STR, _BOOL, _NULL = (f"tag:yaml.org,2002:{t}" for t in ("str", "bool", "null"))


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: `on:`, `yes`, `no`, `off` stay strings."""


class ActionSpec(Protocol):
    """What the checker needs of an action: catalog Operations and high-level actions."""

    @property
    def full_name(self) -> str: ...

    @property
    def params(self) -> tuple[Param, ...]: ...


def default_registry() -> dict[str, ActionSpec]:
    """Return every operation of the catalog plus deploybot's own actions (their specs)."""
    return {**apis.registry(), **apis.action_specs()}


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


@dataclass(frozen=True, slots=True)
class _Error:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


def load_rules(
    rules_dir: Path,
    registry: Mapping[str, ActionSpec] | None = None,
    *,
    http_allowed_hosts: tuple[str, ...] | None = None,
    epic_label_field: str | None = None,
) -> RuleSet:
    """Load the rules folder, or raise RuleError carrying every error found.

    `epic_label_field` is the site's epic label custom field (JIRA_EPIC_LABEL_FIELD), the
    one custom field a JQL filter may name."""
    ruleset, errors = check_rules(
        rules_dir,
        registry,
        http_allowed_hosts=http_allowed_hosts,
        epic_label_field=epic_label_field,
    )
    if ruleset is None:
        raise RuleError(errors)
    return ruleset


def check_rules(
    rules_dir: Path,
    registry: Mapping[str, ActionSpec] | None = None,
    *,
    http_allowed_hosts: tuple[str, ...] | None = None,
    epic_label_field: str | None = None,
) -> tuple[RuleSet | None, list[str]]:
    """Check the rules folder; return the rule set (None on any error) and every error.

    `http_allowed_hosts` (the setting; None: not checked) refuses `http.request` steps
    when it is empty, and literal URLs on other hosts.
    """
    ops = default_registry() if registry is None else registry
    if not rules_dir.is_dir():
        return None, [f"{rules_dir}:0: rules folder not found"]
    checker = _Checker(ops, Path(os.path.abspath(rules_dir)), epic_label_field)
    checker.http_allowed_hosts = http_allowed_hosts
    contents: dict[str, bytes] = {}
    for path in sorted(rules_dir.glob("*.yaml")):
        display = str(rules_dir / path.name)
        try:
            data = path.read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            checker.errors.append(_Error(display, 0, f"cannot read: {exc}"))
            continue
        contents[path.name] = data
        checker.check_file(display, text)
    errors = [str(e) for e in sorted(checker.errors, key=lambda e: (e.file, e.line))]
    if errors:
        return None, errors
    return RuleSet.build(checker.rules, content_version(contents), checker.base_dir), []


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _kind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    short_tag = node.tag.rsplit(":", 1)[-1]
    return {"str": "a string", "bool": "true/false", "null": "empty"}.get(short_tag, "a number")


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


class _Checker:
    """Walk YAML nodes of rule files, collecting rules and errors."""

    def __init__(
        self,
        registry: Mapping[str, ActionSpec],
        base_dir: Path,
        epic_label_field: str | None = None,
    ) -> None:
        self.registry = registry
        self.base_dir = base_dir
        self.epic_label_field = epic_label_field
        self.errors: list[_Error] = []
        self.rules: list[Rule] = []
        self._names: dict[str, str] = {}  # rule name -> "file:line" of its first definition
        self._file = ""
        self.http_allowed_hosts: tuple[str, ...] | None = None  # None: http.request unchecked
        self._loader: _Loader = _Loader("")

    # --- plumbing -------------------------------------------------------------------

    def error(self, at: Node | int, message: str) -> None:
        line = at if isinstance(at, int) else _line(at)
        self.errors.append(_Error(self._file, line, message))

    def value(self, node: Node) -> Any:
        return self._loader.construct_object(node, deep=True)

    def check_file(self, display: str, text: str) -> None:
        self._file = display
        self._loader = _Loader(text)
        try:
            root = self._loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 0
            message = f"YAML syntax error: {exc.problem or exc.context}"
            context_mark = exc.context_mark
            if exc.problem and exc.context and context_mark and context_mark.line + 1 != line:
                # Where the unclosed thing started is often where the mistake is.
                message += f" ({exc.context} at line {context_mark.line + 1})"
            self.error(line, message)
            return
        except yaml.YAMLError as exc:
            self.error(0, f"YAML error: {exc}")
            return
        finally:
            self._loader.dispose()
        if root is None:
            return  # an empty file (or only comments) holds no rules
        top = self.mapping(root, "a rule file", ("rules",), required=("rules",))
        if top is None or "rules" not in top:
            return
        for rule_node in self.sequence(top["rules"][1], "rules") or ():
            self.rule(rule_node)

    def mapping(
        self,
        node: Node,
        what: str,
        allowed: tuple[str, ...] | None,
        required: tuple[str, ...] = (),
    ) -> dict[str, tuple[ScalarNode, Node]] | None:
        """Return key -> (key node, value node), reporting unknown and duplicate keys."""
        if not isinstance(node, MappingNode):
            self.error(node, f"{what} must be a mapping, not {_kind(node)}")
            return None
        found: dict[str, tuple[ScalarNode, Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.error(key_node, f"keys of {what} must be plain words")
                continue
            key = str(key_node.value)
            if key in found:
                self.error(key_node, f"duplicate key {key!r} in {what}")
            elif allowed is not None and key not in allowed:
                self.error(
                    key_node, f"unknown key {key!r} in {what} (expected: {', '.join(allowed)})"
                )
            else:
                found[key] = (key_node, value_node)
        for key in required:
            if key not in found:
                self.error(node, f"{what} needs {key!r}")
        return found

    def sequence(self, node: Node, what: str) -> list[Node] | None:
        if not isinstance(node, SequenceNode):
            self.error(node, f"{what} must be a list, not {_kind(node)}")
            return None
        return list(node.value)

    def string(self, node: Node, what: str, *, allow_empty: bool = False) -> str | None:
        if not (isinstance(node, ScalarNode) and node.tag == _STR):
            self.error(node, f"{what} must be a string, not {_kind(node)}")
            return None
        if not node.value and not allow_empty:
            self.error(node, f"{what} must not be empty")
            return None
        return str(node.value)

    def boolean(self, node: Node, what: str) -> bool | None:
        if not (isinstance(node, ScalarNode) and node.tag == _BOOL):
            self.error(node, f"{what} must be true or false, not {_kind(node)}")
            return None
        return bool(self.value(node))

    def strings(self, node: Node, what: str) -> tuple[str, ...] | None:
        items = self.sequence(node, what)
        if items is None:
            return None
        values = [self.string(item, f"each entry of {what}") for item in items]
        return None if None in values else tuple(v for v in values if v is not None)

    # --- rules ----------------------------------------------------------------------

    def rule(self, node: Node) -> None:
        keys = self.mapping(node, "a rule", _RULE_KEYS, required=("name", "on", "do"))
        if keys is None:
            return
        name = self._optional(keys, "name", lambda n: self.string(n, "name"))
        if name is not None:
            first = self._names.setdefault(name, f"{self._file}:{_line(node)}")
            if first != f"{self._file}:{_line(node)}":
                self.error(keys["name"][1], f"duplicate rule name {name!r} (first at {first})")
        description = self._optional(
            keys, "description", lambda n: self.string(n, "description", allow_empty=True)
        )
        enabled = self._optional(keys, "enabled", lambda n: self.boolean(n, "enabled"))
        on = self._on(keys["on"][1]) if "on" in keys else None
        conditions = self._optional(keys, "when", self._conditions_list) or ()
        concurrency = self._optional(keys, "concurrency", self._concurrency)
        has_on_failure = "on_failure" in keys
        steps = self._steps(keys["do"][1], has_on_failure) if "do" in keys else None
        on_failure: tuple[Step, ...] | None = ()
        if has_on_failure:
            do_ids = _node_ids(keys["do"][1]) if "do" in keys else {}
            on_failure = self._steps(keys["on_failure"][1], False, do_ids)
        if name is None or on is None or steps is None or on_failure is None:
            return
        if concurrency is _INVALID:
            return
        events, jql, fields, property_keys = on
        self.rules.append(
            Rule(
                name=name,
                description=description or "",
                enabled=True if enabled is None else enabled,
                events=events,
                jql=jql,
                fields=fields,
                property_keys=property_keys,
                conditions=conditions,
                steps=steps,
                source_file=self._file,
                source_line=_line(node),
                concurrency=concurrency[0] if concurrency else None,
                pending_latest=bool(concurrency and concurrency[1]),
                on_failure=on_failure,
            )
        )

    def _concurrency(self, node: Node) -> Any:
        """`"key template"` or `{key: "...", pending: latest}` -> (key, latest)."""
        latest = False
        key_node = node
        if isinstance(node, MappingNode):
            keys = self.mapping(node, "concurrency", ("key", "pending"), required=("key",))
            if keys is None or "key" not in keys:
                return _INVALID
            key_node = keys["key"][1]
            if "pending" in keys:
                pending = self.string(keys["pending"][1], "concurrency.pending")
                if pending != "latest":
                    if pending is not None:
                        self.error(
                            keys["pending"][1],
                            f"concurrency.pending: {pending!r} is not known (expected: latest)",
                        )
                    return _INVALID
                latest = True
        key = self.string(key_node, "concurrency key")
        if key is None:
            return _INVALID
        if not templates.is_template(key):
            return key, latest  # one key for every run of the rule: one run at a time
        try:
            names = templates.root_names(key)
        except TemplateSyntaxError as exc:
            self.error(key_node, f"concurrency: template error: {exc.message}")
            return _INVALID
        unknown = sorted(names - _PAYLOAD_NAMES)
        if unknown:
            self.error(
                key_node,
                f"concurrency: the key cannot render: it reads {', '.join(unknown)} "
                f"(a key is rendered when the event is planned, from the payload: "
                f"{', '.join(sorted(_PAYLOAD_NAMES))})",
            )
            return _INVALID
        return key, latest

    def _optional(
        self,
        keys: Mapping[str, tuple[ScalarNode, Node]],
        key: str,
        read: Callable[[Node], Any],
    ) -> Any:
        return read(keys[key][1]) if key in keys else None

    def _on(
        self, node: Node
    ) -> tuple[tuple[str, ...], str | None, tuple[str, ...], tuple[str, ...]] | None:
        keys = self.mapping(node, "on", _ON_KEYS, required=("events",))
        if keys is None or "events" not in keys:
            return None
        events = self.strings(keys["events"][1], "on.events")
        # A Forge event name stands for its Jira webhook event (Forge events are stored
        # in that shape): one index entry, and webhook registration sees Jira's names.
        if events:
            events = tuple(dict.fromkeys(FORGE_EVENTS.get(item, item) for item in events))
        for item in events or ():
            if item not in JIRA_EVENTS:
                self.error(
                    keys["events"][1],
                    f"unknown Jira webhook event {item!r} (expected: {', '.join(JIRA_EVENTS)},"
                    f" or a Forge event: {', '.join(FORGE_EVENTS)})",
                )
        if events == ():
            self.error(keys["events"][1], "on.events must name at least one event")
        jql = self._optional(keys, "jql", lambda n: self.string(n, "on.jql"))
        problem = (
            check_jql(jql, epic_label_field=self.epic_label_field) if jql is not None else None
        )
        if problem is not None:
            self.error(keys["jql"][1], f"on.jql: Jira's webhook filter cannot take this: {problem}")
        fields = self._optional(keys, "fields", lambda n: self.strings(n, "on.fields"))
        property_keys = self._optional(
            keys, "property_keys", lambda n: self.strings(n, "on.property_keys")
        )
        if property_keys is not None:
            if not property_keys:
                self.error(keys["property_keys"][1], "on.property_keys must name at least one key")
            elif events and not set(events) & set(_PROPERTY_EVENTS):
                self.error(
                    keys["property_keys"][1],
                    "on.property_keys narrows only the events "
                    + " and ".join(_PROPERTY_EVENTS)
                    + "; add one of them to on.events",
                )
        if not events:
            return None
        return events, jql, fields or (), property_keys or ()

    # --- conditions -----------------------------------------------------------------

    def _conditions_list(self, node: Node, what: str = "when") -> tuple[Condition, ...] | None:
        items = self.sequence(node, what)
        if items is None:
            return None
        conditions = [self.condition(item) for item in items]
        return tuple(c for c in conditions if c is not None)

    def condition(self, node: Node) -> Condition | None:
        keys = self.mapping(node, "a condition", None)
        if keys is None:
            return None
        heads = [key for key in keys if key in _HEADS]
        if len(heads) != 1:
            found = f" (found {', '.join(heads)})" if heads else ""
            self.error(node, f"a condition needs exactly one of {', '.join(_HEADS)}{found}")
            return None
        head = heads[0]
        value_node = keys[head][1]
        if head == "field":
            return self._field_condition(keys)
        if head == "changed":
            return self._changed_condition(keys)
        self._no_other_keys(keys, head, f"{head}:")
        if head == "not":
            if isinstance(value_node, SequenceNode):
                inner = self._conditions_list(value_node)
                return NotOf(AllOf(inner)) if inner is not None else None
            condition = self.condition(value_node)
            return NotOf(condition) if condition is not None else None
        inner = self._conditions_list(value_node)
        if inner is None:
            return None
        if not inner and not value_node.value:
            self.error(value_node, f"{head}: needs at least one condition")
        return AllOf(inner) if head == "all" else AnyOf(inner)

    def _no_other_keys(
        self,
        keys: Mapping[str, tuple[ScalarNode, Node]],
        head: str,
        what: str,
        extra: tuple[str, ...] = (),
    ) -> None:
        for key, (key_node, _) in keys.items():
            if key != head and key not in extra:
                self.error(key_node, f"unknown key {key!r} next to {what}")

    def _field_condition(self, keys: Mapping[str, tuple[ScalarNode, Node]]) -> Condition | None:
        path = self.string(keys["field"][1], "field")
        if path is not None and "" in path.split("."):
            self.error(keys["field"][1], f"field path {path!r} has an empty segment")
            path = None
        operators = [key for key in keys if key != "field"]
        for key in operators:
            if key not in FIELD_OPERATORS:
                self.error(
                    keys[key][0],
                    f"unknown condition operator {key!r} "
                    f"(expected one of: {', '.join(FIELD_OPERATORS)})",
                )
        known = [key for key in operators if key in FIELD_OPERATORS]
        if len(known) != 1:
            problem = "has none" if not known else f"has {', '.join(known)}"
            self.error(
                keys["field"][0], f"a field condition needs exactly one operator ({problem})"
            )
            return None
        op = known[0]
        expected = self._expected(op, keys[op][1])
        if path is None or expected is _INVALID:
            return None
        return FieldCondition(path=path, op=op, expected=expected, segments=tuple(path.split(".")))

    def _expected(self, op: str, node: Node) -> Any:
        if op in ("in", "not_in"):
            if not isinstance(node, SequenceNode):
                self.error(node, f"{op} takes a list, not {_kind(node)}")
                return _INVALID
            return self.value(node)
        if op == "exists":
            value = self.boolean(node, "exists")
            return _INVALID if value is None else value
        if op == "matches":
            pattern = self.string(node, "matches")
            if pattern is None:
                return _INVALID
            try:
                return re.compile(pattern)
            except re.error as exc:
                self.error(node, f"invalid regular expression {pattern!r}: {exc}")
                return _INVALID
        return self.value(node)

    def _changed_condition(self, keys: Mapping[str, tuple[ScalarNode, Node]]) -> Condition | None:
        self._no_other_keys(keys, "changed", "changed: (expected from, to)", ("from", "to"))
        name = self.string(keys["changed"][1], "changed")
        # Changelog values are strings (fromString/toString); compare as strings.
        ends: dict[str, str | None] = {}
        for end in ("from", "to"):
            if end not in keys:
                continue
            node = keys[end][1]
            if not isinstance(node, ScalarNode):
                self.error(node, f"{end} must be a single value, not {_kind(node)}")
                return None
            ends[end] = None if node.tag == _NULL else str(node.value)
        if name is None:
            return None
        return ChangedCondition(
            field=name,
            from_=ends.get("from"),
            to=ends.get("to"),
            has_from="from" in ends,
            has_to="to" in ends,
        )

    # --- steps ----------------------------------------------------------------------

    def _steps(
        self, node: Node, has_on_failure: bool, do_ids: Mapping[str, int] | None = None
    ) -> tuple[Step, ...] | None:
        where = "do" if do_ids is None else "on_failure"
        items = self.sequence(node, where)
        if items is None:
            return None
        if not items:
            self.error(node, f"{where} must list at least one step")
            return None
        if len(items) >= workflow.ON_FAILURE_BASE:
            self.error(node, f"{where} may list at most {workflow.ON_FAILURE_BASE - 1} steps")
            return None
        all_ids = {
            str(value.value): _line(key)
            for item in items
            if isinstance(item, MappingNode)
            for key, value in item.value
            if isinstance(key, ScalarNode) and key.value == "id" and isinstance(value, ScalarNode)
        }
        # `on_failure` steps read every step of `do` (those that succeeded) and `failure`.
        seen: dict[str, int] = dict(do_ids or {})
        base = 0 if do_ids is None else workflow.ON_FAILURE_BASE
        steps = [
            self.step(item, base + index, seen, all_ids, has_on_failure, on_failure=base > 0)
            for index, item in enumerate(items)
        ]
        return None if None in steps else tuple(s for s in steps if s is not None)

    def step(
        self,
        node: Node,
        index: int,
        seen: dict[str, int],
        all_ids: Mapping[str, int],
        has_on_failure: bool = False,
        *,
        on_failure: bool = False,
    ) -> Step | None:
        errors_before = len(self.errors)
        keys = self.mapping(node, "a step", _STEP_KEYS, required=("action",))
        if keys is None:
            return None
        control = self._control(keys, seen, all_ids, has_on_failure, on_failure)
        step_id = self._optional(keys, "id", lambda n: self.string(n, "id"))
        if step_id is not None:
            id_node = keys["id"][1]
            if not _STEP_ID.fullmatch(step_id):
                self.error(
                    id_node,
                    f"step id {step_id!r} must be letters, digits and _ "
                    f"(templates read it as steps.{step_id})",
                )
            elif step_id in seen:
                self.error(
                    id_node, f"duplicate step id {step_id!r} (first at line {seen[step_id]})"
                )
        action = self._optional(keys, "action", lambda n: self.string(n, "action"))
        op = self._operation(action, keys["action"][1]) if action is not None else None
        with_node = keys["with"][1] if "with" in keys else None
        params = self.mapping(with_node, "with", None) if with_node is not None else {}
        if params is not None and op is not None:
            self._check_params(op, params, keys["with"][0] if "with" in keys else node)
        if action == "http.request" and self.http_allowed_hosts is not None:
            self._check_http(keys["action"][1], params or {})
        if with_node is not None:
            self._check_templates(with_node, seen, all_ids, on_failure=on_failure)
        if step_id is not None and step_id not in seen:
            seen[step_id] = _line(keys["id"][1])
        if len(self.errors) != errors_before or action is None:
            return None
        with_ = self.value(with_node) if with_node is not None else {}
        return Step(
            id=step_id,
            action=action,
            with_=with_,
            index=index,
            line=_line(node),
            base_dir=self.base_dir,
            file_params=frozenset(p.name for p in op.params if p.location in _PATH_LOCATIONS)
            if op
            else frozenset(),
            compiled=templates.compile_tree(with_),
            control=control,
        )

    def _control(
        self,
        keys: Mapping[str, tuple[ScalarNode, Node]],
        seen: Mapping[str, int],
        all_ids: Mapping[str, int],
        has_on_failure: bool,
        on_failure: bool,
    ) -> workflow.Control | None:
        """Check a step's `if`, `until`, `every`, `timeout`, `fail_if`."""
        raw: dict[str, Any] = {}
        for key in ("if", "until", "fail_if"):
            if key in keys:
                raw[key] = self._step_conditions(
                    keys[key][1], key, seen, all_ids, result=key != "if", on_failure=on_failure
                )
        durations: dict[str, float | None] = {}
        for key in ("every", "timeout"):
            if key not in keys:
                continue
            key_node, value_node = keys[key]
            if "until" not in keys:
                self.error(
                    key_node, f"{key} belongs to until: (a step without until is called once)"
                )
            value = self.value(value_node)
            seconds = workflow.parse_duration(value)
            if seconds is None:
                self.error(
                    value_node,
                    f"{key}: {value!r} is not a duration (e.g. 30s, 10m, 2h, 1h30m, 1d)",
                )
            durations[key] = seconds
        if "until" in keys and "timeout" not in keys:
            self.error(
                keys["until"][0],
                "until needs a timeout (e.g. timeout: 2h): a wait must end even if the "
                "condition never holds",
            )
        if not raw and not has_on_failure:
            return None
        return workflow.Control(
            if_=raw.get("if"),
            until=raw.get("until"),
            fail_if=raw.get("fail_if"),
            every_s=durations.get("every") or workflow.DEFAULT_EVERY_S,
            timeout_s=durations.get("timeout"),
            has_on_failure=has_on_failure,
        )

    def _step_conditions(
        self,
        node: Node,
        key: str,
        seen: Mapping[str, int],
        all_ids: Mapping[str, int],
        *,
        result: bool,
        on_failure: bool,
    ) -> Any:
        """Check `if:`/`until:`/`fail_if:`; return their raw form (stored with the run)."""
        if isinstance(node, ScalarNode) and node.tag == _STR:
            text = str(node.value)
            try:
                single = templates.single_expression(text) if templates.is_template(text) else None
            except TemplateSyntaxError as exc:
                self.error(node, f"{key}: template error: {exc.message}")
                return None
            if single is None:
                self.error(
                    node, f'{key}: a string condition is one template expression, "{{{{ ... }}}}"'
                )
                return None
            self._check_template_text(
                node, key, seen, all_ids, on_failure=on_failure, result=result
            )
            return text
        conditions = self._conditions_list(node, key)
        if conditions is None:
            return None
        for scalar, _ in _condition_fields(node):
            self._check_path(scalar, key, seen, all_ids, result=result, on_failure=on_failure)
        return self.value(node)

    def _check_path(
        self,
        node: ScalarNode,
        key: str,
        seen: Mapping[str, int],
        all_ids: Mapping[str, int],
        *,
        result: bool,
        on_failure: bool,
    ) -> None:
        parts = str(node.value).split(".")
        head = parts[0]
        if head == "steps":
            ref = parts[1] if len(parts) > 1 else ""
            if ref not in seen:
                later = (
                    " (it is defined at a later step; steps run in order)" if ref in all_ids else ""
                )
                self.error(node, f"{key}: steps.{ref} is not the id of an earlier step{later}")
        elif head == "result" and not result:
            self.error(node, f"{key}: result is this step's answer: only until/fail_if read it")
        elif head == "failure" and not on_failure:
            self.error(node, f"{key}: failure is only known to on_failure steps")

    def _operation(self, action: str, node: Node) -> ActionSpec | None:
        op = self.registry.get(action)
        if op is None:
            close = difflib.get_close_matches(action, list(self.registry), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.error(node, f"unknown action {action!r}{hint}")
        return op

    def _check_params(
        self, op: ActionSpec, params: Mapping[str, tuple[ScalarNode, Node]], at: Node
    ) -> None:
        by_name = {p.name: p for p in op.params}
        for name, (key_node, value_node) in params.items():
            param = by_name.get(name)
            if param is None:
                takes = ", ".join(sorted(by_name)) or "nothing"
                self.error(
                    key_node, f"{op.full_name} takes no parameter {name!r} (it takes: {takes})"
                )
            elif param.many and isinstance(value_node, SequenceNode):
                for item in value_node.value:
                    if not isinstance(item, ScalarNode):
                        self.error(
                            item,
                            f"{op.full_name}: each entry of {name} must be a single value,"
                            f" not {_kind(item)}",
                        )
            elif param.location in ("path", "query", "file", "form", "download") and not isinstance(
                value_node, ScalarNode
            ):
                self.error(
                    value_node,
                    f"{op.full_name}: {name} is a {param.location} parameter "
                    f"and takes a single value, not {_kind(value_node)}",
                )
            elif param.location in _PATH_LOCATIONS:
                self._check_file(name, value_node, must_exist=param.location == "file")
        required = {p.name for p in op.params if p.required}
        for name in sorted(required - params.keys()):
            self.error(at, f"{op.full_name} needs parameter {name!r}")
        given = frozenset(name for name, (_, value) in params.items() if not _is_null(value))
        groups: tuple[tuple[str, ...], ...] = getattr(op, "one_of", ())
        if (problem := catalog.one_of_problem(op.full_name, groups, given)) is not None:
            self.error(at, problem)

    def _check_http(self, at: Node, params: Mapping[str, tuple[ScalarNode, Node]]) -> None:
        allowed = self.http_allowed_hosts or ()
        if not allowed:
            self.error(at, "http.request is refused: DEPLOYBOT_HTTP_ALLOWED_HOSTS is empty")
            return
        url = params.get("url")
        if url is None or not isinstance(url[1], ScalarNode) or url[1].tag != _STR:
            return
        if templates.is_template(url[1].value):
            return  # its host is only known per event; checked when rendered
        problem = host_problem(url[1].value, allowed)
        if problem is not None:
            self.error(url[1], f"http.request: {problem}")

    def _check_file(self, name: str, node: Node, *, must_exist: bool) -> None:
        if not (isinstance(node, ScalarNode) and node.tag == _STR):
            self.error(node, f"{name} must be a path (a string), not {_kind(node)}")
            return
        if templates.is_template(node.value):
            return  # only known per event; checked when rendered
        # Through links, as the executor resolves it: a link pointing out is outside too.
        base = os.path.realpath(self.base_dir)
        path = "" if "\x00" in node.value else os.path.realpath(os.path.join(base, node.value))
        if not path or path == base or os.path.commonpath([base, path]) != base:
            self.error(node, f"{name}: {node.value!r} is outside the rules folder")
        elif must_exist and not os.path.isfile(path):
            self.error(node, f"{name}: no file {node.value!r} in the rules folder")

    def _check_templates(
        self,
        node: Node,
        seen: Mapping[str, int],
        all_ids: Mapping[str, int],
        *,
        on_failure: bool = False,
    ) -> None:
        for scalar, path in _strings(node, "with"):
            if not templates.is_template(scalar.value):
                continue
            self._check_template_text(scalar, path, seen, all_ids, on_failure=on_failure)

    def _check_template_text(
        self,
        scalar: ScalarNode,
        path: str,
        seen: Mapping[str, int],
        all_ids: Mapping[str, int],
        *,
        on_failure: bool = False,
        result: bool = False,
    ) -> None:
        try:
            referenced, private = templates.inspect_template(scalar.value)
            roots = templates.root_names(scalar.value)
            # Parsing alone misses an unknown filter or test (`| lowr`): compiling
            # raises TemplateAssertionError (a TemplateSyntaxError) for it.
            templates.compile_template(scalar.value)
        except TemplateSyntaxError as exc:
            self.error(
                _template_line(scalar, exc.lineno), f"template error in {path}: {exc.message}"
            )
            return
        if private:
            names = ", ".join(map(repr, private))
            self.error(scalar, f"{path}: templates may not read private names ({names})")
        if "failure" in roots and not on_failure:
            self.error(scalar, f"{path}: failure is only known to on_failure steps")
        if "result" in roots and not result:
            self.error(scalar, f"{path}: result is this step's answer: only until/fail_if read it")
        for ref in referenced:
            if ref in seen:
                continue
            later = " (it is defined at a later step; steps run in order)" if ref in all_ids else ""
            self.error(
                scalar,
                f"{path}: steps.{ref} is not the id of an earlier step in this rule{later}",
            )


_INVALID: Final = object()


def _node_ids(node: Node) -> dict[str, int]:
    """The `id:` of each step node of a list, with its line (read even if a step is bad)."""
    if not isinstance(node, SequenceNode):
        return {}
    return {
        str(value.value): _line(key)
        for item in node.value
        if isinstance(item, MappingNode)
        for key, value in item.value
        if isinstance(key, ScalarNode) and key.value == "id" and isinstance(value, ScalarNode)
    }


def _condition_fields(node: Node) -> Iterator[tuple[ScalarNode, str]]:
    """Yield the `field:` path scalars of a condition list, nested ones included."""
    if isinstance(node, SequenceNode):
        for item in node.value:
            yield from _condition_fields(item)
    elif isinstance(node, MappingNode):
        for key, value in node.value:
            if not isinstance(key, ScalarNode):
                continue
            if key.value == "field" and isinstance(value, ScalarNode):
                yield value, str(value.value)
            elif key.value in ("all", "any", "not"):
                yield from _condition_fields(value)


def _strings(node: Node, where: str) -> Iterator[tuple[ScalarNode, str]]:
    """Yield every string scalar under `node` with its path like `with.data.version`."""
    if isinstance(node, ScalarNode):
        if node.tag == _STR:
            yield node, where
    elif isinstance(node, MappingNode):
        for key, value in node.value:
            yield from _strings(value, f"{where}.{key.value}")
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            yield from _strings(item, f"{where}[{i}]")


def _template_line(node: ScalarNode, template_line: int) -> int:
    # A literal block (`|`) starts on the line after its indicator and keeps its lines.
    if node.style == "|":
        return _line(node) + template_line
    return _line(node)
