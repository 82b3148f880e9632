"""Prometheus metrics: counters fed on the hot paths, gauges read from the database at scrape.

Counting a delivery is a counter increment and a histogram observation (no I/O); the
database is read only when `/metrics` is scraped: one GROUP BY over events and action
runs, and one MIN over webhook expiries.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from sqlalchemy import func, literal, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.models import (
    ACTION_STATUSES,
    EVENT_STATUSES,
    action_runs,
    events,
    kv,
    utcnow,
    webhook_registrations,
)
from bot.jira_app.catch_up import STATS_KEY, CatchUpStats, parse_stats
from bot.web.errors import Handler, add_routes
from bot.web.keys import ENGINE, EXECUTOR, RULES

ACK_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SCRAPE_TIMEOUT_S = 5.0
EVENT_QUEUED = ("received", "processing")
ACTION_QUEUED = ("pending", "retrying", "running")


def delivery_outcome(status: int) -> str:
    """Name a delivery's outcome from the status it was answered with."""
    return {202: "stored", 200: "duplicate"}.get(status, f"rejected_{status}")


def attempt_outcome(status: str) -> str:
    """Name an action attempt's outcome from the run status it left behind."""
    return "waiting" if status == "pending" else status


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the database and the rule watcher say at scrape time."""

    database_up: bool
    event_counts: Mapping[str, int] = field(default_factory=dict)
    run_counts: Mapping[str, int] = field(default_factory=dict)
    nearest_expiry: datetime | None = None
    rule_errors: int = 0
    catch_up: CatchUpStats | None = None  # None: the catch-up never ran


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _by_status(name: str, doc: str, counts: Mapping[str, int], known: Iterable[str]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=["status"])
    for status in sorted(set(known) | set(counts)):
        family.add_metric([status], counts.get(status, 0))
    return family


def snapshot_families(snapshot: Snapshot, now: datetime) -> list[Metric]:
    """Turn a snapshot into gauge families (no sample for what is unknown)."""
    families: list[Metric] = [
        _gauge(
            "deploybot_database_up",
            "1 if the last scrape could read the database",
            1 if snapshot.database_up else 0,
        ),
        _gauge(
            "deploybot_rule_load_errors",
            "errors of the last rule reload (the last good set stays in force)",
            snapshot.rule_errors,
        ),
    ]
    if not snapshot.database_up:
        return families
    events_, runs = snapshot.event_counts, snapshot.run_counts
    families += [
        _by_status("deploybot_events", "stored events by status", events_, EVENT_STATUSES),
        _gauge(
            "deploybot_event_queue_depth",
            "events not processed yet (received or processing)",
            sum(events_.get(s, 0) for s in EVENT_QUEUED),
        ),
        _by_status("deploybot_action_runs", "action runs by status", runs, ACTION_STATUSES),
        _gauge(
            "deploybot_action_queue_depth",
            "action runs still to run (pending, retrying or running)",
            sum(runs.get(s, 0) for s in ACTION_QUEUED),
        ),
    ]
    if snapshot.nearest_expiry is not None:
        families.append(
            _gauge(
                "deploybot_webhook_expiry_seconds",
                "seconds until the registered Jira webhook that expires first expires",
                (snapshot.nearest_expiry - now).total_seconds(),
            )
        )
    if snapshot.catch_up is not None:
        families.append(
            _gauge(
                "deploybot_catch_up_changes",
                "Jira changes the catch-up stored that no delivery had brought (in total)",
                snapshot.catch_up.caught_up_total,
            )
        )
        if snapshot.catch_up.newest_change_s is not None:
            families.append(
                _gauge(
                    "deploybot_catch_up_newest_change_timestamp_seconds",
                    "when the newest Jira change the catch-up saw was made",
                    snapshot.catch_up.newest_change_s,
                )
            )
    return families


async def read_snapshot(engine: AsyncEngine, rule_errors: int) -> Snapshot:
    """Read the gauges' values from the database (two cheap statements)."""
    counts = (
        select(literal("events").label("kind"), events.c.status, func.count().label("n"))
        .group_by(events.c.status)
        .union_all(
            select(literal("runs"), action_runs.c.status, func.count()).group_by(
                action_runs.c.status
            )
        )
    )
    try:
        async with asyncio.timeout(SCRAPE_TIMEOUT_S), engine.connect() as conn:
            rows = (await conn.execute(counts)).all()
            nearest = (
                await conn.execute(select(func.min(webhook_registrations.c.expires_at)))
            ).scalar_one()
            stats = (await conn.execute(select(kv.c.value).where(kv.c.key == STATS_KEY))).scalar()
    except Exception:  # a scrape reports the database as down rather than failing
        return Snapshot(database_up=False, rule_errors=rule_errors)
    return Snapshot(
        database_up=True,
        event_counts={r.status: int(r.n) for r in rows if r.kind == "events"},
        run_counts={r.status: int(r.n) for r in rows if r.kind == "runs"},
        nearest_expiry=nearest,
        rule_errors=rule_errors,
        catch_up=None if stats is None else parse_stats(str(stats)),
    )


