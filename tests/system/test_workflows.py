"""Workflows against a real `deploybot serve` process and stateful fakes, on both engines:
a rollout that waits for its build, a failed build cleaned up by `on_failure`, a rollback
arriving during a rollout, a typed read-modify-write of a Genesys draft, one action per
Jira change, and a SIGKILL while a step waits."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.engine import create_engine
from bot.db.models import action_runs
from bot.services.ubiops import UbiOpsClient
from tests.conftest import CLIENT_SECRET
from tests.fakes.genesys import FakeGenesys, _Configuration
from tests.fakes.ubiops import FakeUbiOps
from tests.helpers import EXAMPLE_RULES, TOKEN, wait_for
from tests.signing import oauth_token
from tests.system.harness import Service, serve, service_env

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals"),
    pytest.mark.slow,
]
GENESYS_ID, GENESYS_SECRET = "genesys-client", "genesys-secret-" + "w" * 24
CONFIG_ID = "7f9d2c44-0000-4000-8000-00000000a001"

RULES = """
rules:
  - name: rollout
    on: {events: [jira:issue_updated], jql: project = OPS}
    when: [{changed: status, to: Ready to deploy}]
    concurrency: "ubiops/ml-prod/{{ issue.fields.customfield_10050 }}"
    do:
      - id: version
        action: ubiops.deployment_versions_create
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          data: {version: "{{ issue.key | lower }}"}
      - id: upload
        action: ubiops.revisions_file_upload
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          version: "{{ steps.version.version }}"
          file: artifacts/model.zip
      - id: build
        action: ubiops.revisions_get
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          version: "{{ steps.version.version }}"
          revision_id: "{{ steps.upload.revision }}"
        until: [{field: result.status, in: [success, failed]}]
        every: 1s
        timeout: 2m
        fail_if: [{field: result.status, equals: failed}]
      - id: smoke
        action: ubiops.deployment_version_requests_create
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          version: "{{ steps.version.version }}"
          data: {input: 2.0}
      - action: ubiops.deployments_update
        if: [{field: steps.smoke.success, equals: true}]
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          data: {default_version: "{{ steps.version.version }}"}
    on_failure:
      - action: ubiops.deployment_versions_delete
        if: [{field: steps.version, exists: true}]
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          version: "{{ steps.version.version }}"

  - name: rollback
    on: {events: [jira:issue_updated], jql: project = OPS}
    when: [{changed: status, to: Roll back}]
    concurrency: "ubiops/ml-prod/{{ issue.fields.customfield_10050 }}"
    do:
      - action: ubiops.deployments_update
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          data: {default_version: "{{ issue.fields.customfield_10055 }}"}

  - name: web-languages
    on: {events: [jira:issue_updated], jql: project = OPS}
    when: [{changed: status, to: Add language}]
    do:
      - id: draft
        action: genesys.get_webdeployments_configuration_versions_draft
        with: {configuration_id: "{{ issue.fields.customfield_10060 }}"}
      - action: genesys.put_webdeployments_configuration_versions_draft
        with:
          configuration_id: "{{ issue.fields.customfield_10060 }}"
          configuration_version:
            name: "{{ steps.draft.name }}"
            defaultLanguage: "{{ steps.draft.defaultLanguage }}"
            languages: "{{ steps.draft.languages + [issue.fields.customfield_10061] }}"
            messenger: "{{ steps.draft.messenger }}"
            position: "{{ steps.draft.position | default(none) }}"
            headless: "{{ issue.fields.customfield_10062 }}"
      - action: genesys.post_webdeployments_configuration_versions_draft_publish
        with: {configuration_id: "{{ issue.fields.customfield_10060 }}"}
