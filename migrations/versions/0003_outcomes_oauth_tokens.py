"""event outcomes, and the OAuth access token shared through the database

`events.outcome` (ignored, running, waiting, succeeded, failed) is what an operator
filters on; it is kept up to date where runs change state, so it is a column with an
index rather than a query over every run. `oauth_tokens` holds the OAuth app's access
token and the refresh token it rotates, shared by every worker and replica.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 23:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("outcome", sa.String(length=16), nullable=True))
        batch_op.create_index(batch_op.f("ix_events_outcome_id"), ["outcome", "id"])
    op.create_table(
        "oauth_tokens",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("seed", sa.String(length=64), nullable=False),
        sa.Column("refresh_token", sa.Text(), nullable=False),
        sa.Column("access_token", sa.Text(), nullable=True),
        sa.Column("refresh_at_ms", sa.BigInteger(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_oauth_tokens")),
    )
    # Outcomes of the events already stored, from their runs (the most telling first).
    for outcome, runs_where in (
        ("failed", "r.status = 'dead'"),
        ("running", "r.status IN ('pending', 'running', 'retrying')"),
    ):
        op.execute(
            "UPDATE events SET outcome = '" + outcome + "' WHERE outcome IS NULL AND EXISTS"
            " (SELECT 1 FROM action_runs r WHERE r.event_id = events.id AND " + runs_where + ")"
        )
    op.execute(
        "UPDATE events SET outcome = 'succeeded' WHERE outcome IS NULL AND status = 'processed'"
        " AND EXISTS (SELECT 1 FROM action_runs r WHERE r.event_id = events.id)"
    )
    op.execute(
        "UPDATE events SET outcome = 'ignored' WHERE outcome IS NULL AND status = 'processed'"
    )


def downgrade() -> None:
    op.drop_table("oauth_tokens")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_events_outcome_id"))
        batch_op.drop_column("outcome")
