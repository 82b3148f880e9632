"""Hostile input that reaches stored state: NUL characters, broken rule sets, retries of
runs that cannot run, secrets at rest (issue #17, items 6, 8, 9, 10 and 11)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from sqlalchemy import select

from bot.db.engine import create_engine
from bot.db.models import action_runs
from bot.db.queries import get_event
from bot.pipeline.executor import ActionExecutor
from bot.services.runner import ActionRunner
from bot.settings import Settings
from bot.web.keys import PROCESSOR
from tests.conftest import ClientFactory
from tests.helpers import (
    ADMIN_TOKEN,
    BEARER,
    TOKEN,
    create_deployment,
    dead_event,
    deliver,
    get_event_api,
    run_statuses,
    start,
    start_ubiops,
    wait_for,
    write_rollout_rules,
)

Client = TestClient[Any, Any]

NUL_RULES = """
rules:
  - name: echo-summary
    on: {events: [jira:issue_updated]}
    when: [{field: issue.fields.labels, contains: hostile}]
    do:
      - action: ubiops.deployment_versions_create
        with:
          project_name: ml-prod
          deployment_name: churn
          data: {version: "{{ issue.key | lower }}", description: "{{ issue.fields.summary }}"}
      - action: ubiops.deployments_update
        with:
          project_name: ml-prod
          deployment_name: churn
          data: {default_version: "{{ issue.fields.summary }}"}
  - name: innocent
    on: {events: [jira:issue_updated]}
    when: [{field: issue.fields.labels, contains: innocent}]
    do:
      - action: ubiops.deployments_get
        with: {project_name: ml-prod, deployment_name: churn}
