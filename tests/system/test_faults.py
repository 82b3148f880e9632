"""Faulty services: every action ends succeeded, or dead with its reason; nothing is made twice.

A real `bot serve` process runs rules that create UbiOps versions and version variables
and Genesys web configurations, publications and deployments, against the fakes
answering about 30 % of the calls with a seeded, even mix of 429 (with each service's
rate-limit headers), 500, 503, an answer held past the client's timeout after the
request was carried out, and a dropped connection. One rule targets a UbiOps
deployment that always answers 503, so its runs must use up the retry budget and die.

The per-call timeout and the retry budget are shortened through their settings
(DEPLOYBOT_HTTP_TIMEOUT_S, DEPLOYBOT_RETRY_*). Figures go to test-artifacts/system-faults.json.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.engine import create_engine
from bot.db.models import action_attempts, action_runs, events
from tests.fakes.genesys import FakeGenesys
from tests.fakes.ubiops import FakeUbiOps, Fault
from tests.helpers import EXAMPLE_RULES, TOKEN, wait_for
from tests.system.harness import (
    Service,
    create_churn_deployment,
    deliver,
    service_env,
    unprocessed_events,
)

ARTIFACT = Path(__file__).resolve().parents[2] / "test-artifacts" / "system-faults.json"
ISSUES = 24  # each: 2 UbiOps steps and 3 Genesys steps
FLAKY_ISSUES = 3  # each: 1 UbiOps step against a deployment that always answers 503
FAULT_FRACTION = 0.30
SEED = 20240608
TIMEOUT_S = 1.5  # per HTTP attempt, in the service
SLOW_S = 2.5  # a slow answer comes this long after the request was carried out
HTTP_ATTEMPTS = 4  # inline tries of one call (the default)
BUDGET_ATTEMPTS = 4  # executor attempts of one action run before it is dead
SETTLE_S = 45.0

RULES = """
rules:
  - name: ubiops-version
    on: {events: [jira:issue_updated]}
    when:
      - {changed: status, to: Ready to deploy}
      - {field: issue.key, matches: "^OPS-"}
    do:
      - id: version
        action: ubiops.deployment_versions_create
        with:
          project_name: ml-prod
          deployment_name: churn
          data: {version: "{{ issue.key | lower }}", environment: python3-11}
      - action: ubiops.deployment_version_environment_variables_create
        with:
          project_name: ml-prod
          deployment_name: churn
          version: "{{ steps.version.version }}"
          data: {name: JIRA_ISSUE, value: "{{ issue.key }}", secret: false}
  - name: genesys-web
    on: {events: [jira:issue_updated]}
    when:
      - {changed: status, to: Ready to deploy}
      - {field: issue.key, matches: "^OPS-"}
    do:
      - id: config
        action: genesys.post_webdeployments_configurations
        with:
          configuration_version:
            name: "cfg-{{ issue.key | lower }}"
            defaultLanguage: en-us
            languages: [en-us]
      - id: published
        action: genesys.post_webdeployments_configuration_versions_draft_publish
        with: {configuration_id: "{{ steps.config.id }}"}
      - action: genesys.post_webdeployments_deployments
        with:
          deployment:
            name: "dep-{{ issue.key | lower }}"
            allowAllDomains: true
            configuration:
              id: "{{ steps.published.id }}"
              version: "{{ steps.published.version }}"
  - name: flaky-version
    on: {events: [jira:issue_updated]}
    when:
      - {changed: status, to: Ready to deploy}
      - {field: issue.key, matches: "^FLAKY-"}
    do:
      - action: ubiops.deployment_versions_create
        with:
          project_name: ml-prod
          deployment_name: flaky
          data: {version: "{{ issue.key | lower }}", environment: python3-11}
"""
FAULT_KINDS = ("429", "500", "503", "slow", "drop")


def ubiops_faults() -> list[Fault]:
    """UbiOps' side of the mix; its 429 carries the x-ratelimit-* headers."""
    rate_limited = {"x-ratelimit-limit": "240", "x-ratelimit-remaining": "0"}
    return [
        Fault(status=429, headers={**rate_limited, "x-ratelimit-reset": "1"}),
        Fault(status=500),
        Fault(status=503),
        Fault(kind="slow", delay_s=SLOW_S, after=True),
        Fault(kind="drop", after=True),
    ]


def inject_genesys_faults(fake: FakeGenesys) -> None:
    """Genesys' side: one fault of each kind, chained so that each fires on 6 % of calls.

    The first configuration creates meet one of each kind for sure, whatever the seed.
    """
    for kind in FAULT_KINDS:
        fake.inject(
            kind,  # type: ignore[arg-type]
            path_prefix="/api/v2/webdeployments/configurations",
            retry_after_s=1,
            delay_s=SLOW_S,
            after=kind == "slow",
        )
    share = FAULT_FRACTION / len(FAULT_KINDS)
    for index, kind in enumerate(FAULT_KINDS):
        fake.inject(
            kind,  # type: ignore[arg-type]
            count=None,
            fraction=share / (1 - share * index),  # of the calls the earlier ones let by
            seed=SEED + index,
            retry_after_s=1,
            delay_s=SLOW_S,
            after=kind == "slow",
        )


