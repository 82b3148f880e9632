"""Leasing rows to a worker: the claim statement the processor and the executor share."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, union_all, update

# An expired lease is one before any claimer's clock, however far replicas' clocks drift.
EXPIRED = datetime(2000, 1, 1, tzinfo=UTC)


def claim_statement(
    table: Any,
    dialect_name: str,
    ready: Sequence[Any],
    *,
    owner: str,
    lease_until: Any,
    limit: int,
    values: dict[str, Any],
    returning: tuple[Any, ...],
) -> Any:
    """UPDATE ... WHERE id IN (SELECT ... LIMIT n [FOR UPDATE SKIP LOCKED]) RETURNING ...

    One statement, so that on SQLite it takes the write lock at once (no read-then-write
    upgrade that could deadlock), and on PostgreSQL replicas skip each other's rows.
    `ready` lists conditions a row may meet, each on one status. `lease_until` (and times
    in `ready`) may be values or bind parameters.
    """
    # Each condition is its own walk of the (status, id) index, oldest first, stopping after
    # `limit` rows. As one OR, SQLite reads and sorts every matching row (the whole
    # backlog, on every claim), and PostgreSQL ORs two bitmap scans, which recheck every
    # row version the index still lists (under load, tens of thousands of dead ones) and
    # never mark dead entries as an index scan does: 14 ms a claim in bench/pipeline.py.
    branches: list[Any] = [
        select(table.c.id).where(cond).order_by(table.c.id).limit(limit) for cond in ready
    ]
    if dialect_name == "postgresql":
        # Each branch locks what it finds, skipping rows another replica holds.
        each = union_all(
            *(
                select(cte.c.id)
                for cte in (
                    b.with_for_update(skip_locked=True).cte(f"due_{i}")
                    for i, b in enumerate(branches)
                )
            )
        ).subquery()
    else:
        each = union_all(*(select(b.subquery().c.id) for b in branches)).subquery()
    candidates = select(each.c.id).order_by(each.c.id).limit(limit)
    return (
        update(table)
        .where(table.c.id.in_(candidates.scalar_subquery()))
        .values(
            lease_owner=owner,
            lease_until=lease_until,
            attempts=table.c.attempts + 1,
            **values,
        )
        .returning(*returning)
    )
