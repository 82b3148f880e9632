"""How long to wait before trying a call again: the pure retry decision (no clock, no I/O).

Every adapter's calls and the executor's action attempts share it (`bot.services.http`,
`bot.core.due`).
"""

from __future__ import annotations

import math
import random
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
        return None  # an HTTP-date Retry-After falls back to our own backoff
    return max(seconds, 0.0) if math.isfinite(seconds) else None


def server_wait_s(status: int | None, headers: Mapping[str, str]) -> float | None:
    """Return how long the service asked us to wait, or None if it did not say."""
    lower = {k.lower(): v for k, v in headers.items()}
    told = _seconds(lower.get("retry-after"))
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
) -> float | None:
    """Return the wait before the next attempt after `attempt` failed, or None to stop.

    Retries connection errors (status None), 408, 429 and 5xx; waits as long as the
    service says (Retry-After, rate-limit reset) and otherwise uses exponential backoff
    with full jitter. A service-requested wait beyond `max_delay_s` stops the inline
    retries: the executor reschedules the action instead of holding a worker.
    """
    if attempt >= policy.max_attempts or not is_retryable(status):
        return None
    told = server_wait_s(status, headers)
    if told is not None:
        return told if told <= policy.max_delay_s else None
    cap_s = min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1))
    return rng.uniform(0.0, cap_s)
