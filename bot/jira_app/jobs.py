"""The scheduler's jobs: plain async functions with explicit dependencies and a given `now`.

What is due is decided in `bot.core.due` (pure); these functions only read, call Jira, store.
`bot.jira_app.scheduler` runs them; `deploybot webhooks sync|list` (bot.cli.webhooks) calls
them directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy import delete, exists
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.delivery import parse_delivery
from bot.core.due import failed_after_ms, prune_before, refresh_due
from bot.core.webhook_plan import Need, RegisteredWebhook, plan_sync
from bot.db.models import action_runs, events
from bot.db.registrations import (
    Registrations,
    failed_cursor_key,
    kv_get,
    kv_set,
)
from bot.db.store import EventStore
from bot.errors import ActionError, PayloadError
from bot.jira_app.access import JiraAccess, Target
from bot.rules.model import RuleSet

log = logging.getLogger(__name__)

# Action runs that are finished for good; `dead` ones stay until someone replays them.
PRUNABLE_RUN_STATUSES = ("succeeded", "skipped")
_REPLAY_HEADERS = {"Content-Type": "application/json"}


def needs_from_rules(ruleset: RuleSet) -> tuple[list[Need], list[str]]:
    """Return what the enabled rules ask Jira to send, and the rules that cannot ask."""
    needs: list[Need] = []
    problems: list[str] = []
    for rule in ruleset.rules:
        if not rule.enabled:
            continue
        if not rule.jql:
            problems.append(
                f"{rule.source}: rule {rule.name!r} has no on.jql; Jira registers webhooks"
                " only with a JQL filter, so this rule receives no events"
            )
            continue
        needs.append(
            Need(rule.name, rule.events, rule.jql, rule.fields or None, rule.property_keys or None)
        )
    return needs, problems


@dataclass(frozen=True, slots=True)
class SyncReport:
    """What one sync did for one target, and what Jira or the limits refused."""

    tenant: str
    registered: tuple[int, ...] = ()
    deleted: tuple[int, ...] = ()
    kept: tuple[int, ...] = ()
    refreshed: tuple[int, ...] = ()
    errors: tuple[str, ...] = ()


async def sync_webhooks(
    target: Target, needs: list[Need], registrations: Registrations, url: str, now: datetime
) -> SyncReport:
    """Make the target's webhooks match the needs, refresh those due, and store the result.

    A webhook Jira no longer knows is missing from its list, so it is registered again.
    """
    client = target.client
    plan = plan_sync(needs, await client.list_all(), client.mode)
    results = await client.apply(plan, url)
    errors = list(plan.errors)
    held = list(plan.keep)
    for desired, result in zip(plan.register, results, strict=True):
        if result.created_id is None:
            errors.append(f"Jira refused the webhook for rules {', '.join(desired.rules)}")
            errors.extend(f"  {e} (jql: {desired.spec.jql})" for e in result.errors)
        else:
            # Registration answers carry no expiry: unknown is due, so the refresh tells it.
            held.append(RegisteredWebhook(result.created_id, result.spec, None))
    due = refresh_due([(h.id, h.expires_at) for h in held], now)
    if due:
        expires_at = await client.refresh(due)
        held = [replace(h, expires_at=expires_at) if h.id in due else h for h in held]
    await registrations.replace(target.tenant, held, refreshed=due)
    return SyncReport(
        target.tenant,
        registered=tuple(r.created_id for r in results if r.created_id is not None),
        deleted=plan.delete,
        kept=tuple(h.id for h in plan.keep),
        refreshed=tuple(due),
        errors=tuple(errors),
    )


def maintenance_due(
    last: tuple[str, datetime] | None, fingerprint: str, now: datetime, interval: timedelta
) -> bool:
    """Tell whether a target's webhooks need a sync: never synced, changed, or interval up."""
    return last is None or last[0] != fingerprint or now >= last[1] + interval