async def settled(engine: AsyncEngine) -> bool:
    """Every event processed and every run final (a run after a dead step is skipped)."""
    async with engine.connect() as conn:
        open_events = await unprocessed_events(conn)
        open_runs = (
            await conn.execute(
                select(func.count())
                .select_from(action_runs)
                .where(action_runs.c.status.not_in(["succeeded", "dead", "skipped"]))
            )
        ).scalar_one()
    return open_events == 0 and open_runs == 0


async def read_runs(engine: AsyncEngine) -> tuple[list[Any], Counter[int], list[Any]]:
    """Return the action runs (with their issue key), attempt rows per run, and the events."""
    async with engine.connect() as conn:
        runs = (
            await conn.execute(
                select(action_runs, events.c.issue_key)
                .join(events, events.c.id == action_runs.c.event_id)
                .order_by(action_runs.c.id)
            )
        ).all()
        attempt_rows = Counter(
            (await conn.execute(select(action_attempts.c.action_run_id))).scalars().all()
        )
        stored = (await conn.execute(select(events.c.delivery_id, events.c.status))).all()
    return list(runs), attempt_rows, list(stored)


def record(engine_name: str, figures: dict[str, Any]) -> None:
    report = json.loads(ARTIFACT.read_text()) if ARTIFACT.exists() else {}
    report[engine_name] = figures
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nfaults ({engine_name}): {json.dumps(figures)}")


