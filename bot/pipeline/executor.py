"""Action execution: claim due action runs from the outbox, call the service, record it.

A run moves `pending -> running -> succeeded | retrying -> ... | dead`. Steps of one rule
run in order: a run is due only when the step before it succeeded; when a step is dead
the later steps of that rule are `skipped`. A run found `running` with an expired lease
(its worker died mid-call) is claimed again with `lookup_first`, so a create whose
outcome is unknown looks for its object before creating it a second time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import and_, bindparam, exists, func, insert, not_, or_, select, text, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import ColumnElement
from sqlalchemy.sql.elements import BindParameter

from bot import logs
from bot.core.due import next_attempt_at, next_check
from bot.core.masking import mask_result, needs_rule_params
from bot.db.claims import EXPIRED, claim_statement
from bot.db.clean import clean_text, clean_value
from bot.db.engine import never_succeeds, save_until_done
from bot.db.group_commit import GroupCommit
from bot.db.models import UTCDateTime, action_attempts, action_runs, events, utcnow
from bot.db.outcomes import update_outcomes
from bot.db.store import database_error
from bot.db.writers import writer_for
from bot.errors import ActionError, ServiceDisabled, TemplateRenderError
from bot.pipeline.wakeup import wait_until_set
from bot.rules import workflow
from bot.rules.model import RuleSet, Step
from bot.rules.templates import build_context, render_params
from bot.rules.workflow import IF_SKIPPED
from bot.services.actions import Done, Wait
from bot.services.http import LAST_STATUS
from bot.services.runner import ActionRunner, action_params

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """How often and how patiently a failing action run is retried before it is dead."""

    max_attempts: int = 8
    base_delay_s: float = 5.0
    max_delay_s: float = 900.0


@dataclass(frozen=True, slots=True)
class _Run:
    id: int
    event_id: int
    rule_name: str
    step_index: int
    step_id: str | None
    action: str
    params: dict[str, Any]
    state: dict[str, Any] | None
    attempts: int
    resumed: bool  # claimed back from a worker whose lease ran out: outcome unknown
    context: dict[str, Any]  # template context: payload, `event`, earlier steps' results
    tenant: str  # the event's Jira tenant: whose Jira `jira.*` actions call
    key: str = ""  # the idempotency key: keyed actions mark what they make with it
    control: workflow.Control = field(default_factory=workflow.Control)
    waiting_since: datetime | None = None  # the first call of a step waiting on `until`


@dataclass(frozen=True, slots=True)
class _AttemptRecord:
    """One attempt's outcome, waiting to be written with others in one transaction."""

    run: _Run
    started: datetime
    finished: datetime
    outcome: str
    values: dict[str, Any]
    status_code: int | None


ACTIVE = ("pending", "running", "retrying", "waiting")  # a run of these holds its key
# While deliveries load the write path, claims (a commit each, and an outcome commit after
# them) come at most this often, for all free slots at once: the deliveries' commits
# queue behind them in the one writer (see docs/performance.md, issue #23).
BUSY_CLAIM_PAUSE_S = 0.1
# ... and the outcomes finishing meanwhile wait this long for each other: one commit.
BUSY_OUTCOME_LINGER_S = 0.1


def _skipped_by_if(last_error: ColumnElement[Any]) -> ColumnElement[bool]:
    """A skipped run's error says its own `if` skipped it. Not LIKE with a bound pattern:
    SQLite prepares a statement again whenever such a pattern is bound (the LIKE
    optimisation), and the claim is thousands of characters: 0.1 ms per branch per claim."""
    return func.substr(last_error, 1, len(IF_SKIPPED)) == IF_SKIPPED


