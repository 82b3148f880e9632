"""`deploybot webhooks sync|list`, run as a real process against the fake Jira."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.db.engine import create_engine, upgrade
from bot.db.tenants import Tenants
from tests.fakes.jira import FakeJira, FakeWebhook

PUBLIC_URL = "https://deploybot.example.com"
GOOD = """
  - name: deploy
    on:
      events: [jira:issue_updated]
      jql: project = OPS AND issuetype = Deployment
      fields: [status]
    do: [{action: ubiops.deployments_list, with: {project_name: p}}]
"""
# Inside the subset `rules check` knows, but this Jira refuses the property key.
REFUSED = """
  - name: odd-property
    on: {events: [jira:issue_created], jql: "issue.property[deploy:env] = prod"}
    do: [{action: ubiops.deployments_list, with: {project_name: p}}]
"""


@pytest.fixture
async def fake() -> AsyncIterator[FakeJira]:
    jira = FakeJira(mode="connect")
    await jira.start()
    try:
        yield jira
    finally:
        await jira.close()


async def deploybot(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        cwd=tmp_path,  # no stray .env is read
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_rules(folder: Path, *rules: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "rules.yaml").write_text("rules:\n" + "".join(textwrap.dedent(r) for r in rules))


async def test_sync_matches_the_rules_reports_refusals_and_list_shows_it(
    fake: FakeJira, database_url: str, tmp_path: Path
) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    await Tenants(engine).install(fake.client_key, fake.shared_secret, fake.base_url)
    await engine.dispose()
    rules_dir = tmp_path / "rules"
    write_rules(rules_dir, GOOD, REFUSED)
    env = {
        "PATH": "/usr/bin:/bin",
        "DEPLOYBOT_DATABASE_URL": database_url,
        "DEPLOYBOT_RULES_DIR": str(rules_dir),
        "DEPLOYBOT_PUBLIC_URL": PUBLIC_URL,
        "JIRA_AUTH_MODE": "connect",
        "JIRA_APP_KEY": fake.app_key,
    }
    # A webhook no rule needs any more (registered earlier for the same URL).
    fake.webhooks[7] = FakeWebhook(
        7,
        ["jira:issue_deleted"],
        "project = OLD",
        None,
        PUBLIC_URL + "/webhooks/jira",
        fake.now + 86400,
    )

    code, out, err = await deploybot(tmp_path, env, "webhooks", "sync")
    assert code == 1, out + err
    (created,) = fake.live()
    assert created.jql == "project = OPS AND issuetype = Deployment"
    assert created.fields == ["status"] and created.url == PUBLIC_URL + "/webhooks/jira"
    assert f"registered [{created.id}], deleted [7]" in out
    assert "error: Jira refused the webhook for rules odd-property" in out
    assert "issue.property[deploy:env]" in out and "not supported in webhook JQL" in out
    assert [r for r in fake.api_requests() if r.auth_error] == []

    code, out, err = await deploybot(tmp_path, env, "webhooks", "list", "--json")
    assert code == 0, err
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["tenant"] == fake.client_key and row["webhook_id"] == created.id
    assert row["jql"] == created.jql and row["events"] == ["jira:issue_updated"]
    assert row["fields"] == ["status"] and row["expires_at"] is not None

    write_rules(rules_dir, GOOD)  # the refused rule removed: sync is clean and changes nothing
    code, out, err = await deploybot(tmp_path, env, "webhooks", "sync")
    assert code == 0, out + err
    assert f"registered [], deleted [], kept [{created.id}]" in out
    assert [h.id for h in fake.live()] == [created.id]

    code, out, err = await deploybot(tmp_path, env, "webhooks", "list")
    assert code == 0 and created.jql in out and "jira:issue_updated" in out
    assert "1 webhook(s)" in err


async def test_sync_refuses_broken_rules_and_a_missing_public_url(
    database_url: str, tmp_path: Path
) -> None:
    rules_dir = tmp_path / "rules"
    write_rules(rules_dir, "  - name: x\n    on: {events: [jira:issue_updated], jql: labels = a}\n")
    env = {
        "PATH": "/usr/bin:/bin",
        "DEPLOYBOT_DATABASE_URL": database_url,
        "DEPLOYBOT_RULES_DIR": str(rules_dir),
    }
    code, _, err = await deploybot(tmp_path, env, "webhooks", "sync")
    assert code == 1 and "rules.yaml:" in err and "webhooks not synced" in err
    write_rules(rules_dir, GOOD)
    code, _, err = await deploybot(tmp_path, env, "webhooks", "sync")
    assert code == 2 and "DEPLOYBOT_PUBLIC_URL" in err


PROPERTY_RULE = """
  - name: on-deploy-property
    on:
      events: [issue_property_set]
      jql: project = OPS
      property_keys: [deploy-target, deploy-env]
    do: [{action: ubiops.deployments_list, with: {project_name: p}}]
"""


async def test_property_keys_are_registered_as_the_issue_property_keys_filter(
    fake: FakeJira, database_url: str, tmp_path: Path
) -> None:
    engine = create_engine(database_url)
    await upgrade(engine)
    await Tenants(engine).install(fake.client_key, fake.shared_secret, fake.base_url)
    await engine.dispose()
    rules_dir = tmp_path / "rules"
    write_rules(rules_dir, PROPERTY_RULE)
    env = {
        "PATH": "/usr/bin:/bin",
        "DEPLOYBOT_DATABASE_URL": database_url,
        "DEPLOYBOT_RULES_DIR": str(rules_dir),
        "DEPLOYBOT_PUBLIC_URL": PUBLIC_URL,
        "JIRA_AUTH_MODE": "connect",
        "JIRA_APP_KEY": fake.app_key,
    }
    code, out, err = await deploybot(tmp_path, env, "webhooks", "sync")
    assert code == 0, out + err
    (created,) = fake.live()
    assert created.property_keys == ["deploy-env", "deploy-target"]
    [registration] = [r for r in fake.api_requests() if r.method == "POST"]
    [entry] = json.loads(registration.body)["webhooks"]
    assert entry["issuePropertyKeysFilter"] == ["deploy-env", "deploy-target"]
    # Jira lists it back: the same filter, kept as it is
    code, out, err = await deploybot(tmp_path, env, "webhooks", "sync")
    assert code == 0, out + err
    assert f"registered [], deleted [], kept [{created.id}]" in out
    code, out, err = await deploybot(tmp_path, env, "webhooks", "list", "--json")
    assert code == 0, err
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["property_keys"] == ["deploy-env", "deploy-target"]