"""


def payload(key: str, summary: str, label: str) -> dict[str, Any]:
    return {
        "timestamp": 1700000000000,
        "webhookEvent": "jira:issue_updated",
        "issue": {"id": "1", "key": key, "fields": {"summary": summary, "labels": [label]}},
        "changelog": {"items": []},
    }


def _engine_name(settings: Settings) -> str:
    return "sqlite" if settings.database_url.startswith("sqlite") else "postgresql"


async def _runs(settings: Settings) -> list[Any]:
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            found = await conn.execute(select(action_runs).order_by(action_runs.c.id))
            return list(found.all())
    finally:
        await engine.dispose()


# -- item 6: a NUL character never stalls the executor -------------------------------------


async def test_nul_in_a_field_does_not_stall_the_executor_across_restarts(
    make_client: ClientFactory,
    settings: Settings,
    tmp_path: Path,
    aiohttp_server: Callable[..., Any],
) -> None:
    rules = tmp_path / "nul-rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(NUL_RULES)
    _fake, base_url = await start_ubiops(aiohttp_server)
    await create_deployment(base_url)
    config = dict(
        rules_dir=rules,
        admin_token=ADMIN_TOKEN,
        ubiops_api_url=base_url,
        ubiops_api_token=TOKEN,
        workers=2,
    )
    client: Client = await make_client(settings, **config)
    # More hostile runs than worker slots: each is answered with its NUL echoed back (the
    # version's description) and then refused with it in the error text.
    hostile = [
        await deliver(client, f"d-nul-{n}", payload(f"OPS-{n}", f"v\x00{n}", "hostile"))
        for n in range(3)
    ]
    innocent = await deliver(client, "d-innocent", payload("OPS-9", "fine", "innocent"))

    async def settled() -> bool:
        shown = [await run_statuses(client, e) for e in hostile]
        return shown == [["succeeded", "dead"]] * 3 and await run_statuses(client, innocent) == [
            "succeeded"
        ]

    await wait_for(settled, timeout_s=30)
    for event_id in hostile:
        created, refused = (await get_event_api(client, event_id))["action_runs"]
        assert "\x00" not in json.dumps(created["result"], ensure_ascii=False)
        assert created["result"]["description"].startswith("v\ufffd")
        assert "does not exist" in refused["last_error"] and "\x00" not in refused["last_error"]
        assert "\x00" not in (refused["attempt_log"][0]["error"] or "")
    await client.close()

    # A restart finds nothing stuck: a new innocent event is acted on.
    again: Client = await make_client(settings, **config)
    later = await deliver(again, "d-innocent-2", payload("OPS-10", "fine", "innocent"))

    async def acted() -> bool:
        return await run_statuses(again, later) == ["succeeded"]

    await wait_for(acted, timeout_s=30)
    assert [r.status for r in await _runs(settings) if r.status not in ("succeeded", "dead")] == []


async def test_an_outcome_refused_for_good_ends_its_run_dead_and_spares_its_batch(
    make_client: ClientFactory,
    settings: Settings,
    tmp_path: Path,
    aiohttp_server: Callable[..., Any],
) -> None:
    """The last line of defence, below the cleaning: an outcome the database refuses
    (here one that skipped the cleaning) is not retried forever, and the other outcomes
    written in the same transaction are stored."""
    rules = tmp_path / "nul-rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(NUL_RULES)
    client: Client = await make_client(settings, rules_dir=rules, workers=0)
    for n in range(2):
        await deliver(client, f"d-{n}", payload(f"OPS-{n}", "x", "innocent"))

    async def planned() -> bool:
        return len(await _runs(settings)) == 2

    await wait_for(planned)
    await client.close()

    engine = create_engine(settings.database_url)
    try:
        executor = ActionExecutor(engine, ActionRunner({}), rules_dir=rules)
        first, second = await executor.claim(2)
        # What each engine refuses: PostgreSQL a NUL in text, SQLite's driver a lone surrogate.
        bad = "v\x00" if _engine_name(settings) == "postgresql" else "v\ud800"
        from bot.db.models import utcnow
        from bot.pipeline.executor import _AttemptRecord

        now = utcnow()
        common = {
            "b_next_attempt_at": None,
            "b_updated_at": now,
            "b_attempts": 1,
            "b_state": None,
            "b_waiting_since": None,
        }
        refused = _AttemptRecord(
            first, now, now, "failed", {**common, "b_status": "dead", "b_last_error": bad,
                                        "b_result": None}, 400
        )  # fmt: skip
        fine = _AttemptRecord(
            second, now, now, "succeeded", {**common, "b_status": "succeeded",
                                            "b_last_error": None, "b_result": {"ok": True}}, None
        )  # fmt: skip
        assert await executor._write([refused, fine]) == [True, True]
        async with engine.connect() as conn:
            rows = {
                r.id: r
                for r in await conn.execute(
                    select(action_runs.c.id, action_runs.c.status, action_runs.c.last_error,
                           action_runs.c.result)
                )
            }  # fmt: skip
    finally:
        await engine.dispose()
    assert rows[first.id].status == "dead"
    assert "the outcome could not be stored" in rows[first.id].last_error
    assert (rows[second.id].status, rows[second.id].result) == ("succeeded", {"ok": True})


# -- items 8 and 9: no evaluation without a good rule set; a filter typo is a rule error ---

GOOD_RULE = """
rules:
  - name: innocent
    on: {events: [jira:issue_updated]}
    do:
      - action: ubiops.deployments_get
        with: {project_name: ml-prod, deployment_name: "{{ issue.key | lower }}"}
