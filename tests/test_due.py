"""Tables for "what is due now", and simulated months of a scheduler using them."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.core.due import (
    FAILED_RETENTION,
    MIN_EVENT_RETENTION,
    REFRESH_MARGIN,
    WEBHOOK_LIFETIME,
    failed_after_ms,
    next_attempt_at,
    next_check,
    prune_before,
    refresh_at,
    refresh_due,
)

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)


@pytest.mark.parametrize(
    ("expires_in", "due"),
    [
        (WEBHOOK_LIFETIME, False),  # just created or refreshed
        (REFRESH_MARGIN + timedelta(seconds=1), False),
        (REFRESH_MARGIN, True),  # exactly 20 days left: due
        (REFRESH_MARGIN - timedelta(seconds=1), True),
        (HOUR, True),
        (-HOUR, True),  # already past: refreshing is still the right call (Jira may lag)
    ],
)
def test_refresh_due_boundary(expires_in: timedelta, due: bool) -> None:
    assert refresh_due([(7, T0 + expires_in)], T0) == ([7] if due else [])


def test_refresh_due_picks_and_sorts_ids() -> None:
    registrations = [(30, T0 + 25 * DAY), (10, T0 + 5 * DAY), (20, None), (5, T0 + 19 * DAY)]
    assert refresh_due(registrations, T0) == [5, 10, 20]
    assert refresh_due(registrations, T0, margin=4 * DAY) == [20]
    assert refresh_due([], T0) == []


def test_refresh_at_is_expiry_minus_margin() -> None:
    assert refresh_at(T0 + WEBHOOK_LIFETIME) == T0 + timedelta(days=10)


@pytest.mark.parametrize(
    ("last_ms", "expected_ms"),
    [
        (None, int((T0 - FAILED_RETENTION).timestamp() * 1000)),
        (int((T0 - HOUR).timestamp() * 1000), int((T0 - HOUR).timestamp() * 1000)),
        (int((T0 - 5 * DAY).timestamp() * 1000), int((T0 - FAILED_RETENTION).timestamp() * 1000)),
    ],
)
def test_failed_after_ms(last_ms: int | None, expected_ms: int) -> None:
    assert failed_after_ms(last_ms, T0) == expected_ms


@pytest.mark.parametrize(
    ("retention", "cutoff"),
    [
        (timedelta(days=30), T0 - timedelta(days=30)),
        (timedelta(hours=1), T0 - MIN_EVENT_RETENTION),  # never inside Jira's redelivery window
        (timedelta(0), T0 - MIN_EVENT_RETENTION),
    ],
)
def test_prune_before(retention: timedelta, cutoff: datetime) -> None:
    assert prune_before(T0, retention) == cutoff
    assert MIN_EVENT_RETENTION > FAILED_RETENTION


@pytest.mark.parametrize(
    ("attempt", "cap_s"),
    [(1, 30.0), (2, 60.0), (3, 120.0), (5, 480.0), (6, 600.0), (40, 600.0)],
)
def test_next_attempt_at_backs_off_with_jitter_under_a_cap(attempt: int, cap_s: float) -> None:
    rng = random.Random(attempt)
    delays = [
        (next_attempt_at(attempt, T0, 30.0, 600.0, rng) - T0).total_seconds() for _ in range(200)
    ]
    assert all(0.0 <= d <= cap_s for d in delays)
    assert max(delays) > cap_s * 0.8  # the whole jitter range is used, not a fixed value


def test_next_attempt_at_honours_the_service_wait() -> None:
    rng = random.Random(1)
    assert next_attempt_at(2, T0, 30.0, 600.0, rng, retry_after_s=3600) == T0 + HOUR
    assert next_attempt_at(2, T0, 30.0, 600.0, rng, retry_after_s=-5) == T0
    with pytest.raises(ValueError):
        next_attempt_at(0, T0, 30.0, 600.0, rng)


def simulate(gaps: list[timedelta], ids: tuple[int, ...] = (1, 2)) -> tuple[bool, int]:
    """Tick a scheduler after each gap; Jira drops a webhook at expiry. Return (lapsed, calls)."""
    now = T0
    expires = dict.fromkeys(ids, T0 + WEBHOOK_LIFETIME)
    calls = 0
    for gap in gaps:
        now += gap
        if any(e <= now for e in expires.values()):
            return True, calls
        due = refresh_due(expires.items(), now)
        if due:
            calls += 1  # one refresh call covers every due webhook
            expires.update(dict.fromkeys(due, now + WEBHOOK_LIFETIME))
    return False, calls


@given(
    st.lists(st.integers(min_value=1, max_value=int(REFRESH_MARGIN.total_seconds())), max_size=60)
)
def test_never_lapses_while_ticks_are_at_most_the_margin_apart(gaps_s: list[int]) -> None:
    lapsed, _ = simulate([timedelta(seconds=s) for s in gaps_s])
    assert not lapsed


def test_a_longer_outage_than_the_lifetime_lapses() -> None:
    assert simulate([DAY, WEBHOOK_LIFETIME]) == (True, 0)


def test_ninety_days_of_hourly_webhook_checks_never_lapse() -> None:
    rng = random.Random(90)
    now = T0
    expires = {1: T0 + WEBHOOK_LIFETIME, 2: T0 + WEBHOOK_LIFETIME + 3 * DAY}
    refreshes = 0
    while now < T0 + 90 * DAY:
        assert all(e > now for e in expires.values()), f"lapsed at {now}"
        due = refresh_due(expires.items(), now)
        if due:
            refreshes += 1
            expires.update(dict.fromkeys(due, now + WEBHOOK_LIFETIME))
            assert refresh_due(expires.items(), now) == []  # refreshed: none due at once
        late = timedelta(hours=rng.uniform(0, 6))  # a busy or restarting scheduler
        outage = 15 * DAY if T0 + 45 * DAY <= now < T0 + 46 * DAY else timedelta(0)
        now += HOUR + late + outage  # the webhook check's tick (DEPLOYBOT_WEBHOOKS_INTERVAL_S)
    assert 8 <= refreshes <= 12


_T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now_s", "since_s", "every_s", "timeout_s", "check_at_s", "waited_s"),
    [
        (0, None, 600, 7200, 600, 0),  # the first call: next check one `every` on
        (600, 0, 600, 7200, 1200, 600),
        (6600, 0, 600, 7200, 7200, 6600),  # the last check falls on the bound
        (6900, 0, 600, 7200, 7200, 6900),  # ...not one `every` beyond it
        (7200, 0, 600, 7200, None, 7200),  # the bound: timed out
        (9000, 0, 600, 7200, None, 9000),  # the service was down past it
        (100, 0, 10, None, 110, 100),  # no bound (a shortcut's own wait)
    ],
)
def test_next_check_of_a_waiting_step(
    now_s: float,
    since_s: float | None,
    every_s: float,
    timeout_s: float | None,
    check_at_s: float | None,
    waited_s: float,
) -> None:
    since = None if since_s is None else _T0 + timedelta(seconds=since_s)
    at, waited = next_check(_T0 + timedelta(seconds=now_s), since, every_s, timeout_s)
    assert at == (None if check_at_s is None else _T0 + timedelta(seconds=check_at_s))
    assert waited == waited_s
