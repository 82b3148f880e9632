"""The status page's HTML templates and style: static HTML, no script, readable on a phone
and in dark mode. Every value is escaped by Jinja2's autoescape (Jira's values are hostile).
"""

from __future__ import annotations

STYLE = """
:root { --fg: #1d2430; --muted: #6b7385; --line: #dde2ea; --head: #f2f4f8; --err: #a4161a;
  --ok: #2b7a0b; --warn: #8a5a00; --bg: #fff; --link: #1f5fbf; --box: #f7f8fa;
  color-scheme: light dark; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e3e7ee; --muted: #9aa3b5; --line: #333a46; --head: #232935; --err: #ff8a8a;
    --ok: #8fd37a; --warn: #f0c060; --bg: #14181f; --link: #8ab4ff; --box: #1b2029; } }
body { font: 15px/1.45 system-ui, sans-serif; margin: 1.2rem 2rem; color: var(--fg);
  background: var(--bg); }
a { color: var(--link); }
h1 { font-size: 1.5rem; margin: 0 0 .25rem; } h2 { font-size: 1.1rem; margin: 1.6rem 0 .5rem; }
h3 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
nav { display: flex; gap: 1rem; flex-wrap: wrap; align-items: center; margin-bottom: .8rem; }
nav form { margin-left: auto; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin-bottom: .5rem; }
th, td { text-align: left; padding: .3rem .7rem; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { background: var(--head); font-weight: 600; } td.n { text-align: right; }
.muted { color: var(--muted); } .err { color: var(--err); } .ok { color: var(--ok); }
.warn { color: var(--warn); }
.counts { display: flex; gap: 2.5rem; flex-wrap: wrap; }
.banner { padding: .6rem .9rem; border-radius: 4px; border: 1px solid var(--line);
  background: var(--box); margin: .6rem 0 1rem; }
.banner.ok { border-color: var(--ok); } .banner.err { border-color: var(--err); }
button { padding: .25rem .8rem; cursor: pointer; }
code, pre { font-size: .88em; } pre { background: var(--box); padding: .6rem; margin: .3rem 0;
  overflow-x: auto; max-height: 28rem; white-space: pre-wrap; word-break: break-word; }
td { white-space: nowrap; } td.err, td.wrap { white-space: normal; min-width: 12rem; }
form.out { margin-top: 2rem; } form.inline { display: inline; }
form.filters { margin-bottom: .8rem; display: flex; gap: .6rem; flex-wrap: wrap; align-items: end; }
form.filters label { display: flex; flex-direction: column; font-size: .85em; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; margin: 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; word-break: break-word; }
.step { border: 1px solid var(--line); border-radius: 4px; padding: .5rem .8rem;
  margin: .6rem 0; }
.step h3 { margin: 0 0 .3rem; }
details summary { cursor: pointer; margin: .3rem 0; }
@media (max-width: 640px) { body { margin: .8rem; } th, td { padding: .25rem .4rem; }
  nav form { margin-left: 0; } }
"""

LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>deploybot{{ ' - ' + title if title }}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{{ style }}</style></head>
<body>{% block body %}{% endblock %}</body></html>
"""

# The top of every page behind the login: where to go, the issue search, the banner.
NAV = """<nav><strong>deploybot</strong>
<a href="/">Overview</a><a href="/events">Events</a><a href="/runs">Dead and waiting runs</a>
<form method="get" action="/events" role="search">
<input type="search" name="issue" placeholder="Issue key, e.g. OPS-123" aria-label="Issue key"
 value="{{ issue or '' }}" size="18"> <button type="submit">Find</button></form></nav>
{% if flash %}<p class="banner {{ flash.tone }}" role="status">{{ flash.text }}</p>{% endif %}
"""

LOGIN = """{% extends "layout" %}{% block body %}
<h1>deploybot</h1>
{% if message %}<p class="{{ tone }}">{{ message }}</p>{% endif %}
<form method="post" action="/login">
  <label>Admin token <input type="password" name="token" autocomplete="current-password"
    autofocus required></label>
  <button type="submit">Log in</button>