class _SnapshotCollector(Collector):
    """Expose the latest snapshot (set just before each scrape renders)."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.snapshot = Snapshot(database_up=False)
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        return snapshot_families(self.snapshot, self._clock())


class Metrics:
    """One application's metrics, in a registry of its own."""

    def __init__(self, clock: Callable[[], datetime] = utcnow) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "deploybot_deliveries",
            "Jira deliveries by outcome: stored, duplicate, rejected_<status>",
            ["outcome"],
            registry=self.registry,
        )
        self.ack_seconds = Histogram(
            "deploybot_delivery_ack_seconds",
            "time from a delivery's arrival to its answer",
            buckets=ACK_BUCKETS_S,
            registry=self.registry,
        )
        self.action_attempts = Counter(
            "deploybot_action_attempts",
            "action attempts by service, operation and outcome"
            " (succeeded, retrying, dead, waiting)",
            ["service", "operation", "outcome"],
            registry=self.registry,
        )
        self.action_retries = Counter(
            "deploybot_action_retries",
            "failed action attempts scheduled to be retried",
            ["service", "operation"],
            registry=self.registry,
        )
        self.events_failed = Counter(
            "deploybot_events_failed",
            "events whose outcome turned failed (an action run is dead)",
            registry=self.registry,
        )
        self._by_status: dict[int, Counter] = {}
        self._snapshot = _SnapshotCollector(clock)
        self.registry.register(self._snapshot)

    def observe_delivery(self, status: int, elapsed_s: float) -> None:
        """Count one answered delivery."""
        counter = self._by_status.get(status)
        if counter is None:  # each status's labelled child is looked up once
            counter = self._by_status[status] = self.deliveries.labels(delivery_outcome(status))
        counter.inc()
        self.ack_seconds.observe(elapsed_s)

    def timed(self, handler: Handler) -> Handler:
        """The delivery route's `handler`, each answer counted by outcome and timed."""

        @functools.wraps(handler)
        async def observed(request: web.Request) -> web.StreamResponse:
            started = time.perf_counter()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            except asyncio.CancelledError:
                status = 499  # the client went away before the answer (nginx's convention)
                raise
            finally:
                self.observe_delivery(status, time.perf_counter() - started)

        return observed

    def observe_attempt(self, action: str, status: str) -> None:
        """Count one recorded action attempt by the run status it left behind."""
        service, _, operation = action.partition(".")
        self.action_attempts.labels(service, operation, attempt_outcome(status)).inc()
        if status == "retrying":
            self.action_retries.labels(service, operation).inc()

    def render(self, snapshot: Snapshot) -> bytes:
        """Render the exposition text with this snapshot for the gauges."""
        self._snapshot.snapshot = snapshot  # no await until rendered: scrapes do not mix
        return generate_latest(self.registry)


METRICS = web.AppKey("metrics", Metrics)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Serve the metrics in Prometheus text format."""
    app = request.app
    rule_errors = len(app[RULES].errors) if RULES in app else 0
    snapshot = await read_snapshot(app[ENGINE], rule_errors)
    body = app[METRICS].render(snapshot)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _observe_executor(app: web.Application) -> AsyncIterator[None]:
    if EXECUTOR in app:
        app[EXECUTOR].on_attempt = app[METRICS].observe_attempt
        app[EXECUTOR].on_event_failed = lambda _event_id: app[METRICS].events_failed.inc()
    yield


def install(app: web.Application) -> None:
    """Add metrics to an app: a registry (`timed` wraps the delivery route), `/metrics`,
    the executor's attempts."""
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_observe_executor)  # after the workers' context made the executor
    add_routes(app, [("GET", "/metrics", metrics_endpoint)])
