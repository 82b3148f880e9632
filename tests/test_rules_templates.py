"""Templates of `with:`: sandboxed, strict, compiled once, Jira values stay data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.errors import TemplateRenderError
from bot.rules.templates import build_context, compile_template, render_params
from tests.helpers import payload, template_step


def _context(event: dict[str, Any], steps: dict[str, Any] | None = None) -> dict[str, Any]:
    return build_context(event, event_id="ev-1", received_at="2024-06-10T09:13:21Z", steps=steps)


def test_renders_recursively_with_payload_event_and_steps(tmp_path: Path) -> None:
    step = template_step(
        tmp_path,
        "          project_name: ml-prod\n"
        "          deployment_name: '{{ issue.fields.customfield_10050 }}'\n"
        "          data:\n"
        "            version: '{{ issue.key | lower }}-{{ steps.first[0].name }}'\n"
        "            maximum_instances: 3\n"
        "            labels: {event: '{{ event.id }}', at: '{{ event.received_at }}'}\n"
        "            tags: ['{{ user.displayName }}', true]\n",
    )
    params = render_params(
        step, _context(payload("jira_issue_updated"), {"first": [{"name": "a"}]})
    )
    assert params == {
        "project_name": "ml-prod",
        "deployment_name": "churn-model",
        "data": {
            "version": "ops-42-a",
            "maximum_instances": 3,
            "labels": {"event": "ev-1", "at": "2024-06-10T09:13:21Z"},
            "tags": ["Mia Krystof", True],
        },
    }
    assert step.with_["data"]["version"] == "{{ issue.key | lower }}-{{ steps.first[0].name }}"


def test_values_from_jira_stay_literal(tmp_path: Path) -> None:
    step = template_step(
        tmp_path,
        "          project_name: '{{ issue.fields.summary }}'\n"
        "          deployment_name: d\n"
        "          data: {version: '{{ issue.fields.labels[0] }}'}\n",
    )
    event = payload("jira_issue_updated")
    event["issue"]["fields"]["summary"] = "{{ 7*7 }}{% for x in range(3) %}x{% endfor %}"
    event["issue"]["fields"]["labels"] = ["{{ event.id }}"]
    params = render_params(step, _context(event))
    assert params["project_name"] == "{{ 7*7 }}{% for x in range(3) %}x{% endfor %}"
    assert params["data"] == {"version": "{{ event.id }}"}


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (
            "{{ issue.fields.customfield_99999 }}",
            "with.deployment_name: 'dict object' has no attribute 'customfield_99999'",
        ),
        ("{{ nope }}", "with.deployment_name: 'nope' is undefined"),
        ("{{ issue.fields.nope | lower }}", "with.deployment_name: 'dict object' has no attribute"),
        # `x.__class__` is refused when the rules load; the attr filter only when rendering
        ("{{ '' | attr('__class__') }}", "with.deployment_name: access to attribute '__class__'"),
        ("{{ 1 // 0 }}", "with.deployment_name: integer division or modulo by zero"),
    ],
)
def test_render_failures_raise_template_render_error(
    tmp_path: Path, template: str, message: str
) -> None:
    step = template_step(
        tmp_path,
        f'          project_name: p\n          deployment_name: "{template}"\n'
        "          data: {version: v}\n",
    )
    with pytest.raises(TemplateRenderError) as caught:
        render_params(step, _context(payload("jira_issue_updated")))
    assert str(caught.value).startswith(message), str(caught.value)


def test_file_parameter_is_resolved_inside_the_rules_folder(tmp_path: Path) -> None:
    folder = tmp_path / "rules"
    step = template_step(
        folder,
        "          project_name: p\n          deployment_name: d\n          version: v\n"
        "          file: artifacts/model.zip\n",
        action="ubiops.revisions_file_upload",
    )
    params = render_params(step, _context(payload("jira_issue_updated")))
    assert params["file"] == str(folder / "artifacts" / "model.zip")


def test_templated_file_parameter_cannot_leave_the_rules_folder(tmp_path: Path) -> None:
    step = template_step(
        tmp_path / "rules",
        "          project_name: p\n          deployment_name: d\n          version: v\n"
        "          file: 'artifacts/{{ issue.fields.summary }}.zip'\n",
        action="ubiops.revisions_file_upload",
    )
    event = payload("jira_issue_updated")
    event["issue"]["fields"]["summary"] = "../../../etc/passwd"
    with pytest.raises(TemplateRenderError, match="is outside the rules folder"):
        render_params(step, _context(event))
    event["issue"]["fields"]["summary"] = "model"
    rendered = render_params(step, _context(event))["file"]
    assert rendered == str(tmp_path / "rules" / "artifacts" / "model.zip")


def test_templates_are_compiled_once() -> None:
    assert compile_template("{{ issue.key }}") is compile_template("{{ issue.key }}")
