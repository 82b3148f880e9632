"""Cached OAuth access tokens: refreshed early, one refresh at a time, once more on 401."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.errors import ActionError


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A bearer token and the clock reading from which it must not be used any more."""

    value: str = field(repr=False)
    refresh_at_s: float


class BearerAuth(Protocol):
    """Where a client gets its bearer token, and a new one when the API rejected it."""

    async def token(self) -> str: ...

    async def refresh(self, rejected: str | None) -> str: ...


def parse_token_answer(answer: Any, *, source: str, now_s: float, margin_s: float) -> AccessToken:
    """Turn a token endpoint's answer into a token refreshed `margin_s` (at most half its
    life) early; `source` names the endpoint in errors."""
    if not isinstance(answer, dict):
        raise ActionError(f"{source} answered without a JSON object", retryable=True)
    value, expires_in = answer.get("access_token"), answer.get("expires_in")
    if not isinstance(value, str) or not value:
        raise ActionError(f"{source} answered without an access_token", retryable=True)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        raise ActionError(f"{source} answered without a positive expires_in", retryable=True)
    return AccessToken(value, now_s + expires_in - min(margin_s, expires_in / 2))


class CachedToken(ABC):
    """One cached access token shared by every caller of a client.

    Callers that find it due queue behind one fetch and reuse its result; a token the API
    rejected (401) is replaced once, unless another caller already replaced it.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token: AccessToken | None = None

    @abstractmethod
    async def _fetch(self) -> AccessToken:
        """Ask the token endpoint for a new token."""

    def _fresh(self) -> str | None:
        token = self._token
        return token.value if token and self._clock() < token.refresh_at_s else None

    async def token(self) -> str:
        """Return a usable token, fetching one when none is cached or it is due."""
        if (value := self._fresh()) is not None:
            return value
        async with self._lock:
            return self._fresh() or await self._replace()

    async def refresh(self, rejected: str | None) -> str:
        """Replace a token the API rejected unless another caller already did."""
        async with self._lock:
            current = self._token
            if current is not None and current.value != rejected and self._fresh():
                return current.value
            return await self._replace()

    async def _replace(self) -> str:
        self._token = None
        self._token = await self._fetch()
        return self._token.value
