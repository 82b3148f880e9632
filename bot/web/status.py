"""The status page: a server-rendered HTML overview for operators, and its login form.

A browser cannot send a bearer header, so `POST /login` trades the admin token for an
HttpOnly, SameSite=Strict cookie holding a value derived from it (never the token itself).
Forms that change something carry a CSRF token, also derived from the admin token.
Every value is escaped by Jinja2's autoescape: issue keys and errors come from Jira.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Any

import jinja2
from aiohttp import web

from bot.db.models import EVENT_OUTCOMES
from bot.db.queries import EventFilter, list_action_runs, search_events, status_counts
from bot.db.registrations import Registrations
from bot.jira_app.catch_up import read_stats
from bot.web.errors import read_form
from bot.web.keys import CLOCK, ENGINE, RULES, SETTINGS
from bot.web.sessions import SESSION_TTL_S, SESSIONS

COOKIE = "token"
CSRF_FIELD = "csrf"
RECENT_EVENTS = 25
DEAD_RUNS_SHOWN = 100
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

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.5rem 2rem; color: #1d2430; }
h1 { font-size: 1.5rem; margin: 0 0 .25rem; } h2 { font-size: 1.1rem; margin: 1.6rem 0 .5rem; }
table { border-collapse: collapse; margin-bottom: .5rem; }
th, td { text-align: left; padding: .3rem .7rem; border-bottom: 1px solid #dde2ea; }
th { background: #f2f4f8; font-weight: 600; } td.n { text-align: right; }
.muted { color: #6b7385; } .err { color: #a4161a; } .ok { color: #2b7a0b; }
.counts { display: flex; gap: 2.5rem; flex-wrap: wrap; }
button { padding: .25rem .8rem; cursor: pointer; }
code { font-size: .9em; }
td { white-space: nowrap; } td.err { white-space: normal; }
form.out { margin-top: 2rem; }
"""

_LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>deploybot{{ ' - ' + title if title }}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{{ style }}</style></head>
<body>{% block body %}{% endblock %}</body></html>
"""

_LOGIN = """{% extends "layout" %}{% block body %}
<h1>deploybot</h1>
{% if message %}<p class="err">{{ message }}</p>{% endif %}
<form method="post" action="/login">
  <label>Admin token <input type="password" name="token" autocomplete="current-password"
    autofocus required></label>
  <button type="submit">Log in</button>
</form>
{% endblock %}"""

_PAGE = """{% extends "layout" %}{% block body %}
<h1>deploybot</h1>
<p class="muted">{{ now }} &middot; rules version <code>{{ rules_version[:12] }}</code>
 ({{ rule_count }} rules)</p>

<div class="counts">
{% for title, counts in [("Events", counts.events), ("Action runs", counts.action_runs)] %}
<div><h2>{{ title }}</h2><table>
{% for status, n in counts.items() %}<tr><td>{{ status }}</td><td class="n">{{ n }}</td></tr>
{% endfor %}</table></div>
{% endfor %}
</div>

<h2>Rule load errors</h2>
{% if rule_errors %}<ul class="err">{% for e in rule_errors %}<li><code>{{ e }}</code></li>
{% endfor %}</ul>{% else %}<p class="ok">none</p>{% endif %}

<h2>Dead action runs</h2>
{% if dead_runs %}<table><tr><th>run</th><th>event</th><th>issue</th><th>rule</th>
<th>step</th><th>action</th><th>attempts</th><th>last error</th><th></th></tr>
{% for r in dead_runs %}<tr>
<td>{{ r.id }}</td><td><a href="/api/events/{{ r.event_id }}">{{ r.event_id }}</a></td>
<td>{{ r.issue_key or "" }}</td><td>{{ r.rule }}</td><td class="n">{{ r.step + 1 }}</td>
<td><code>{{ r.action }}</code></td><td class="n">{{ r.attempts }}</td>
<td class="err">{{ r.last_error or "" }}</td>
<td><form method="post" action="/api/action-runs/{{ r.id }}/retry">
<input type="hidden" name="csrf" value="{{ csrf }}">
<button type="submit" aria-label="Retry action run {{ r.id }}">Retry</button></form></td>
</tr>{% endfor %}</table>
{% else %}<p class="ok">none</p>{% endif %}

