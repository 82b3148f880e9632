"""The scheduler's jobs: plain async functions with explicit dependencies and a given `now`.

What is due is decided in `bot.core.due` (pure); these functions only read, call Jira, store.
`bot.jira_app.scheduler` runs them; `deploybot webhooks sync|list` calls them directly.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import aiohttp
import orjson
from sqlalchemy import delete, exists
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.backoff import RetryPolicy
from bot.core.delivery import parse_delivery
from bot.core.due import failed_after_ms, prune_before, refresh_due
from bot.core.webhook_plan import Need, RegisteredWebhook, plan_sync
from bot.db.engine import create_engine, upgrade
from bot.db.models import action_runs, events
from bot.db.oauth_tokens import OAuthTokenStore
from bot.db.registrations import (
    OAUTH_REFRESH_TOKEN_KEY,
    Registrations,
    failed_cursor_key,
    kv_get,
    kv_set,
)
from bot.db.store import EventStore
from bot.db.tenants import Tenant, Tenants
from bot.errors import ActionError, PayloadError, RuleError
from bot.rules.loader import load_rules
from bot.rules.model import RuleSet
from bot.services import http
from bot.services.forge_tokens import ForgeSystemAuth, ForgeSystemTokens
from bot.services.jira import (
    DEFAULT_POLICY,
    ConnectAuth,
    JiraClient,
    SharedOAuthTokens,
    token_seed,
)
from bot.settings import Settings

log = logging.getLogger(__name__)

DELIVERY_PATH = "/webhooks/jira"
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
class Target:
    """One Jira deploybot registers webhooks with: a Connect tenant, or the OAuth app ("")."""

    tenant: str
    client: JiraClient


@dataclass(frozen=True, slots=True)
class JiraAccess:
    """How to reach Jira: settings, database, HTTP session, and the clock tokens use."""

    settings: Settings
    engine: AsyncEngine
    session: aiohttp.ClientSession
    clock: Callable[[], float] = time.time
    policy: RetryPolicy = DEFAULT_POLICY

    @property
    def delivery_url(self) -> str | None:
        """Return the URL Jira delivers to (None without DEPLOYBOT_PUBLIC_URL)."""
        public_url = self.settings.public_url
        return None if not public_url else public_url.rstrip("/") + DELIVERY_PATH

    def _client(self, base_url: str, auth: ConnectAuth | SharedOAuthTokens) -> JiraClient:
        return JiraClient(self.session, base_url, auth, policy=self.policy, clock=self.clock)

    def connect_client(self, tenant: Tenant) -> JiraClient:
        """The client of one Connect tenant: requests signed with its shared secret."""
        auth = ConnectAuth(self.settings.jira_app_key, tenant.shared_secret)
        return self._client(tenant.base_url, auth)

    async def targets(self) -> list[Target]:
        """Return every Jira to manage: enabled Connect tenants, or the configured OAuth app."""
        s = self.settings
        if s.jira_auth_mode == "connect":
            return [
                Target(t.client_key, self.connect_client(t))
                for t in await Tenants(self.engine).all_enabled()
            ]
        client = await self.oauth_client()
        return [] if client is None else [Target("", client)]

    async def oauth_client(self) -> JiraClient | None:
        """The OAuth app's client, its access token shared through the database (None when
        the OAuth settings are incomplete)."""
        s = self.settings
        if not (s.jira_base_url and s.jira_client_id and s.jira_client_secret):
            return None
        configured = s.jira_refresh_token
        initial = await self.refresh_token()
        if not configured and initial is None:
            return None
        tokens = SharedOAuthTokens(
            self.session,
            OAuthTokenStore(self.engine, s.jira_client_secret),
            s.jira_token_url,
            s.jira_client_id,
            s.jira_client_secret,
            configured or "",
            initial_refresh_token=initial,
            policy=self.policy,
            clock=self.clock,
        )
        return self._client(s.jira_base_url, tokens)

    async def refresh_token(self) -> str | None:
        """Return the newest OAuth refresh token: the stored rotated one, else the setting."""
        configured = self.settings.jira_refresh_token
        seed = token_seed(configured or "")
        state = await OAuthTokenStore(self.engine, self.settings.jira_client_secret or "").current()
        if state is not None and state.seed == seed:
            return state.refresh_token
        # Where versions before the shared token kept it.
        stored = await kv_get(self.engine, OAUTH_REFRESH_TOKEN_KEY)
        if stored is not None:
            stored_seed, _, token = stored.partition(":")
            if token and stored_seed == seed:
                return token
        return configured


class JiraActionClients:
    """The clients `jira.*` actions use: the Jira of the event's tenant.

    Connect mode: each installed, enabled tenant is its own site, reached with requests
    signed by its shared secret. OAuth mode: the app's one site (tenant ""), its access
    token shared with every worker, replica and the scheduler through the database.
    """

    def __init__(self, access: JiraAccess, forge: ForgeSystemTokens | None = None) -> None:
        self._access = access
        self._tenants = Tenants(access.engine)  # its lookups are cached
        self._oauth: JiraClient | None = None
        self._forge = forge

    async def client(self, tenant: str) -> JiraClient | None:
        mode = self._access.settings.jira_auth_mode
        if mode in ("oauth", "secret"):  # secret mode writes back with the OAuth app
            if tenant != "":
                return None
            if self._oauth is None:
                self._oauth = await self._access.oauth_client()
            if self._oauth is None and self._forge is not None:
                return self._forge_client()
            return self._oauth
        if mode != "connect":
            return None
        found = await self._tenants.get(tenant)
        if found is None or not found.enabled:
            return None
        return self._access.connect_client(found)

    def _forge_client(self) -> JiraClient | None:
        """Forge mode without the OAuth app: the app system token Forge events bring. Once
        one came, its site is known: a stale token makes the call fail retryably (the next
        event brings a fresh one); before any came there is no client (the run is dead)."""
        assert self._forge is not None
        held = self._forge.fresh() or self._forge.latest()
        if held is None:
            return None
        auth = ForgeSystemAuth(self._forge, held.api_base_url)
        a = self._access
        return JiraClient(a.session, held.api_base_url, auth, policy=a.policy, clock=a.clock)


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


async def _with_access(settings: Settings, work: Callable[[JiraAccess], Awaitable[int]]) -> int:
    engine = create_engine(settings.database_url)
    try:
        await upgrade(engine)
        async with http.client_session(proxy=settings.proxy) as session:
            return await work(JiraAccess(settings, engine, session))
    finally:
        await engine.dispose()


async def run_sync_command(access: JiraAccess, ruleset: RuleSet, now: datetime) -> int:
    """Sync every target with the rules, print what changed; 1 when anything was refused."""
    url = access.delivery_url
    if url is None:
        print("deploybot: webhooks sync needs DEPLOYBOT_PUBLIC_URL", file=sys.stderr)
        return 2
    targets = await access.targets()
    if not targets:
        print(
            "deploybot: no Jira to sync with (no Connect tenant installed, or the Jira"
            " OAuth settings are incomplete)",
            file=sys.stderr,
        )
        return 2
    needs, problems = needs_from_rules(ruleset)
    failed = bool(problems)
    for problem in problems:
        print(f"error: {problem}")
    for target in targets:
        name = target.tenant or "oauth app"
        try:
            r = await sync_webhooks(target, needs, Registrations(access.engine), url, now)
        except ActionError as exc:
            print(f"{name}: error: {exc}")
            failed = True
            continue
        print(
            f"{name}: registered {list(r.registered)}, deleted {list(r.deleted)},"
            f" kept {list(r.kept)}, refreshed {list(r.refreshed)}"
        )
        for error in r.errors:
            print(f"{name}: error: {error}")
        failed = failed or bool(r.errors)
    return 1 if failed else 0


def cmd_sync(settings: Settings) -> int:
    """`deploybot webhooks sync`: register what the rules need, delete what they do not."""
    try:
        ruleset = load_rules(settings.rules_dir, epic_label_field=settings.jira_epic_label_field)
    except RuleError as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        print("deploybot: rules have errors; webhooks not synced", file=sys.stderr)
        return 1
    now = datetime.now(UTC)
    return asyncio.run(_with_access(settings, lambda a: run_sync_command(a, ruleset, now)))


def cmd_list(settings: Settings, as_json: bool) -> int:
    """`deploybot webhooks list`: the stored registrations with JQL, events and expiry."""

    async def work(engine: AsyncEngine) -> int:
        try:
            await upgrade(engine)
            rows = await Registrations(engine).list()
        finally:
            await engine.dispose()
        for row in rows:
            if as_json:
                sys.stdout.write(orjson.dumps(row.to_json()).decode() + "\n")
                continue
            expires = row.expires_at.isoformat(timespec="seconds") if row.expires_at else "-"
            fields = f"  fields {','.join(row.spec.fields)}" if row.spec.fields else ""
            if row.spec.property_keys:
                fields += f"  property keys {','.join(row.spec.property_keys)}"
            print(
                f"{row.tenant or '-':<24} {row.webhook_id:>10}  expires {expires}"
                f"  events {','.join(row.spec.events)}  jql {row.spec.jql}{fields}"
            )
        if not as_json:
            print(f"{len(rows)} webhook(s)", file=sys.stderr)
        return 0

    return asyncio.run(work(create_engine(settings.database_url)))