def due_conditions(now: datetime | BindParameter[datetime]) -> list[ColumnElement[bool]]:
    """Runs that may start now, one condition per status: due, with the step before
    done (pending, retrying, waiting) and their concurrency key free, or stale (running,
    lease run out: the run holds its key and goes on).

    A step of `do` follows a step that succeeded or was skipped by its `if`; a step of
    `on_failure` follows any finished one (their failure triggers nothing further). A
    run not started yet waits while another run of its key is in progress and started,
    or is older (events in the order received); a started run is never held back, so two
    runs can never wait for each other.
    """
    r = action_runs.c
    previous = action_runs.alias("previous")
    previous_done = exists().where(
        previous.c.event_id == r.event_id,
        previous.c.rule_name == r.rule_name,
        previous.c.step_index == r.step_index - 1,
        or_(
            previous.c.status == "succeeded",
            # Skipped by its own `if` (not behind a dead step: a `runs retry` of such a
            # later step must not run before the dead one is put right).
            and_(previous.c.status == "skipped", _skipped_by_if(previous.c.last_error)),
            and_(
                r.step_index > workflow.ON_FAILURE_BASE, previous.c.status.in_(("dead", "skipped"))
            ),
        ),
    )
    first = or_(r.step_index == 0, r.step_index == workflow.ON_FAILURE_BASE)
    other = action_runs.alias("other")
    # A run has started once its first step was claimed (every step is planned pending).
    first_of_other = action_runs.alias("first_of_other")
    started = exists().where(
        first_of_other.c.event_id == other.c.event_id,
        first_of_other.c.rule_name == other.c.rule_name,
        first_of_other.c.step_index == 0,
        first_of_other.c.status != "pending",
    )
    key_taken = exists().where(
        other.c.concurrency_key == r.concurrency_key,
        other.c.status.in_(ACTIVE),
        or_(other.c.event_id != r.event_id, other.c.rule_name != r.rule_name),
        or_(
            other.c.event_id < r.event_id,
            and_(other.c.event_id == r.event_id, other.c.rule_name < r.rule_name),
            started,
        ),
    )
    key_free = or_(
        r.concurrency_key.is_(None), r.step_index > 0, r.status != "pending", not_(key_taken)
    )
    due = [
        and_(
            r.status == status,
            # A waiting step always has its next check: a plain range on the (status,
            # next_attempt_at) index, so runs waiting for later cost the claim nothing.
            r.next_attempt_at <= now
            if status == "waiting"
            else or_(r.next_attempt_at.is_(None), r.next_attempt_at <= now),
            or_(first, previous_done),
            key_free,
        )
        for status in ("pending", "retrying", "waiting")
    ]
    stale = and_(r.status == "running", r.lease_until < now)
    return [*due, stale]


_RECORD_OUTCOME = (
    update(action_runs)
    .where(action_runs.c.id == bindparam("b_id"))
    .values(
        status=bindparam("b_status"),
        next_attempt_at=bindparam("b_next_attempt_at"),
        last_error=bindparam("b_last_error"),
        updated_at=bindparam("b_updated_at"),
        result=bindparam("b_result"),
        attempts=bindparam("b_attempts"),
        state=bindparam("b_state"),
        waiting_since=bindparam("b_waiting_since", type_=UTCDateTime()),
    )
)
# A dead step of `do` releases its rule's `on_failure` steps, with what failed.
_RELEASE_ON_FAILURE = (
    update(action_runs)
    .where(
        action_runs.c.event_id == bindparam("b_event_id"),
        action_runs.c.rule_name == bindparam("b_rule_name"),
        action_runs.c.status == "held",
    )
    .values(status="pending", failure=bindparam("b_failure"), updated_at=bindparam("b_now"))
)
# A run whose `do` steps are all finished and none dead: its `on_failure` steps stand down.
_later = action_runs.alias("later")
_STAND_DOWN = (
    update(action_runs)
    .where(
        action_runs.c.event_id == bindparam("b_event_id"),
        action_runs.c.rule_name == bindparam("b_rule_name"),
        action_runs.c.status == "held",
        not_(
            exists().where(
                _later.c.event_id == action_runs.c.event_id,
                _later.c.rule_name == action_runs.c.rule_name,
                _later.c.step_index < workflow.ON_FAILURE_BASE,
                _later.c.status.in_((*ACTIVE, "dead")),
            )
        ),
    )
    .values(
        status="skipped",
        last_error="not needed: no step of do is dead",
        updated_at=bindparam("b_now"),
    )
)


