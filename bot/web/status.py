"""The status page: a server-rendered HTML overview for operators, and its login form.

A browser cannot send a bearer header, so `POST /login` trades the admin token for an
HttpOnly, SameSite=Strict cookie holding a value derived from it (never the token itself).
Forms that change something carry a CSRF token, also derived from the admin token.
Every value is escaped by Jinja2's autoescape: issue keys and errors come from Jira.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from bot.core.masking import mask_rendered
from bot.db.models import EVENT_OUTCOMES
from bot.db.queries import (
    EventFilter,
    get_event,
    list_action_runs,
    run_summaries,
    search_events,
    status_counts,
)
from bot.db.registrations import Registrations
from bot.errors import TemplateRenderError
from bot.jira_app.catch_up import read_stats
from bot.rules.model import Step
from bot.rules.templates import build_context, render_params
from bot.rules.workflow import IF_SKIPPED, ON_FAILURE_BASE
from bot.web.errors import read_form
from bot.web.keys import CLOCK, ENGINE, RULES, SETTINGS
from bot.web.sessions import SESSION_TTL_S, SESSIONS
from bot.web.templates import STYLE, TEMPLATES

COOKIE = "token"
CSRF_FIELD = "csrf"
RECENT_EVENTS = 25
DEAD_RUNS_SHOWN = 10  # on the overview; /runs shows up to RUNS_SHOWN of each
RUNS_SHOWN = 200
EVENTS_PAGE = 50
ANSWER_SHOWN = 4000  # characters of an action's answer on the event page
# Where a form may send the browser back to (never an address taken as given).
_BACK = re.compile(r"/(?:events/[0-9]{1,19}|events|runs)?")
# The page is static HTML with inline styles: forbid everything else.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}

_ENV = jinja2.Environment(
    loader=jinja2.DictLoader(TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
# ISO times to the second, for reading: 2026-05-01T10:00:00.123+00:00 -> 2026-05-01 10:00:00
_ENV.filters["when"] = lambda iso: str(iso)[:19].replace("T", " ")
_ENV.filters["epoch"] = lambda s: (
    "never" if s is None else datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
)
# Steps of `on_failure` are stored from ON_FAILURE_BASE on: say which list they are in.
_ENV.filters["step_no"] = lambda index: (
    f"on_failure {index - ON_FAILURE_BASE + 1}" if index >= ON_FAILURE_BASE else str(index + 1)
)
_ENV.globals["tone"] = lambda state: {
    "succeeded": "ok",
    "failed": "err",
    "dead": "err",
    "waiting": "warn",
    "retrying": "warn",
}.get(state or "", "muted")


def derived(admin_token: str, purpose: str) -> str:
    """Return HMAC-SHA256(admin token, purpose) in hex: a cookie or CSRF value."""
    return hmac.new(
        admin_token.encode(), f"deploybot:{purpose}".encode(), hashlib.sha256
    ).hexdigest()


def matches(given: str | None, expected: str) -> bool:
    """Compare a presented secret with the expected one in constant time."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def csrf_token(admin_token: str) -> str:
    return derived(admin_token, "csrf")


