"""`deploybot webhooks sync|list`: the webhook jobs run once, from the command line."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.engine import create_engine, upgrade
from bot.db.registrations import (
    Registrations,
)
from bot.errors import ActionError, RuleError
from bot.jira_app.access import JiraAccess
from bot.jira_app.jobs import needs_from_rules, sync_webhooks
from bot.rules.loader import load_rules
from bot.rules.model import RuleSet
from bot.services import http
from bot.settings import Settings

log = logging.getLogger(__name__)


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
