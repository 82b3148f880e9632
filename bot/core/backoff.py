"""How long to wait before trying a call again: the pure retry decision (no clock, no I/O).

Every adapter's calls and the executor's action attempts share it (`bot.services.http`,
`bot.core.due`).
"""

from __future__ import annotations

import datetime
import email.utils
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

RETRYABLE_STATUSES = frozenset({408, 429})
# Seconds until a service takes requests again, sent with a 429 (UbiOps, Genesys).
RATE_LIMIT_RESET_HEADERS = ("x-ratelimit-reset", "inin-ratelimit-reset")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently one call is attempted."""

    max_attempts: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0  # a longer wait asked for by the service is left to the executor
    timeout_s: float = 30.0  # per attempt, connect to last byte


def is_retryable(status: int | None) -> bool:
    """Say whether a failure with this status (None: no answer at all) may pass on retry."""
    return status is None or status in RETRYABLE_STATUSES or 500 <= status <= 599


def _seconds(value: str | None) -> float | None:
    """Parse a header value holding seconds; None when absent or not a number."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def _retry_after_s(value: str | None, now_s: float) -> float | None:
    """Parse Retry-After in both of its forms (RFC 9110 10.2.3): seconds or an HTTP date."""
    seconds = _seconds(value)
    if seconds is not None or value is None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" and obsolete zones: HTTP dates are in GMT
        when = when.replace(tzinfo=datetime.UTC)
    return max(when.timestamp() - now_s, 0.0)


def server_wait_s(
    status: int | None, headers: Mapping[str, str], now_s: float | None = None
) -> float | None:
    """Return how long the service asked us to wait, or None if it did not say.

    `now_s` (epoch seconds, default the wall clock) turns an HTTP-date Retry-After into
    a wait."""
    lower = {k.lower(): v for k, v in headers.items()}
    told = _retry_after_s(lower.get("retry-after"), time.time() if now_s is None else now_s)
    if told is not None:
        return told
    if status == 429:
        # The reset headers ride on every UbiOps answer; they only mean "wait" on a 429.
        for name in RATE_LIMIT_RESET_HEADERS:
            told = _seconds(lower.get(name))
            if told is not None:
                return told
    return None


def retry_delay_s(
    policy: RetryPolicy,
    attempt: int,
    status: int | None,
    headers: Mapping[str, str],
    rng: random.Random,
    now_s: float | None = None,
) -> float | None:
    """Return the wait before the next attempt after `attempt` failed, or None to stop.

    Retries connection errors (status None), 408, 429 and 5xx; waits as long as the
    service says (Retry-After, rate-limit reset) and otherwise uses exponential backoff
    with full jitter. A service-requested wait beyond `max_delay_s` stops the inline
    retries: the executor reschedules the action instead of holding a worker.
    """
    if attempt >= policy.max_attempts or not is_retryable(status):
        return None
    told = server_wait_s(status, headers, now_s)
    if told is not None:
        return told if told <= policy.max_delay_s else None
    cap_s = min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1))
    return rng.uniform(0.0, cap_s)
