"""Wire conformance: deploybot sends what the official clients send, operation by operation.

One recording aiohttp server on localhost. Each operation a rule can call is sent once
by the official Python client (`ubiops` 4.15.0, `PureCloudPlatformClientV2` 219.0.0,
pointed at the server: configuration host; for Genesys an access token so it does not
log in) and once by deploybot the way users send it: a rule file checked by the real
loader, its parameters rendered from a Jira payload, run by the ActionRunner with the
clients `deploybot serve` builds from its settings. The two requests must agree on
method, path, query (as encoded on the wire), the headers that matter (Content-Type,
Authorization presence and scheme, Accept, the operation's own headers), the JSON body
and the multipart fields.

Jira's webhook operations have no official Python client here: their requests are
compared with the reference document (method, path, query, documented Content-Type).

Where deploybot differs on purpose, the difference is asserted and explained below:
- a path parameter holding `/` is sent encoded (`%2F`): the Genesys client sends it raw,
  which addresses another resource (the UbiOps client encodes it too);
- a request without a body (GET, DELETE) carries no Content-Type: both clients label it
  application/json although nothing follows;
- every UbiOps call asks for JSON (`Accept: application/json`); the UbiOps client states
  no preference (`*/*`) on its DELETEs, whose answers are empty.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import email.utils
import importlib
import json
import re
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import ubiops
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from bot.core.apis import genesys, registry
from bot.core.backoff import RetryPolicy
from bot.core.catalog import BODY_METHODS, PlannedRequest
from bot.core.regions import GENESYS_REGION_NAMES
from bot.errors import ActionError
from bot.rules.loader import check_rules, load_rules
from bot.rules.templates import build_context, render_params
from bot.services.actions import ServiceClient
from bot.services.http import send
from bot.services.jira import JiraClient
from bot.services.runner import ActionRunner
from bot.settings import Settings, from_env
from bot.web.app import service_clients
from tests.helpers import OAuthTokens

ServerFactory = Callable[..., Awaitable[TestServer]]

with warnings.catch_warnings():
    # 219.0.0 starts its config-file watcher with the deprecated Thread.setDaemon
    warnings.simplefilter("ignore", DeprecationWarning)
    genesys_sdk: Any = importlib.import_module("PureCloudPlatformClientV2")
GenesysApiClient: Any = genesys_sdk.api_client.ApiClient
PureCloudRegionHosts: Any = genesys_sdk.PureCloudRegionHosts

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference"
UBIOPS_TOKEN = "Token ubiops-wire-0123456789"
GENESYS_TOKEN = "genesys-wire-token-0123456789"
JIRA_TOKEN = "jira-wire-token-0123456789"
UBIOPS_PREFIX = "/v2.1"
MODEL = b"PK\x05\x06" + b"\0" * 18  # an empty zip archive
# Values with the characters the clients percent-encode in a query (`:` and `,`).
LABELS = "team:ml,env:prod"


# --- the recording server ---------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One multipart field: name, file name (None for a plain field) and content."""

    name: str
    filename: str | None
    content_type: str | None
    content: bytes


