"""The catch-up job: store, as events, the Jira changes no delivery brought.

Each tick searches Jira (`/rest/api/3/search/jql`, every page) for the issues the rules'
filters match that were updated since the cursor (minus a margin), reads each one's
changelog (`/rest/api/3/issue/{key}/changelog`, every page), and stores every change
created since then that no stored delivery reported, as a `jira:issue_updated` event of
source `catch-up` (bot.core.catch_up). Its delivery id names the issue and the change,
so a change is stored once however many ticks or replicas see it; a live delivery of
the same change arriving later is stored but plans no second action (one action per
Jira change). Bounded per tick: at most `max_changes` changes stored and as many issues
read; past that the cursor stops at the last change stored and the next tick goes on.

The cursor (kv `catch-up:<tenant>`) is the time up to which changes are known to be
stored; it starts, on the first tick, at the newest event stored (or now on an empty
database: history before deploybot is not replayed). The scheduler's leader lock makes
one replica run it; the delivery ids keep even two concurrent runs from storing twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot import logs
from bot.core import catch_up as core
from bot.core.catalog import PlannedRequest
from bot.core.delivery import Delivery
from bot.db.models import events
from bot.db.registrations import kv_get, kv_set
from bot.db.store import EventStore
from bot.errors import ActionError
from bot.jira_app.access import JiraAccess
from bot.rules.model import RuleSet
from bot.services.jira import JiraClient

log = logging.getLogger(__name__)

PAGE_SIZE = 100
MAX_SEARCH_PAGES = 50
MAX_CHANGELOG_PAGES = 20
STATS_KEY = "catch-up-stats"


def cursor_key(tenant: str) -> str:
    return f"catch-up:{tenant}"


@dataclass
class CatchUpStats:
    """What the metrics and the status page show (kept in kv: any replica can read it)."""

    newest_change_s: float | None = None  # the newest Jira change the catch-up saw
    caught_up_total: int = 0  # changes it stored that no delivery had brought
    last_tick_s: float | None = None
    covered_until_s: float | None = None


def parse_stats(raw: str) -> CatchUpStats:
    try:
        data = json.loads(raw)
        return CatchUpStats(**{k: data.get(k) for k in CatchUpStats.__dataclass_fields__})
    except (ValueError, TypeError, AttributeError):
        return CatchUpStats()


async def read_stats(engine: AsyncEngine) -> CatchUpStats:
    raw = await kv_get(engine, STATS_KEY)
    return CatchUpStats() if raw is None else parse_stats(raw)


class CatchUp:
    """The scheduled job; `await job(now)` runs one tick and returns the changes stored."""

    def __init__(
        self,
        access: JiraAccess,
        store: EventStore,
        rules: Callable[[], RuleSet | None],
        *,
        margin_s: float,
        max_changes: int,
    ) -> None:
        self._access = access
        self._store = store
        self._rules = rules
        self._margin_s = margin_s
        self._max_changes = max_changes

    async def __call__(self, now: datetime) -> int:
        ruleset = self._rules()
        if ruleset is None:
            return 0  # rules not loaded yet: their filters are unknown
        client = await self._access.oauth_client()
        if client is None:
            return 0
        return await self.run(client, ruleset, now.timestamp())

    async def _cursor(self, tenant: str, now_s: float) -> tuple[float, float | None]:
        """(changes are stored up to, the issue search resumes at when a tick was cut)."""
        raw = await kv_get(self._access.engine, cursor_key(tenant))
        if raw is not None:
            try:
                data = json.loads(raw)
                resume = data.get("resume_s")
                return float(data["covered_s"]), None if resume is None else float(resume)
            except (ValueError, TypeError, KeyError):
                pass
        async with self._access.engine.connect() as conn:
            newest = (
                await conn.execute(
                    select(func.max(events.c.received_at)).where(events.c.tenant == tenant)
                )
            ).scalar()
        # First tick: from the newest event stored; on an empty database nothing is behind.
        return (newest.timestamp() if isinstance(newest, datetime) else now_s), None

    async def run(
        self, client: JiraClient, ruleset: RuleSet, now_s: float, tenant: str = ""
    ) -> int:
        """One tick for one Jira: search, read changelogs, store what was never received."""
        jqls = [r.jql for r in ruleset.rules if r.enabled and "jira:issue_updated" in r.events]
        covered, resume = await self._cursor(tenant, now_s)
        stats = await read_stats(self._access.engine)
        if not jqls or covered >= now_s:
            await self._finish(tenant, now_s, None, stats, now_s, 0)
            return 0
        since = covered - self._margin_s
        # Issues come oldest update first: when a tick is cut short, the next one searches
        # from the last issue it finished (the rest were updated since), while changes are
        # still read back to `since`.
        search_from = since if resume is None else resume
        jql = core.search_jql(core.filter_jql(jqls), search_from, now_s)
        stored = issues_read = 0
        cut = False
        done_until = search_from
        async for issue in self._search(client, jql):
            issue_id, key = issue.get("id"), issue.get("key")
            if not isinstance(issue_id, str | int) or not isinstance(key, str):
                continue
            if issues_read >= self._max_changes or stored >= self._max_changes:
                cut = True
                break
            issues_read += 1
            changes = core.changes_since(await self._changelog(client, key), since)
            if changes and (
                stats.newest_change_s is None or changes[-1][0] > stats.newest_change_s
            ):
                stats.newest_change_s = changes[-1][0]
            seen = await self._received(tenant, key, since) if changes else set()
            for created, history in changes:
                if (str(issue_id), str(history["id"])) in seen:
                    continue
                if stored >= self._max_changes:
                    cut = True
                    break
                if await self._store_change(tenant, issue, history, created):
                    stored += 1
            if cut:
                break
            done_until = max(done_until, _updated(issue, done_until))
        if cut:
            await self._finish(tenant, covered, done_until, stats, now_s, stored)
        else:
            await self._finish(tenant, now_s, None, stats, now_s, stored)
        if stored:
            logs.info(log, "catch-up stored changes", count=stored, tenant=tenant, cut=cut)
        return stored

    async def _finish(
        self,
        tenant: str,
        covered: float,
        resume: float | None,
        stats: CatchUpStats,
        now_s: float,
        stored: int,
    ) -> None:
        cursor = json.dumps({"covered_s": covered, "resume_s": resume})
        await kv_set(self._access.engine, cursor_key(tenant), cursor)
        stats.caught_up_total += stored
        stats.last_tick_s = now_s
        stats.covered_until_s = covered
        await kv_set(self._access.engine, STATS_KEY, json.dumps(stats.__dict__))

    async def _search(self, client: JiraClient, jql: str) -> Any:
        token: str | None = None
        for _ in range(MAX_SEARCH_PAGES):
            query = [("jql", jql), ("maxResults", str(PAGE_SIZE)), ("fields", "*navigable")]
            if token:
                query.append(("nextPageToken", token))
            page = (await client.send(PlannedRequest("GET", core.SEARCH_PATH, tuple(query)))).json
            found = page.get("issues") if isinstance(page, dict) else None
            if not isinstance(found, list):
                raise ActionError("Jira's search answer has no issues")
            for issue in found:
                if isinstance(issue, dict):
                    yield issue
            token = page.get("nextPageToken")
            if not token or page.get("isLast") or not found:
                return

    async def _changelog(self, client: JiraClient, key: str) -> list[Any]:
        path = f"/rest/api/3/issue/{key}/changelog"
        histories: list[Any] = []
        for _ in range(MAX_CHANGELOG_PAGES):
            query = (("startAt", str(len(histories))), ("maxResults", str(PAGE_SIZE)))
            page = (await client.send(PlannedRequest("GET", path, query))).json
            values = page.get("values") if isinstance(page, dict) else None
            if not isinstance(values, list):
                raise ActionError(f"Jira's changelog of {key} has no values")
            histories.extend(values)
            if page.get("isLast", True) or not values:
                break
        return histories

    async def _received(self, tenant: str, key: str, since: float) -> set[tuple[str, str]]:
        """The changes of `key` that stored events (deliveries or catch-ups) reported."""
        after = datetime.fromtimestamp(since, UTC) - timedelta(seconds=self._margin_s)
        async with self._access.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(events.c.body).where(
                        events.c.tenant == tenant,
                        events.c.issue_key == key,
                        events.c.webhook_event == "jira:issue_updated",
                        events.c.received_at >= after,
                    )
                )
            ).scalars()
            payloads = []
            for body in rows:
                try:
                    payloads.append(orjson.loads(body))
                except orjson.JSONDecodeError:
                    continue
        return core.changelog_ids(p for p in payloads if isinstance(p, dict))

    async def _store_change(
        self, tenant: str, issue: dict[str, Any], history: Mapping[str, Any], created: float
    ) -> bool:
        payload = core.synthesized_payload(issue, history, created)
        delivery = Delivery(
            delivery_id=core.delivery_id(str(issue["id"]), str(history["id"])),
            retry_count=0,
            webhook_event="jira:issue_updated",
            issue_key=str(issue["key"]),
            body=orjson.dumps(payload),
        )
        result = await self._store.add(tenant, delivery, source=core.SOURCE)
        return result.created


def _updated(issue: dict[str, Any], default: float) -> float:
    fields = issue.get("fields")
    value = core.jira_time(fields.get("updated")) if isinstance(fields, dict) else None
    return default if value is None else value
