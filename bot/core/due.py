"""What is due now: pure time arithmetic for the scheduler's jobs (no clock, no I/O).

Every function takes `now` explicitly, so the scheduler wiring reads the clock once per
tick and the tables in tests pin every boundary.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from datetime import datetime, timedelta

from bot.core.backoff import RetryPolicy, retry_delay_s

# Jira drops a dynamic webhook 30 days after its creation or last refresh.
WEBHOOK_LIFETIME = timedelta(days=30)
# Refresh once fewer than 20 of the 30 days remain, i.e. 10 days after each refresh. The
# refresh is one cheap call for all webhooks, while a lapse silently loses events; 20 days
# of slack outlive a long scheduler outage, an expired OAuth grant or a Jira incident, and
# give the scheduler many ticks to retry a failed refresh before anything is lost.
REFRESH_MARGIN = timedelta(days=20)
# Jira keeps failed deliveries (and may replay them) for 72 hours.
FAILED_RETENTION = timedelta(hours=72)
# Stored events are the dedupe record for redeliveries; pruning one that Jira can still
# redeliver would act on that delivery twice, so retention never goes below this.
MIN_EVENT_RETENTION = FAILED_RETENTION + timedelta(days=1)


def refresh_at(expires_at: datetime, margin: timedelta = REFRESH_MARGIN) -> datetime:
    """Return when a webhook expiring at `expires_at` becomes due for refresh."""
    return expires_at - margin


def refresh_due(
    registrations: Iterable[tuple[int, datetime | None]],
    now: datetime,
    margin: timedelta = REFRESH_MARGIN,
) -> list[int]:
    """Return the ids to refresh now (an unknown expiry is due: refreshing tells it)."""
    return sorted(
        webhook_id
        for webhook_id, expires_at in registrations
        if expires_at is None or refresh_at(expires_at, margin) <= now
    )


def next_attempt_at(
    attempt: int,
    now: datetime,
    base_s: float,
    max_s: float,
    rng: random.Random,
    retry_after_s: float | None = None,
) -> datetime:
    """Return when a failed action run (its `attempt`-th try) is tried again.

    The backoff is the shared one of `backoff.retry_delay_s` (exponential, full jitter); the
    run's own attempt budget is the executor's, so this never says "stop". A wait the
    service asked for wins, even beyond `max_s`: retrying earlier would only be refused.
    """
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    if retry_after_s is not None:
        return now + timedelta(seconds=max(retry_after_s, 0.0))
    policy = RetryPolicy(max_attempts=attempt + 1, base_delay_s=base_s, max_delay_s=max_s)
    delay_s = retry_delay_s(policy, attempt, None, {}, rng)
    assert delay_s is not None  # status None (no answer) is always retryable within budget
    return now + timedelta(seconds=delay_s)


def failed_after_ms(last_failure_ms: int | None, now: datetime) -> int:
    """Return the `after` cursor for polling failed deliveries (never older than Jira keeps)."""
    window_start_ms = int((now - FAILED_RETENTION).timestamp() * 1000)
    return window_start_ms if last_failure_ms is None else max(last_failure_ms, window_start_ms)


def prune_before(now: datetime, retention: timedelta) -> datetime:
    """Return the cut-off before which finished rows may be deleted."""
    return now - max(retention, MIN_EVENT_RETENTION)


def next_check(
    now: datetime, waiting_since: datetime | None, every_s: float, timeout_s: float | None
) -> tuple[datetime | None, float]:
    """When a step whose `until` does not hold yet is checked again, and how long it has
    waited; None when its `timeout` has passed (the step then fails: "timed out").

    The first check is the step's first call (`waiting_since` None). A next check that
    would fall after the timeout is moved to it, so a wait never outlives its bound by
    up to one `every`.
    """
    since = now if waiting_since is None else waiting_since
    waited_s = (now - since).total_seconds()
    if timeout_s is not None and waited_s >= timeout_s:
        return None, waited_s
    at = now + timedelta(seconds=every_s)
    if timeout_s is not None:
        at = min(at, since + timedelta(seconds=timeout_s))
    return at, waited_s