# What a claim needs of the runs it leases (each column costs a conversion per row).
_CLAIMED = (
    action_runs.c.id,
    action_runs.c.event_id,
    action_runs.c.rule_name,
    action_runs.c.step_index,
    action_runs.c.step_id,
    action_runs.c.action,
    action_runs.c.params,
    action_runs.c.state,
    action_runs.c.attempts,
    action_runs.c.idempotency_key,
    action_runs.c.control,
    action_runs.c.failure,
    action_runs.c.waiting_since,
)
_EVENT_BODIES = select(events.c.id, events.c.tenant, events.c.body, events.c.received_at).where(
    events.c.id.in_(bindparam("b_ids", expanding=True))
)
# The runs of some events, by the (event_id, ...) index. Not filtered on status in SQL:
# SQLite would then walk the status index instead, i.e. every succeeded run ever.
_EVENT_RUNS = select(
    action_runs.c.event_id,
    action_runs.c.rule_name,
    action_runs.c.step_index,
    action_runs.c.step_id,
    action_runs.c.status,
    action_runs.c.result,
).where(action_runs.c.event_id.in_(bindparam("b_ids", expanding=True)))
# On PostgreSQL, claims of all replicas take turns (a transaction-scoped advisory lock),
# so that two runs of one concurrency key are never claimed by two replicas at once:
# each claim sees the runs the one before it started. Claims are short statements.
_CLAIM_LOCK = text("SELECT pg_advisory_xact_lock(7310019)")


# Outcomes' statements, built once. The first releases the runs whose lease is still ours.
_RELEASE_OWNED = (
    update(action_runs)
    .where(
        action_runs.c.id.in_(bindparam("b_ids", expanding=True)),
        action_runs.c.lease_owner == bindparam("b_owner"),
    )
    .values(lease_owner=None, lease_until=None)
    .returning(action_runs.c.id)
)
_INSERT_ATTEMPTS = insert(action_attempts)


