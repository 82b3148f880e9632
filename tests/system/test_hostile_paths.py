"""Jira text that tries to climb out of a path: URL path parameters and local file paths.

A companion of test_hostile_input.py. Real signed deliveries reach a running deploybot
whose rules copy issue fields into a UbiOps path parameter, a download target and an
upload source. A dot segment or a path out of the rules folder must end the run dead with
a reason, and nothing may be sent to the fake UbiOps or written outside the folder. Both
engines run (the events, runs and errors are stored).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.core.apis import registry
from bot.core.catalog import Operation, Param, plan_request
from bot.errors import ActionError
from bot.rules.loader import check_rules
from bot.services.ubiops import UbiOpsClient
from bot.settings import Settings
from tests.conftest import ClientFactory
from tests.fakes.ubiops import FakeUbiOps
from tests.helpers import TOKEN, event_when_runs_are, headers, issue_updated

DOT_SEGMENTS = ["..", ".", "", " .. "]
DELETE_RULE = """
rules:
  - name: delete-version
    on: {events: [jira:issue_updated]}
    do:
      - action: ubiops.deployment_versions_delete
        with:
          project_name: ml-prod
          deployment_name: churn
          version: "{{ issue.fields.customfield_10051 }}"
"""
FILE_RULES = """
rules:
  - name: download
    on: {events: [jira:issue_updated]}
    do:
      - action: ubiops.revisions_file_download
        with:
          project_name: ml-prod
          deployment_name: churn
          version: v1
          revision_id: "{{ issue.fields.customfield_10052 }}"
          save_to: "{{ issue.fields.customfield_10051 }}"
  - name: upload
    on: {events: [jira:issue_updated]}
    do:
      - action: ubiops.revisions_file_upload
        with:
          project_name: ml-prod
          deployment_name: churn
          version: v1
          file: "{{ issue.fields.customfield_10053 }}"