def until(seconds: float | None) -> str:
    """Say how long until an expiry, e.g. `2d 3h`, or how long ago it passed."""
    if seconds is None:
        return "never expires"
    left = abs(int(seconds))
    parts = [(left // 86400, "d"), (left % 86400 // 3600, "h"), (left % 3600 // 60, "m")]
    text = " ".join([f"{n}{unit}" for n, unit in parts if n][:2]) or f"{left}s"
    return text if seconds >= 0 else f"expired {text} ago"


def html(template: str, status: int = 200, **values: Any) -> web.Response:
    """Render a template with the page's security headers."""
    values = {"title": "", "flash": None, "issue": None, **values}
    body = _ENV.get_template(template).render(style=STYLE, **values)
    return web.Response(text=body, status=status, content_type="text/html", headers=HEADERS)


def see_other(location: str) -> web.Response:
    """Redirect a form POST to a page (303: the browser follows with a GET)."""
    return web.Response(status=303, headers={"Location": location, **HEADERS})


def now_utc(request: web.Request) -> datetime:
    return datetime.fromtimestamp(request.app[CLOCK](), UTC)


async def webhook_rows(request: web.Request) -> list[dict[str, Any]]:
    """Return the stored registrations with seconds (and words) to expiry."""
    now = now_utc(request)
    rows = []
    for reg in await Registrations(request.app[ENGINE]).list():
        left = None if reg.expires_at is None else (reg.expires_at - now).total_seconds()
        rows.append({**reg.to_json(), "expires_in_s": left, "expires_in": until(left)})
    return rows


# What a form's redirect may say: a fixed sentence per code, filled with numbers only
# (a link cannot make the page say anything else).
_FLASH: dict[str, tuple[str, str]] = {
    "retried": ("ok", "Action run {run} is queued again ({n} run(s) queued)."),
    "refused": ("err", "Action run {run} cannot be retried: {why}"),
    "replayed": ("ok", "Event {event} is queued to be evaluated again ({n} run(s) re-queued)."),
    "busy": ("err", "Event {event} is being processed right now: replay it in a moment."),
}


def flash_location(back: str, code: str, **numbers: int) -> str:
    """The address to send a form back to, with its banner's code and numbers."""
    return f"{back}?{urlencode({'flash': code, **numbers})}"


def safe_back(raw: object, default: str = "/") -> str:
    """The page a form came from, if it is one of ours; else `default`."""
    return raw if isinstance(raw, str) and _BACK.fullmatch(raw) else default


def _number(query: Mapping[str, str], name: str) -> int | None:
    raw = query.get(name, "")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 19 else None


def flash(query: Mapping[str, str]) -> dict[str, str] | None:
    """The banner named by the query string (see _FLASH), or None."""
    code = query.get("flash", "")
    if code not in _FLASH:
        return None
    tone, text = _FLASH[code]
    run, event, n, instead = (_number(query, k) for k in ("run", "event", "n", "instead"))
    why = (
        f"a step before it has not succeeded: retry action run {instead} first."
        if instead is not None
        else "only dead runs, and the skipped runs behind them, can be retried."
    )
    return {"tone": tone, "text": text.format(run=run, event=event, n=n or 0, why=why)}


def _common(request: web.Request) -> dict[str, Any]:
    token = request.app[SETTINGS].admin_token
    assert token is not None  # the routes exist only with a token
    return {
        "csrf": csrf_token(token),
        "flash": flash(request.query),
        "back": request.path,
    }


async def page(request: web.Request) -> web.Response:
    """GET /: counts, dead runs with Retry, recent events, registrations, rule errors."""
    engine, rules = request.app[ENGINE], request.app[RULES]
    outcome = request.query.get("outcome")
    outcome = outcome if outcome in EVENT_OUTCOMES else None  # anything else: all events
    found = await search_events(engine, EventFilter(outcome=outcome), limit=RECENT_EVENTS)
    dead = await list_action_runs(engine, status="dead", limit=DEAD_RUNS_SHOWN + 1)
    return html(
        "page",
        **_common(request),
        outcome=outcome,
        outcomes=EVENT_OUTCOMES,
        now=now_utc(request).strftime("%Y-%m-%d %H:%M:%S UTC"),
        rules_version=rules.current.version,
        rule_count=len(rules.current.rules),
        rule_errors=rules.errors,
        counts=await status_counts(engine),
        dead_runs=dead[:DEAD_RUNS_SHOWN],
        dead_more=len(dead) > DEAD_RUNS_SHOWN,
        events=found,
        summaries=await run_summaries(engine, [e["id"] for e in found]),
        filtered=outcome is not None,
        webhooks=await webhook_rows(request),
        catch_up=await read_stats(engine) if request.app[SETTINGS].catch_up else None,
    )


def _form_time(raw: str, name: str, problems: list[str]) -> datetime | None:
    """A `datetime-local` field (UTC), or None; a wrong value is reported, not fatal."""
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw[:40])
    except ValueError:
        problems.append(f"{name}: {raw[:40]!r} is not a time (2026-05-01T10:00)")
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def events_page(request: web.Request) -> web.Response:
    """GET /events: events filtered by outcome, matched rule, issue key and time, paged by
    the last id shown (`before`). An issue key alone answers "what happened to OPS-123?"."""
    q, engine = request.query, request.app[ENGINE]
    problems: list[str] = []
    outcome = q.get("outcome") if q.get("outcome") in EVENT_OUTCOMES else None
    rule_names = sorted(rule.name for rule in request.app[RULES].current.rules)
    issue = q.get("issue", "").strip()[:255].upper() or None  # Jira keys are upper case
    where = EventFilter(
        outcome=outcome,
        rule=q.get("rule", "")[:255] or None,
        issue_key=issue,
        since=_form_time(q.get("since", ""), "received from", problems),
        until=_form_time(q.get("until", ""), "until", problems),
    )
    before = _number(q, "before")
    found = await search_events(engine, where, limit=EVENTS_PAGE + 1, before_id=before)
    shown = found[:EVENTS_PAGE]
    kept = {k: v for k, v in q.items() if k in ("outcome", "rule", "issue", "since", "until") and v}
    older = (
        f"/events?{urlencode({**kept, 'before': shown[-1]['id']})}"
        if len(found) > EVENTS_PAGE
        else None
    )
    return html(
        "events",
        **_common(request),
        title=f"events for {issue}" if issue else "events",
        f=where,
        issue=issue,
        since_text=q.get("since", "")[:40],
        until_text=q.get("until", "")[:40],
        outcomes=EVENT_OUTCOMES,
        rule_names=[
            *rule_names,
            *([where.rule] if where.rule and where.rule not in rule_names else []),
        ],
        problems=problems,
        events=shown,
        summaries=await run_summaries(engine, [e["id"] for e in shown]),
        filtered=bool(kept),
        before=before,
        older=older,
        first_link=f"/events?{urlencode(kept)}",
    )


async def runs_page(request: web.Request) -> web.Response:
    """GET /runs: dead runs (with Retry) and waiting runs (with what they wait for)."""
    engine = request.app[ENGINE]
    return html(
        "runs",
        **_common(request),
        title="runs",
        limit=RUNS_SHOWN,
        dead_runs=await list_action_runs(engine, status="dead", limit=RUNS_SHOWN),
        waiting_runs=await list_action_runs(engine, status="waiting", limit=RUNS_SHOWN),
    )


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)