</form>
{% endblock %}"""

# A form that changes something: CSRF token, and where to come back to.
_POST = """{% macro post(action, label, aria, back) -%}
<form class="inline" method="post" action="{{ action }}">
<input type="hidden" name="csrf" value="{{ csrf }}"><input type="hidden" name="next"
 value="{{ back }}"><button type="submit" aria-label="{{ aria }}">{{ label }}</button></form>
{%- endmacro %}"""

EVENTS_TABLE = """{% if events %}<div class="scroll"><table><tr><th>id</th><th>received</th>
<th>event</th><th>issue</th><th>status</th><th>outcome</th><th>error</th><th>rules and runs</th>
</tr>{% for e in events %}<tr><td><a href="/events/{{ e.id }}">{{ e.id }}</a></td>
<td>{{ e.received_at | when }}</td><td>{{ e.webhook_event }}</td><td>{% if e.issue_key %}
<a href="/events?issue={{ e.issue_key | urlencode }}">{{ e.issue_key }}</a>{% endif %}</td>
<td>{{ e.status }}</td><td>{{ e.outcome or "" }}</td><td class="err">{{ e.error or "" }}</td>
<td class="wrap">{{ summaries.get(e.id, []) | join("; ") }}</td></tr>
{% endfor %}</table></div>{% else %}<p class="muted">no events
{%- if filtered %} match these filters{% else %} yet{% endif %}</p>{% endif %}"""

PAGE = """{% extends "layout" %}{% block body %}
{% from "macros" import post with context %}
{% include "nav" %}
<p class="muted">{{ now }} &middot; rules version <code>{{ rules_version[:12] }}</code>
 ({{ rule_count }} rules)</p>

<div class="counts">
{% for title, counts, link in [("Events", counts.events, "status"),
                               ("Action runs", counts.action_runs, "")] %}
<div><h2>{{ title }}</h2><table>
{% for status, n in counts.items() %}<tr><td>{{ status }}</td><td class="n">{{ n }}</td></tr>
{% endfor %}</table></div>
{% endfor %}
<div><h2>Event outcomes</h2><table>
{% for o in outcomes %}<tr><td><a href="/events?outcome={{ o }}">{{ o }}</a></td></tr>
{% endfor %}</table></div>
</div>

{% if catch_up %}<p>Catch-up: {{ catch_up.caught_up_total }} change(s) stored that no delivery
brought; newest change seen {{ catch_up.newest_change_s | epoch }}; covered until
{{ catch_up.covered_until_s | epoch }}.</p>{% endif %}

<h2>Rule load errors</h2>
{% if rule_errors %}<ul class="err">{% for e in rule_errors %}<li><code>{{ e }}</code></li>
{% endfor %}</ul>{% else %}<p class="ok">none</p>{% endif %}

<h2>Dead action runs</h2>
{% if dead_runs %}<div class="scroll"><table><tr><th>run</th><th>event</th><th>issue</th>
<th>rule</th><th>step</th><th>action</th><th>attempts</th><th>last error</th><th></th></tr>
{% for r in dead_runs %}<tr>
<td>{{ r.id }}</td><td><a href="/events/{{ r.event_id }}">{{ r.event_id }}</a></td>
<td>{{ r.issue_key or "" }}</td><td>{{ r.rule }}</td><td class="n">{{ r.step | step_no }}</td>
<td><code>{{ r.action }}</code></td><td class="n">{{ r.attempts }}</td>
<td class="err">{{ r.last_error or "" }}</td>
<td>{{ post("/api/action-runs/%d/retry" % r.id, "Retry", "Retry action run %d" % r.id, back) }}
</td></tr>{% endfor %}</table></div>
{% if dead_more %}<p><a href="/runs">all dead and waiting runs</a></p>{% endif %}
{% else %}<p class="ok">none</p>{% endif %}

<h2>Recent events{% if outcome %} ({{ outcome }}){% endif %}</h2>
<p>outcome: <a href="/">all</a>{% for o in outcomes %}
 · <a href="/?outcome={{ o }}">{{ o }}</a>{% endfor %} · <a href="/events">filter and page</a></p>
{% include "events_table" %}

<h2>Jira webhook registrations</h2>
{% if webhooks %}<div class="scroll"><table><tr><th>tenant</th><th>id</th><th>events</th>
<th>JQL</th><th>expires</th><th>time to expiry</th></tr>
{% for w in webhooks %}<tr><td>{{ w.tenant or "(app)" }}</td><td>{{ w.webhook_id }}</td>
<td>{{ w.events | join(", ") }}</td><td><code>{{ w.jql }}</code></td>
<td>{{ w.expires_at | when if w.expires_at else "never" }}</td>
<td class="{{ 'err' if w.expires_in_s is not none and w.expires_in_s < 86400 }}">
{{ w.expires_in }}</td></tr>
{% endfor %}</table></div>{% else %}<p class="muted">none registered</p>{% endif %}

