"""What tests share: payloads, signed delivery headers, rules, a registry mirroring the
reference documents, and one polling helper."""

from __future__ import annotations

import asyncio
import inspect
import json
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.apis import ubiops
from bot.core.backoff import RetryPolicy
from bot.core.catalog import Operation, Param
from bot.db.engine import create_engine, upgrade
from bot.db.models import action_runs, events, rule_matches
from bot.db.queries import get_event
from bot.db.store import EventStore
from bot.db.tenants import Tenants
from bot.jira_app.access import JiraAccess
from bot.jira_app.jobs import WebhookMaintenance
from bot.rules.loader import load_rules
from bot.rules.model import RuleSet, Step
from bot.services.jira import DEFAULT_POLICY, refresh_token_grant
from bot.services.tokens import AccessToken, CachedToken, parse_token_answer
from bot.services.ubiops import UbiOpsClient
from bot.settings import Settings
from tests.conftest import CLIENT_SECRET, ClientFactory
from tests.fakes.jira import FakeJira
from tests.fakes.ubiops import FakeUbiOps
from tests.signing import InstallKeys, oauth_token

DATA_DIR = Path(__file__).parent / "data"
_PROJECT = Param("project_name", "path", required=True)
_DEPLOYMENT = Param("deployment_name", "path", required=True)
_VERSION = Param("version", "path", required=True)

# Mirrors reference/ubiops-deployments-api.md and reference/genesys-webdeployments-api.md.
REGISTRY: dict[str, Operation] = {
    op.full_name: op
    for op in (
        Operation(
            "ubiops",
            "deployment_versions_create",
            "POST",
            "/projects/{project_name}/deployments/{deployment_name}/versions",
            (_PROJECT, _DEPLOYMENT, Param("data", "body", required=True)),
        ),
        Operation(
            "ubiops",
            "deployment_versions_get",
            "GET",
            "/projects/{project_name}/deployments/{deployment_name}/versions/{version}",
            (_PROJECT, _DEPLOYMENT, _VERSION),
        ),
        Operation(
            "ubiops",
            "revisions_file_upload",
            "POST",
            "/projects/{project_name}/deployments/{deployment_name}/versions/{version}/revisions",
            (
                _PROJECT,
                _DEPLOYMENT,
                _VERSION,
                Param("file", "file"),
                Param("source_deployment", "form"),
                Param("source_version", "form"),
                Param("template_deployment_id", "form"),
            ),
        ),
        Operation(
            "ubiops",
            "revisions_file_download",
            "GET",
            "/projects/{project_name}/deployments/{deployment_name}/versions/{version}"
            "/revisions/{revision_id}/download",
            (
                _PROJECT,
                _DEPLOYMENT,
                _VERSION,
                Param("revision_id", "path", required=True),
                Param("save_to", "download"),  # deploybot's own: where the file is stored
            ),
        ),
        Operation(
            "ubiops",
            "deployments_list",
            "GET",
            "/projects/{project_name}/deployments",
            (_PROJECT, Param("labels", "query")),
        ),
        Operation(
            "genesys",
            "post_webdeployments_configuration_versions_draft_publish",
            "POST",
            "/api/v2/webdeployments/configurations/{configurationId}/versions/draft/publish",
            (Param("configuration_id", "path", required=True, wire_name="configurationId"),),
        ),
    )
}


# The example rollout's other steps, as the adapter defines them.
REGISTRY |= {
    f"ubiops.{name}": ubiops.OPERATIONS_BY_NAME[name]
    for name in (
        "revisions_get",
        "deployment_version_requests_create",
        "deployments_update",
        "deployment_versions_delete",
    )
}


def payload(name: str) -> dict[str, Any]:
    """Return a fresh copy of a Jira webhook payload fixture from tests/data."""
    data: dict[str, Any] = json.loads((DATA_DIR / f"{name}.json").read_text())
    return data