"""


def payload(key: str, to: str, *, change: str, **fields: Any) -> dict[str, Any]:
    return {
        "timestamp": 1700000000000,
        "webhookEvent": "jira:issue_updated",
        "issue": {
            "id": str(20000 + int(key.split("-")[1])),
            "key": key,
            "fields": {
                "project": {"id": "10000", "key": "OPS"},
                "customfield_10050": "churn",
                **fields,
            },
        },
        "changelog": {"id": change, "items": [{"field": "status", "toString": to}]},
    }


@dataclass
class Env:
    ubiops: FakeUbiOps
    genesys: FakeGenesys
    ubiops_url: str
    service: Service
    session: aiohttp.ClientSession
    engine: AsyncEngine

    async def send(self, body: dict[str, Any], delivery_id: str) -> int:
        headers = {
            "Authorization": f"Bearer {oauth_token(CLIENT_SECRET)}",
            "Content-Type": "application/json",
            "X-Atlassian-Webhook-Identifier": delivery_id,
        }
        url = self.service.url + "/webhooks/jira"
        async with self.session.post(url, data=json.dumps(body), headers=headers) as resp:
            assert resp.status in (200, 202), await resp.text()
            event_id: int = (await resp.json())["event_id"]
            return event_id

    async def statuses(self, event_id: int) -> list[str]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(action_runs.c.status)
                .where(action_runs.c.event_id == event_id)
                .order_by(action_runs.c.rule_name, action_runs.c.step_index)
            )
            return [r.status for r in rows]

    async def settle(self, event_id: int, expected: list[str], timeout_s: float = 60) -> None:
        async def done() -> bool:
            return await self.statuses(event_id) == expected

        try:
            await wait_for(done, timeout_s=timeout_s)
        except AssertionError:
            raise AssertionError(
                f"runs of event {event_id}: {await self.statuses(event_id)}, not {expected}"
            ) from None

    def uploads(self, version: str) -> int:
        return len(self.ubiops.calls("POST", rf".*/versions/{version}/revisions"))

    def default_version(self) -> str | None:
        value: str | None = self.ubiops.projects["ml-prod"]["churn"].data["default_version"]
        return value


@pytest.fixture
async def env(database_url: str, tmp_path: Path) -> AsyncIterator[Env]:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "workflows.yaml").write_text(RULES)
    shutil.copytree(EXAMPLE_RULES / "artifacts", rules / "artifacts")
    ubiops = FakeUbiOps(token=TOKEN)
    genesys = FakeGenesys(client_id=GENESYS_ID, client_secret=GENESYS_SECRET)
    ubiops_runner, ubiops_origin = await serve(ubiops.app())
    genesys_runner, genesys_origin = await serve(genesys.app)
    ubiops_url = ubiops_origin + ubiops.prefix
    settings = service_env(
        database_url,
        rules,
        UBIOPS_API_URL=ubiops_url,
        UBIOPS_API_TOKEN=TOKEN,
        GENESYS_API_URL=genesys_origin,
        GENESYS_LOGIN_URL=genesys_origin,
        GENESYS_CLIENT_ID=GENESYS_ID,
        GENESYS_CLIENT_SECRET=GENESYS_SECRET,
        DEPLOYBOT_ACTION_LEASE_S="3",
        DEPLOYBOT_LEASE_S="3",
    )
    service = Service(settings, tmp_path, tmp_path / "service.log")
    engine = create_engine(database_url)
    async with aiohttp.ClientSession() as session:
        await UbiOpsClient(session, ubiops_url, TOKEN).call(
            "deployments_create",
            {
                "project_name": "ml-prod",
                "data": {"name": "churn", "input_type": "structured", "output_type": "structured"},
            },
        )
        await service.start(session)
        try:
            yield Env(ubiops, genesys, ubiops_url, service, session, engine)
        finally:
            if service.proc is not None and service.proc.returncode is None:
                await service.stop(timeout_s=10)
            await engine.dispose()
            await ubiops_runner.cleanup()
            await genesys_runner.cleanup()


ROLLOUT_DONE = ["succeeded"] * 5 + ["skipped"]


async def test_rollout_waits_for_the_build_then_promotes(env: Env) -> None:
    env.ubiops.build_steps = ("queued", "building", "building", "success")
    # The first version becomes the default by itself; promote a second one.
    first = await env.send(payload("OPS-1", "Ready to deploy", change="1"), "d-1")
    await env.settle(first, ROLLOUT_DONE)
    event_id = await env.send(payload("OPS-2", "Ready to deploy", change="2"), "d-2")
    await env.settle(event_id, ROLLOUT_DONE)
    assert env.default_version() == "ops-2"
    assert env.uploads("ops-2") == 1
    assert len(env.ubiops.calls("GET", r".*/versions/ops-2/revisions/[^/]+")) == 4
    assert env.ubiops.calls("DELETE", r".*/versions/.*") == []


async def test_failed_build_is_cleaned_up_by_on_failure(env: Env) -> None:
    env.ubiops.build_steps = ("queued", "building", "failed")
    event_id = await env.send(payload("OPS-3", "Ready to deploy", change="3"), "d-3")
    await env.settle(
        event_id, ["succeeded", "succeeded", "dead", "skipped", "skipped", "succeeded"]
    )
    assert "ops-3" not in env.ubiops.version_names("ml-prod", "churn")
    assert env.ubiops.calls("PATCH", r".*/deployments/churn") == []


async def test_a_rollback_during_a_rollout_ends_on_the_rollback_version(env: Env) -> None:
    old = await env.send(payload("OPS-4", "Ready to deploy", change="4"), "d-4")
    await env.settle(old, ROLLOUT_DONE)
    env.ubiops.build_steps = ("queued", *["building"] * 4, "success")
    rollout = await env.send(payload("OPS-5", "Ready to deploy", change="5"), "d-5")

    async def building() -> bool:
        return (await env.statuses(rollout))[2:3] == ["waiting"]

    await wait_for(building)
    rollback = await env.send(
        payload("OPS-6", "Roll back", change="6", customfield_10055="ops-4"), "d-6"
    )
    await env.settle(rollout, ROLLOUT_DONE)
    await env.settle(rollback, ["succeeded"])
    promotes = [c.json["default_version"] for c in env.ubiops.calls("PATCH", r".*/churn")]
    assert promotes == ["ops-4", "ops-5", "ops-4"]
    assert env.default_version() == "ops-4"


async def test_a_genesys_draft_is_read_modified_and_written_with_its_types(env: Env) -> None:
    draft = FakeGenesys._version_doc(
        CONFIG_ID,
        {
            "name": "Support",
            "defaultLanguage": "en-us",
            "languages": ["en-us"],
            "messenger": {"enabled": True, "fileUpload": {"enableAttachments": False}},
        },
        "draft",
        "Pending",
    )
    env.genesys.configurations[CONFIG_ID] = _Configuration(draft)
    body = payload(
        "OPS-7",
        "Add language",
        change="7",
        customfield_10060=CONFIG_ID,
        customfield_10061="fr",
        customfield_10062=False,
    )
    event_id = await env.send(body, "d-7")
    await env.settle(event_id, ["succeeded"] * 3)
    published = env.genesys.configurations[CONFIG_ID].versions[-1]
    assert published["languages"] == ["en-us", "fr"]
    assert published["messenger"] == {"enabled": True, "fileUpload": {"enableAttachments": False}}
    assert published["headless"] is False
    assert published["position"] is None


async def test_one_jira_change_acts_once_whatever_delivery_brings_it(env: Env) -> None:
    body = payload("OPS-8", "Ready to deploy", change="8")
    first = await env.send(body, "d-8")
    await env.settle(first, ROLLOUT_DONE)
    again = await env.send(body, "d-8-sent-again")  # same change, new delivery identifier

    async def processed() -> bool:
        async with env.session.get(env.service.url + "/healthz") as resp:
            assert resp.status == 200
        return await env.statuses(again) == [] and await processed_event(env.engine, again)

    await wait_for(processed)
    assert len(env.ubiops.calls("POST", r".*/deployments/churn/versions")) == 1
    assert env.uploads("ops-8") == 1


async def processed_event(engine: AsyncEngine, event_id: int) -> bool:
    from bot.db.models import events

    async with engine.connect() as conn:
        status = (
            await conn.execute(select(events.c.status).where(events.c.id == event_id))
        ).scalar_one()
    return bool(status == "processed")


async def test_sigkill_while_waiting_resumes_polling_without_uploading_again(env: Env) -> None:
    env.ubiops.build_steps = ("queued", *["building"] * 5, "success")
    event_id = await env.send(payload("OPS-9", "Ready to deploy", change="9"), "d-9")

    async def polled_twice() -> bool:
        polls = env.ubiops.calls("GET", r".*/versions/ops-9/revisions/[^/]+")
        return len(polls) >= 2 and (await env.statuses(event_id))[2:3] == ["waiting"]

    await wait_for(polled_twice)
    await env.service.kill()
    polls_before = len(env.ubiops.calls("GET", r".*/versions/ops-9/revisions/[^/]+"))
    await env.service.start(env.session)
    await env.settle(event_id, ROLLOUT_DONE)
    assert env.uploads("ops-9") == 1
    polls = len(env.ubiops.calls("GET", r".*/versions/ops-9/revisions/[^/]+"))
    assert polls > polls_before  # polled again after the restart
    assert env.default_version() == "ops-9"
