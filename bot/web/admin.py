"""The admin API (`/api/...`) and the status page routes, behind the admin token.

Without DEPLOYBOT_ADMIN_TOKEN none of these routes exist (404). With it, a request is
let in by `Authorization: Bearer <token>` or by the status page's session cookie; a
cookie-authenticated POST must also carry the CSRF token, and is answered with a
redirect back to the page instead of JSON.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from bot.db.models import EVENT_OUTCOMES, EVENT_STATUSES
from bot.db.outcomes import set_outcomes
from bot.db.queries import EventFilter, get_event, retry_action_run, search_events
from bot.errors import RetryRefused
from bot.pipeline.replay import Selection, reset_events, select_events
from bot.web import status
from bot.web.errors import Handler, add_routes, read_form
from bot.web.keys import CLOCK, ENGINE, EXECUTOR, PROCESSOR, RULES, SETTINGS
from bot.web.sessions import SESSIONS, Sessions

VIA = web.RequestKey("admin_via", str)  # "bearer" or "cookie"
BACK = web.RequestKey("admin_back", str)  # the page a form came from (cookie only)
PAGE_DEFAULT, PAGE_MAX = 50, 500
ID_MAX = 2**63 - 1  # BIGINT

REPLAY_NOTE = (
    "The event is back in `received`: the processor evaluates it again with the rules in "
    "force. Action runs are keyed by event, rule and step (their idempotency key), so a "
    "step that already has a run is not planned twice and a succeeded run is not repeated. "
    "The event's dead runs, and the steps skipped behind them, are queued again "
    "(`runs_reset`); steps of rules that newly match get new runs."
)


def _error(exc: type[web.HTTPError], message: str) -> web.HTTPError:
    return exc(text=json.dumps({"error": message}), content_type="application/json")


def credential(request: web.Request, token: str) -> str | None:
    """Say how the request proved it holds the admin token: bearer, cookie, or None."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and status.matches(given.strip(), token):
        return "bearer"
    if request.app[SESSIONS].valid(request.cookies.get(status.COOKIE), request.app[CLOCK]()):
        return "cookie"
    return None