def write_rules(folder: Path, files: dict[str, str]) -> Path:
    """Write dedented rule files into `folder` and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(textwrap.dedent(text).lstrip("\n"))
    return folder


PAYLOAD = {
    "timestamp": 1700000000000,
    "webhookEvent": "jira:issue_updated",
    "issue_event_type_name": "issue_generic",
    "issue": {"id": "10001", "key": "OPS-7", "fields": {"summary": "Roll out model"}},
    "changelog": {"items": [{"field": "status", "fromString": "Open", "toString": "Done"}]},
}


def headers(delivery_id: str = "d-1", token: str | None = None, **extra: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token or oauth_token(CLIENT_SECRET)}",
        "Content-Type": "application/json",
        "X-Atlassian-Webhook-Identifier": delivery_id,
        **extra,
    }


async def stored_count(settings: Settings) -> int:
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(events))).scalar_one())
    finally:
        await engine.dispose()


TOKEN = "ubiops-token-" + "x" * 40
EXAMPLE_RULES = Path(__file__).resolve().parent.parent / "rules"

RULES = """
rules:
  - name: roll-out
    on:
      events: [jira:issue_updated]
      jql: project = OPS
    when:
      - changed: status
        to: Ready to deploy
    do:
      - id: version
        action: ubiops.deployment_versions_create
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          data:
            version: "{{ issue.key | lower }}"
            environment: python3-11
      - action: ubiops.revisions_file_upload
        with:
          project_name: ml-prod
          deployment_name: "{{ issue.fields.customfield_10050 }}"
          version: "{{ steps.version.version }}"
          file: artifacts/model.zip
  - name: only-hotfixes
    on:
      events: [jira:issue_updated]
    when:
      - field: issue.fields.summary
        matches: "(?i)hotfix"
    do:
      - action: ubiops.deployments_get
        with: {project_name: ml-prod, deployment_name: x}
"""


def issue_updated(
    key: str, *, summary: str = "Roll out", deployment: str | None = "churn"
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "summary": summary,
        "labels": ["model-x"],
        "project": {"id": "10000", "key": "OPS", "name": "Operations"},
    }
    if deployment is not None:
        fields["customfield_10050"] = deployment
    return {
        "timestamp": 1700000000000,
        "webhookEvent": "jira:issue_updated",
        "issue": {"id": "1", "key": key, "fields": fields},
        "changelog": {
            "items": [
                {
                    "field": "status",
                    "fieldId": "status",
                    "fromString": "Open",
                    "toString": "Ready to deploy",
                }
            ]
        },
    }


async def wait_for(
    predicate: Callable[[], Any], timeout_s: float = 15.0, poll_s: float = 0.05
) -> None:
    """Poll `predicate` (plain or async) until it is true; fail the test after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        found = predicate()
        if inspect.isawaitable(found):
            found = await found
        if found:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(poll_s)


async def event_when_runs_are(database_url: str, event_id: int, statuses: list[str]) -> Any:
    """Wait until the event's action runs have `statuses` (in order); return the event."""
    engine = create_engine(database_url)

    async def settled() -> bool:
        shown = await get_event(engine, event_id)
        assert shown is not None
        return [r["status"] for r in shown["action_runs"]] == statuses

    try:
        await wait_for(settled)
        shown = await get_event(engine, event_id)
    finally:
        await engine.dispose()
    assert shown is not None
    return shown


PUBLIC_URL = "https://deploybot.example.com/app"


CLIENT_KEY = "jira:tenant-1"


SECRET = "tenant-shared-secret-" + "abcdef0123456789" * 3


class KeyServer:
    """Serves install public keys by kid, as connect-install-keys.atlassian.com does."""

    def __init__(self, keys: InstallKeys) -> None:
        self.keys = keys
        self.fetches: list[str] = []

    def app(self) -> web.Application:
        async def key(request: web.Request) -> web.Response:
            kid = request.match_info["kid"]
            self.fetches.append(kid)
            if kid != self.keys.kid:
                return web.Response(status=404)
            return web.Response(text=self.keys.public_pem)

        app = web.Application()
        app.router.add_get("/{kid}", key)
        return app