@dataclass(frozen=True)
class Seen:
    """One request as it arrived, raw: the path and query still encoded."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        lower = {k.lower(): v for k, v in self.headers.items()}
        return lower.get(name.lower())

    @property
    def content_type(self) -> str | None:
        value = self.header("Content-Type")
        return value.split(";")[0].strip().lower() if value else None

    def parts(self) -> list[Part]:
        """The multipart fields, parsed from the raw body."""
        raw = b"Content-Type: " + (self.header("Content-Type") or "").encode() + b"\r\n\r\n"
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw + self.body)
        assert message.is_multipart(), self.headers
        out = []
        for part in message.iter_parts():
            assert isinstance(part, Message)
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            out.append(
                Part(
                    str(part.get_param("name", header="content-disposition")),
                    part.get_filename(),
                    part.get("Content-Type"),
                    payload,
                )
            )
        return out


@dataclass
class Recorder:
    """Answers every request with `{}` (tokens for the login routes) and records it."""

    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        path, _, query = request.raw_path.partition("?")
        if path in ("/oauth/token", "/jira-token"):  # deploybot's logins, not compared
            token = GENESYS_TOKEN if path == "/oauth/token" else JIRA_TOKEN
            return web.json_response({"access_token": token, "expires_in": 3600})
        self.seen.append(Seen(request.method, path, query, dict(request.headers), body))
        return web.json_response({})

    def take(self) -> Seen:
        assert len(self.seen) == 1, [f"{s.method} {s.path}" for s in self.seen]
        return self.seen.pop()


# --- the cases ------------------------------------------------------------------------

P, D, V = "ml-prod", "churn", "v1"
WHERE: dict[str, Any] = {"project_name": P, "deployment_name": D}
VERSION: dict[str, Any] = {**WHERE, "version": V}
VARIABLE = {"name": "MODEL_NAME", "value": "churn:7,b", "secret": False}
CONFIG = {"name": "web-config", "description": "chat", "languages": ["en-us"]}
DEPLOYMENT = {"name": "site", "configuration": {"id": "cfg-1", "version": "2"}}
WIDGET = {"name": "legacy", "clientType": "v2", "authenticationRequired": False}
EXPAND = ["supportedContent", "configuration"]


@dataclass(frozen=True)
class Case:
    """One operation call: the parameters both sides get, and what is special about it."""

    action: str
    params: dict[str, Any]
    label: str = ""
    ours: dict[str, Any] = field(default_factory=dict)  # deploybot's own extra params

    @property
    def id(self) -> str:
        return self.action + (f"[{self.label}]" if self.label else "")

    @property
    def service(self) -> str:
        return self.action.split(".")[0]

    @property
    def name(self) -> str:
        return self.action.split(".")[1]


def _ubiops_cases() -> Iterator[Case]:
    def case(name: str, label: str = "", ours: dict[str, Any] | None = None, **params: Any) -> Case:
        return Case(f"ubiops.{name}", params, label, ours or {})

    yield case("builds_get", **VERSION, build_id="b-1")
    yield case("builds_list", **VERSION)
    yield case("builds_update", **VERSION, build_id="b-1", data={"description": "again"})
    yield case("deployment_audit_events_list", **WHERE, action="create", limit=3, offset=0)
    for scope, base in (("deployment", WHERE), ("deployment_version", VERSION)):
        prefix = f"{scope}_environment_variables"
        yield case(f"{prefix}_copy", **base, data={"source_deployment": "other"})
        yield case(f"{prefix}_create", **base, data=VARIABLE)
        yield case(f"{prefix}_delete", **base, id="env-1")
        yield case(f"{prefix}_get", **base, id="env-1")
        yield case(f"{prefix}_list", **base)
        yield case(f"{prefix}_update", **base, id="env-1", data=VARIABLE)
    yield case("deployment_versions_create", **WHERE, data={"version": V, "environment": "py"})
    yield case("deployment_versions_delete", **VERSION)
    yield case("deployment_versions_get", **VERSION)
    yield case("deployment_versions_list", **WHERE, labels=LABELS)
    yield case("deployment_versions_update", **VERSION, data={"maximum_instances": 3})
    yield case("deployments_create", project_name=P, data={"name": D, "input_type": "plain"})
    yield case("deployments_delete", **WHERE)
    yield case("deployments_get", **WHERE)
    yield case("deployments_list", project_name=P, labels=LABELS)
    yield case("deployments_update", **WHERE, data={"default_version": V})
    yield case("revisions_file_download", **VERSION, revision_id="r-1", ours={"save_to": "out.zip"})
    yield case("revisions_file_upload", "file", **VERSION, file="artifacts/model.zip")
    # item 1: the form fields alone still go as multipart/form-data
    yield case(
        "revisions_file_upload", "source", **VERSION, source_deployment="old", source_version="v0"
    )
    yield case("revisions_file_upload", "template", **VERSION, template_deployment_id="t-1")
    yield case("revisions_get", **VERSION, revision_id="r-1")
    # The requests API (smoke tests): direct and batch, deployment and version level.
    yield case("deployment_requests_create", **WHERE, data={"input": 2.0}, timeout=30)
    yield case("deployment_version_requests_create", **VERSION, data={"input": 2.0})
    yield case("deployment_requests_get", **WHERE, request_id="q-1", metadata_only=True)
    yield case("deployment_version_requests_get", **VERSION, request_id="q-1")
    yield case("batch_deployment_requests_create", **WHERE, data=[{"input": 1.0}])
    yield case("batch_deployment_version_requests_create", **VERSION, data=[{"input": 1.0}])
    yield case("revisions_list", **VERSION)
    yield case("revisions_rebuild", "data", **VERSION, revision_id="r-1", data={"reason": "x"})
    # item 2: a POST without a body is JSON all the same
    yield case("revisions_rebuild", "no-data", **VERSION, revision_id="r-1")


def _genesys_cases() -> Iterator[Case]:
    def case(name: str, label: str = "", **params: Any) -> Case:
        return Case(f"genesys.{name}", params, label)

    cfg = {"configuration_id": "cfg-1"}
    dep = {"deployment_id": "dep-1"}
    cobrowse = {**dep, "session_id": "s-1"}
    yield case("delete_webdeployments_configuration", **cfg)
    yield case("delete_webdeployments_deployment", **dep)
    yield case("delete_webdeployments_deployment_cobrowse_session_id", **cobrowse)
    yield case(
        "delete_webdeployments_token_revoke",
        x_journey_session_id="j-1",
        x_journey_session_type="web",
    )
    yield case("get_webdeployments_configuration_version", **cfg, version_id="2")
    yield case("get_webdeployments_configuration_versions", **cfg)
    yield case("get_webdeployments_configuration_versions_draft", **cfg)
    yield case("get_webdeployments_configurations", show_only_published=True)
    # item 7: `expand` is a list in a rule, sent comma-separated (encoded) as the client does
    yield case("get_webdeployments_deployment", **dep, expand=EXPAND)
    yield case("get_webdeployments_deployment_cobrowse_session_id", **cobrowse)
    yield case("get_webdeployments_deployment_configurations", **dep, type="Draft", expand=EXPAND)
    yield case("get_webdeployments_deployments", expand=EXPAND)
    # item 2: the example rule's publish, a POST without a body
    yield case("post_webdeployments_configuration_versions_draft_publish", **cfg)
    yield case("post_webdeployments_configurations", configuration_version=CONFIG)
    yield case("post_webdeployments_deployments", deployment=DEPLOYMENT)
    yield case(
        "post_webdeployments_token_oauthcodegrantjwtexchange",
        body={"deploymentId": "dep-1", "journeySessionId": "j-1", "code": "c", "redirectUri": "u"},
    )
    yield case(
        "post_webdeployments_token_refresh", "body", body={"refreshToken": "r", "deploymentId": "d"}
    )
    yield case("post_webdeployments_token_refresh", "no-body")
    yield case(
        "put_webdeployments_configuration_versions_draft", **cfg, configuration_version=CONFIG
    )
    yield case("put_webdeployments_deployment", **dep, deployment=DEPLOYMENT)
    yield case("delete_widgets_deployment", **dep)
    yield case("get_widgets_deployment", **dep)
    yield case("get_widgets_deployments")
    yield case("post_widgets_deployments", body=WIDGET)
    yield case("put_widgets_deployment", **dep, body=WIDGET)


def _jira_cases() -> Iterator[Case]:
    ids = {"webhookIds": [10000, 10001]}
    registration = {
        "url": "https://bot.example/webhooks/jira",
        "webhooks": [{"events": ["jira:issue_updated"], "jqlFilter": "project = OPS"}],
    }
    yield Case("jira.delete_webhook_by_id", {"container_for_webhook_ids": ids})
    yield Case("jira.get_dynamic_webhooks_for_app", {"start_at": 0, "max_results": 50})
    yield Case("jira.get_failed_webhooks", {"max_results": 100, "after": 1700000000000})
    yield Case("jira.refresh_webhooks", {"container_for_webhook_ids": ids})
    yield Case("jira.register_dynamic_webhooks", {"webhook_registration_details": registration})


SDK_CASES = [*_ubiops_cases(), *_genesys_cases()]
JIRA_CASES = list(_jira_cases())


def test_the_cases_cover_every_operation_a_rule_can_call() -> None:
    covered = {c.action for c in [*SDK_CASES, *JIRA_CASES]}
    assert covered == set(registry()), set(registry()) ^ covered
    assert len(covered) == 66


# --- the official clients ---------------------------------------------------------------


def _ubiops_sdk(host: str, case: Case, files: Path) -> None:
    """Send the case with the UbiOps client (its generated method, or for the builds
    operations that 4.15.0 does not generate, its `call_api` as the generated code does)."""
    configuration = ubiops.Configuration(host=host, api_key={"Authorization": UBIOPS_TOKEN})
    params = dict(case.params)
    if "file" in params:
        params["file"] = str(files / params["file"])
    if "data" not in params and case.name == "revisions_rebuild":
        # `data` is required by the client; without its check it sends no body, as asked
        configuration.client_side_validation = False
        params["data"] = None
    client = ubiops.ApiClient(configuration)
    try:
        if case.name.startswith("builds_"):
            _ubiops_builds(client, case.name, params)
        else:
            answer = getattr(ubiops.CoreApi(client), case.name)(**params)
            if hasattr(answer, "close"):
                answer.close()  # a download is handed over as an open stream
    except (ubiops.ApiException, ValueError, TypeError, AttributeError):
        pass  # the answer (`{}`) may not parse as the model: the request is what counts
    finally:
        client.close()


def _ubiops_builds(client: Any, name: str, params: dict[str, Any]) -> None:
    path = "/projects/{project_name}/deployments/{deployment_name}/versions/{version}/builds"
    data = params.pop("data", None)
    if "build_id" in params:
        path += "/{build_id}"
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    method = {"builds_get": "GET", "builds_list": "GET", "builds_update": "PATCH"}[name]
    client.call_api(
        path,
        method,
        params,
        [],
        headers,
        body=data,
        post_params=[],
        files={},
        response_type="object",
        auth_settings=["api_key"],
        _return_http_data_only=True,
    )


def _genesys_sdk(host: str, case: Case) -> None:
    """Send the case with the Genesys client: API host set, access token given."""
    client = GenesysApiClient(host=host)
    client.access_token = GENESYS_TOKEN
    kind = "WidgetsApi" if "_widgets_" in case.name else "WebDeploymentsApi"
    api = getattr(genesys_sdk, kind)(client)
    try:
        getattr(api, case.name)(**case.params)
    except (ValueError, TypeError, AttributeError):
        pass  # the answer (`{}`) may not parse as the model: the request is what counts
    finally:
        client.rest_client.pool_manager.clear()  # close its kept-alive connections


# --- deploybot, through a rule ------------------------------------------------------------


def _rule_value(name: str, value: Any, fields: dict[str, Any]) -> Any:
    """Strings come from the Jira payload through a template, as in users' rules."""
    if isinstance(value, str) and name not in ("file", "save_to"):
        fields[name] = value
        return "{{ issue.fields." + name + " }}"
    return value