def guarded(handler: Handler, token: str) -> Handler:
    """Let a request through to `handler` only with the admin token (and CSRF on forms)."""

    async def check(request: web.Request) -> web.StreamResponse:
        via = credential(request, token)
        if via is None:
            if request.path.startswith("/api/"):
                return web.json_response(
                    {"error": "admin token required"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="deploybot"'},
                )
            # The first visit lands here: an invitation, not an error.
            return status.html(
                "login", status=401, tone="muted", message="Log in with the admin token."
            )
        if via == "cookie" and request.method == "POST":
            # The cookie is sent by the browser on its own: prove the form is ours.
            given = (await read_form(request)).get(status.CSRF_FIELD)
            if not status.matches(
                given if isinstance(given, str) else None, status.csrf_token(token)
            ):
                return web.json_response({"error": "missing or wrong CSRF token"}, status=403)
            request[BACK] = status.safe_back((await read_form(request)).get("next"))
        request[VIA] = via
        return await handler(request)

    return check


def _answer(
    request: web.Request, body: dict[str, Any], flash: str, **numbers: int
) -> web.StreamResponse:
    """JSON for API clients; for the page's forms, a redirect back to the page they came
    from with a banner saying what happened (`flash`)."""
    if request[VIA] == "cookie":
        return status.see_other(status.flash_location(request[BACK], flash, **numbers))
    return web.json_response(body)


def _time(raw: str | None, name: str) -> datetime | None:
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise _error(web.HTTPBadRequest, f"{name} must be an ISO 8601 time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # naive times are UTC


def _int(raw: str | None, name: str, default: int, high: int) -> int:
    if raw is None:
        return default
    # ASCII digits only ("²".isdigit()), and short: int() of 5,000 digits raises
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not 0 <= int(raw) <= high:
        raise _error(web.HTTPBadRequest, f"{name} must be a whole number from 0 to {high}")
    return int(raw)


def _choice(raw: str | None, name: str, allowed: tuple[str, ...]) -> str | None:
    if raw is not None and raw not in allowed:
        raise _error(web.HTTPBadRequest, f"{name} must be one of {', '.join(allowed)}")
    return raw


def _id(request: web.Request) -> int:
    """The path's id: ASCII digits (the route says so); one past 64 bits names nothing."""
    raw = request.match_info["id"]
    if len(raw) > 19 or int(raw) > ID_MAX:
        raise _error(web.HTTPNotFound, f"no such id {raw[:20]}")
    return int(raw)


async def events_list(request: web.Request) -> web.StreamResponse:
    """GET /api/events: filtered, newest first, paged by `cursor` or `offset`."""
    q = request.query
    if "cursor" in q and "offset" in q:
        raise _error(web.HTTPBadRequest, "give cursor or offset, not both")
    where = EventFilter(
        status=_choice(q.get("status"), "status", EVENT_STATUSES),
        outcome=_choice(q.get("outcome"), "outcome", EVENT_OUTCOMES),
        webhook_event=q.get("webhook_event"),
        issue_key=q.get("issue_key"),
        since=_time(q.get("since"), "since"),
        until=_time(q.get("until"), "until"),
        rule=q.get("rule"),
    )
    limit = max(_int(q.get("limit"), "limit", PAGE_DEFAULT, PAGE_MAX), 1)
    cursor = _int(q.get("cursor"), "cursor", 0, 2**63 - 1) if "cursor" in q else None
    offset = _int(q.get("offset"), "offset", 0, 2**31 - 1)
    page = await search_events(
        request.app[ENGINE], where, limit=limit, before_id=cursor, offset=offset
    )
    # The cursor is the last id shown: the next page has the older events.
    next_cursor = str(page[-1]["id"]) if len(page) == limit else None
    return web.json_response({"events": page, "next_cursor": next_cursor})


async def event_show(request: web.Request) -> web.StreamResponse:
    """GET /api/events/{id}: the event with its rule matches, action runs and attempts."""
    shown = await get_event(request.app[ENGINE], _id(request))
    if shown is None:
        raise _error(web.HTTPNotFound, f"no event {_id(request)}")
    return web.json_response(shown)


async def rules_show(request: web.Request) -> web.StreamResponse:
    """GET /api/rules: the rule set in force and the errors of the last reload."""
    watcher = request.app[RULES]
    current = watcher.current
    return web.json_response(
        {
            "version": current.version,
            "loaded": watcher.loaded,
            "errors": watcher.errors,
            "rules": [
                {
                    "name": rule.name,
                    "source": rule.source,
                    "events": list(rule.events),
                    "enabled": rule.enabled,
                    "description": rule.description,
                    "jql": rule.jql,
                    "actions": [step.action for step in rule.steps],
                }
                for rule in current.rules
            ],
        }
    )


async def webhooks_list(request: web.Request) -> web.StreamResponse:
    """GET /api/webhooks: stored registrations with their expiry and seconds to it."""
    rows = await status.webhook_rows(request)
    return web.json_response({"webhooks": rows})


async def event_replay(request: web.Request) -> web.StreamResponse:
    """POST /api/events/{id}/replay: evaluate the event again (the CLI's `events replay`)."""
    event_id, engine = _id(request), request.app[ENGINE]
    found = await select_events(engine, Selection(ids=[event_id]))
    if not found:
        raise _error(web.HTTPNotFound, f"no event {event_id}")
    runs_reset, replayed = await reset_events(engine, [event_id])
    if not replayed:
        if request[VIA] == "cookie":
            return _answer(request, {}, "busy", event=event_id)
        raise _error(web.HTTPConflict, f"event {event_id} is being processed now; try later")
    request.app[PROCESSOR].wakeup.set()
    request.app[EXECUTOR].wakeup.set()
    body = {"event_id": event_id, "previous_status": found[0][1], "status": "received"}
    body |= {"runs_reset": runs_reset, "note": REPLAY_NOTE}
    return _answer(request, body, "replayed", event=event_id, n=runs_reset)


async def run_retry(request: web.Request) -> web.StreamResponse:
    """POST /api/action-runs/{id}/retry: queue a dead or skipped run (and later skipped steps)."""
    run_id = _id(request)
    try:
        outcome = await retry_action_run(request.app[ENGINE], run_id, status.now_utc(request))
    except RetryRefused as exc:
        if request[VIA] == "cookie":
            instead = {} if exc.retry_instead is None else {"instead": exc.retry_instead}
            return _answer(request, {}, "refused", run=run_id, **instead)
        refusal = {"error": str(exc), "retry_instead": exc.retry_instead}
        raise web.HTTPConflict(text=json.dumps(refusal), content_type="application/json") from None
    if outcome is None:
        raise _error(web.HTTPNotFound, f"no action run {run_id}")
    previous, queued = outcome
    await set_outcomes(request.app[ENGINE], queued, status.now_utc(request))
    request.app[EXECUTOR].wakeup.set()
    body = {"action_run_id": run_id, "previous_status": previous, "queued": queued}
    return _answer(request, {**body, "status": "pending"}, "retried", run=run_id, n=len(queued))


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/api/events", events_list),
    ("GET", r"/api/events/{id:[0-9]+}", event_show),
    ("POST", r"/api/events/{id:[0-9]+}/replay", event_replay),
    ("POST", r"/api/action-runs/{id:[0-9]+}/retry", run_retry),
    ("GET", "/api/rules", rules_show),
    ("GET", "/api/webhooks", webhooks_list),
    ("GET", "/", status.page),
    ("GET", "/events", status.events_page),
    ("GET", r"/events/{id:[0-9]+}", status.event_page),
    ("GET", "/runs", status.runs_page),
    ("POST", "/logout", status.logout),
)
OPEN_ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/login", status.login_form),
    ("POST", "/login", status.login),
)


def setup(app: web.Application) -> None:
    """Add the admin API and status page routes when an admin token is configured."""
    token = app[SETTINGS].admin_token
    if not token:
        return
    app[SESSIONS] = Sessions(token)
    add_routes(app, [(method, path, guarded(handler, token)) for method, path, handler in ROUTES])
    add_routes(app, OPEN_ROUTES)