def install_body(secret: str = SECRET, client_key: str = CLIENT_KEY) -> dict[str, str]:
    return {
        "key": "deploybot",
        "clientKey": client_key,
        "sharedSecret": secret,
        "baseUrl": "https://tenant-1.atlassian.net",
        "eventType": "installed",
    }


async def install(
    client: TestClient[Any, Any], keys: InstallKeys, body: dict[str, str] | None = None, **sign: Any
) -> int:
    body = body or install_body()
    token = keys.sign(
        "POST",
        "/lifecycle/installed",
        client_key=sign.pop("client_key", body["clientKey"]),
        audience=sign.pop("audience", PUBLIC_URL),
        **sign,
    )
    resp = await client.post(
        "/lifecycle/installed", json=body, headers={"Authorization": f"JWT {token}"}
    )
    return resp.status


QUICK = RetryPolicy(max_attempts=2, base_delay_s=0.0, max_delay_s=0.0, timeout_s=5.0)


@dataclass
class World:
    fake: FakeJira
    engine: AsyncEngine
    session: aiohttp.ClientSession
    settings: Settings

    def access(self, engine: AsyncEngine | None = None) -> JiraAccess:
        fake = self.fake
        return JiraAccess(
            self.settings, engine or self.engine, self.session, clock=lambda: fake.now, policy=QUICK
        )

    def maintenance(self, rules: RuleSet, interval_days: float = 1) -> WebhookMaintenance:
        return WebhookMaintenance(self.access(), lambda: rules, timedelta(days=interval_days))


async def make_world(mode: str, database_url: str) -> AsyncIterator[World]:
    fake = FakeJira(mode=mode)  # type: ignore[arg-type]
    await fake.start()
    engine = create_engine(database_url)
    await upgrade(engine)
    settings = Settings(
        database_url=database_url,
        public_url=PUBLIC_URL,
        jira_auth_mode=mode,  # type: ignore[arg-type]
        jira_app_key=fake.app_key,
        jira_base_url=fake.base_url,
        jira_client_id=fake.client_id,
        jira_client_secret=fake.client_secret,
        jira_refresh_token=fake.refresh_token,
        jira_token_url=fake.token_url,
    )
    if mode == "connect":
        await Tenants(engine).install(fake.client_key, fake.shared_secret, fake.base_url)
    try:
        async with aiohttp.ClientSession() as session:
            yield World(fake, engine, session, settings)
    finally:
        await engine.dispose()
        await fake.close()


def tenant_of(w: World) -> str:
    return w.fake.client_key if w.fake.mode == "connect" else ""


async def start_store(engine: AsyncEngine) -> EventStore:
    store = EventStore(engine)
    await store.start()
    return store


ADMIN_TOKEN = "admin-token-" + "a1b2c3d4" * 5


BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


Client = TestClient[Any, Any]


