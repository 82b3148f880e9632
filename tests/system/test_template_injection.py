"""Template injection, end to end: Jira text is data, a hostile rule fails its run safely.

Real signed deliveries reach a running deploybot (make_client, a real localhost server)
whose rule copies issue fields (summary, description, a custom field, the issue key) into
UbiOps environment variables and a Genesys configuration. The fields hold Jinja syntax
and sandbox escapes; the fakes must receive them as the literal text, byte for byte.

A rule whose own template reads a private name (`x.__init__`, `x['_y']`) is refused when
the rules load; one that reaches it in a way only rendering reveals (the `attr` filter)
loads, and the sandbox fails its run: dead, with a clear error, nothing sent to UbiOps.

SQLite and PostgreSQL both run: the hostile text is stored (event body, rendered
parameters, errors) and read back by the executor, and the engines store text differently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from bot.db.engine import create_engine
from bot.db.queries import get_event
from bot.services.ubiops import UbiOpsClient
from bot.settings import Settings
from tests.conftest import ClientFactory
from tests.fakes.genesys import FakeGenesys
from tests.fakes.ubiops import FakeUbiOps
from tests.helpers import TOKEN, event_when_runs_are, headers, issue_updated, wait_for

HOSTILE = [
    "{{ 7*7 }}",
    "{% for x in range(3) %}x{% endfor %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{# comment #}{{ event.id }}{% raw %}{{ x }}{% endraw %}",
]
GENESYS_ID, GENESYS_SECRET = "genesys-client", "genesys-secret-" + "q" * 24

COPY_RULE = """
rules:
  - name: copy-fields
    on: {events: [jira:issue_updated]}
    do:
      - action: ubiops.deployment_environment_variables_create
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10051 }}"
          data: {name: SUMMARY, value: "{{ issue.fields.summary }}", secret: false}
      - action: ubiops.deployment_environment_variables_create
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10051 }}"
          data: {name: DESCRIPTION, value: "{{ issue.fields.description }}", secret: false}
      - action: ubiops.deployment_environment_variables_create
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10051 }}"
          data: {name: CUSTOM, value: "{{ issue.fields.customfield_10050 }}", secret: false}
      - action: ubiops.deployment_environment_variables_create
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10051 }}"
          data: {name: KEY, value: "{{ issue.key }}", secret: false}
      - action: genesys.post_webdeployments_configurations
        with:
          configuration_version:
            name: "{{ issue.fields.customfield_10051 }}"
            description: "{{ issue.fields.summary }}|{{ issue.key }}"
            defaultLanguage: en-us
            languages: [en-us]
"""

ESCAPE_RULE = """
rules:
  - name: escape-attempt
    on: {events: [jira:issue_updated]}
    do:
      - action: ubiops.deployments_list
        with:
          project_name: "{{ cycler | attr('__init__') }}"
      - action: ubiops.deployments_list
        with: {project_name: ml-prod}
"""


@pytest.fixture
async def fakes(aiohttp_server: Callable[..., Any]) -> tuple[FakeUbiOps, str, FakeGenesys, str]:
    ubiops = FakeUbiOps(token=TOKEN)
    ubiops_url = str((await aiohttp_server(ubiops.app())).make_url(ubiops.prefix))
    genesys = FakeGenesys(client_id=GENESYS_ID, client_secret=GENESYS_SECRET)
    genesys_server: TestServer = await aiohttp_server(genesys.app)
    genesys_url = str(genesys_server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        client = UbiOpsClient(session, ubiops_url, TOKEN)
        for i in range(len(HOSTILE)):
            data = {"name": f"d{i}", "input_type": "plain", "output_type": "plain"}
            await client.call("deployments_create", {"project_name": "ml-prod", "data": data})
    ubiops.requests.clear()
    return ubiops, ubiops_url, genesys, genesys_url


def hostile_issue(i: int, text: str) -> dict[str, Any]:
    payload = issue_updated(text, summary=text, deployment=text)
    fields = payload["issue"]["fields"]
    fields["description"] = f"{text} (description)"
    fields["customfield_10051"] = f"d{i}"  # where this delivery's variables go
    return payload


async def test_jira_text_reaches_the_services_literally(
    make_client: ClientFactory,
    settings: Settings,
    tmp_path: Path,
    fakes: tuple[FakeUbiOps, str, FakeGenesys, str],
) -> None:
    ubiops, ubiops_url, genesys, genesys_url = fakes
    rules = tmp_path / "copy-rules"
    rules.mkdir()
    (rules / "copy.yaml").write_text(COPY_RULE)
    client = await make_client(
        settings,
        rules_dir=rules,
        ubiops_api_url=ubiops_url,
        ubiops_api_token=TOKEN,
        genesys_api_url=genesys_url,
        genesys_login_url=genesys_url,
        genesys_client_id=GENESYS_ID,
        genesys_client_secret=GENESYS_SECRET,
    )
    event_ids = []
    for i, text in enumerate(HOSTILE):
        resp = await client.post(
            "/webhooks/jira", data=json.dumps(hostile_issue(i, text)), headers=headers(f"inj-{i}")
        )
        assert resp.status == 202, await resp.text()
        event_ids.append((await resp.json())["event_id"])
    engine = create_engine(settings.database_url)

    async def all_done() -> bool:
        for event_id in event_ids:
            shown = await get_event(engine, event_id)
            assert shown is not None
            runs = shown["action_runs"]
            assert not any(r["status"] in {"dead", "skipped"} for r in runs), runs
            if len(runs) != 5 or any(r["status"] != "succeeded" for r in runs):
                return False
        return True

    try:
        await wait_for(all_done, timeout_s=30)
    finally:
        await engine.dispose()

    configurations = {
        req.json["name"]: req.json
        for req in genesys.api_requests
        if req.method == "POST" and req.path == "/api/v2/webdeployments/configurations"
    }
    for i, text in enumerate(HOSTILE):
        sent = {
            req.json["name"]: req.json["value"]
            for req in ubiops.calls(
                "POST", rf"/projects/ml-prod/deployments/d{i}/environment-variables"
            )
        }
        assert sent == {
            "SUMMARY": text,
            "DESCRIPTION": f"{text} (description)",
            "CUSTOM": text,
            "KEY": text,
        }
        assert configurations[f"d{i}"]["description"] == f"{text}|{text}"
    assert len(configurations) == len(HOSTILE)


async def test_a_rule_template_escaping_the_sandbox_fails_its_run(
    make_client: ClientFactory,
    settings: Settings,
    tmp_path: Path,
    fakes: tuple[FakeUbiOps, str, FakeGenesys, str],
) -> None:
    ubiops, ubiops_url, _genesys, _url = fakes
    rules = tmp_path / "escape-rules"
    rules.mkdir()
    (rules / "escape.yaml").write_text(ESCAPE_RULE)
    client = await make_client(
        settings, rules_dir=rules, ubiops_api_url=ubiops_url, ubiops_api_token=TOKEN
    )
    resp = await client.post(
        "/webhooks/jira", data=json.dumps(issue_updated("OPS-9")), headers=headers("esc-1")
    )
    assert resp.status == 202
    event_id = (await resp.json())["event_id"]
    shown = await event_when_runs_are(settings.database_url, event_id, ["dead", "skipped"])
    error = shown["action_runs"][0]["last_error"]
    assert "with.project_name" in error
    assert "access to attribute '__init__'" in error and "unsafe" in error
    assert ubiops.requests == []  # neither the escaping step nor the one after it ran