"""


def _issue(key: str, **fields: str) -> dict[str, Any]:
    payload = issue_updated(key)
    payload["issue"]["fields"].update(fields)
    return payload


async def _deliver(client: Any, ident: str, payload: dict[str, Any]) -> int:
    resp = await client.post("/webhooks/jira", data=json.dumps(payload), headers=headers(ident))
    assert resp.status == 202, await resp.text()
    event_id: int = (await resp.json())["event_id"]
    return event_id


@pytest.fixture
async def ubiops(aiohttp_server: Callable[..., Any], tmp_path: Path) -> tuple[FakeUbiOps, str, str]:
    """The fake with deployment churn, version v1 and one uploaded revision (its id)."""
    fake = FakeUbiOps(token=TOKEN)
    base_url = str((await aiohttp_server(fake.app())).make_url(fake.prefix))
    model = tmp_path / "seed-model.zip"
    model.write_bytes(b"PK model bytes")
    where = {"project_name": "ml-prod", "deployment_name": "churn"}
    async with aiohttp.ClientSession() as session:
        client = UbiOpsClient(session, base_url, TOKEN)
        data = {"name": "churn", "input_type": "plain", "output_type": "plain"}
        await client.call("deployments_create", {"project_name": "ml-prod", "data": data})
        await client.call("deployment_versions_create", {**where, "data": {"version": "v1"}})
        upload = await client.call(
            "revisions_file_upload", {**where, "version": "v1", "file": str(model)}
        )
    fake.requests.clear()
    return fake, base_url, str(upload["revision"])


# ----- item 2: dot segments in rendered path parameters ---------------------------------


def test_every_operation_refuses_dot_segments_in_path_parameters() -> None:
    """UbiOps, Genesys and Jira: the one place that builds a path refuses them all.

    Jira's table has no path parameter yet: an issue-comment operation shaped like the
    ones Jira write-back adds stands in for it.
    """
    comment = Operation(
        "jira",
        "add_comment",
        "POST",
        "/rest/api/3/issue/{issueIdOrKey}/comment",
        (Param("issue", "path", required=True, wire_name="issueIdOrKey"), Param("body", "body")),
    )
    checked = set()
    for op in [*registry().values(), comment]:
        for param in (p for p in op.params if p.location == "path"):
            params: dict[str, Any] = {p.name: "x" for p in op.params if p.required}
            params |= dict.fromkeys(op.one_of[0] if op.one_of else (), "x")  # one whole source
            for value in DOT_SEGMENTS:
                with pytest.raises(ActionError, match=f"path parameter {param.name} is"):
                    plan_request(op, {**params, param.name: value})
            plan_request(op, {**params, param.name: "...x%2e%2e"})  # a name, not a segment
            checked.add(op.full_name.partition(".")[0])
    assert checked == {"ubiops", "genesys", "jira"}


async def test_a_dot_segment_from_jira_ends_the_run_dead_and_sends_nothing(
    make_client: ClientFactory,
    settings: Settings,
    tmp_path: Path,
    ubiops: tuple[FakeUbiOps, str, str],
) -> None:
    fake, base_url, _revision = ubiops
    rules = tmp_path / "delete-rules"
    rules.mkdir()
    (rules / "delete.yaml").write_text(DELETE_RULE)
    client = await make_client(
        settings, rules_dir=rules, ubiops_api_url=base_url, ubiops_api_token=TOKEN
    )
    for i, value in enumerate(DOT_SEGMENTS):
        event_id = await _deliver(client, f"dots-{i}", _issue(f"OPS-{i}", customfield_10051=value))
        shown = await event_when_runs_are(settings.database_url, event_id, ["dead"])
        error = shown["action_runs"][0]["last_error"]
        assert "path parameter version is" in error, error
        assert "never sent" in error
    assert fake.requests == []  # the deployment was not deleted (nor anything asked)


# ----- item 3: file paths out of the rules folder ---------------------------------------


async def test_rendered_file_paths_out_of_the_rules_folder_end_the_run_dead(
    make_client: ClientFactory,
    settings: Settings,
    tmp_path: Path,
    ubiops: tuple[FakeUbiOps, str, str],
) -> None:
    fake, base_url, revision = ubiops
    rules = tmp_path / "file-rules"
    rules.mkdir()
    (rules / "files.yaml").write_text(FILE_RULES)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for UbiOps")
    (rules / "link").symlink_to(outside, target_is_directory=True)
    (rules / "model.zip").write_bytes(b"PK upload me")
    client = await make_client(
        settings, rules_dir=rules, ubiops_api_url=base_url, ubiops_api_token=TOKEN
    )
    escapes = [
        ("../outside/written.zip", "../outside/secret.txt"),
        (str(outside / "written.zip"), str(outside / "secret.txt")),
        ("link/written.zip", "link/secret.txt"),  # a link inside pointing out
        ("sub/../../outside/written.zip", "sub/../../outside/secret.txt"),
        ("", "."),
    ]
    for i, (save_to, source) in enumerate(escapes):
        fields = {
            "customfield_10051": save_to,
            "customfield_10052": revision,
            "customfield_10053": source,
        }
        event_id = await _deliver(client, f"files-{i}", _issue(f"OPS-{i}", **fields))
        shown = await event_when_runs_are(settings.database_url, event_id, ["dead", "dead"])
        for run in shown["action_runs"]:
            assert "outside the rules folder" in run["last_error"], run
    assert fake.requests == []
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    # The control: paths inside the folder work, so the rules were armed all along.
    fields = {
        "customfield_10051": "downloads/model.zip",
        "customfield_10052": revision,
        "customfield_10053": "model.zip",
    }
    event_id = await _deliver(client, "files-ok", _issue("OPS-OK", **fields))
    await event_when_runs_are(settings.database_url, event_id, ["succeeded", "succeeded"])
    assert (rules / "downloads" / "model.zip").read_bytes() == b"PK model bytes"
    assert (
        len(fake.calls("POST", r"/projects/ml-prod/deployments/churn/versions/v1/revisions")) == 1
    )


def test_rules_check_refuses_literal_file_paths_out_of_the_folder(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.zip").write_bytes(b"PK")
    (rules / "link").symlink_to(outside, target_is_directory=True)
    (rules / "inside.zip").write_bytes(b"PK")
    cases = ["../outside/model.zip", str(outside / "model.zip"), "link/model.zip", "."]
    steps = "".join(
        f"""
      - action: ubiops.revisions_file_upload
        with: {{project_name: p, deployment_name: d, version: v, file: {json.dumps(f)}}}
      - action: ubiops.revisions_file_download
        with:
          project_name: p
          deployment_name: d
          version: v
          revision_id: r
          save_to: {json.dumps(f)}"""
        for f in cases
    )
    (rules / "escape.yaml").write_text(
        f"rules:\n  - name: escape\n    on: {{events: [jira:issue_updated]}}\n    do:{steps}\n"
    )
    ruleset, errors = check_rules(rules)
    assert ruleset is None
    outside_errors = [e for e in errors if "is outside the rules folder" in e]
    assert len(outside_errors) == 2 * len(cases), errors
    assert all(e.startswith(f"{rules / 'escape.yaml'}:") for e in outside_errors)
    lines = sorted(int(e.split(":")[1]) for e in outside_errors)
    assert len(set(lines)) == len(lines)  # each names its own line