def write_rollout_rules(tmp_path: Path) -> Path:
    """Write the pipeline's two rules (a two-step UbiOps roll-out, and a miss)."""
    folder = tmp_path / "rules"
    (folder / "artifacts").mkdir(parents=True, exist_ok=True)
    (folder / "deploy.yaml").write_text(RULES)
    (folder / "artifacts" / "model.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    return folder


async def start_ubiops(aiohttp_server: Callable[..., Any]) -> tuple[FakeUbiOps, str]:
    """Serve a fake UbiOps with project ml-prod and no deployment yet."""
    fake = FakeUbiOps(token=TOKEN)
    server: TestServer = await aiohttp_server(fake.app())
    return fake, str(server.make_url(fake.prefix))


async def create_deployment(base_url: str, name: str = "churn") -> None:
    async with aiohttp.ClientSession() as session:
        data = {"name": name, "input_type": "structured", "output_type": "structured"}
        await UbiOpsClient(session, base_url, TOKEN).call(
            "deployments_create", {"project_name": "ml-prod", "data": data}
        )


async def deliver(client: Client, delivery_id: str, payload: dict[str, Any]) -> int:
    """POST a signed delivery; return the stored event's id."""
    resp = await client.post(
        "/webhooks/jira", data=json.dumps(payload), headers=headers(delivery_id)
    )
    assert resp.status == 202, await resp.text()
    return int((await resp.json())["event_id"])


async def run_statuses(client: Client, event_id: int) -> list[str]:
    shown = await (await client.get(f"/api/events/{event_id}", headers=BEARER)).json()
    return [run["status"] for run in shown["action_runs"]]


async def dead_event(client: Client, key: str) -> int:
    """Deliver an event whose first step dies (no such UbiOps deployment) and wait for it."""
    event_id = await deliver(client, f"d-{key}", issue_updated(key))

    async def settled() -> bool:
        return await run_statuses(client, event_id) == ["dead", "skipped"]

    await wait_for(settled)
    return event_id


async def start(
    make_client: ClientFactory, settings: Settings, rules_dir: Path, base_url: str
) -> Client:
    client: Client = await make_client(
        settings,
        rules_dir=rules_dir,
        admin_token=ADMIN_TOKEN,
        ubiops_api_url=base_url,
        ubiops_api_token=TOKEN,
    )
    return client


async def get_event_api(client: Client, event_id: int) -> dict[str, Any]:
    resp = await client.get(f"/api/events/{event_id}", headers=BEARER)
    assert resp.status == 200
    shown: dict[str, Any] = await resp.json()
    return shown


CHROMIUM = Path("/usr/bin/chromium")


CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


async def row_counts(settings: Settings) -> dict[str, int]:
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            return {
                table.name: int(
                    (await conn.execute(select(func.count()).select_from(table))).scalar_one()
                )
                for table in (events, rule_matches, action_runs)
            }
    finally:
        await engine.dispose()


def template_step(
    folder: Path, with_yaml: str, action: str = "ubiops.deployment_versions_create"
) -> Step:
    text = (
        "rules:\n  - name: r\n    on: {events: [jira:issue_updated]}\n    do:\n"
        f"      - id: first\n        action: ubiops.deployments_list\n"
        f"        with: {{project_name: p}}\n"
        f"      - action: {action}\n        with:\n{with_yaml}"
    )
    (folder / "artifacts").mkdir(parents=True, exist_ok=True)
    (folder / "artifacts" / "model.zip").write_bytes(b"PK")
    rule = load_rules(write_rules(folder, {"r.yaml": text}), REGISTRY).rules[0]
    return rule.steps[1]


async def deliver_connect(
    client: TestClient[Any, Any], token: str, delivery_id: str = "c-1", query: str = ""
) -> int:
    resp = await client.post(
        "/webhooks/jira" + query,
        data=json.dumps(PAYLOAD),
        headers={
            "Authorization": f"JWT {token}",
            "Content-Type": "application/json",
            "X-Atlassian-Webhook-Identifier": delivery_id,
        },
    )
    return resp.status


class OAuthTokens(CachedToken):
    """A JiraClient's bearer tokens from the refresh-token grant, kept in memory: the
    client's own tests, without the database `SharedOAuthTokens` keeps the chain in.
    Each grant's rotated refresh token is handed to `on_rotate`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        token_url: str,
        client_id: str,
        client_secret: str,
        refresh_token: str,
        *,
        on_rotate: Callable[[str], Awaitable[None]] | None = None,
        policy: RetryPolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.time,
        margin_s: float = 60.0,
    ) -> None:
        super().__init__(clock)
        self._session = session
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self.refresh_token = refresh_token
        self._on_rotate = on_rotate
        self._policy = policy
        self._margin_s = margin_s

    def __repr__(self) -> str:
        return f"OAuthTokens(token_url={self._token_url!r}, client_id={self._client_id!r})"

    async def _fetch(self) -> AccessToken:
        answer = await refresh_token_grant(
            self._session,
            self._token_url,
            self._client_id,
            self._client_secret,
            self.refresh_token,
            policy=self._policy,
        )
        token = parse_token_answer(
            answer, source="Jira's token endpoint", now_s=self._clock(), margin_s=self._margin_s
        )
        rotated = answer.get("refresh_token")
        if isinstance(rotated, str) and rotated and rotated != self.refresh_token:
            self.refresh_token = rotated
            if self._on_rotate is not None:
                await self._on_rotate(rotated)
        return token