<form class="out" method="post" action="/logout">
<input type="hidden" name="csrf" value="{{ csrf }}">
<button type="submit">Log out</button></form>
{% endblock %}"""

EVENTS = """{% extends "layout" %}{% block body %}
{% include "nav" %}
<h1>Events{% if issue %} for {{ issue }}{% endif %}</h1>
<form class="filters" method="get" action="/events">
<label>outcome <select name="outcome"><option value="">any</option>
{% for o in outcomes %}<option{% if o == f.outcome %} selected{% endif %}>{{ o }}</option>
{% endfor %}</select></label>
<label>rule (matched) <select name="rule"><option value="">any</option>
{% for r in rule_names %}<option{% if r == f.rule %} selected{% endif %}>{{ r }}</option>
{% endfor %}</select></label>
<label>issue key <input name="issue" value="{{ issue or '' }}" size="12"></label>
<label>received from (UTC) <input type="datetime-local" name="since"
 value="{{ since_text }}"></label>
<label>until (UTC) <input type="datetime-local" name="until" value="{{ until_text }}"></label>
<button type="submit">Filter</button> <a href="/events">clear</a>
</form>
{% if problems %}<p class="err">{{ problems | join("; ") }}</p>{% endif %}
{% if issue and events %}<p>deploybot received {{ events | length }}
{%- if older %}+{% endif %} event(s) for {{ issue }}; the newest is
<a href="/events/{{ events[0].id }}">event {{ events[0].id }}</a>
({{ events[0].outcome or events[0].status }}).</p>{% endif %}
{% include "events_table" %}
<p>{% if before %}<a href="{{ first_link }}">newest</a>{% endif %}
{% if older %} · <a href="{{ older }}" rel="next">older events</a>{% endif %}</p>
{% endblock %}"""

RUNS = """{% extends "layout" %}{% block body %}
{% from "macros" import post with context %}
{% include "nav" %}
<h1>Dead and waiting runs</h1>
{% for title, rows, dead in [("Dead", dead_runs, true), ("Waiting", waiting_runs, false)] %}
<h2>{{ title }} ({{ rows | length }}{% if rows | length >= limit %}+{% endif %})</h2>
{% if rows %}<div class="scroll"><table><tr><th>run</th><th>event</th><th>issue</th>
<th>rule</th><th>step</th><th>action</th><th>attempts</th>
<th>{{ "last error" if dead else "waiting for" }}</th><th>{{ "" if dead else "next check" }}</th>
</tr>{% for r in rows %}<tr><td>{{ r.id }}</td>
<td><a href="/events/{{ r.event_id }}">{{ r.event_id }}</a></td><td>{{ r.issue_key or "" }}</td>
<td>{{ r.rule }}</td><td class="n">{{ r.step | step_no }}</td><td><code>{{ r.action }}</code></td>
<td class="n">{{ r.attempts }}</td><td class="{{ 'err' if dead else 'wrap' }}">
{{ r.last_error or "" }}</td><td>{% if dead %}
{{ post("/api/action-runs/%d/retry" % r.id, "Retry", "Retry action run %d" % r.id, back) }}
{% else %}{{ r.next_attempt_at | when if r.next_attempt_at else "" }}{% endif %}</td></tr>
{% endfor %}</table></div>{% else %}<p class="ok">none</p>{% endif %}
{% endfor %}
{% endblock %}"""

EVENT = """{% extends "layout" %}{% block body %}
{% from "macros" import post with context %}
{% include "nav" %}
<h1>Event {{ e.id }}: {{ e.webhook_event }}{% if e.issue_key %} on
<a href="/events?issue={{ e.issue_key | urlencode }}">{{ e.issue_key }}</a>{% endif %}</h1>
<div>outcome <strong class="{{ tone(e.outcome) }}">{{ e.outcome or "not processed yet" }}</strong>
 &middot; status {{ e.status }}
 &middot; {{ post("/api/events/%d/replay" % e.id, "Replay", "Replay event %d" % e.id, back) }}
 <span class="muted">evaluates the event again with the rules in force</span></div>
{% if e.error %}<p class="err">{{ e.error }}</p>{% endif %}

