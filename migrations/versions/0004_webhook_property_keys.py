"""webhook registrations keep their issuePropertyKeysFilter

A rule's `on.property_keys` is registered with Jira as `issuePropertyKeysFilter`;
the registrations table keeps it beside `fields` so `webhooks list` shows it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 23:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_registrations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("property_keys", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhook_registrations", schema=None) as batch_op:
        batch_op.drop_column("property_keys")