def _retry_offer(run: Mapping[str, Any], runs: list[dict[str, Any]]) -> str | int | None:
    """ "button" when retrying this run is allowed, the id of the run to retry instead
    when it waits behind one, else None (bot.db.queries.retry_action_run decides the same)."""
    if run["status"] == "dead":
        return "button"
    if run["status"] != "skipped" or (run["last_error"] or "").startswith(IF_SKIPPED):
        return None
    if run["step"] >= ON_FAILURE_BASE:  # a clean-up not needed: its dead step, if any
        dead = [
            r
            for r in runs
            if r["rule"] == run["rule"] and r["step"] < ON_FAILURE_BASE and r["status"] == "dead"
        ]
        return int(dead[0]["id"]) if dead else None
    for earlier in runs:
        if (
            earlier["rule"] == run["rule"]
            and earlier["step"] < run["step"]
            and earlier["status"] != "succeeded"
            and not (
                earlier["status"] == "skipped"
                and (earlier["last_error"] or "").startswith(IF_SKIPPED)
            )
        ):
            return int(earlier["id"])
    return "button"


def _request_shown(
    run: Mapping[str, Any], payload: Any, event: Mapping[str, Any], runs: list[dict[str, Any]]
) -> tuple[str, str | None]:
    """The step's request as the executor renders it (secrets masked), or its `with:` and
    why it cannot be rendered yet (a later step reads results not there yet)."""
    params = run["params"] or {}
    steps = {
        r["step_id"]: r["result"]
        for r in runs
        if r["rule"] == run["rule"]
        and r["step"] < min(run["step"], ON_FAILURE_BASE)
        and r["status"] == "succeeded"
        and r["step_id"] is not None
    }
    if not isinstance(payload, dict):
        return _pretty(params), "the payload is not a JSON object"
    context = build_context(
        payload, event_id=str(event["id"]), received_at=event["received_at"], steps=steps
    )
    if run["failure"] is not None:
        context["failure"] = run["failure"]
    # No file parameters resolved: the page shows the path as the rule gives it.
    step = Step(id=run["step_id"], action=run["action"], with_=params, index=run["step"],
                base_dir=Path("."))  # fmt: skip
    try:
        rendered = render_params(step, context)
    except TemplateRenderError as exc:
        return _pretty(params), f"shown as written in the rule: not rendered ({exc})"
    return _pretty(mask_rendered(run["action"], rendered)), None