<h2>Recent events{% if outcome %} ({{ outcome }}){% endif %}</h2>
<p>outcome: <a href="/">all</a>{% for o in outcomes %}
 · <a href="/?outcome={{ o }}">{{ o }}</a>{% endfor %}</p>
{% if events %}<table><tr><th>id</th><th>received</th><th>event</th><th>issue</th>
<th>status</th><th>outcome</th><th>error</th></tr>
{% for e in events %}<tr><td><a href="/api/events/{{ e.id }}">{{ e.id }}</a></td>
<td>{{ e.received_at | when }}</td><td>{{ e.webhook_event }}</td><td>{{ e.issue_key or "" }}</td>
<td>{{ e.status }}</td><td>{{ e.outcome or "" }}</td><td class="err">{{ e.error or "" }}</td></tr>
{% endfor %}</table>{% else %}<p class="muted">no events
{%- if outcome %} with this outcome{% else %} yet{% endif %}</p>{% endif %}

<h2>Jira webhook registrations</h2>
{% if webhooks %}<table><tr><th>tenant</th><th>id</th><th>events</th><th>JQL</th>
<th>expires</th><th>time to expiry</th></tr>
{% for w in webhooks %}<tr><td>{{ w.tenant or "(app)" }}</td><td>{{ w.webhook_id }}</td>
<td>{{ w.events | join(", ") }}</td><td><code>{{ w.jql }}</code></td>
<td>{{ w.expires_at | when if w.expires_at else "never" }}</td>
<td class="{{ 'err' if w.expires_in_s is not none and w.expires_in_s < 86400 }}">
{{ w.expires_in }}</td></tr>
{% endfor %}</table>{% else %}<p class="muted">none registered</p>{% endif %}
{% if catch_up %}<p>Catch-up: {{ catch_up.caught_up_total }} change(s) stored that no delivery
brought; newest change seen {{ catch_up.newest_change_s | epoch }}; covered until
{{ catch_up.covered_until_s | epoch }}.</p>{% endif %}

<form class="out" method="post" action="/logout">
<input type="hidden" name="csrf" value="{{ csrf }}">
<button type="submit">Log out</button></form>
{% endblock %}"""

_ENV = jinja2.Environment(
    loader=jinja2.DictLoader({"layout": _LAYOUT, "login": _LOGIN, "page": _PAGE}),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
# ISO times to the second, for reading: 2026-05-01T10:00:00.123+00:00 -> 2026-05-01 10:00:00
_ENV.filters["when"] = lambda iso: str(iso)[:19].replace("T", " ")
_ENV.filters["epoch"] = lambda s: (
    "never" if s is None else datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
)


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
    body = _ENV.get_template(template).render(style=_STYLE, title="", **values)
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


async def page(request: web.Request) -> web.Response:
    """GET /: counts, dead runs with Retry, recent events, registrations, rule errors."""
    engine, rules = request.app[ENGINE], request.app[RULES]
    token = request.app[SETTINGS].admin_token
    assert token is not None  # the routes exist only with a token
    outcome = request.query.get("outcome")
    outcome = outcome if outcome in EVENT_OUTCOMES else None  # anything else: all events
    return html(
        "page",
        outcome=outcome,
        outcomes=EVENT_OUTCOMES,
        now=now_utc(request).strftime("%Y-%m-%d %H:%M:%S UTC"),
        rules_version=rules.current.version,
        rule_count=len(rules.current.rules),
        rule_errors=rules.errors,
        counts=await status_counts(engine),
        dead_runs=await list_action_runs(engine, status="dead", limit=DEAD_RUNS_SHOWN),
        events=await search_events(engine, EventFilter(outcome=outcome), limit=RECENT_EVENTS),
        webhooks=await webhook_rows(request),
        catch_up=await read_stats(engine) if request.app[SETTINGS].catch_up else None,
        csrf=csrf_token(token),
    )


async def login_form(_request: web.Request) -> web.Response:
    """GET /login: the token form."""
    return html("login", message="")


async def login(request: web.Request) -> web.StreamResponse:
    """POST /login: set the session cookie when the token is right (failures throttled)."""
    settings, sessions = request.app[SETTINGS], request.app[SESSIONS]
    token = settings.admin_token
    assert token is not None
    now, address = request.app[CLOCK](), request.remote or ""
    wait_s = sessions.login_wait_s(address, now)
    if wait_s > 0:
        response = html("login", status=429, message="Too many failed logins: wait a little.")
        response.headers["Retry-After"] = str(max(1, round(wait_s)))
        return response
    given = (await read_form(request)).get("token")
    if not matches(given if isinstance(given, str) else None, token):
        sessions.login_failed(address, now)
        return html("login", status=401, message="That token is not right.")
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