"""
TYPO_RULE = GOOD_RULE.replace("| lower", "| lowr")


async def _event(settings: Settings, event_id: int) -> dict[str, Any]:
    engine = create_engine(settings.database_url)
    try:
        shown = await get_event(engine, event_id)
    finally:
        await engine.dispose()
    assert shown is not None
    return shown


async def test_events_wait_while_no_good_rule_set_is_loaded(
    make_client: ClientFactory, settings: Settings, tmp_path: Path
) -> None:
    rules = tmp_path / "wait-rules"
    rules.mkdir()
    (rules / "r.yaml").write_text("rules: [{name: broken, on: {}}]\n")
    client: Client = await make_client(settings, rules_dir=rules, admin_token=ADMIN_TOKEN)
    ready = await client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["rules"] == "not loaded"
    event_id = await deliver(client, "d-early", payload("OPS-1", "x", "any"))
    # Whatever the processor's own loop does meanwhile, three more claims take nothing.
    for _ in range(3):
        assert await client.app[PROCESSOR].run_once() == 0
    assert (await _event(settings, event_id))["status"] == "received"

    (rules / "r.yaml").write_text(GOOD_RULE)  # the hot reload installs it

    async def processed() -> bool:
        return bool((await _event(settings, event_id))["status"] == "processed")

    await wait_for(processed)
    shown = await _event(settings, event_id)
    assert [m["rule"] for m in shown["matches"] if m["matched"]] == ["innocent"]
    assert [r["action"] for r in shown["action_runs"]] == ["ubiops.deployments_get"]
    assert (await client.get("/readyz")).status == 200


def _typo_error(rules: Path) -> str:
    line = next(n for n, text in enumerate(TYPO_RULE.splitlines(), 1) if "lowr" in text)
    where = f"{rules / 'r.yaml'}:{line}"
    return f"{where}: template error in with.deployment_name: No filter named 'lowr'."


def test_rules_check_reports_a_filter_typo_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.cli.main import main

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(TYPO_RULE)
    assert main(["rules", "check", str(rules)]) == 1
    out = capsys.readouterr()
    assert _typo_error(rules) in out.out
    assert "Traceback" not in out.out + out.err


async def test_serve_starts_with_a_filter_typo_and_is_not_ready(
    make_client: ClientFactory, settings: Settings, tmp_path: Path
) -> None:
    rules = tmp_path / "typo-rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(TYPO_RULE)
    client: Client = await make_client(settings, rules_dir=rules)
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["rule_errors"] == [_typo_error(rules)]
    event_id = await deliver(client, "d-typo", payload("OPS-1", "x", "any"))
    assert (await _event(settings, event_id))["status"] == "received"


async def test_a_filter_typo_on_hot_reload_is_reported_everywhere(
    make_client: ClientFactory, settings: Settings, tmp_path: Path
) -> None:
    rules = tmp_path / "reload-rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(GOOD_RULE)
    client: Client = await make_client(settings, rules_dir=rules, admin_token=ADMIN_TOKEN)
    assert (await client.get("/readyz")).status == 200
    version = (await (await client.get("/readyz")).json())["rules_version"]
    (rules / "r.yaml").write_text(TYPO_RULE)
    expected = [_typo_error(rules)]

    async def reported() -> bool:
        return bool((await (await client.get("/readyz")).json())["rule_errors"])

    await wait_for(reported)
    ready = await (await client.get("/readyz")).json()
    # The last good set stays in force and the service stays ready.
    assert (ready["status"], ready["rules_version"], ready["rule_errors"]) == (
        "ready",
        version,
        expected,
    )
    shown = await (await client.get("/api/rules", headers=BEARER)).json()
    assert shown["errors"] == expected and shown["version"] == version
    metrics = await (await client.get("/metrics")).text()
    assert "deploybot_rule_load_errors 1.0" in metrics.splitlines()


# -- item 10: a skipped run behind a dead one is not retried on its own --------------------


async def test_retrying_a_skipped_run_behind_a_dead_one_names_the_run_to_retry(
    make_client: ClientFactory,
    settings: Settings,
    tmp_path: Path,
    aiohttp_server: Callable[..., Any],
) -> None:
    _fake, base_url = await start_ubiops(aiohttp_server)
    client: Client = await start(make_client, settings, write_rollout_rules(tmp_path), base_url)
    event_id = await dead_event(client, "OPS-70")
    dead, skipped = (await get_event_api(client, event_id))["action_runs"]
    await create_deployment(base_url)  # the cause is fixed: only the order is wrong now

    resp = await client.post(f"/api/action-runs/{skipped['id']}/retry", headers=BEARER)
    assert resp.status == 409
    refusal = await resp.json()
    assert refusal["retry_instead"] == dead["id"]
    assert f"retry action run {dead['id']} instead" in refusal["error"]
    assert await run_statuses(client, event_id) == ["dead", "skipped"]  # nothing changed

    # The run it names is the way out: retried, both steps run.
    assert (await client.post(f"/api/action-runs/{dead['id']}/retry", headers=BEARER)).status == 200

    async def succeeded() -> bool:
        return await run_statuses(client, event_id) == ["succeeded", "succeeded"]

    await wait_for(succeeded)


# -- item 11: secrets at rest ---------------------------------------------------------------

SECRET_VALUE = "env-secret-" + "Z8" * 16
SECRET_RULES = f"""
rules:
  - name: set-secret
    on: {{events: [jira:issue_updated]}}
    when: [{{field: issue.fields.labels, contains: secret}}]
    do:
      - action: ubiops.deployment_environment_variables_create
        with:
          project_name: ml-prod
          deployment_name: churn
          data: {{name: API_KEY, value: "{SECRET_VALUE}", secret: true}}
  - name: guest-token
    on: {{events: [jira:issue_updated]}}
    when: [{{field: issue.fields.labels, contains: token}}]
    do:
      - id: exchange
        action: genesys.post_webdeployments_token_oauthcodegrantjwtexchange
        with:
          body: {{deploymentId: dep-1, oauthParameters: {{code: "{{{{ issue.key }}}}"}}}}
