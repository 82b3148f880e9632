"""GET /metrics: delivery outcomes, ack latency, database gauges, action attempts."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from bot.db.engine import create_engine
from bot.db.models import utcnow, webhook_registrations
from bot.settings import Settings
from bot.web.metrics import Metrics, Snapshot, delivery_outcome, snapshot_families
from tests import test_pipeline
from tests.conftest import ClientFactory
from tests.fakes.ubiops import FakeUbiOps
from tests.helpers import PAYLOAD, TOKEN, headers, issue_updated, wait_for

rules_dir = test_pipeline.rules_dir  # fixtures shared with the pipeline tests
ubiops = test_pipeline.ubiops

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: TestClient[Any, Any]) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(await resp.text())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_deliveries_by_outcome_and_database_gauges(
    make_client: ClientFactory, settings: Settings, tmp_path: Path
) -> None:
    (settings.rules_dir / "broken.yaml").write_text("rules: [\n")
    client = await make_client(settings)
    body = json.dumps(PAYLOAD)
    answers = [
        await client.post("/webhooks/jira", data=body, headers=headers("m-1")),
        await client.post("/webhooks/jira", data=body, headers=headers("m-1")),
        await client.post("/webhooks/jira", data=body, headers=headers("m-2", token="bad")),
        await client.post(
            "/webhooks/jira", data=body, headers={**headers("m-3"), "Content-Type": "text/plain"}
        ),
        await client.post("/webhooks/jira", data=body, headers=headers("m-4")),
    ]
    assert [a.status for a in answers] == [202, 200, 401, 415, 202]
    expires = utcnow() + timedelta(days=3)
    engine = create_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            for webhook_id, days in ((1, 3), (2, 20)):
                await conn.execute(
                    webhook_registrations.insert().values(
                        tenant="",
                        webhook_id=webhook_id,
                        jql="project = OPS",
                        events=["jira:issue_updated"],
                        expires_at=utcnow() + timedelta(days=days),
                        registered_at=utcnow(),
                    )
                )
    finally:
        await engine.dispose()

    samples = await scrape(client)
    delivered = {
        o: value(samples, "deploybot_deliveries_total", outcome=o)
        for o in ("stored", "duplicate", "rejected_401", "rejected_415")
    }
    assert delivered == {"stored": 2, "duplicate": 1, "rejected_401": 1, "rejected_415": 1}
    assert value(samples, "deploybot_delivery_ack_seconds_count") == 5
    assert value(samples, "deploybot_database_up") == 1
    events_by_status = {
        s: value(samples, "deploybot_events", status=s)
        for s in ("received", "processing", "processed", "failed")
    }
    assert sum(v or 0 for v in events_by_status.values()) == 2
    assert value(samples, "deploybot_event_queue_depth") == (events_by_status["received"] or 0) + (
        events_by_status["processing"] or 0
    )
    assert value(samples, "deploybot_action_queue_depth") == 0
    expiry_s = value(samples, "deploybot_webhook_expiry_seconds")
    assert expiry_s is not None
    assert abs(expiry_s - (expires - utcnow()).total_seconds()) < 60
    rule_errors = value(samples, "deploybot_rule_load_errors")
    assert rule_errors is not None and rule_errors >= 1


async def test_action_attempts_by_service_operation_and_outcome(
    make_client: ClientFactory,
    settings: Settings,
    rules_dir: Path,
    ubiops: tuple[FakeUbiOps, str],
) -> None:
    _fake, base_url = ubiops
    client = await make_client(
        settings, rules_dir=rules_dir, ubiops_api_url=base_url, ubiops_api_token=TOKEN
    )
    for delivery_id, payload in (
        ("ok", issue_updated("OPS-1")),
        ("no-deployment", issue_updated("OPS-2", deployment=None)),
    ):
        resp = await client.post(
            "/webhooks/jira", data=json.dumps(payload), headers=headers(delivery_id)
        )
        assert resp.status == 202
    attempts = "deploybot_action_attempts_total"

    async def settled() -> bool:
        samples = await scrape(client)
        return value(samples, "deploybot_action_queue_depth") == 0 and (
            value(samples, "deploybot_action_runs", status="skipped") == 1
        )

    await wait_for(settled)
    samples = await scrape(client)
    create = {"service": "ubiops", "operation": "deployment_versions_create"}
    upload = {"service": "ubiops", "operation": "revisions_file_upload"}
    assert value(samples, attempts, **create, outcome="succeeded") == 1
    assert value(samples, attempts, **create, outcome="dead") == 1
    assert value(samples, attempts, **upload, outcome="succeeded") == 1
    assert value(samples, "deploybot_action_runs", status="succeeded") == 2
    assert value(samples, "deploybot_action_runs", status="dead") == 1


def test_retries_and_waits_are_counted_apart() -> None:
    metrics = Metrics()
    for status in ("retrying", "retrying", "pending", "succeeded"):
        metrics.observe_attempt("genesys.get_webdeployments_deployments", status)
    text = metrics.render(Snapshot(database_up=False)).decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    labels = {"service": "genesys", "operation": "get_webdeployments_deployments"}
    assert value(samples, "deploybot_action_retries_total", **labels) == 2
    assert value(samples, "deploybot_action_attempts_total", **labels, outcome="waiting") == 1
    assert value(samples, "deploybot_action_attempts_total", **labels, outcome="retrying") == 2
    # The database was unreachable: say so, and invent no gauge values.
    assert value(samples, "deploybot_database_up") == 0
    assert value(samples, "deploybot_events", status="received") is None


def test_snapshot_gauges_fill_unseen_statuses_and_omit_unknown_expiry() -> None:
    now = utcnow()
    families = snapshot_families(
        Snapshot(database_up=True, event_counts={"failed": 3}, run_counts={"retrying": 2}), now
    )
    names = {f.name: f for f in families}
    assert "deploybot_webhook_expiry_seconds" not in names
    statuses = {s.labels["status"]: s.value for s in names["deploybot_events"].samples}
    assert statuses == {"received": 0, "processing": 0, "processed": 0, "failed": 3}
    assert names["deploybot_action_queue_depth"].samples[0].value == 2


def test_outcome_names() -> None:
    assert [delivery_outcome(s) for s in (202, 200, 401, 413, 503)] == [
        "stored",
        "duplicate",
        "rejected_401",
        "rejected_413",
        "rejected_503",
    ]


def test_counting_a_delivery_costs_microseconds() -> None:
    """The hot path pays a counter increment and a histogram observation, nothing more."""
    metrics = Metrics()
    rounds = 20_000
    started = time.perf_counter()
    for i in range(rounds):
        metrics.observe_delivery(202 if i % 2 else 200, 0.003)
    per_delivery_s = (time.perf_counter() - started) / rounds
    assert per_delivery_s < 50e-6, f"{per_delivery_s * 1e6:.1f} µs per delivery"