class ActionExecutor:
    """Run due action runs through an `ActionRunner` and persist every attempt."""

    def __init__(
        self,
        engine: AsyncEngine,
        runner: ActionRunner,
        *,
        rules_dir: Path,
        lease_s: float = 120.0,
        concurrency: int = 4,
        budget: RetryBudget | None = None,
        owner: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
        rules: Callable[[], RuleSet] | None = None,
        ingest_busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self._engine = engine
        self._ingest_busy = ingest_busy
        self._rules = rules  # the rule set in force: where masked secrets are read
        self._writes = writer_for(engine)
        self._runner = runner
        self._rules_dir = rules_dir
        self._lease_s = lease_s
        self._concurrency = concurrency
        self._budget = budget or RetryBudget()
        self.owner = owner or f"actions-{uuid.uuid4().hex[:12]}"
        self._clock = clock
        self._rng = rng or random.Random()
        self.wakeup = asyncio.Event()
        self._commits: GroupCommit[_AttemptRecord, bool] = GroupCommit(
            self._write, linger=lambda: BUSY_OUTCOME_LINGER_S if self._ingest_busy() else 0.0
        )
        self._claims: dict[int, Any] = {}  # claim statements by size
        # Called with (action, new run status) after each recorded attempt (metrics).
        self.on_attempt: Callable[[str, str], None] | None = None
        # Called with the event id when an event's outcome turns `failed` (metrics).
        self.on_event_failed: Callable[[int], None] | None = None

    async def claim(self, limit: int) -> list[_Run]:
        """Lease up to `limit` due runs."""
        now = self._clock()
        stmt = self._claims.get(limit)
        if stmt is None:  # built once per size: building it costs more than running it
            at = bindparam("b_now", type_=UTCDateTime())
            stmt = self._claims[limit] = claim_statement(
                action_runs,
                self._engine.dialect.name,
                due_conditions(at),
                owner=self.owner,
                lease_until=bindparam("b_lease_until", type_=UTCDateTime()),
                limit=limit,
                values={"status": "running", "updated_at": at},
                returning=_CLAIMED,
            )
        times = {"b_now": now, "b_lease_until": now + timedelta(seconds=self._lease_s)}

        postgres = self._engine.dialect.name == "postgresql"

        def claim(conn: Connection) -> tuple[list[Any], dict[int, tuple[str, dict[str, Any]]]]:
            if postgres:
                conn.execute(_CLAIM_LOCK)
            rows = sorted(conn.execute(stmt, times).all(), key=lambda r: r.id)
            return rows, self._contexts(conn, rows) if rows else {}

        rows, sources = await self._writes.run_relaxed(claim)
        # Any second or later attempt may follow one whose outcome is unknown (a timeout,
        # a worker killed mid-call): it runs with `lookup_first`, so creates look first.
        return [
            _Run(
                id=r.id,
                event_id=r.event_id,
                rule_name=r.rule_name,
                step_index=r.step_index,
                step_id=r.step_id,
                action=r.action,
                params=r.params or {},
                state=r.state,
                attempts=r.attempts,
                resumed=r.attempts > 1,
                tenant=sources[r.id][0],
                context=sources[r.id][1],
                key=r.idempotency_key,
                control=workflow.Control.from_json(r.control),
                waiting_since=r.waiting_since,
            )
            for r in rows
        ]

    def _contexts(self, conn: Connection, rows: list[Any]) -> dict[int, tuple[str, dict[str, Any]]]:
        """Claimed runs' event tenants and template contexts: two queries for the batch."""
        ids = {"b_ids": list({r.event_id for r in rows})}
        bodies = {e.id: e for e in conn.execute(_EVENT_BODIES, ids)}
        # Steps of a rule run in order, so the earlier results of a due run are final.
        # A first step has none (the common claim: each event's first step).
        earlier: dict[tuple[int, str], list[Any]] = {}
        later = {"b_ids": list({r.event_id for r in rows if r.step_index > 0})}
        for row in conn.execute(_EVENT_RUNS, later) if later["b_ids"] else ():
            if row.status == "succeeded" and row.step_id is not None:
                earlier.setdefault((row.event_id, row.rule_name), []).append(row)
        out: dict[int, tuple[str, dict[str, Any]]] = {}
        for r in rows:
            event = bodies[r.event_id]
            steps = {
                e.step_id: e.result
                for e in earlier.get((r.event_id, r.rule_name), [])
                if e.step_index < r.step_index
            }
            context = build_context(
                orjson.loads(event.body),
                event_id=str(r.event_id),
                received_at=event.received_at.isoformat(),
                steps=steps,
            )
            if r.failure is not None:
                context["failure"] = r.failure  # an `on_failure` step: what failed
            out[r.id] = (event.tenant, context)
        return out

    def _step(self, run: _Run) -> Step:
        spec = action_params(run.action) or ()
        params: Mapping[str, Any] = run.params
        if needs_rule_params(run.action, params):
            params = self._rule_params(run)
        return Step(
            id=run.step_id,
            action=run.action,
            with_=params,
            index=run.step_index,
            base_dir=self._rules_dir,
            file_params=frozenset(p.name for p in spec if p.location == "file"),
        )

    def _rule_params(self, run: _Run) -> Mapping[str, Any]:
        """The step's `with:` from the rule set in force: its stored copy has a secret
        masked (bot.core.masking), which only the rule file holds."""
        rule = self._rules().get(run.rule_name) if self._rules is not None else None
        step = rule.steps[run.step_index] if rule and run.step_index < len(rule.steps) else None
        if step is None or step.action != run.action:
            raise TemplateRenderError(
                f"the secret value of step {run.step_index + 1} is kept only in its rule, "
                f"and rule {run.rule_name!r} no longer has this step"
            )
        return step.with_

    async def execute(self, run: _Run) -> str:
        """Run one claimed action run; return its new status."""
        started = self._clock()
        status_code: int | None = None
        control = run.control
        if control.if_ is not None and run.waiting_since is None:
            try:
                reason = workflow.check(control.if_, run.context)
            except TemplateRenderError as exc:
                return await self._failed(run, started, f"if: {exc}", None, retryable=False)
            if reason is not None:
                # Not a failure: the steps after it go on, as after a success.
                return await self._record(
                    run,
                    started,
                    outcome="skipped",
                    status="skipped",
                    error=f"{IF_SKIPPED}{reason}",
                    attempts=run.attempts - 1,
                )
        LAST_STATUS.set(None)  # this task's: a run is executed in a task of its own
        try:
            params = render_params(self._step(run), run.context)
            outcome = await self._runner.run(
                run.action,
                params,
                state=run.state,
                lookup_first=run.resumed,
                tenant=run.tenant,
                key=run.key,
            )
        except TemplateRenderError as exc:
            return await self._failed(run, started, str(exc), None, retryable=False)
        except ServiceDisabled as exc:
            return await self._failed(run, started, str(exc), None, retryable=False)
        except ActionError as exc:
            status_code = exc.status
            delay = exc.retry_after_s
            return await self._failed(
                run, started, str(exc), status_code, retryable=exc.retryable, retry_after_s=delay
            )
        except Exception as exc:  # a bug or an unexpected failure: retried within the budget
            log.exception("action run %s failed unexpectedly", run.id)
            return await self._failed(run, started, f"{type(exc).__name__}: {exc}", None, True)
        if isinstance(outcome, Wait):
            return await self._record(
                run,
                started,
                outcome="waiting",
                status="pending",
                # A wait is progress, not a failed attempt: it does not use the budget.
                attempts=run.attempts - 1,
                next_attempt_at=started + timedelta(seconds=outcome.after_s),
                state=outcome.state,
                status_code=LAST_STATUS.get(),
            )
        assert isinstance(outcome, Done)
        if control.until is not None or control.fail_if is not None:
            return await self._judge(run, started, outcome.result)
        return await self._record(
            run,
            started,
            outcome="succeeded",
            status="succeeded",
            result=outcome.result,
            status_code=LAST_STATUS.get(),
        )

    async def _judge(self, run: _Run, started: datetime, result: Any) -> str:
        """Apply a step's `until` and `fail_if` to its answer."""
        control = run.control
        context = {**run.context, "result": result}
        try:
            waiting_on = (
                workflow.check(control.until, context) if control.until is not None else None
            )
            failed = (
                workflow.check(control.fail_if, context) is None
                if control.fail_if is not None and waiting_on is None
                else False
            )
        except TemplateRenderError as exc:
            return await self._failed(run, started, str(exc), None, retryable=False)
        # The attempt keeps the answer, and its HTTP status unless judged a failure:
        # `failure.status_code` is a failed call's status (none here: the call succeeded).
        record = functools.partial(self._record, run, started, result=result)
        answered = LAST_STATUS.get()
        if waiting_on is not None:
            since = run.waiting_since or started
            check_at, waited_s = next_check(
                started, run.waiting_since, control.every_s, control.timeout_s
            )
            if check_at is None:
                error = (
                    f"timed out waiting for {workflow.describe(control.until)} after "
                    f"{waited_s:.0f}s (timeout {control.timeout_s:.0f}s); last: {waiting_on}"
                )
                return await record(outcome="failed", status="dead", error=error)
            # A durable wait: the row is due again from the database; no task sleeps.
            return await record(
                outcome="waiting",
                status="waiting",
                status_code=answered,
                error=f"waiting for {waiting_on}",
                attempts=run.attempts - 1,
                next_attempt_at=check_at,
                waiting_since=since,
            )
        if failed:
            error = f"fail_if: {workflow.describe(control.fail_if)} held"
            return await record(outcome="failed", status="dead", error=error)
        return await record(outcome="succeeded", status="succeeded", status_code=answered)

    async def _failed(
        self,
        run: _Run,
        started: datetime,
        error: str,
        status_code: int | None,
        retryable: bool,
        retry_after_s: float | None = None,
    ) -> str:
        if retryable and run.attempts < self._budget.max_attempts:
            when = next_attempt_at(
                run.attempts,
                started,
                self._budget.base_delay_s,
                self._budget.max_delay_s,
                self._rng,
                retry_after_s,
            )
            return await self._record(
                run,
                started,
                outcome="failed",
                status="retrying",
                error=error,
                status_code=status_code,
                next_attempt_at=when,
            )
        return await self._record(
            run, started, outcome="failed", status="dead", error=error, status_code=status_code
        )

    async def _record(
        self,
        run: _Run,
        started: datetime,
        *,
        outcome: str,
        status: str,
        error: str | None = None,
        status_code: int | None = None,
        result: Any = None,
        attempts: int | None = None,
        next_attempt_at: datetime | None = None,
        state: dict[str, Any] | None = None,
        waiting_since: datetime | None = None,
    ) -> str:
        finished = self._clock()
        # Every column every time: a batch is then one executemany of one statement.
        # Texts are cleaned: an error or answer may echo a Jira field with a NUL.
        values: dict[str, Any] = {
            "b_status": status,
            "b_next_attempt_at": next_attempt_at,
            "b_last_error": None if error is None else clean_text(error),
            "b_updated_at": finished,
            "b_result": clean_value(mask_result(result)),
            "b_attempts": run.attempts if attempts is None else attempts,
            "b_state": clean_value(run.state if state is None else state),
            # A failed call while waiting keeps the wait's start: the timeout still counts.
            "b_waiting_since": run.waiting_since if waiting_since is None else waiting_since,
        }
        item = _AttemptRecord(run, started, finished, outcome, values, status_code)
        written = await save_until_done(
            lambda: self._commits.submit(item), f"action run {run.id}'s outcome"
        )
        if not written:
            return "lost"  # the lease ran out and another worker owns the run now
        if status == "dead":
            # What an operator must act on: `deploybot runs list --status dead`, then retry.
            log.warning(
                "dead run %s (event %s, rule %s, step %s, %s) after %s attempt(s): %s",
                run.id, run.event_id, run.rule_name, run.step_index + 1, run.action,
                run.attempts, error,
                extra={"event_id": run.event_id, "rule": run.rule_name, "action": run.action,
                       "action_run_id": run.id, "attempt": run.attempts, "status": status,
                       "error": error},
            )  # fmt: skip
        logs.info(
            log,
            f"action {outcome}",
            event_id=run.event_id,
            rule=run.rule_name,
            action=run.action,
            action_run_id=run.id,
            attempt=run.attempts,
            status=status,
            status_code=status_code,
            error=error,
        )
        if self.on_attempt is not None:
            self.on_attempt(run.action, status)
        return status

    async def _write(self, batch: list[_AttemptRecord]) -> list[bool]:
        """Write several attempts' outcomes in one transaction; False where a lease was lost.

        An outcome the database refuses for good must not hold back the others of its
        batch: then each is written alone, and one refused alone ends its run dead.
        """
        try:
            return await self._write_batch(batch)
        except Exception as error:
            if not never_succeeds(error):
                raise
            if len(batch) == 1:
                return [await self._write_refused(batch[0], error)]
        written: list[bool] = []
        for item in batch:
            try:
                written += await self._write_batch([item])
            except Exception as error:
                if not never_succeeds(error):
                    raise
                written.append(await self._write_refused(item, error))
        return written

    async def _write_refused(self, item: _AttemptRecord, error: BaseException) -> bool:
        """Record `item`'s run dead, with why its outcome could not be stored (and none
        of what was refused); False when even that is refused (logged)."""
        reason = f"the outcome could not be stored: {database_error(error)}"
        log.error("action run %s: %s", item.run.id, reason)
        values = {
            **item.values,
            "b_status": "dead",
            "b_next_attempt_at": None,
            "b_last_error": clean_text(reason),
            "b_result": None,
            "b_state": None,
        }
        dead = replace(item, outcome="failed", values=values)
        try:
            [written] = await self._write_batch([dead])
        except Exception as again:
            if not never_succeeds(again):
                raise
            log.error("action run %s: not even its failure could be stored: %s", item.run.id, again)
            return False
        return written

    async def _write_batch(self, batch: list[_AttemptRecord]) -> list[bool]:
        """Write attempts' outcomes in one transaction; False where a lease was lost."""
        written, failed = await self._writes.run_relaxed(self._write_outcomes, batch)
        for event_id in failed:  # counted once committed (a retried write counts once)
            if self.on_event_failed is not None:
                self.on_event_failed(event_id)
        return written

    def _write_outcomes(
        self, conn: Connection, batch: list[_AttemptRecord]
    ) -> tuple[list[bool], list[int]]:
        """Write outcomes in `conn`'s transaction; False where a lease was lost.

        Seven statements at most whatever the batch size (the last three read and set the
        events' outcomes). The first is a write, so that SQLite takes its write lock at
        once, and it returns the runs whose lease is still ours.
        """
        now = self._clock()
        ids = [item.run.id for item in batch]
        owned = set(conn.execute(_RELEASE_OWNED, {"b_ids": ids, "b_owner": self.owner}).scalars())
        mine = [item for item in batch if item.run.id in owned]
        if mine:
            conn.execute(_RECORD_OUTCOME, [{"b_id": item.run.id, **item.values} for item in mine])
            conn.execute(
                _INSERT_ATTEMPTS,
                [
                    {
                        "action_run_id": item.run.id,
                        "attempt": item.run.attempts,
                        "started_at": item.started,
                        "finished_at": item.finished,
                        "outcome": item.outcome,
                        "status_code": item.status_code,
                        "error": item.values["b_last_error"],
                    }
                    for item in mine
                ],
            )
        for item in mine:
            run = item.run
            status = item.values["b_status"]
            in_do = run.step_index < workflow.ON_FAILURE_BASE
            where = {"b_event_id": run.event_id, "b_rule_name": run.rule_name, "b_now": now}
            if status == "dead" and in_do:
                conn.execute(
                    update(action_runs)
                    .where(
                        action_runs.c.event_id == run.event_id,
                        action_runs.c.rule_name == run.rule_name,
                        action_runs.c.step_index > run.step_index,
                        action_runs.c.step_index < workflow.ON_FAILURE_BASE,
                        action_runs.c.status.in_(("pending", "retrying")),
                    )
                    .values(
                        status="skipped",
                        last_error=f"step {run.step_index + 1} ({run.action}) is dead",
                        updated_at=now,
                    )
                )
                if run.control.has_on_failure:
                    failure = workflow.failure_context(
                        step_index=run.step_index,
                        step_id=run.step_id,
                        action=run.action,
                        error=item.values["b_last_error"],
                        attempts=run.attempts,
                        status_code=item.status_code,
                    )
                    conn.execute(_RELEASE_ON_FAILURE, {**where, "b_failure": failure})
            elif status in ("succeeded", "skipped") and in_do and run.control.has_on_failure:
                conn.execute(_STAND_DOWN, where)
        failed = update_outcomes(conn, sorted({item.run.event_id for item in mine}), now)
        return [item.run.id in owned for item in batch], failed

    async def run_once(self) -> int:
        """Claim and execute one batch concurrently; return how many runs were executed."""
        runs = await self.claim(self._concurrency)
        if runs:
            await asyncio.gather(*(self.execute(run) for run in runs))
        return len(runs)

    async def run(self, poll_s: float = 1.0) -> None:
        """Execute due runs until cancelled, `concurrency` at a time, claiming as slots free.

        Wakes on `wakeup` (new runs planned), when a run finishes, or every `poll_s`.
        """
        inflight: dict[asyncio.Task[str], int] = {}  # each task's run id
        orphans = False  # a claim failed: rows may be leased to us that no task holds

        def finished(task: asyncio.Task[str]) -> None:
            inflight.pop(task, None)
            if not task.cancelled() and task.exception() is not None:
                log.error("action run task failed: %s", task.exception())
            self.wakeup.set()  # a slot is free

        try:
            while True:
                # Cleared before the claim: a run planned (or finished) meanwhile wakes
                # the wait below. One event to wait on, whatever the concurrency.
                self.wakeup.clear()
                free = self._concurrency - len(inflight)
                claimed: list[_Run] = []
                # Claims are writes (a commit each): take them in batches of at least half
                # the slots, unless nothing is running.
                if free >= max(1, self._concurrency // 2) or not inflight:
                    try:
                        if orphans:
                            await self._take_back_orphans(sorted(inflight.values()))
                            orphans = False
                        claimed = await self.claim(free)
                    except (SQLAlchemyError, OSError) as exc:
                        orphans = True
                        log.warning("action execution paused: database error: %s", exc)
                    except Exception:  # a bug must not end execution for good
                        orphans = True
                        log.exception("action claim failed; again in %.0f s", poll_s)
                        await asyncio.sleep(poll_s)
                        continue
                for run in claimed:
                    task = asyncio.create_task(self.execute(run))
                    inflight[task] = run.id
                    task.add_done_callback(finished)
                if claimed and self._ingest_busy():
                    await asyncio.sleep(BUSY_CLAIM_PAUSE_S)
                    continue
                if claimed and len(inflight) < self._concurrency:
                    continue  # more may be due right now
                await wait_until_set(self.wakeup, poll_s)
        finally:
            pending = list(inflight)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _take_back_orphans(self, running: list[int]) -> None:
        """Expire this executor's leases on runs none of its tasks runs, so that the next
        claim resumes them (creates look first). A claim whose COMMIT the database
        carried out, its answer lost with the connection (or a bug after it), leased them
        to this live process: no one else takes them back, and the lease runs for minutes."""
        r = action_runs.c
        stmt = (
            update(action_runs)
            .where(r.lease_owner == self.owner, r.status == "running", r.id.not_in(running))
            .values(lease_until=EXPIRED)
        )
        taken = await self._writes.run_relaxed(lambda conn: conn.execute(stmt).rowcount)
        if taken:
            log.warning("%d action run(s) leased by a failed claim taken back", taken)

    async def release(self) -> None:
        """Give back leases of runs not started (graceful shutdown)."""
        await self._commits.idle()  # outcomes already submitted are written first
        stmt = (
            update(action_runs)
            .where(action_runs.c.lease_owner == self.owner, action_runs.c.status == "running")
            .values(lease_until=self._clock())
        )
        await self._writes.run(lambda conn: conn.execute(stmt))