"""


async def _database_bytes(settings: Settings, tmp_path: Path) -> bytes:
    """The SQLite files' bytes, or (PostgreSQL) every row of every table as text."""
    if _engine_name(settings) == "sqlite":
        files = [tmp_path / f"deploybot.db{suffix}" for suffix in ("", "-wal", "-shm")]
        return b"".join(f.read_bytes() for f in files if f.exists())
    from tests.system.test_secrets import dump_database

    return (await dump_database(settings.database_url)).encode()


async def test_secret_values_and_returned_tokens_are_masked_at_rest(
    make_client: ClientFactory,
    settings: Settings,
    tmp_path: Path,
    aiohttp_server: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.fakes.genesys import FakeGenesys
    from tests.test_cli import _run

    rules = tmp_path / "secret-rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(SECRET_RULES)
    ubiops, ubiops_url = await start_ubiops(aiohttp_server)
    genesys = FakeGenesys()
    genesys.deployments["dep-1"] = {"id": "dep-1", "name": "guest chat"}
    genesys_url = str((await aiohttp_server(genesys.app)).make_url("")).rstrip("/")
    client: Client = await make_client(
        settings,
        rules_dir=rules,
        admin_token=ADMIN_TOKEN,
        ubiops_api_url=ubiops_url,
        ubiops_api_token=TOKEN,
        genesys_api_url=genesys_url,
        genesys_login_url=genesys_url,
        genesys_client_id=genesys.client_id,
        genesys_client_secret=genesys.client_secret,
    )
    # No deployment yet: the variable's run dies, and is retried once there is one. The
    # retry must still send the real value, which the database never held.
    secret_event = await deliver(client, "d-secret", payload("OPS-1", "x", "secret"))

    async def dead() -> bool:
        return await run_statuses(client, secret_event) == ["dead"]

    await wait_for(dead)
    await create_deployment(ubiops_url)
    [run] = (await get_event_api(client, secret_event))["action_runs"]
    assert (await client.post(f"/api/action-runs/{run['id']}/retry", headers=BEARER)).status == 200
    token_event = await deliver(client, "d-token", payload("OPS-2", "x", "token"))

    async def done() -> bool:
        return [await run_statuses(client, e) for e in (secret_event, token_event)] == [
            ["succeeded"],
            ["succeeded"],
        ]

    await wait_for(done)
    [sent] = [r.json for r in ubiops.calls("POST", r".*/environment-variables")][-1:]
    assert (sent["value"], sent["secret"]) == (SECRET_VALUE, True)
    assert genesys.issued_jwts and genesys.jwt_refresh_tokens
    secrets = {
        "secret variable value": SECRET_VALUE,
        **{f"guest jwt {i}": t for i, t in enumerate(genesys.issued_jwts)},
        **{f"refresh token {i}": t for i, t in enumerate(genesys.jwt_refresh_tokens)},
    }
    [token_run] = (await get_event_api(client, token_event))["action_runs"]
    shown = {
        path: await (await client.get(path, headers=BEARER)).text()
        for path in ("/", f"/api/events/{secret_event}", f"/api/events/{token_event}")
    }
    await client.close()

    def cli(*argv: str) -> str:
        code, out, _err = _run(monkeypatch, capsys, settings.database_url, *argv)
        assert code == 0
        return out

    for event_id in (secret_event, token_event):  # the CLI runs its own loop: in a thread
        shown[f"events show {event_id}"] = await asyncio.to_thread(
            cli, "events", "show", str(event_id)
        )
        shown[f"events show {event_id} --json"] = await asyncio.to_thread(
            cli, "events", "show", str(event_id), "--json"
        )
    stored = await _database_bytes(settings, tmp_path)
    leaks = [
        f"{name} in {place}"
        for name, secret in secrets.items()
        for place, text in [*shown.items(), ("the database", stored.decode("latin-1"))]
        if secret in text
    ]
    assert leaks == []
    assert token_run["result"] == {"jwt": "********", "refreshToken": "********"}


async def test_a_fresh_sqlite_database_is_private(
    make_client: ClientFactory, settings: Settings, tmp_path: Path
) -> None:
    if _engine_name(settings) != "sqlite":
        pytest.skip("a PostgreSQL database has no file of deploybot's")
    path = tmp_path / "deploybot.db"
    assert not path.exists()
    client: Client = await make_client(settings)
    await deliver(client, "d-1", payload("OPS-1", "x", "any"))  # the WAL is written
    modes = {
        p.name: p.stat().st_mode & 0o777
        for p in await asyncio.to_thread(lambda: list(tmp_path.iterdir()))
        if p.name.startswith(path.name)
    }
    assert modes.get("deploybot.db") == 0o600 and modes.get("deploybot.db-wal") == 0o600, modes
    assert set(modes.values()) == {0o600}, modes


def test_rules_test_shows_a_secret_value_masked(tmp_path: Path) -> None:
    from bot.rules.dryrun import dry_run
    from bot.rules.loader import load_rules

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(SECRET_RULES)
    report = dry_run(load_rules(rules), payload("OPS-1", "x", "secret"))
    assert "deployment_environment_variables_create" in report and '"API_KEY"' in report
    assert SECRET_VALUE not in report and "********" in report


async def test_a_masked_secret_whose_rule_step_is_gone_fails_its_run_with_the_reason(
    database_url: str, tmp_path: Path, aiohttp_server: Callable[..., Any]
) -> None:
    import aiohttp

    from bot.core.delivery import Delivery
    from bot.db.engine import upgrade
    from bot.db.store import EventStore
    from bot.pipeline.processor import EventProcessor
    from bot.rules.loader import load_rules
    from bot.services.ubiops import UbiOpsClient

    rules = tmp_path / "secret-rules"
    rules.mkdir()
    (rules / "r.yaml").write_text(SECRET_RULES)
    planned_with = load_rules(rules)
    (rules / "r.yaml").write_text(GOOD_RULE)  # the secret's step is gone from the rules
    in_force = load_rules(rules)
    ubiops, ubiops_url = await start_ubiops(aiohttp_server)
    await create_deployment(ubiops_url)
    engine = create_engine(database_url)
    try:
        await upgrade(engine)
        store = EventStore(engine)
        await store.start()
        body = json.dumps(payload("OPS-1", "x", "secret")).encode()
        await store.add("", Delivery("d-1", 0, "jira:issue_updated", "OPS-1", body))
        await store.close()
        assert await EventProcessor(engine, lambda: planned_with).run_once() == 1
        async with engine.connect() as conn:
            [params] = (await conn.execute(select(action_runs.c.params))).scalars()
        assert params["data"] == {"name": "API_KEY", "value": "********", "secret": True}
        async with aiohttp.ClientSession() as session:
            runner = ActionRunner({"ubiops": UbiOpsClient(session, ubiops_url, TOKEN)})
            executor = ActionExecutor(engine, runner, rules_dir=rules, rules=lambda: in_force)
            assert await executor.run_once() == 1
        async with engine.connect() as conn:
            status, error = (
                await conn.execute(select(action_runs.c.status, action_runs.c.last_error))
            ).one()
    finally:
        await engine.dispose()
    assert status == "dead"
    assert "rule 'set-secret' no longer has this step" in error
    assert ubiops.calls("POST", r".*/environment-variables") == []  # the mask was never sent
