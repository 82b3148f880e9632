"""The Forge app system token: how `jira.*` actions call Jira back in Forge mode.

A Forge Remote request carries, when the manifest's endpoint asks for it
(`auth.appSystemToken.enabled: true`), `x-forge-oauth-system: <token>`: a bearer token
for Jira's REST API at the FIT's `app.apiBaseUrl`, acting as the app's bot user. It is
a JWT whose `exp` says how long it lives (minutes), and it is only ever handed to the
replica that received the event. So it is kept in memory (never stored), the newest one
per site, and used while it is fresh; an action that runs later, or on another replica,
finds none and is retried (the next Forge event brings a fresh one), or is written back
with the OAuth app when one is configured (preferred: it works from every replica).
https://developer.atlassian.com/platform/forge/remote/calling-product-apis/
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt

from bot.errors import ActionError

# A token this close to its expiry is not used (the call itself takes time).
EXPIRY_MARGIN_S = 30.0


@dataclass(frozen=True, slots=True)
class SystemToken:
    api_base_url: str
    token: str
    expires_at: float


class ForgeSystemTokens:
    """The newest app system token of each Forge site (apiBaseUrl), in memory."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tokens: dict[str, SystemToken] = {}

    def remember(self, api_base_url: str, token: str) -> None:
        """Keep `token` if it is newer than the one held (its `exp`, read unverified:
        it came with a verified invocation, and Jira checks it on every call)."""
        try:
            exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
        except jwt.PyJWTError:
            return
        if not isinstance(exp, int | float):
            return
        held = self._tokens.get(api_base_url)
        if held is None or exp >= held.expires_at:
            self._tokens[api_base_url] = SystemToken(api_base_url, token, float(exp))

    def latest(self) -> SystemToken | None:
        """The newest token held, fresh or not (which site to call back)."""
        return max(self._tokens.values(), key=lambda t: t.expires_at, default=None)

    def fresh(self) -> SystemToken | None:
        """The freshest token still usable (deploybot serves one Jira site: tenant "")."""
        now = self._clock()
        usable = [t for t in self._tokens.values() if t.expires_at - EXPIRY_MARGIN_S > now]
        return max(usable, key=lambda t: t.expires_at, default=None)


class ForgeSystemAuth:
    """JiraClient auth with the held app system token (no refresh: Forge sends them)."""

    def __init__(self, tokens: ForgeSystemTokens, api_base_url: str) -> None:
        self._tokens = tokens
        self._url = api_base_url

    def __repr__(self) -> str:
        return f"ForgeSystemAuth({self._url!r})"

    async def token(self) -> str:
        held = self._tokens.fresh()
        if held is None or held.api_base_url != self._url:
            raise ActionError(
                "no fresh Forge app system token (it comes with each Forge event and lives"
                " minutes); retried later, or configure the OAuth app for write-back",
                retryable=True,
            )
        return held.token

    async def refresh(self, rejected: str | None) -> str:
        raise ActionError("Jira refused the Forge app system token", status=401, retryable=True)