def _through_a_rule(rules_dir: Path, case: Case) -> tuple[str, dict[str, Any]]:
    """Write the case as a one-step rule, load it with the real checker, render it."""
    fields: dict[str, Any] = {}
    with_ = {k: _rule_value(k, v, fields) for k, v in {**case.params, **case.ours}.items()}
    rule = {
        "name": "wire",
        "on": {"events": ["jira:issue_updated"]},
        "do": [{"action": case.action, "with": with_}],
    }
    (rules_dir / "wire.yaml").write_text(yaml.safe_dump({"rules": [rule]}, sort_keys=False))
    [loaded] = load_rules(rules_dir).rules
    [step] = loaded.steps
    context = build_context({"issue": {"key": "OPS-1", "fields": fields}}, event_id="1")
    return step.action, render_params(step, context)


def _settings(base: str, *, genesys_credentials: bool = True) -> Settings:
    return Settings(
        ubiops_api_url=base + UBIOPS_PREFIX,
        ubiops_api_token=UBIOPS_TOKEN,
        genesys_api_url=base,
        genesys_login_url=base,
        genesys_client_id="client" if genesys_credentials else None,
        genesys_client_secret="secret" if genesys_credentials else None,
        http_attempts=1,
    )


async def _deploybot(base: str, rules_dir: Path, case: Case) -> None:
    action, params = _through_a_rule(rules_dir, case)
    async with aiohttp.ClientSession() as session:
        clients: dict[str, ServiceClient | None]
        if case.service == "jira":
            tokens = OAuthTokens(session, base + "/jira-token", "id", "secret", "refresh")
            clients = {"jira": JiraClient(session, base, tokens)}
        else:
            # the guest operations need no Genesys credentials: built without any
            guest = case.name in genesys.GUEST_OPERATIONS
            clients = service_clients(_settings(base, genesys_credentials=not guest), session)
        runner = ActionRunner(clients, files_dir=rules_dir)
        await runner.run(action, params)


