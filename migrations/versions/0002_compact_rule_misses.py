"""rule misses as one JSON column per event, and an index for the action claim

An event evaluated against a large rule set missed most of its rules; one
`rule_matches` row per missed rule made processing write ~100 rows per event.
`events.rule_misses` holds them as one JSON list of {"rule", "reason"}; only
matched rules keep a `rule_matches` row.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 08:40:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rule_misses", sa.JSON(), nullable=True))
    with op.batch_alter_table("action_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_action_runs_status_id"), ["status", "id"])
    # Existing miss rows move into the column, in the order they were written.
    bind = op.get_bind()
    matches = sa.table(
        "rule_matches",
        sa.column("id", sa.Integer()),
        sa.column("event_id", sa.Integer()),
        sa.column("rule_name", sa.String()),
        sa.column("matched", sa.Boolean()),
        sa.column("reason", sa.Text()),
    )
    events = sa.table("events", sa.column("id", sa.Integer()), sa.column("rule_misses", sa.JSON()))
    misses: dict[int, list[dict[str, Any]]] = {}
    rows = bind.execute(
        sa.select(matches.c.event_id, matches.c.rule_name, matches.c.reason)
        .where(matches.c.matched.is_(False))
        .order_by(matches.c.id)
    )
    for row in rows:
        misses.setdefault(row.event_id, []).append({"rule": row.rule_name, "reason": row.reason})
    if misses:
        bind.execute(
            events.update()
            .where(events.c.id == sa.bindparam("b_id"))
            .values(rule_misses=sa.bindparam("b_misses")),
            [{"b_id": k, "b_misses": v} for k, v in misses.items()],
        )
        bind.execute(matches.delete().where(matches.c.matched.is_(False)))


def downgrade() -> None:
    with op.batch_alter_table("action_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_action_runs_status_id"))
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_column("rule_misses")
