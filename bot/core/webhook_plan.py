"""Plan the Jira dynamic webhooks the rules need: group, limit, diff. Pure: no I/O.

`deploybot webhooks sync` lists what Jira has, calls `plan_sync`, then deletes before it
registers, so the app never holds more than the limit at any moment.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

AuthMode = Literal["connect", "oauth"]

# Jira's caps: 100 webhooks per Connect app per tenant, 5 per OAuth 2.0 app per user.
# https://developer.atlassian.com/cloud/jira/platform/webhooks/#registering-a-webhook-using-the-rest-api--for-connect-and-oauth-2-0-apps-
WEBHOOK_LIMITS: dict[AuthMode, int] = {"connect": 100, "oauth": 5}


def normalize_jql(jql: str) -> str:
    """Collapse runs of whitespace so layout differences do not count as a change."""
    return " ".join(jql.split())


def _fields_key(fields: Iterable[str] | None) -> tuple[str, ...] | None:
    return None if fields is None else tuple(sorted(set(fields)))


@dataclass(frozen=True, slots=True)
class Need:
    """What one rule asks Jira to send: events, a JQL filter, optional fieldIdsFilter and
    issuePropertyKeysFilter."""

    rule_name: str
    events: tuple[str, ...]
    jql: str
    fields: tuple[str, ...] | None = None
    property_keys: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class WebhookSpec:
    """One webhook filter: events and fields sorted and unique, JQL whitespace-normalized."""

    events: tuple[str, ...]
    jql: str
    fields: tuple[str, ...] | None = None
    property_keys: tuple[str, ...] | None = None  # issuePropertyKeysFilter

    def __post_init__(self) -> None:
        # Canonical form, so filters that differ only in order or layout compare equal.
        object.__setattr__(self, "events", tuple(sorted(set(self.events))))
        object.__setattr__(self, "jql", normalize_jql(self.jql))
        object.__setattr__(self, "fields", _fields_key(self.fields))
        object.__setattr__(self, "property_keys", _fields_key(self.property_keys))

    def to_json(self) -> dict[str, Any]:
        """Return the entry of `webhooks` in Jira's registration body."""
        body: dict[str, Any] = {"events": list(self.events), "jqlFilter": self.jql}
        if self.fields is not None:
            body["fieldIdsFilter"] = list(self.fields)
        if self.property_keys is not None:
            body["issuePropertyKeysFilter"] = list(self.property_keys)
        return body


@dataclass(frozen=True, slots=True)
class RegisteredWebhook:
    """A webhook Jira holds for this app."""

    id: int
    spec: WebhookSpec
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Desired:
    """A webhook the rules need and which rules need it."""

    spec: WebhookSpec
    rules: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """What to do to make Jira's webhooks equal the rules' needs."""

    register: tuple[Desired, ...]
    delete: tuple[int, ...]
    keep: tuple[RegisteredWebhook, ...]
    dropped_rules: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()


def desired_webhooks(needs: Iterable[Need]) -> list[Desired]:
    """Group needs with the same JQL and fields into one webhook, uniting their events."""
    Key = tuple[str, tuple[str, ...] | None, tuple[str, ...] | None]
    events: dict[Key, set[str]] = {}
    rules: dict[Key, list[str]] = {}
    for need in needs:  # dicts keep first-appearance order: rule file order decides
        key = (normalize_jql(need.jql), _fields_key(need.fields), _fields_key(need.property_keys))
        events.setdefault(key, set()).update(need.events)
        names = rules.setdefault(key, [])
        if need.rule_name not in names:
            names.append(need.rule_name)
    return [
        Desired(WebhookSpec(tuple(events[key]), key[0], key[1], key[2]), tuple(rules[key]))
        for key in events
    ]


def apply_limit(desired: list[Desired], limit: int) -> tuple[list[Desired], list[str], list[str]]:
    """Keep the first `limit` webhooks; return them, the dropped rules and the errors."""
    kept, over = desired[:limit], desired[limit:]
    dropped = [rule for d in over for rule in d.rules]
    errors = (
        [
            f"the rules need {len(desired)} webhooks but Jira allows {limit}; "
            f"not registered for rules: {', '.join(dropped)}"
        ]
        if over
        else []
    )
    return kept, dropped, errors


def plan_sync(
    needs: Iterable[Need], registered: Iterable[RegisteredWebhook], mode: AuthMode
) -> SyncPlan:
    """Diff the needed webhooks against Jira's: register missing, delete stale, keep equal."""
    desired, dropped, errors = apply_limit(desired_webhooks(needs), WEBHOOK_LIMITS[mode])
    wanted = {d.spec: d for d in desired}
    keep: dict[WebhookSpec, RegisteredWebhook] = {}
    delete: list[int] = []
    for hook in sorted(registered, key=lambda h: h.id):
        # Jira has no update: a changed filter or event list is a delete plus a register;
        # a second webhook with the same spec is a duplicate and goes too.
        if hook.spec in wanted and hook.spec not in keep:
            keep[hook.spec] = hook
        else:
            delete.append(hook.id)
    register = tuple(d for d in desired if d.spec not in keep)
    return SyncPlan(register, tuple(delete), tuple(keep.values()), tuple(dropped), tuple(errors))