# --- comparison -----------------------------------------------------------------------


def _query(seen: Seen) -> list[str]:
    """The query pairs as encoded on the wire (order aside)."""
    return sorted(seen.query.split("&")) if seen.query else []


def _body(seen: Seen) -> Any:
    if seen.content_type == "multipart/form-data":
        return [
            (p.name, p.filename, p.content_type if p.filename else None, p.content)
            for p in seen.parts()
        ]
    if seen.content_type == "application/json" and seen.body:
        return json.loads(seen.body)
    return seen.body


def essentials(seen: Seen) -> dict[str, Any]:
    """What must agree between the client's request and deploybot's."""
    out = {
        "method": seen.method,
        "path": seen.path,
        "query": _query(seen),
        "accept": seen.header("Accept"),
        "authorization": seen.header("Authorization"),
        "journey headers": {
            k.lower(): v for k, v in seen.headers.items() if k.lower().startswith("x-journey-")
        },
        "body": _body(seen),
    }
    # Content-Type matters where a body may follow; see the module docstring.
    out["content-type"] = seen.content_type if seen.method in BODY_METHODS else "(no body)"
    return out


async def _both(case: Case, aiohttp_server: ServerFactory, tmp_path: Path) -> tuple[Seen, Seen]:
    recorder = Recorder()
    server = await aiohttp_server(recorder.app())
    base = str(server.make_url("")).rstrip("/")
    rules_dir = tmp_path / "rules"
    (rules_dir / "artifacts").mkdir(parents=True)
    (rules_dir / "artifacts" / "model.zip").write_bytes(MODEL)
    if case.service == "ubiops":
        await asyncio.to_thread(_ubiops_sdk, base + UBIOPS_PREFIX, case, rules_dir)
    else:
        await asyncio.to_thread(_genesys_sdk, base, case)
    official = recorder.take()
    await _deploybot(base, rules_dir, case)
    return official, recorder.take()


