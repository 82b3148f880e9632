"""`deploybot rules check` and `deploybot rules test` entry functions, and the dry run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bot.cli.rules import cmd_check, cmd_test
from bot.rules.dryrun import dry_run, plan_dry_run
from bot.rules.loader import ActionSpec, load_rules
from tests.helpers import DATA_DIR, REGISTRY, payload, write_rules

REPO_RULES = Path(__file__).parent.parent / "rules"


@pytest.fixture
def rules_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Copy the shipped rules to ./rules of a fresh working directory."""
    shutil.copytree(REPO_RULES, tmp_path / "rules")
    monkeypatch.chdir(tmp_path)
    return Path("rules")


def test_check_prints_every_error_and_returns_1(
    rules_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (rules_copy / "genesys-publish.yaml").read_text()
    (rules_copy / "genesys-publish.yaml").write_text(
        text.replace('matches: "^/publish\\\\b"', 'matches: "^/publish("')
    )
    (rules_copy / "zz.yaml").write_text("rules:\n  - name: deploy-model-when-ready\n")
    assert cmd_check(rules_copy, registry=REGISTRY) == 1
    assert capsys.readouterr().out.splitlines() == [
        "rules/genesys-publish.yaml:27: invalid regular expression '^/publish(': "
        "missing ), unterminated subpattern at position 9",
        "rules/zz.yaml:2: a rule needs 'on'",
        "rules/zz.yaml:2: a rule needs 'do'",
        "rules/zz.yaml:2: duplicate rule name 'deploy-model-when-ready' "
        "(first at rules/ubiops-rollout.yaml:10)",
        "4 error(s) in rules",
    ]


def test_check_prints_a_summary_and_returns_0(
    rules_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = load_rules(rules_copy, REGISTRY).version
    assert cmd_check(rules_copy, registry=REGISTRY) == 0
    assert capsys.readouterr().out == (
        f"rules: 3 rule(s) in 2 file(s) OK (version {version[:12]})\n"
    )


def test_check_with_the_real_registry(rules_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_check(rules_copy) == 0, capsys.readouterr().out


def test_dry_run_of_an_update(rules_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cmd_test(DATA_DIR / "jira_issue_updated.json", rules_copy, registry=REGISTRY) == 0
    model = Path.cwd() / "rules" / "artifacts" / "model.zip"
    assert (
        capsys.readouterr().out
        == f"""\
event: jira:issue_updated (OPS-42)
2 rule(s) listen to this event: 1 match, 1 do not; 1 rule(s) listen to other events only

MATCH deploy-model-when-ready  (rules/ubiops-rollout.yaml:10)
  jql `project = OPS AND issuetype = Deployment`: checked on the payload (no webhook of ours \
named): holds
  concurrency key: 'ubiops/ml-prod/churn-model': one run of this key at a time
  step 1 [version]: ubiops.deployment_versions_create
    POST /projects/ml-prod/deployments/churn-model/versions
    content-type: application/json
    json body:
      {{
        "version": "ops-42",
        "environment": "python3-11",
        "instance_type": "2048mb",
        "labels": {{
          "jira": "OPS-42"
        }}
      }}
    parameters (rendered):
      project_name: "ml-prod"
      deployment_name: "churn-model"
      data: {{"version": "ops-42", "environment": "python3-11", "instance_type": "2048mb", \
"labels": {{"jira": "OPS-42"}}}}
  step 2 [upload]: ubiops.revisions_file_upload
    POST /projects/ml-prod/deployments/churn-model/versions/~steps.version.version~/revisions
    content-type: multipart/form-data
    file (multipart field 'file'): {model}
    parameters (rendered):
      project_name: "ml-prod"
      deployment_name: "churn-model"
      version: "~steps.version.version~"
      file: "{model}"
    note: ~steps.version.version~ is a placeholder: a dry run calls no earlier step, so its \
result is not known
  step 3 [build]: ubiops.revisions_get
    until result.status in ['success', 'failed']: the answer is checked after each call, every \
30s, timeout 7200s (not known before running)
    fail_if result.status equals 'failed': checked on the answer (not known before running)
    GET \
/projects/ml-prod/deployments/churn-model/versions/~steps.version.version~/revisions/~steps.upload.revision~
    parameters (rendered):
      project_name: "ml-prod"
      deployment_name: "churn-model"
      version: "~steps.version.version~"
      revision_id: "~steps.upload.revision~"
    note: ~steps.upload.revision~ is a placeholder: a dry run calls no earlier step, so its \
result is not known
    note: ~steps.version.version~ is a placeholder: a dry run calls no earlier step, so its \
result is not known
  step 4 [smoke]: ubiops.deployment_version_requests_create
    POST /projects/ml-prod/deployments/churn-model/versions/~steps.version.version~/requests
    content-type: application/json
    json body:
      {{
        "input": 2.0
      }}
    parameters (rendered):
      project_name: "ml-prod"
      deployment_name: "churn-model"
      version: "~steps.version.version~"
      data: {{"input": 2.0}}
    note: ~steps.version.version~ is a placeholder: a dry run calls no earlier step, so its \
result is not known
  step 5: ubiops.deployments_update
    if steps.smoke.success equals True: not known before running (reads steps.smoke, the \
results of earlier steps)
    PATCH /projects/ml-prod/deployments/churn-model
    content-type: application/json
    json body:
      {{
        "default_version": "~steps.version.version~"
      }}
    parameters (rendered):
      project_name: "ml-prod"
      deployment_name: "churn-model"
      data: {{"default_version": "~steps.version.version~"}}
    note: ~steps.version.version~ is a placeholder: a dry run calls no earlier step, so its \
result is not known
  on_failure (only when a step above is dead; `failure` unknown now):
  step 1: ubiops.deployment_versions_delete
    if steps.version exists True: not known before running (reads steps.version, the results of \
earlier steps)
    DELETE /projects/ml-prod/deployments/churn-model/versions/~steps.version.version~
    parameters (rendered):
      project_name: "ml-prod"
      deployment_name: "churn-model"
      version: "~steps.version.version~"
    note: ~steps.version.version~ is a placeholder: a dry run calls no earlier step, so its \
result is not known

NO MATCH publish-web-config-on-done  (rules/genesys-publish.yaml:4)
  jql: `project = OPS AND issuetype = "Web config" AND status IN (Done, Closed)` does not hold \
for this issue (checked on the event itself)

dry run: nothing was sent
"""
    )


def test_dry_run_with_the_real_registry(
    rules_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cmd_test(DATA_DIR / "jira_comment_created.json", rules_copy) == 0
    out = capsys.readouterr().out
    assert "MATCH publish-web-config-on-comment  (rules/genesys-publish.yaml:20)" in out
    assert (
        "    POST /api/v2/webdeployments/configurations/7f9d2c44-0000-4000-8000-000000000001"
        "/versions/draft/publish\n"
    ) in out


def test_dry_run_reports_a_render_failure_per_step(tmp_path: Path) -> None:
    folder = write_rules(
        tmp_path / "rules",
        {
            "r.yaml": """
            rules:
              - name: r
                on: {events: [comment_created]}
                do:
                  - action: ubiops.deployment_versions_get
                    with: {project_name: p, deployment_name: "{{ issue.fields.customfield_10050 }}",
                           version: v}
                  - action: ubiops.deployments_list
                    with: {project_name: "{{ issue.key }}", labels: "jira:{{ issue.key }}"}
            """
        },
    )
    result = plan_dry_run(
        load_rules(folder, REGISTRY), payload("jira_comment_created"), registry=REGISTRY
    )
    (plan,) = result.matched
    first, second = plan.steps
    assert first.request is None and first.params is None
    assert first.error == (
        "with.deployment_name: 'dict object' has no attribute 'customfield_10050'"
    )
    assert second.error is None and second.request is not None
    assert (second.request.method, second.request.path, second.request.query) == (
        "GET",
        "/projects/OPS-43/deployments",
        (("labels", "jira:OPS-43"),),
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read the event"),
        ("[1, 2]", "the event must be a JSON object"),
    ],
)
def test_test_refuses_a_bad_event_file(
    rules_copy: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    (Path.cwd() / "event.json").write_text(content)
    assert cmd_test(Path("event.json"), rules_copy, registry=REGISTRY) == 1
    assert capsys.readouterr().out.startswith(f"event.json: {message}")


def test_test_refuses_broken_rules(rules_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (rules_copy / "bad.yaml").write_text("rules: 3\n")
    event = Path.cwd() / "e.json"
    event.write_text(json.dumps(payload("jira_issue_updated")))
    assert cmd_test(event, rules_copy, registry=REGISTRY) == 1
    assert capsys.readouterr().out == "rules/bad.yaml:1: rules must be a list, not a number\n"


def test_high_level_actions_are_checked_and_shown_without_a_single_request(
    tmp_path: Path,
) -> None:
    from bot.core.catalog import Param
    from bot.services.actions import Done, HighLevelAction, ServiceClient

    async def run(client: ServiceClient, params: object, state: object, run: object) -> Done:
        return Done(None)  # pragma: no cover - a dry run never runs actions

    deploy = HighLevelAction(
        "ubiops", "deploy_revision", (Param("file", "file", required=True),), run
    )
    registry: dict[str, ActionSpec] = {**REGISTRY, deploy.full_name: deploy}
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "m.zip").write_bytes(b"PK")
    folder = write_rules(
        tmp_path / "rules",
        {
            "r.yaml": """
            rules:
              - name: r
                on: {events: [comment_created]}
                do:
                  - {action: ubiops.deploy_revision, with: {file: m.zip}}
            """
        },
    )
    result = plan_dry_run(
        load_rules(folder, registry), payload("jira_comment_created"), registry=registry
    )
    (step,) = result.matched[0].steps
    assert (step.request, step.error) == (None, None)
    assert step.params == {"file": str(folder / "m.zip")}
    text = dry_run(load_rules(folder, registry), payload("jira_comment_created"), registry=registry)
    assert "    a high-level action: several calls, decided as it runs\n" in text
