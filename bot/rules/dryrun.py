"""Dry run of one event: matching rules, failed conditions, and the exact HTTP calls.

Pure: nothing is sent. Steps run in a dry run are never called, so a later step that
reads `steps.X` sees a placeholder, shown as `~steps.X.field~` in its parameters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bot.core import catalog, masking
from bot.core.catalog import Operation, PlannedRequest
from bot.errors import DeploybotError
from bot.rules import workflow
from bot.rules.engine import evaluate
from bot.rules.loader import ActionSpec, default_registry
from bot.rules.model import Miss, Rule, RuleSet, Step
from bot.rules.templates import build_context, render_params
from bot.rules.workflow import concurrency_key


class Placeholder:
    """Stands for an earlier step's result; records which parts a template read."""

    def __init__(self, path: str, used: set[str]) -> None:
        self._path = path
        self._used = used

    def __getattr__(self, name: str) -> Placeholder:
        if name.startswith("_"):
            raise AttributeError(name)
        return Placeholder(f"{self._path}.{name}", self._used)

    def __getitem__(self, key: object) -> Placeholder:
        return Placeholder(f"{self._path}.{key}", self._used)

    def __str__(self) -> str:
        self._used.add(self._path)
        return f"~{self._path}~"  # "~" survives URL quoting, so paths stay readable


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step as it would run: rendered parameters and the HTTP request, or the error."""

    step: Step
    params: Mapping[str, Any] | None
    request: PlannedRequest | None
    error: str | None
    placeholders: tuple[str, ...]  # steps.X paths filled with placeholders
    main_call_only: bool = False  # a high-level action's main call; it decides the rest
    notes: tuple[str, ...] = ()  # what its if/until/fail_if decide, or cannot know yet


@dataclass(frozen=True, slots=True)
class RulePlan:
    """A matching rule and the plan of each of its steps."""

    rule: Rule
    steps: tuple[StepPlan, ...]
    on_failure: tuple[StepPlan, ...] = ()
    notes: tuple[str, ...] = ()  # how its JQL was decided, its concurrency key


@dataclass(frozen=True, slots=True)
class DryRunResult:
    """Everything a dry run found for one event."""

    event: str
    issue_key: str | None
    matched: tuple[RulePlan, ...]
    missed: tuple[tuple[Rule, Miss], ...]
    other_rules: int  # rules that listen to other events only


def plan_dry_run(
    ruleset: RuleSet,
    payload: Mapping[str, Any],
    *,
    event_id: str = "dry-run",
    received_at: str = "dry-run",
    registry: Mapping[str, ActionSpec] | None = None,
) -> DryRunResult:
    """Evaluate the payload and plan every step of every matching rule."""
    ops = default_registry() if registry is None else registry
    evaluation = evaluate(ruleset, payload)
    event = str(payload.get("webhookEvent", ""))
    matched = tuple(
        RulePlan(
            rule,
            _plan_steps(rule, rule.steps, payload, ops, event_id, received_at),
            _plan_steps(rule, rule.on_failure, payload, ops, event_id, received_at),
            _rule_notes(rule, payload, evaluation.jql.get(rule.name), event_id),
        )
        for rule in evaluation.matched
    )
    by_name = {rule.name: rule for rule in ruleset.for_event(event)}
    issue = payload.get("issue")
    key = issue.get("key") if isinstance(issue, Mapping) else None
    return DryRunResult(
        event=event,
        issue_key=key if isinstance(key, str) else None,
        matched=matched,
        missed=tuple((by_name[m.rule_name], m) for m in evaluation.missed),
        other_rules=len(ruleset.rules) - len(by_name),
    )


def _rule_notes(
    rule: Rule, payload: Mapping[str, Any], jql: str | None, event_id: str
) -> tuple[str, ...]:
    notes = []
    if rule.jql:
        notes.append(f"jql `{rule.jql}`: {jql or 'not checked'}")
    if rule.concurrency is not None:
        try:
            key = concurrency_key(rule, dict(payload), 0)
            latest = ", pending: latest (only the newest waiting run is kept)"
            notes.append(
                f"concurrency key: {key!r}: one run of this key at a time"
                + (latest if rule.pending_latest else "")
            )
        except DeploybotError as exc:
            notes.append(f"concurrency: {exc}: the run would be dead at once")
    return tuple(notes)


def _control_notes(step: Step, context: Mapping[str, Any]) -> list[str]:
    """What a step's if/until/fail_if would decide, or that only the run can know."""
    control = step.control
    if control is None:
        return []
    notes = []
    if control.if_ is not None:
        unknown = workflow.run_time_reads(control.if_)
        phrase = workflow.describe(control.if_)
        if unknown:
            notes.append(
                f"if {phrase}: not known before running (reads {', '.join(unknown)}, "
                f"the results of earlier steps)"
            )
        else:
            reason = workflow.check(control.if_, context)
            notes.append(
                f"if {phrase}: holds, the step runs"
                if reason is None
                else f"if {phrase}: does not hold ({reason}): the step would be skipped"
            )
    if control.until is not None:
        notes.append(
            f"until {workflow.describe(control.until)}: the answer is checked after each "
            f"call, every {control.every_s:g}s, timeout {control.timeout_s or 0:g}s "
            f"(not known before running)"
        )
    if control.fail_if is not None:
        notes.append(
            f"fail_if {workflow.describe(control.fail_if)}: checked on the answer "
            f"(not known before running)"
        )
    return notes