@pytest.mark.parametrize("case", SDK_CASES, ids=[c.id for c in SDK_CASES])
async def test_deploybot_sends_what_the_official_client_sends(
    case: Case, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    official, ours = await _both(case, aiohttp_server, tmp_path)
    expected = essentials(official)
    if case.service == "ubiops" and official.method == "DELETE":
        assert expected["accept"] == "*/*"  # no preference: see the module docstring
        expected["accept"] = "application/json"
    if case.service == "ubiops":
        # The UbiOps client sends a boolean query value as Python's text (`True`); deploybot
        # sends the JSON spelling (`true`) that the API documents use. Both parse the same.
        expected["query"] = [
            re.sub(r"=(True|False)$", lambda m: "=" + m[1].lower(), q) for q in expected["query"]
        ]
    assert essentials(ours) == expected
    # The deliberate header difference: no Content-Type without a body.
    if ours.method not in BODY_METHODS:
        assert (ours.body, official.body) == (b"", b"")
        assert ours.content_type is None
        assert official.content_type == "application/json"


# What the table above checks, item by item of issue #22, so a regression names itself.


def _case(case_id: str) -> Case:
    return next(c for c in SDK_CASES if c.id == case_id)


async def test_item1_an_upload_from_a_source_version_is_multipart(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    _, ours = await _both(_case("ubiops.revisions_file_upload[source]"), aiohttp_server, tmp_path)
    assert ours.content_type == "multipart/form-data"
    assert [(p.name, p.content) for p in ours.parts()] == [
        ("source_deployment", b"old"),
        ("source_version", b"v0"),
    ]


@pytest.mark.parametrize(
    ("case_id", "body"),
    [
        ("genesys.post_webdeployments_configuration_versions_draft_publish", b"null"),
        ("genesys.post_webdeployments_token_refresh[no-body]", b"null"),
        ("ubiops.revisions_rebuild[no-data]", b""),
    ],
)
async def test_item2_a_post_without_a_body_is_json(
    case_id: str, body: bytes, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    official, ours = await _both(_case(case_id), aiohttp_server, tmp_path)
    # Genesys' client serialises the absent body (`null`), UbiOps' sends none: each as its own
    assert (ours.content_type, ours.body) == (official.content_type, official.body)
    assert (ours.content_type, ours.body) == ("application/json", body)


@pytest.mark.parametrize("name", sorted(genesys.GUEST_OPERATIONS))
async def test_item3_guest_operations_go_without_credentials(
    name: str, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    case = next(c for c in SDK_CASES if c.action == f"genesys.{name}")
    official, ours = await _both(case, aiohttp_server, tmp_path)
    # and deploybot sent it with no Genesys credentials configured at all (_deploybot)
    assert official.header("Authorization") is None
    assert ours.header("Authorization") is None


async def test_item3_other_genesys_operations_still_need_credentials(tmp_path: Path) -> None:
    async with aiohttp.ClientSession() as session:
        clients = service_clients(
            _settings("http://127.0.0.1:9", genesys_credentials=False), session
        )
        with pytest.raises(ActionError, match="GENESYS_CLIENT_ID"):
            await ActionRunner(clients).run(
                "genesys.get_webdeployments_deployments", {"expand": EXPAND}
            )


@pytest.mark.parametrize(
    "case_id",
    [
        "ubiops.deployments_list",
        "ubiops.deployment_versions_list",
        "genesys.get_webdeployments_deployment",
        "genesys.get_webdeployments_deployments",
    ],
)
async def test_item7_item9_query_values_are_encoded_as_the_client_encodes_them(
    case_id: str, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    official, ours = await _both(_case(case_id), aiohttp_server, tmp_path)
    assert _query(ours) == _query(official)
    assert any(
        v in ours.query
        for v in ("labels=team%3Aml%2Cenv%3Aprod", "expand=supportedContent%2Cconfiguration")
    )


# --- the deliberate difference: `/` inside a path parameter ----------------------------------


async def test_a_slash_in_a_path_parameter_stays_inside_it(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    """The Genesys client sends `/` raw (`quote(value)`), so `dep/x` addresses
    `/deployments/dep/x` and `dep/../x` even `/deployments/x` (dot segments are resolved
    on the way): other resources. deploybot encodes it, as the UbiOps client does."""
    for value, theirs in (("dep/x", "dep/x"), ("dep/../x", "x")):
        case = Case("genesys.get_webdeployments_deployment", {"deployment_id": value})
        official, ours = await _both(case, aiohttp_server, tmp_path / "g" / theirs)
        assert official.path == f"/api/v2/webdeployments/deployments/{theirs}"
        assert ours.path == "/api/v2/webdeployments/deployments/" + value.replace("/", "%2F")
    ubiops_case = Case("ubiops.deployments_get", {"project_name": P, "deployment_name": "a/b"})
    official, ours = await _both(ubiops_case, aiohttp_server, tmp_path / "u")
    assert ours.path == official.path == f"{UBIOPS_PREFIX}/projects/{P}/deployments/a%2Fb"


# --- Jira: compared with the reference document --------------------------------------------


@dataclass(frozen=True)
class JiraDoc:
    method: str
    path: str
    content_type: str | None


def _jira_documented() -> dict[str, JiraDoc]:
    text = (REFERENCE / "jira-webhooks-api.md").read_text()
    out = {}
    for section in re.split(r"^# \*\*", text, flags=re.M)[1:]:
        name = section.split("**", 1)[0]
        row = re.search(rf"\[\*\*{name}\*\*\][^|]*\|\s*\*\*(\w+)\*\*\s*(\S+)", text)
        content = re.search(r"\*\*Content-Type\*\*: (.+)", section)
        assert row is not None and content is not None, name
        ctype = content[1].strip()
        out[f"jira.{name}"] = JiraDoc(row[1], row[2], None if ctype == "Not defined" else ctype)
    return out


@pytest.mark.parametrize("case", JIRA_CASES, ids=[c.id for c in JIRA_CASES])
async def test_jira_operations_send_what_the_reference_documents(
    case: Case, aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    doc = _jira_documented()[case.action]
    recorder = Recorder()
    server = await aiohttp_server(recorder.app())
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    await _deploybot(str(server.make_url("")).rstrip("/"), rules_dir, case)
    ours = recorder.take()
    assert (ours.method, ours.path) == (doc.method, doc.path)
    assert ours.content_type == doc.content_type
    assert ours.header("Authorization") == f"Bearer {JIRA_TOKEN}"
    params = registry()[case.action].params
    bodies = [case.params[p.name] for p in params if p.location == "body"]
    assert _body(ours) == (bodies[0] if bodies else b"")
    query = [f"{p.wire}={case.params[p.name]}" for p in params if p.location == "query"]
    assert _query(ours) == sorted(query)


# --- item 6: Retry-After as an HTTP date ----------------------------------------------------


async def test_item6_retry_after_as_an_http_date_is_honoured(aiohttp_server: ServerFactory) -> None:
    answers = [429, 200]
    wait_s = 3.0

    async def handler(request: web.Request) -> web.Response:
        status = answers.pop(0)
        if status == 429:
            when = email.utils.formatdate(time.time() + wait_s, usegmt=True)
            return web.json_response(
                {"error": "slow down"}, status=429, headers={"Retry-After": when}
            )
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/thing", handler)
    server = await aiohttp_server(app)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async with aiohttp.ClientSession() as session:
        response = await send(
            session,
            PlannedRequest("GET", "/thing"),
            base_url=str(server.make_url("")).rstrip("/"),
            headers={},
            limiter=None,
            policy=RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=30.0),
            sleep=sleep,
        )
    assert response.json == {"ok": True}
    [waited] = slept
    # whole seconds on the wire: the wait is what is left of them, never the 0.01 backoff
    assert 1.0 < waited <= wait_s


# --- item 8: `rules check` and the upload's sources -------------------------------------------


@pytest.mark.parametrize(
    ("sources", "problem"),
    [
        ({}, "needs file or source_deployment with source_version or template_deployment_id"),
        ({"source_deployment": "old"}, "source_deployment needs source_version too"),
        ({"source_version": "v0"}, "source_version needs source_deployment too"),
        (
            {"file": "artifacts/model.zip", "source_deployment": "old", "source_version": "v0"},
            "takes only one of",
        ),
    ],
)
def test_item8_rules_check_refuses_an_upload_without_one_whole_source(
    tmp_path: Path, sources: dict[str, str], problem: str
) -> None:
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "model.zip").write_bytes(MODEL)
    step = {"action": "ubiops.revisions_file_upload", "with": {**VERSION, **sources}}
    rule = {"name": "up", "on": {"events": ["jira:issue_updated"]}, "do": [step]}
    (tmp_path / "up.yaml").write_text(yaml.safe_dump({"rules": [rule]}, sort_keys=False))
    ruleset, errors = check_rules(tmp_path)
    assert ruleset is None
    [error] = errors
    assert error.startswith(f"{tmp_path / 'up.yaml'}:")
    assert problem in error


# --- item 5: regions, as the Genesys client names and derives them ---------------------------


@pytest.mark.parametrize("region", list(PureCloudRegionHosts), ids=lambda r: r.name)
def test_item5_every_region_of_the_client_is_accepted_by_name_and_domain(region: Any) -> None:
    api_host = region.get_api_host()
    domain = api_host.removeprefix("https://api.")
    for name in (region.name, region.name.replace("_", "-").upper(), domain):
        settings = from_env({"GENESYS_REGION": name}, dotenv=None)
        assert settings.genesys_api_url == api_host
        # the client's own derivation of its login host
        assert settings.genesys_login_url == GenesysApiClient(host=api_host).get_conf_url(
            "login", api_host
        )
    assert GENESYS_REGION_NAMES[region.name] == domain


@pytest.mark.parametrize(
    ("name", "domain"),
    [
        ("mx_central_1", "mxc1.pure.cloud"),
        ("ap_southeast_1", "apse1.pure.cloud"),
        ("eusc_de_east_1", "edee1.eusc-pure.cloud"),
    ],
)
def test_item5_the_newest_regions_are_accepted(name: str, domain: str) -> None:
    for value in (name, domain):
        settings = from_env({"GENESYS_REGION": value}, dotenv=None)
        assert (settings.genesys_api_url, settings.genesys_login_url) == (
            f"https://api.{domain}",
            f"https://login.{domain}",
        )


def test_item5_the_login_url_follows_an_api_url_as_the_client_derives_it() -> None:
    api = "https://api.example-gateway.test:8443/genesys"
    settings = from_env({"GENESYS_API_URL": api, "GENESYS_REGION": "eu_west_1"}, dotenv=None)
    client_login = GenesysApiClient(host=api).get_conf_url("login", api)
    assert (
        settings.genesys_login_url
        == client_login
        == "https://login.example-gateway.test:8443/genesys"
    )
    assert settings.startup_notes() == []
    # A gateway without an api. host: login stays on the region's, and start-up says so.
    gateway = from_env({"GENESYS_API_URL": "https://gw.example.test/gc"}, dotenv=None)
    assert gateway.genesys_login_url == "https://login.mypurecloud.com"
    [note] = gateway.startup_notes()
    assert "GENESYS_LOGIN_URL" in note and "login.mypurecloud.com" in note
