"""The aiohttp application factory: routes, error mapping, and resource lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from sqlalchemy import text

from bot.core.backoff import RetryPolicy
from bot.db.engine import create_engine, upgrade
from bot.db.store import EventStore, database_error
from bot.db.tenants import Tenants
from bot.db.writers import writer_for
from bot.jira_app.access import DELIVERY_PATH, JiraAccess, JiraActionClients
from bot.jira_app.scheduler import LEADER_CHECK_MAX_S, LeaderLock, Scheduler, scheduled_jobs
from bot.pipeline.executor import ActionExecutor, RetryBudget
from bot.pipeline.liveness import Liveness
from bot.pipeline.processor import EventProcessor
from bot.rules.watcher import RuleWatcher
from bot.services.actions import ServiceClient
from bot.services.genesys import GenesysClient
from bot.services.http import client_session
from bot.services.outbound import OutboundClient
from bot.services.runner import ActionRunner
from bot.services.ubiops import UbiOpsClient
from bot.settings import Settings
from bot.web import admin, forge, jira, metrics
from bot.web.errors import add_routes, json_errors
from bot.web.install_keys import InstallKeys
from bot.web.keys import (
    CLOCK,
    ENGINE,
    EXECUTOR,
    HTTP,
    INSTALL_KEYS,
    PROCESSOR,
    RULES,
    SETTINGS,
    STORE,
    TENANTS,
)

log = logging.getLogger(__name__)


RULES_POLL_S = 2.0
LINGER_S = 2.0


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the database answers and a good rule set is loaded."""
    rules = request.app[RULES]
    body: dict[str, object] = {"rules_version": rules.current.version, "rule_errors": rules.errors}
    try:
        async with request.app[ENGINE].connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means not ready; say which
        return web.json_response(
            {**body, "status": "unavailable", "database": database_error(exc)}, status=503
        )
    trouble = request.app[STORE].write_trouble()
    if trouble is not None:  # it answers, but deliveries cannot be stored (e.g. read-only)
        return web.json_response(
            {**body, "status": "unavailable", "database": f"writes failing: {trouble}"},
            status=503,
        )
    if not rules.loaded:
        return web.json_response(
            {**body, "status": "unavailable", "rules": "not loaded"}, status=503
        )
    return web.json_response({**body, "status": "ready"})


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    engine = create_engine(settings.database_url)
    await upgrade(engine)
    app[ENGINE] = engine
    app[TENANTS] = Tenants(engine)
    store = EventStore(engine)
    await store.start()
    app[STORE] = store
    yield
    await store.close()
    await writer_for(engine).close()
    await engine.dispose()


def http_policy(settings: Settings) -> RetryPolicy:
    """The resilience policy of every call to UbiOps, Genesys and Jira."""
    return RetryPolicy(max_attempts=settings.http_attempts, timeout_s=settings.http_timeout_s)


def service_clients(
    settings: Settings, session: aiohttp.ClientSession
) -> dict[str, ServiceClient | None]:
    """Build the action clients whose credentials are configured (None: disabled)."""
    policy = http_policy(settings)
    ubiops = (
        UbiOpsClient(
            session,
            settings.ubiops_api_url,
            settings.ubiops_api_token,
            policy=policy,
            per_minute=settings.ubiops_per_minute,
        )
        if settings.ubiops_api_token
        else None
    )
    # Always built: the guest operations need no credentials; the others refuse without.
    genesys = GenesysClient(
        session,
        settings.genesys_api_url,
        settings.genesys_login_url,
        settings.genesys_client_id,
        settings.genesys_client_secret,
        policy=policy,
        per_minute=settings.genesys_per_minute,
    )
    outbound = (
        OutboundClient(session, settings.http_allowed_hosts, policy=policy)
        if settings.http_allowed_hosts
        else None
    )
    return {"ubiops": ubiops, "genesys": genesys, "http": outbound}


def jira_action_clients(app: web.Application) -> JiraActionClients:
    """`jira.*` actions call the Jira of their event's tenant (Connect installations)."""
    access = JiraAccess(
        app[SETTINGS], app[ENGINE], app[HTTP], clock=app[CLOCK], policy=http_policy(app[SETTINGS])
    )
    return JiraActionClients(access, app.get(forge.FORGE_TOKENS))