def _plan_steps(
    rule: Rule,
    steps: tuple[Step, ...],
    payload: Mapping[str, Any],
    ops: Mapping[str, ActionSpec],
    event_id: str,
    received_at: str,
) -> tuple[StepPlan, ...]:
    used: set[str] = set()
    results = {step.id: Placeholder(f"steps.{step.id}", used) for step in rule.steps if step.id}
    results |= {step.id: Placeholder(f"steps.{step.id}", used) for step in steps if step.id}
    plans: list[StepPlan] = []
    for position, step in enumerate(steps):
        used.clear()
        # `on_failure` steps read every step of `do` (those that succeeded) and `failure`.
        before = rule.steps if steps is rule.on_failure else ()
        earlier = {s.id: results[s.id] for s in (*before, *steps[:position]) if s.id}
        context = build_context(payload, event_id=event_id, received_at=received_at, steps=earlier)
        if steps is rule.on_failure:
            context["failure"] = Placeholder("failure", used)
        notes = _control_notes(step, context)
        params: dict[str, Any] | None = None
        request: PlannedRequest | None = None
        error: str | None = None
        try:
            params = render_params(step, context)
            op = ops.get(step.action)
            if op is None:
                error = f"unknown action {step.action!r}"
            elif isinstance(op, Operation):
                request = catalog.plan_request(op, params)
            elif (preview := getattr(op, "preview", None)) is not None:
                request = preview(params)
        except DeploybotError as exc:
            error = str(exc)
        main_only = request is not None and not isinstance(op, Operation)
        plans.append(
            StepPlan(step, params, request, error, tuple(sorted(used)), main_only, tuple(notes))
        )
    return tuple(plans)


def format_dry_run(result: DryRunResult) -> str:
    """Render a dry run result as the text `deploybot rules test` prints."""
    about = f" ({result.issue_key})" if result.issue_key else ""
    considered = len(result.matched) + len(result.missed)
    lines = [
        f"event: {result.event or '(no webhookEvent)'}{about}",
        f"{considered} rule(s) listen to this event: {len(result.matched)} match, "
        f"{len(result.missed)} do not; {result.other_rules} rule(s) listen to other events only",
    ]
    for plan in result.matched:
        lines += ["", f"MATCH {plan.rule.name}  ({plan.rule.source})"]
        lines += [f"  {note}" for note in plan.notes]
        for step_plan in plan.steps:
            lines += _format_step(step_plan)
        if plan.on_failure:
            lines.append("  on_failure (only when a step above is dead; `failure` unknown now):")
            for step_plan in plan.on_failure:
                lines += _format_step(step_plan)
    for rule, miss in result.missed:
        lines += ["", f"NO MATCH {rule.name}  ({rule.source})", f"  {miss.reason}"]
    lines.append("")
    lines.append("dry run: nothing was sent")
    return "\n".join(lines)


def _format_step(plan: StepPlan) -> list[str]:
    step = plan.step
    number = step.index + 1
    if step.index >= workflow.ON_FAILURE_BASE:
        number = step.index - workflow.ON_FAILURE_BASE + 1
    label = f"step {number}" + (f" [{step.id}]" if step.id else "")
    lines = [f"  {label}: {step.action}"]
    lines += [f"    {note}" for note in plan.notes]
    if plan.error is not None:
        return [*lines, f"    error: {plan.error}"]
    request = plan.request
    if request is None:
        lines.append("    a high-level action: several calls, decided as it runs")
    else:
        query = request.query_string
        lines.append(f"    {request.method} {request.path}{'?' + query if query else ''}")
        if request.content_type is not None:
            lines.append(f"    content-type: {request.content_type}")
        if not request.authorized:
            lines.append("    sent without credentials (a guest operation, as the SDK sends it)")
        if request.json_body is not None:
            lines.append("    json body:")
            shown = masking.mask_rendered(step.action, {"data": request.json_body})["data"]
            lines += _indented(shown, 6)
        for name, value in request.form:
            lines.append(f"    form field {name}: {value}")
        if request.file_path is not None:
            lines.append(f"    file (multipart field 'file'): {request.file_path}")
        if request.download_path is not None:
            lines.append(f"    response saved to: {request.download_path}")
        if plan.main_call_only:
            lines.append("    (its main call; the action makes the others it needs as it runs)")
    lines.append("    parameters (rendered):")
    for name, value in masking.mask_rendered(step.action, plan.params or {}).items():
        lines.append(f"      {name}: {json.dumps(value, ensure_ascii=False, default=str)}")
    for path in plan.placeholders:
        what = "a dry run calls no earlier step, so its result is not known"
        if path.startswith("failure"):
            what = "what failed is only known when a step is dead"
        lines.append(f"    note: ~{path}~ is a placeholder: {what}")
    return lines


def _indented(value: Any, spaces: int) -> list[str]:
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return [" " * spaces + line for line in text.splitlines()]


def dry_run(
    ruleset: RuleSet,
    payload: Mapping[str, Any],
    *,
    event_id: str = "dry-run",
    registry: Mapping[str, ActionSpec] | None = None,
) -> str:
    """Return the dry-run report of one event as text."""
    return format_dry_run(plan_dry_run(ruleset, payload, event_id=event_id, registry=registry))