def _duration(attempt: Mapping[str, Any]) -> str:
    try:
        started = datetime.fromisoformat(attempt["started_at"])
        finished = datetime.fromisoformat(attempt["finished_at"])
    except (TypeError, ValueError):
        return ""
    seconds = (finished - started).total_seconds()
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def event_view(shown: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The payload pretty-printed, and the event's runs grouped by rule, ready to show."""
    try:
        payload = json.loads(shown["payload"])
        pretty = _pretty(payload)
    except ValueError:
        payload, pretty = None, shown["payload"]
    runs = shown["action_runs"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        request, request_error = _request_shown(run, payload, shown, runs)
        answer = "" if run["result"] is None else _pretty(run["result"])
        step = run["step"]
        label = (
            f"on_failure step {step - ON_FAILURE_BASE + 1}"
            if step >= ON_FAILURE_BASE
            else f"step {step + 1}"
        ) + (f" ({run['step_id']})" if run["step_id"] else "")
        groups.setdefault(run["rule"], []).append(
            {
                **run,
                "label": label,
                "by_if": (run["last_error"] or "").startswith(IF_SKIPPED),
                "retry": _retry_offer(run, runs),
                "request": request,
                "request_error": request_error,
                "answer": answer[:ANSWER_SHOWN],
                "answer_cut": len(answer) > ANSWER_SHOWN,
                "failure": None if run["failure"] is None else _pretty(run["failure"]),
                "attempt_log": [{**a, "duration": _duration(a)} for a in run["attempt_log"]],
            }
        )
    return pretty, [{"rule": rule, "runs": rows} for rule, rows in groups.items()]


async def event_page(request: web.Request) -> web.Response:
    """GET /events/{id}: the delivery, every rule's decision, every step and attempt."""
    raw = request.match_info["id"]
    shown = await get_event(request.app[ENGINE], int(raw)) if len(raw) <= 18 else None
    if shown is None:
        raise web.HTTPNotFound(text=f"no event {raw[:20]}")
    payload, groups = event_view(shown)
    return html(
        "event",
        **_common(request),
        title=f"event {shown['id']}",
        e=shown,
        payload=payload,
        groups=groups,
    )


async def login_form(_request: web.Request) -> web.Response:
    """GET /login: the token form."""
    return html("login", message="", tone="muted")


async def login(request: web.Request) -> web.StreamResponse:
    """POST /login: set the session cookie when the token is right (failures throttled)."""
    settings, sessions = request.app[SETTINGS], request.app[SESSIONS]
    token = settings.admin_token
    assert token is not None
    now, address = request.app[CLOCK](), request.remote or ""
    wait_s = sessions.login_wait_s(address, now)
    if wait_s > 0:
        response = html(
            "login", status=429, tone="err", message="Too many failed logins: wait a little."
        )
        response.headers["Retry-After"] = str(max(1, round(wait_s)))
        return response
    given = (await read_form(request)).get("token")
    if not matches(given if isinstance(given, str) else None, token):
        sessions.login_failed(address, now)
        return html("login", status=401, tone="err", message="That token is not right.")
    response = see_other("/")
    response.set_cookie(
        COOKIE,
        sessions.issue(now),
        max_age=SESSION_TTL_S,
        httponly=True,
        samesite="Strict",
        secure=settings.secure_cookies or request.secure,
        path="/",
    )
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """POST /logout: revoke the session cookie, and tell the browser to drop it."""
    request.app[SESSIONS].revoke(request.cookies.get(COOKIE), request.app[CLOCK]())
    response = see_other("/login")
    response.del_cookie(
        COOKIE,
        path="/",
        secure=request.app[SETTINGS].secure_cookies or request.secure,
        httponly=True,
        samesite="Strict",
    )
    return response