async def _workers(app: web.Application) -> AsyncIterator[None]:
    """Rule reloads, event processing and action execution, as background tasks."""
    settings = app[SETTINGS]
    watcher = await asyncio.to_thread(
        functools.partial(
            RuleWatcher, settings.rules_dir, epic_label_field=settings.jira_epic_label_field
        )
    )
    liveness = Liveness(app[ENGINE], heartbeat_s=settings.heartbeat_s)
    executor = ActionExecutor(
        app[ENGINE],
        ActionRunner(
            service_clients(settings, app[HTTP]),
            files_dir=settings.rules_dir,
            per_tenant={"jira": jira_action_clients(app)},
        ),
        rules_dir=settings.rules_dir,
        lease_s=settings.action_lease_s,
        budget=RetryBudget(
            settings.retry_attempts, settings.retry_base_delay_s, settings.retry_max_delay_s
        ),
        concurrency=settings.workers,
        rules=lambda: watcher.current,
        owner=liveness.identity.actions_owner,
        ingest_busy=app[STORE].busy,
    )
    processor = EventProcessor(
        app[ENGINE],
        lambda: watcher.current,
        lease_s=settings.lease_s,
        on_planned=executor.wakeup.set,
        ingest_busy=app[STORE].busy,
        rules_ready=lambda: watcher.loaded,
        owner=liveness.identity.events_owner,
    )
    app[STORE].on_commit = processor.wakeup.set

    def reclaimed() -> None:
        processor.wakeup.set()
        executor.wakeup.set()

    liveness.on_reclaimed = reclaimed
    # Before the first claim: a crashed predecessor's claims are taken back at once.
    await liveness.beat(durable=True)
    app[RULES], app[PROCESSOR], app[EXECUTOR] = watcher, processor, executor
    tasks = [
        asyncio.create_task(watcher.run(RULES_POLL_S), name="rules-watcher"),
        asyncio.create_task(processor.run(), name="event-processor"),
        asyncio.create_task(executor.run(), name="action-executor"),
        asyncio.create_task(liveness.run(), name="heartbeat"),
    ]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for release in (processor.release, executor.release, liveness.stop):
        with contextlib.suppress(Exception):  # the database may be gone: leases expire anyway
            await release()


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    async with client_session(proxy=app[SETTINGS].proxy) as session:
        app[HTTP] = session
        yield


async def _install_keys(app: web.Application) -> AsyncIterator[None]:
    """The install-key cache, with its own small pool (not the shared session's)."""
    keys = InstallKeys(app[SETTINGS].jira_connect_keys_url)
    app[INSTALL_KEYS] = keys
    yield
    await keys.close()


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> web.Application:
    """Build the application; resources open and close with its cleanup contexts."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        handler_args={
            # Bodies are never inflated: json_errors refuses a Content-Encoding with 415.
            "auto_decompress": False,
            # aiohttp arms the keep-alive timer at connect, so it also bounds the wait for
            # a whole request head: a client trickling its headers is cut off.
            "keepalive_timeout": settings.client_timeout_s,
            # After an answer to an unread body (408, 413, 415), drain it only briefly.
            "lingering_time": min(LINGER_S, settings.client_timeout_s),
        },
    )
    app[SETTINGS] = settings
    app[CLOCK] = clock
    app[jira.REJECTIONS] = jira.Rejections()
    app.cleanup_ctx.extend([_http_session, _install_keys, _database, _workers])
    app.cleanup_ctx.append(scheduler_ctx)  # after the workers: it wakes their executor
    metrics.install(app)  # after the workers: it hooks into the executor they create
    # The delivery route's metrics see the status its errors were answered with.
    app.router.add_post(
        DELIVERY_PATH, app[metrics.METRICS].timed(json_errors(jira.receive_delivery))
    )
    add_routes(app, [("GET", "/healthz", healthz), ("GET", "/readyz", readyz)])
    if settings.jira_auth_mode == "connect":
        add_routes(
            app,
            [
                ("GET", "/atlassian-connect.json", jira.descriptor),
                ("POST", "/lifecycle/installed", jira.installed),
                ("POST", "/lifecycle/uninstalled", jira.uninstalled),
            ],
        )
    admin.setup(app)
    forge.setup(app)
    return app


async def scheduler_ctx(app: web.Application) -> AsyncIterator[None]:
    """Run the scheduler (when this replica leads) for the application's lifetime."""
    settings, watcher = app[SETTINGS], app[RULES]
    jobs = scheduled_jobs(
        settings,
        app[ENGINE],
        app[HTTP],
        app[STORE],
        lambda: watcher.current if watcher.loaded else None,
        app[EXECUTOR].wakeup,
        app[CLOCK],
    )
    scheduler = Scheduler(
        jobs,
        LeaderLock(app[ENGINE]),
        check_s=min(settings.scheduler_interval_s, LEADER_CHECK_MAX_S),
        clock=app[CLOCK],
    )
    task = asyncio.create_task(scheduler.run(), name="scheduler")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
