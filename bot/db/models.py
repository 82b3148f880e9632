"""The schema, as SQLAlchemy Core tables (migrations in `migrations/` create the same)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects import postgresql, sqlite


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every engine (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Identity: BigInteger on PostgreSQL, INTEGER PRIMARY KEY (rowid) on SQLite.
Id = BigInteger().with_variant(Integer(), "sqlite")

tenants = Table(
    "tenants",
    metadata,
    Column("client_key", String(255), primary_key=True),
    Column("shared_secret", Text, nullable=False),
    Column("base_url", Text, nullable=False),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("installed_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

events = Table(
    "events",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    # "" for the OAuth app, the clientKey for a Connect tenant.
    Column("tenant", String(255), nullable=False, default=""),
    Column("delivery_id", String(255), nullable=False),
    Column("retry_count", Integer, nullable=False, default=0),
    Column("webhook_event", String(255), nullable=False),
    Column("issue_key", String(255)),
    Column("source", String(16), nullable=False, default="live"),
    Column("body", LargeBinary, nullable=False),
    Column("status", String(16), nullable=False, default="received"),
    Column("received_at", UTCDateTime, nullable=False),
    Column("lease_owner", String(64)),
    Column("lease_until", UTCDateTime),
    Column("processed_at", UTCDateTime),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text),
    Column("ruleset_version", String(64)),
    # The rules the event missed and why: [{"rule": name, "reason": text}, ...] (one
    # value per event; only matched rules get a rule_matches row).
    Column("rule_misses", JSON),
    # What the operator sees: ignored | running | waiting | succeeded | failed (None: not
    # processed yet). Kept up to date where runs change state, indexed for filtering.
    Column("outcome", String(16)),
    UniqueConstraint("tenant", "delivery_id"),
    Index(None, "status", "id"),
    Index(None, "received_at"),
    Index(None, "outcome", "id"),
)

rule_matches = Table(
    "rule_matches",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("event_id", Id, ForeignKey("events.id", ondelete="CASCADE"), nullable=False),
    Column("rule_name", String(255), nullable=False),
    Column("matched", Boolean, nullable=False),
    Column("reason", Text),
    Column("ruleset_version", String(64), nullable=False),
    Index(None, "event_id"),
)

action_runs = Table(
    "action_runs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("event_id", Id, ForeignKey("events.id", ondelete="CASCADE"), nullable=False),
    Column("rule_name", String(255), nullable=False),
    Column("step_index", Integer, nullable=False),
    Column("step_id", String(255)),
    Column("action", String(255), nullable=False),
    Column("idempotency_key", String(600), nullable=False, unique=True),
    Column("status", String(16), nullable=False, default="pending"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime),
    Column("lease_owner", String(64)),
    Column("lease_until", UTCDateTime),
    Column("params", JSON),
    Column("state", JSON),
    Column("result", JSON),
    Column("last_error", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # Workflows: the step's `if`/`until`/`fail_if` (workflow.Control, stored form), when
    # its wait began, what an `on_failure` step sees as `failure`, the rule's key.
    Column("control", JSON),
    Column("failure", JSON),
    Column("waiting_since", UTCDateTime),
    Column("concurrency_key", String(500)),
    Index(None, "status", "next_attempt_at"),
    Index(None, "concurrency_key", "status"),
    Index(None, "event_id", "rule_name", "step_index"),
    Index(None, "status", "id"),  # the executor's claim: due runs of a status, oldest first
)

action_attempts = Table(
    "action_attempts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("action_run_id", Id, ForeignKey("action_runs.id", ondelete="CASCADE"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("status_code", Integer),
    Column("error", Text),
    Index(None, "action_run_id"),
)

webhook_registrations = Table(
    "webhook_registrations",
    metadata,
    Column("tenant", String(255), primary_key=True),
    Column("webhook_id", BigInteger, primary_key=True),
    Column("jql", Text, nullable=False),
    Column("events", JSON, nullable=False),
    Column("fields", JSON),
    Column("property_keys", JSON),  # issuePropertyKeysFilter
    Column("expires_at", UTCDateTime),
    Column("registered_at", UTCDateTime, nullable=False),
    Column("refreshed_at", UTCDateTime),
)

# Small persisted values: the failed-webhook cursor, a rotated refresh token, ...
kv = Table(
    "kv",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# The OAuth app's access token, shared by every worker and replica, and the refresh token
# it rotates; refreshed by one holder at a time (bot/db/oauth_tokens.py). `seed` says which
# configured JIRA_REFRESH_TOKEN the row descends from.
oauth_tokens = Table(
    "oauth_tokens",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("seed", String(64), nullable=False),
    Column("refresh_token", Text, nullable=False),
    Column("access_token", Text),
    Column("refresh_at_ms", BigInteger, nullable=False),
    Column("generation", Integer, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

# Worker processes alive, each beating its heartbeat (bot/pipeline/liveness.py): a dead
# one's claims (lease_owner "events-<id>" / "actions-<id>") are taken back at once.
processes = Table(
    "processes",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started", String(64), nullable=False),  # the kernel's start time of pid
    Column("started_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
)

EVENT_STATUSES = ("received", "processing", "processed", "failed")
# waiting: a step's `until` does not hold yet (due again at next_attempt_at); held: an
# `on_failure` step, released when a step of `do` is dead; superseded: `pending: latest`.
ACTION_STATUSES = (
    "pending",
    "running",
    "succeeded",
    "retrying",
    "waiting",
    "dead",
    "skipped",
    "held",
    "superseded",
)
EVENT_OUTCOMES = ("ignored", "running", "waiting", "succeeded", "failed")


def upsert(table: Table, dialect: str) -> postgresql.Insert | sqlite.Insert:
    """An INSERT of the engine's dialect, which can say ON CONFLICT (both engines have it)."""
    return postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
