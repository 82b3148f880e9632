"""workflows: step controls, waits, on_failure context, concurrency keys

An action run carries its step's controls (`if`, `until`, `fail_if`, durations) like
its `with:`, the time its wait began, the `failure` an `on_failure` step sees, and
its rule's rendered concurrency key (indexed with the status: the claim looks for a
run of the same key still in progress).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 23:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("action_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("control", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("failure", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("concurrency_key", sa.String(length=500), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_action_runs_concurrency_key_status"), ["concurrency_key", "status"]
        )


def downgrade() -> None:
    with op.batch_alter_table("action_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_action_runs_concurrency_key_status"))
        batch_op.drop_column("concurrency_key")
        batch_op.drop_column("waiting_since")
        batch_op.drop_column("failure")
        batch_op.drop_column("control")
