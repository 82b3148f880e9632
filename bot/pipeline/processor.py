"""Event processing: claim stored events, evaluate the rules, store matches and the outbox.

Claims carry a lease (`lease_until`); an event whose worker died is claimed again once
the lease has passed. Everything an event produces (its rule matches, one action run per
step of each matching rule, its new status) is written in one transaction, guarded by
the lease, and action runs are keyed by event id + rule name + step index, so a reclaimed
event never yields a second set of action runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import and_, bindparam, case, delete, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot import logs
from bot.core.masking import mask_params
from bot.db.claims import claim_statement
from bot.db.clean import clean_text, clean_value
from bot.db.engine import never_succeeds, save_until_done
from bot.db.models import UTCDateTime, action_runs, events, rule_matches, upsert, utcnow
from bot.db.registrations import WebhookFilters
from bot.db.store import database_error
from bot.db.writers import writer_for
from bot.errors import TemplateRenderError
from bot.pipeline.wakeup import wait_until_set
from bot.rules.engine import change_ref, evaluate, matched_webhook_ids
from bot.rules.model import Evaluation, RuleSet
from bot.rules.workflow import concurrency_key

log = logging.getLogger(__name__)

MAX_EVENT_ATTEMPTS = 5  # an event that crashes its worker this often is marked failed
# Ingest first: while deliveries load the write path (EventStore.busy), evaluation runs
# in short slices and batches are small and spaced, so acknowledgements never queue behind
# the processor; a batch's rule evaluations are bounded so its finish stays a short
# transaction (figures: docs/performance.md, "Processor pacing").
SLICE_S = 0.002
SLICE_PAUSE_S = 0.02
BUSY_BATCH = 10
BATCH_PAUSE_S = 0.2
BATCH_EVALUATIONS = 2000
BUSY_EVALUATIONS = 250


# A batch's statements, built once (building one costs more than running it).
_FINISH = (
    update(events)
    .where(
        events.c.id.in_(bindparam("b_ids", expanding=True)),
        events.c.lease_owner == bindparam("b_owner"),
    )
    .values(
        status=bindparam("b_status"),
        processed_at=bindparam("b_now", type_=UTCDateTime()),
        lease_owner=None,
        lease_until=None,
        error=bindparam("b_error"),
        ruleset_version=bindparam("b_version"),
        rule_misses=None,
        # A replayed event keeps the outcome its runs gave it (`replay` recomputed it).
        outcome=case(
            (bindparam("b_outcome") == "failed", "failed"),
            (events.c.outcome.is_(None), bindparam("b_outcome")),
            else_=events.c.outcome,
        ),
    )
    .returning(events.c.id)
)
_CLEAR_MATCHES = delete(rule_matches).where(
    rule_matches.c.event_id.in_(bindparam("b_ids", expanding=True))
)
_INSERT_MATCHES = insert(rule_matches)
_SET_MISSES = (
    update(events)
    .where(events.c.id == bindparam("b_id"))
    .values(rule_misses=bindparam("b_misses", type_=events.c.rule_misses.type))
)


@contextmanager
def _planned_for_these_values(conn: Connection) -> Iterator[None]:
    """On PostgreSQL, plan the statements inside for the values they are given.

    A prepared statement's plan is made for any values after five uses, with the table as
    it is then: on a new database, empty, so a look-up by a list of ids became a scan of
    the whole table, kept while the table grew (until autovacuum analyzes it, a minute
    or more): 13-20 ms each, at every batch, in bench/pipeline.py against 1.4 ms.
    """
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_custom_plan")
    yield
    if postgres:
        conn.exec_driver_sql("SET LOCAL plan_cache_mode = auto")


def idempotency_key(
    event_id: int, rule_name: str, step_index: int, change: str | None = None
) -> str:
    """Return the key that makes one action run per event, rule and step.

    With `change` (the Jira change the event reports, see engine.change_ref) it is one
    run per change instead: the same change re-sent under another delivery identifier
    plans nothing new.
    """
    if change is not None:
        return f"change:{change}:{rule_name}:{step_index}"
    return f"{event_id}:{rule_name}:{step_index}"


@dataclass(frozen=True, slots=True)
class Claimed:
    """An event this worker holds the lease of."""

    id: int
    body: bytes
    attempts: int
    tenant: str = ""


class EventProcessor:
    """Turn received events into rule matches and pending action runs."""

    def __init__(
        self,
        engine: AsyncEngine,
        rules: Callable[[], RuleSet],
        *,
        lease_s: float = 60.0,
        batch: int = 100,
        owner: str | None = None,
        on_planned: Callable[[], None] | None = None,
        clock: Callable[[], datetime] = utcnow,
        ingest_busy: Callable[[], bool] = lambda: False,
        rules_ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self._engine = engine
        self._writes = writer_for(engine)
        self._filters = WebhookFilters(engine)  # which rule JQL Jira matched
        self._ingest_busy = ingest_busy
        self._rules = rules
        self._rules_ready = rules_ready
        self._lease_s = lease_s
        self._batch = batch
        self.owner = owner or f"events-{uuid.uuid4().hex[:12]}"
        self._on_planned = on_planned
        self._clock = clock
        self._insert_runs = upsert(action_runs, engine.dialect.name).on_conflict_do_nothing(
            index_elements=["idempotency_key"]
        )
        self.wakeup = asyncio.Event()
        self._claims: dict[int, Any] = {}  # claim statements by size

    async def claim(self) -> list[Claimed]:
        """Lease up to `batch` events that are received, or whose lease has run out.

        None while no good rule set was ever loaded: evaluated against nothing, events
        would be marked processed with no match and lost; they wait as received instead.
        """
        if not self._rules_ready():
            return []
        now = self._clock()
        # A delivery's commit may queue behind this batch's transactions (one writer), so
        # they must be short: small batches under load, and never more than about
        # BATCH_EVALUATIONS rule evaluations (each missed rule is a reason to store).
        busy = self._ingest_busy()
        limit = min(self._batch, BUSY_BATCH) if busy else self._batch
        evaluations = BUSY_EVALUATIONS if busy else BATCH_EVALUATIONS
        widest = max(map(len, self._rules().by_event.values()), default=1)
        limit = max(1, min(limit, evaluations // widest))
        stmt = self._claims.get(limit)
        if stmt is None:  # built once per size: building it costs more than running it
            at = bindparam("b_now", type_=UTCDateTime())
            ready = [
                events.c.status == "received",
                and_(events.c.status == "processing", events.c.lease_until < at),
            ]
            stmt = self._claims[limit] = claim_statement(
                events,
                self._engine.dialect.name,
                ready,
                owner=self.owner,
                lease_until=bindparam("b_lease_until", type_=UTCDateTime()),
                limit=limit,
                values={"status": "processing"},
                returning=(events.c.id, events.c.body, events.c.attempts, events.c.tenant),
            )
        times = {"b_now": now, "b_lease_until": now + timedelta(seconds=self._lease_s)}
        rows = await self._writes.run_relaxed(lambda conn: conn.execute(stmt, times).all())
        return sorted(
            (Claimed(r.id, r.body, r.attempts, r.tenant) for r in rows), key=lambda c: c.id
        )

    async def process(self, claimed: Claimed) -> bool:
        """Evaluate one claimed event and store the outcome; False if the lease was lost."""
        return await self.process_batch([claimed]) == 1

    async def process_batch(self, claimed: list[Claimed]) -> int:
        """Evaluate claimed events and store their outcomes in one transaction.

        Return how many were stored (an event whose lease was lost, or whose evaluation
        failed and will be tried again, is not). One commit per batch instead of one per
        event keeps the write lock free for deliveries.
        """
        ruleset = self._rules()
        outcomes: list[tuple[int, Evaluation, str | None]] = []
        payloads: dict[int, tuple[dict[str, Any], str | None]] = {}
        slice_end = time.perf_counter() + SLICE_S
        for item in claimed:
            if time.perf_counter() > slice_end:
                await self._yield_to_ingest(SLICE_PAUSE_S)
                slice_end = time.perf_counter() + SLICE_S
            try:
                payload = orjson.loads(item.body)
                ids = matched_webhook_ids(payload)
                jql = await self._filters.matched_jql(item.tenant, ids) if ids else None
                evaluation = evaluate(ruleset, payload, jql)
                failure = None
                if evaluation.matched:
                    change = change_ref(payload, item.tenant)
                    payloads[item.id] = (payload, change)
            except (SQLAlchemyError, OSError):
                raise  # reading the registrations failed: processing pauses, no event fails
            except Exception as exc:  # a payload the engine cannot read fails this event only
                log.exception("event %s could not be evaluated", item.id)
                evaluation, failure = Evaluation(matched=[], missed=[]), f"evaluation failed: {exc}"
            if failure is not None and item.attempts < MAX_EVENT_ATTEMPTS:
                continue  # leave the lease to expire: it is tried again later
            outcomes.append((item.id, evaluation, failure))
        if not outcomes:
            return 0
        stored, planned = await save_until_done(
            lambda: self._finish_all(ruleset, outcomes, payloads),
            f"the evaluation of {len(outcomes)} event(s)",
        )
        if planned and self._on_planned is not None:
            self._on_planned()  # only new action runs are news to the executor
        for event_id, evaluation, _ in outcomes:
            for rule in evaluation.matched if event_id in stored else ():
                logs.info(
                    log, "rule matched", event_id=event_id, rule=rule.name,
                    ruleset=ruleset.version[:12],
                )  # fmt: skip
        return len(stored)

    async def _finish_all(
        self,
        ruleset: RuleSet,
        outcomes: list[tuple[int, Evaluation, str | None]],
        payloads: dict[int, tuple[dict[str, Any], str | None]] | None = None,
    ) -> tuple[set[int], int]:
        """`_finish` in one transaction; if the database refuses it for good, event by
        event, and an event refused alone is failed with the reason (not retried forever)."""
        try:
            return await self._writes.run_relaxed(self._finish, ruleset, outcomes, payloads)
        except Exception as error:
            if not never_succeeds(error):
                raise
        stored: set[int] = set()
        planned = 0
        for outcome in outcomes:
            try:
                done, runs = await self._writes.run_relaxed(
                    self._finish, ruleset, [outcome], payloads
                )
            except Exception as error:
                if not never_succeeds(error):
                    raise
                reason = f"its evaluation could not be stored: {database_error(error)}"
                log.error("event %s: %s", outcome[0], reason)
                failed = (outcome[0], Evaluation(matched=[], missed=[]), reason)
                done, runs = await self._writes.run_relaxed(self._finish, ruleset, [failed])
            stored |= done
            planned += runs
        return stored, planned

    def _finish(
        self,
        conn: Connection,
        ruleset: RuleSet,
        outcomes: list[tuple[int, Evaluation, str | None]],
        payloads: dict[int, tuple[dict[str, Any], str | None]] | None = None,
    ) -> tuple[set[int], int]:
        """Mark the events still leased to us done, with their matches and action runs.

        A handful of statements per batch, whatever its size; returns the ids stored and
        how many action runs were planned.
        """
        now = self._clock()
        by_failure: dict[tuple[str | None, str], list[int]] = {}
        for event_id, evaluation, failure in outcomes:
            # The operator's outcome: `running` once a matched rule planned a step.
            planned = any(rule.steps for rule in evaluation.matched)
            outcome = "failed" if failure else "running" if planned else "ignored"
            by_failure.setdefault((failure, outcome), []).append(event_id)
        stored: set[int] = set()
        for (failure, outcome), ids in by_failure.items():
            marked = conn.execute(
                _FINISH,
                {
                    "b_ids": ids,
                    "b_owner": self.owner,
                    "b_status": "failed" if failure else "processed",
                    "b_now": now,
                    "b_error": None if failure is None else clean_text(failure),
                    "b_version": ruleset.version,
                    "b_outcome": outcome,
                },
            )
            # An event another worker took over is not ours to finish: its outcome stands.
            stored.update(marked.scalars())
        if not stored:
            return stored, 0
        ours = [(event_id, ev) for event_id, ev, _ in outcomes if event_id in stored]
        with _planned_for_these_values(conn):
            conn.execute(_CLEAR_MATCHES, {"b_ids": list(stored)})
            acted = self._already_acted(conn, ours, payloads or {})
        match_rows = [
            {
                "event_id": event_id,
                "rule_name": rule.name,
                "matched": True,
                "reason": acted.get((event_id, rule.name)),
                "ruleset_version": ruleset.version,
            }
            for event_id, ev in ours
            for rule in ev.matched
        ]
        if match_rows:
            conn.execute(_INSERT_MATCHES, match_rows)
        # Misses are most of a large rule set: one JSON value per event, not a row per rule.
        miss_rows = [
            {
                "b_id": event_id,
                # A reason quotes the event's field values, which may hold a NUL.
                "b_misses": [
                    {"rule": m.rule_name, "reason": clean_text(m.reason)} for m in ev.missed
                ],
            }
            for event_id, ev in ours
            if ev.missed
        ]
        if miss_rows:
            conn.execute(_SET_MISSES, miss_rows)
        run_rows: list[dict[str, Any]] = []
        latest_keys: set[str] = set()
        for event_id, ev in ours:
            payload, change = (payloads or {}).get(event_id, ({}, None))
            for rule in ev.matched:
                key: str | None = None
                key_error: str | None = None
                if rule.concurrency is not None:
                    try:
                        key = concurrency_key(rule, payload, event_id)
                    except TemplateRenderError as exc:
                        key_error = str(exc)
                    if key is not None and rule.pending_latest:
                        latest_keys.add(key)
                for step in (*rule.steps, *rule.on_failure):
                    status = "held" if step in rule.on_failure else "pending"
                    error = None
                    if key_error is not None:  # nothing of this run can start safely
                        status = "dead" if step.index == 0 else "skipped"
                        error = key_error if step.index == 0 else "step 1 is dead"
                    run_rows.append(
                        {
                            "event_id": event_id,
                            "rule_name": rule.name,
                            "step_index": step.index,
                            "step_id": step.id,
                            "action": step.action,
                            "idempotency_key": idempotency_key(
                                event_id, rule.name, step.index, change
                            ),
                            "status": status,
                            "attempts": 0,
                            # The raw `with:` (templates unrendered) and controls: a run
                            # renders them when it executes, so it is self-contained
                            # across restarts and rule reloads.
                            # A secret value written in the rule is masked: the executor
                            # reads it from the rule in force (bot.core.masking).
                            "params": clean_value(mask_params(step.action, step.with_)),
                            "control": step.control.to_json() if step.control else None,
                            "concurrency_key": key,
                            "last_error": error,
                            "created_at": now,
                            "updated_at": now,
                        }
                    )
        if run_rows:
            conn.execute(self._insert_runs, run_rows)
        for key in sorted(latest_keys):
            _supersede(conn, key, now)
        return stored, len(run_rows)

    @staticmethod
    def _already_acted(
        conn: Connection,
        ours: list[tuple[int, Evaluation]],
        payloads: dict[int, tuple[dict[str, Any], str | None]],
    ) -> dict[tuple[int, str], str]:
        """Matches whose Jira change another event already acted on, with why nothing is
        planned for them (one indexed look-up per batch, only for events naming a change)."""
        wanted: dict[str, tuple[int, str]] = {}
        for event_id, ev in ours:
            change = payloads.get(event_id, ({}, None))[1]
            for rule in ev.matched if change is not None else ():
                wanted[idempotency_key(event_id, rule.name, 0, change)] = (event_id, rule.name)
        if not wanted:
            return {}
        found = conn.execute(
            select(action_runs.c.idempotency_key, action_runs.c.event_id).where(
                action_runs.c.idempotency_key.in_(list(wanted))
            )
        )
        return {
            wanted[key]: f"this Jira change was already acted on by event {event_id}; "
            "`events replay` of that event runs it again"
            for key, event_id in found
            if event_id != wanted[key][0]
        }

    async def _yield_to_ingest(self, pause_s: float) -> None:
        """Let waiting requests run; while deliveries wait for their commit, pause."""
        await asyncio.sleep(pause_s if self._ingest_busy() else 0)

    async def run_once(self) -> int:
        """Claim and process one batch; return how many events were processed."""
        return await self.process_batch(await self.claim())

    async def run(self, poll_s: float = 1.0) -> None:
        """Process events until cancelled; wake on `wakeup` or every `poll_s` seconds."""
        orphans = False  # a claim failed: rows may be leased to us that no task holds
        while True:
            try:
                if orphans:
                    # Nothing is being evaluated between batches: every event leased to
                    # this worker now is one a failed claim or save left behind.
                    await self.release()
                    orphans = False
                busy = await self.run_once()
            except (SQLAlchemyError, OSError) as exc:
                orphans = True
                log.warning("event processing paused: database error: %s", exc)
                busy = 0
            except Exception:  # a bug must not end processing for good: shown, tried again
                orphans = True
                log.exception("event processing failed; again in %.0f s", poll_s)
                await asyncio.sleep(poll_s)
                continue
            if busy:
                await self._yield_to_ingest(BATCH_PAUSE_S)
                continue
            self.wakeup.clear()
            await wait_until_set(self.wakeup, poll_s)

    async def release(self) -> None:
        """Give back this worker's leases so that they are claimed at once: at a graceful
        shutdown, and after a failed claim (it may have committed, its answer lost)."""
        stmt = (
            update(events)
            .where(events.c.lease_owner == self.owner, events.c.status == "processing")
            .values(status="received", lease_owner=None, lease_until=None)
        )
        await self._writes.run(lambda conn: conn.execute(stmt))


def _supersede(conn: Connection, key: str, now: datetime) -> None:
    """`pending: latest`: of the runs of `key` not started yet, keep only the newest.

    A run has not started while its first step is pending and was never claimed. The
    others end `superseded`, naming the run that replaced them.
    """
    r = action_runs.c
    waiting = conn.execute(
        select(r.event_id, r.rule_name)
        .where(r.concurrency_key == key, r.step_index == 0, r.status == "pending", r.attempts == 0)
        .order_by(r.event_id, r.rule_name)
    ).all()
    if len(waiting) < 2:
        return
    newest = waiting[-1]
    for old in waiting[:-1]:
        conn.execute(
            update(action_runs)
            .where(
                r.event_id == old.event_id,
                r.rule_name == old.rule_name,
                r.status.in_(("pending", "held")),
            )
            .values(
                status="superseded",
                last_error=f"superseded by event {newest.event_id} (rule {newest.rule_name})",
                updated_at=now,
            )
        )