async def test_faulty_services_end_every_action_once(
    database_url: str, tmp_path: Path, aiohttp_server: Callable[..., Any]
) -> None:
    ubiops = FakeUbiOps(token=TOKEN)
    ubiops_server: TestServer = await aiohttp_server(ubiops.app())
    ubiops_url = str(ubiops_server.make_url(ubiops.prefix))
    genesys = FakeGenesys()
    genesys_server: TestServer = await aiohttp_server(genesys.app)
    genesys_url = str(genesys_server.make_url("")).rstrip("/")
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "faults.yaml").write_text(RULES)
    shutil.copytree(EXAMPLE_RULES / "artifacts", rules / "artifacts")
    env = service_env(
        database_url,
        rules,
        UBIOPS_API_URL=ubiops_url,
        UBIOPS_API_TOKEN=TOKEN,
        GENESYS_API_URL=genesys_url,
        GENESYS_LOGIN_URL=genesys_url,
        GENESYS_CLIENT_ID=genesys.client_id,
        GENESYS_CLIENT_SECRET=genesys.client_secret,
        DEPLOYBOT_WORKERS="16",
        UBIOPS_RATE_LIMIT_PER_MINUTE="100000",
        GENESYS_RATE_LIMIT_PER_MINUTE="100000",
        DEPLOYBOT_HTTP_TIMEOUT_S=str(TIMEOUT_S),
        DEPLOYBOT_HTTP_ATTEMPTS=str(HTTP_ATTEMPTS),
        DEPLOYBOT_RETRY_ATTEMPTS=str(BUDGET_ATTEMPTS),
        DEPLOYBOT_RETRY_BASE_DELAY_S="0.2",
        DEPLOYBOT_RETRY_MAX_DELAY_S="1.0",
    )
    service = Service(env, tmp_path, tmp_path / "serve.log")
    engine_name = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    engine = create_engine(database_url)
    timeout = aiohttp.ClientTimeout(total=20)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await create_churn_deployment(session, ubiops_url, TOKEN)
            ubiops.fail_next(1000, Fault(status=503, path_contains="/deployments/flaky"))
            for fault in ubiops_faults():  # the first version creates meet each kind for sure
                ubiops.fail_next(1, replace(fault, method="POST", path_contains="/churn/versions"))
            ubiops.fail_mix(FAULT_FRACTION, ubiops_faults(), seed=SEED)
            inject_genesys_faults(genesys)
            await service.start(session)
            keys = [f"OPS-{i}" for i in range(ISSUES)] + [f"FLAKY-{i}" for i in range(FLAKY_ISSUES)]
            statuses = await asyncio.gather(
                *(deliver(session, service.url, f"fault-{key}", key) for key in keys)
            )
            assert statuses == [202] * len(keys)

            async def done() -> bool:
                return await settled(engine)

            await wait_for(done, timeout_s=SETTLE_S)
            runs, attempt_rows, stored = await read_runs(engine)
            code, _ = await service.stop(15)
    finally:
        await engine.dispose()
        if service.proc is not None and service.proc.returncode is None:
            await service.kill()
    assert code == 0, service.log.read_text()[-3000:]

    # --- what the fakes hold, per name --------------------------------------------------
    versions = ubiops.projects["ml-prod"]["churn"]
    created_versions = Counter(
        entry["event"].removeprefix("Created version ")
        for entry in versions.audit
        if entry["event"].startswith("Created version ")
    )
    config_names = Counter(c.draft["name"] for c in genesys.configurations.values())
    deployment_names = Counter(d["name"] for d in genesys.deployments.values())
    duplicates = {
        "ubiops_versions": sorted(n for n, c in created_versions.items() if c > 1),
        "genesys_configurations": sorted(n for n, c in config_names.items() if c > 1),
        "genesys_deployments": sorted(n for n, c in deployment_names.items() if c > 1),
    }
    statuses_by_action = Counter((r.action, r.status) for r in runs)
    flaky_calls = len(ubiops.calls("POST", r".*/deployments/flaky/versions")) + len(
        ubiops.calls("GET", r".*/deployments/flaky/.*")
    )
    ubiops_injected = Counter(ubiops.injected)
    ubiops_injected["503"] -= flaky_calls  # the always-failing deployment is not the mix
    genesys_injected = Counter(genesys.faults.injected)
    ubiops_calls = len(ubiops.requests) - flaky_calls
    genesys_calls = len(genesys.api_requests)
    publishes = {c.draft["name"]: len(c.versions) for c in genesys.configurations.values()}
    figures = {
        "deliveries": len(keys),
        "actions": len(runs),
        "executor_attempts": sum(r.attempts for r in runs),
        "http_calls": {"ubiops": ubiops_calls, "genesys": genesys_calls},
        "always_503_calls": flaky_calls,
        "faults_injected": {
            "ubiops": dict(sorted(ubiops_injected.items())),
            "genesys": dict(sorted(genesys_injected.items())),
            "fraction_of_calls": round(
                (sum(ubiops_injected.values()) + sum(genesys_injected.values()))
                / (ubiops_calls + genesys_calls),
                3,
            ),
        },
        "succeeded": sum(r.status == "succeeded" for r in runs),
        "dead": sum(r.status == "dead" for r in runs),
        "skipped": sum(r.status == "skipped" for r in runs),
        "by_action": {f"{a} {s}": n for (a, s), n in sorted(statuses_by_action.items())},
        "extra_publishes": sum(n - 1 for n in publishes.values() if n > 1),
        "duplicates": sum(len(names) for names in duplicates.values()),
        "duplicate_names": duplicates,
    }
    record(engine_name, figures)

    # --- every delivery stored once and processed ---------------------------------------
    assert sorted(d for d, _ in stored) == sorted(f"fault-{k}" for k in keys)
    assert {s for _, s in stored} == {"processed"}
    assert len(runs) == ISSUES * 5 + FLAKY_ISSUES
    assert all(ubiops_injected[k] > 0 and genesys_injected[k] > 0 for k in FAULT_KINDS)

    # --- every run ended: succeeded, or dead with its reason and every attempt recorded ---
    dead_steps = {(r.event_id, r.rule_name, r.step_index) for r in runs if r.status == "dead"}
    for run in runs:
        where = f"run {run.id} {run.action} ({run.issue_key}): {run.status} {run.last_error}"
        assert run.status in {"succeeded", "dead", "skipped"}, where
        assert attempt_rows[run.id] == run.attempts, where
        if run.status == "dead":
            assert run.last_error, where
            assert 1 <= run.attempts <= BUDGET_ATTEMPTS, where
        if run.status == "skipped":
            earlier = {(run.event_id, run.rule_name, i) for i in range(run.step_index)}
            assert earlier & dead_steps, where
    flaky = [r for r in runs if r.rule_name == "flaky-version"]
    assert [r.status for r in flaky] == ["dead"] * FLAKY_ISSUES
    for run in flaky:  # the whole budget was used, each attempt retrying inline first
        assert run.attempts == BUDGET_ATTEMPTS, run.last_error
        assert "HTTP 503" in run.last_error and "Service temporarily unavailable" in run.last_error

    # --- one object per name, and it is the one the run recorded -------------------------
    assert figures["duplicates"] == 0, duplicates
    for run in runs:
        if run.status != "succeeded":
            continue
        key = run.issue_key.lower()
        if run.action == "ubiops.deployment_versions_create":
            assert created_versions[key] == 1 and run.result["version"] == key
        elif run.action == "ubiops.deployment_version_environment_variables_create":
            own = list(versions.versions[key].variables.values())
            assert [(v["name"], v["value"]) for v in own] == [("JIRA_ISSUE", run.issue_key)]
            assert run.result["id"] == own[0]["id"]
        elif run.action == "genesys.post_webdeployments_configurations":
            assert config_names[f"cfg-{key}"] == 1
            assert genesys.configurations[run.result["id"]].draft["name"] == f"cfg-{key}"
        elif run.action == "genesys.post_webdeployments_deployments":
            assert deployment_names[f"dep-{key}"] == 1
            assert genesys.deployments[run.result["id"]]["name"] == f"dep-{key}"