<h2>Delivery</h2>
<dl class="facts">
<dt>received</dt><dd>{{ e.received_at | when }} UTC</dd>
<dt>processed</dt><dd>{{ e.processed_at | when if e.processed_at else "not yet" }}</dd>
<dt>X-Atlassian-Webhook-Identifier</dt><dd><code>{{ e.delivery_id }}</code></dd>
<dt>X-Atlassian-Webhook-Retry</dt><dd>{{ e.retry_count }}</dd>
<dt>from</dt><dd>{{ "Connect tenant " + e.tenant if e.tenant else "the OAuth app" }}
 ({{ e.source }})</dd>
<dt>rule set version</dt><dd><code>{{ (e.ruleset_version or "")[:12] }}</code></dd>
<dt>processing attempts</dt><dd>{{ e.attempts }}</dd>
</dl>
<details><summary>Payload ({{ e.payload | length }} characters)</summary>
<pre>{{ payload }}</pre></details>

<h2>Rules</h2>
{% if e.matches %}<div class="scroll"><table><tr><th>rule</th><th>decision</th>
<th>why</th></tr>{% for m in e.matches %}<tr><td>{{ m.rule }}</td>
<td class="{{ 'ok' if m.matched else 'muted' }}">{{ "matched" if m.matched else "missed" }}</td>
<td class="wrap">{{ m.reason or ("every condition held" if m.matched else "") }}</td></tr>
{% endfor %}</table></div>
{% else %}<p class="muted">no rule was evaluated yet</p>{% endif %}

<h2>Steps</h2>
{% for group in groups %}<h3>Rule {{ group.rule }}</h3>
{% for r in group.runs %}<div class="step" id="run-{{ r.id }}">
<h3>{{ r.label }}: <code>{{ r.action }}</code> <span class="{{ tone(r.status) }}">{{ r.status }}
</span> <span class="muted">run {{ r.id }}, {{ r.attempts }} attempt(s)</span></h3>
{% if r.last_error %}<p class="{{ 'muted' if r.status == 'skipped' and r.by_if else 'err' }}">
{{ r.last_error }}</p>{% endif %}
{% if r.waiting_for %}<p class="warn">waits: {{ r.waiting_for }}</p>{% endif %}
{% if r.status == "held" %}<p class="muted">held: runs only when a step above is dead</p>
{% endif %}
{% if r.retry == "button" %}
{{ post("/api/action-runs/%d/retry" % r.id, "Retry", "Retry action run %d" % r.id, back) }}
{% elif r.retry %}<p class="muted">skipped behind <a href="#run-{{ r.retry }}">run
 {{ r.retry }}</a>: retry that one</p>{% endif %}
<details{% if r.status in ("dead", "waiting") %} open{% endif %}><summary>Request</summary>
{% if r.request_error %}<p class="muted">{{ r.request_error }}</p>{% endif %}
<pre>{{ r.request }}</pre></details>
{% if r.answer %}<details{% if r.status in ("dead", "waiting") %} open{% endif %}>
<summary>{{ "Last answer" if r.status == "waiting" else "Answer" }}
{% if r.answer_cut %}(first {{ r.answer | length }} characters){% endif %}</summary>
<pre>{{ r.answer }}</pre></details>{% endif %}
{% if r.failure %}<details><summary>What failed (the <code>failure</code> it sees)</summary>
<pre>{{ r.failure }}</pre></details>{% endif %}
{% if r.attempt_log %}<div class="scroll"><table><tr><th>attempt</th><th>outcome</th>
<th>HTTP status</th><th>started</th><th>duration</th><th>error</th></tr>
{% for a in r.attempt_log %}<tr><td class="n">{{ a.attempt }}</td><td>{{ a.outcome }}</td>
<td>{{ a.status_code or "" }}</td><td>{{ a.started_at | when }}</td><td class="n">{{ a.duration }}
</td><td class="{{ 'err' if a.outcome == 'failed' else 'wrap muted' }}">{{ a.error or "" }}</td>
</tr>{% endfor %}</table></div>{% endif %}
</div>{% endfor %}
{% else %}<p class="muted">no action runs</p>{% endfor %}
{% endblock %}"""

TEMPLATES = {
    "layout": LAYOUT,
    "macros": _POST,
    "nav": NAV,
    "login": LOGIN,
    "page": PAGE,
    "events": EVENTS,
    "events_table": EVENTS_TABLE,
    "runs": RUNS,
    "event": EVENT,
}