@dataclass
class WebhookMaintenance:
    """The webhook job: sync each target when the rules or tenant changed, or when due.

    Run every scheduler tick, it syncs within one tick of a rule reload or a Connect
    install, and otherwise every `interval` (which also refreshes and re-registers).
    """

    access: JiraAccess
    rules: Callable[[], RuleSet | None]  # None: no good rule set loaded yet, do nothing
    interval: timedelta
    last: dict[str, tuple[str, datetime]] = field(default_factory=dict)

    async def __call__(self, now: datetime) -> list[SyncReport]:
        """Sync the targets that are due; a failing target does not stop the others."""
        ruleset, url = self.rules(), self.access.delivery_url
        if ruleset is None or url is None:
            return []
        needs, _ = needs_from_rules(ruleset)
        registrations = Registrations(self.access.engine)
        reports = []
        for target in await self.access.targets():
            fingerprint = f"{ruleset.version}|{target.client.base_url}"
            if not maintenance_due(self.last.get(target.tenant), fingerprint, now, self.interval):
                continue
            try:
                report = await sync_webhooks(target, needs, registrations, url, now)
            except ActionError as exc:
                log.warning("webhook sync failed for tenant %r: %s", target.tenant, exc)
                continue
            self.last[target.tenant] = (fingerprint, now)
            for error in report.errors:
                log.warning("webhook sync for tenant %r: %s", target.tenant, error)
            reports.append(report)
        return reports


def _epoch_ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


async def poll_failed(target: Target, store: EventStore, engine: AsyncEngine, now: datetime) -> int:
    """Store the deliveries Jira gave up on since the cursor; return how many were new.

    Each goes through the live path's `EventStore.add` under its own id, so one that also
    arrived live is stored once. The cursor only passes a failure time once every failure
    at that time is stored (Jira pages never split a time), so a crash loses nothing.
    """
    key = failed_cursor_key(target.tenant)
    stored = await kv_get(engine, key)
    cursor_ms = None if stored is None else int(stored)
    after_ms = failed_after_ms(cursor_ms, now)
    complete_ms: int | None = None  # every failure up to this time is stored
    current_ms: int | None = None
    created = 0
    try:
        async for failure in target.client.failed(after_ms):
            failed_ms = _epoch_ms(failure.failure_time)
            if current_ms is not None and failed_ms > current_ms:
                complete_ms = current_ms
            current_ms = failed_ms
            if not failure.body:
                continue
            try:
                delivery = parse_delivery(
                    _REPLAY_HEADERS, failure.body.encode(), delivery_id=failure.id
                )
            except PayloadError as exc:
                log.warning("failed delivery %s not replayed: %s", failure.id, exc)
                continue
            result = await store.add(target.tenant, delivery, source="failed-poll")
            created += result.created
        complete_ms = current_ms
    finally:
        if complete_ms is not None and complete_ms > (cursor_ms or 0):
            await kv_set(engine, key, str(complete_ms))
    return created


async def poll_all_failed(access: JiraAccess, store: EventStore, now: datetime) -> int:
    """Poll failed deliveries of every Connect tenant (OAuth apps may not: Jira says 403)."""
    if access.settings.jira_auth_mode != "connect":
        return 0
    created = 0
    for target in await access.targets():
        try:
            created += await poll_failed(target, store, access.engine, now)
        except ActionError as exc:
            log.warning("polling failed deliveries of tenant %r failed: %s", target.tenant, exc)
    return created


async def wake_due_actions(wakeup: asyncio.Event) -> None:
    """Wake the action executor so retries whose time has come run now."""
    wakeup.set()


async def prune(engine: AsyncEngine, now: datetime, retention: timedelta) -> tuple[int, int]:
    """Delete finished action runs and processed events older than retention; return counts.

    An event goes only once none of its runs remain (unfinished and dead runs keep it),
    and never while Jira may still redeliver it (`due.prune_before`).
    """
    cutoff = prune_before(now, retention)
    runs, ev = action_runs.c, events.c
    async with engine.begin() as conn:
        pruned_runs = await conn.execute(
            delete(action_runs).where(
                runs.status.in_(PRUNABLE_RUN_STATUSES), runs.updated_at < cutoff
            )
        )
        pruned_events = await conn.execute(
            delete(events).where(
                ev.status == "processed",
                ev.processed_at < cutoff,
                ~exists().where(runs.event_id == ev.id),
            )
        )
    return int(pruned_runs.rowcount), int(pruned_events.rowcount)


# --- commands ----------------------------------------------------------------------------
