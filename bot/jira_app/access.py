"""How deploybot reaches Jira: the clients of each Connect tenant and of the OAuth app,
for the scheduler's jobs and for the `jira.*` actions."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.backoff import RetryPolicy
from bot.db.oauth_tokens import OAuthTokenStore
from bot.db.registrations import (
    OAUTH_REFRESH_TOKEN_KEY,
    kv_get,
)
from bot.db.tenants import Tenant, Tenants
from bot.services.forge_tokens import ForgeSystemAuth, ForgeSystemTokens
from bot.services.jira import (
    DEFAULT_POLICY,
    ConnectAuth,
    JiraClient,
    SharedOAuthTokens,
    token_seed,
)
from bot.settings import Settings

log = logging.getLogger(__name__)

DELIVERY_PATH = "/webhooks/jira"  # where every registered webhook delivers


@dataclass(frozen=True, slots=True)
class Target:
    """One Jira deploybot registers webhooks with: a Connect tenant, or the OAuth app ("")."""

    tenant: str
    client: JiraClient


@dataclass(frozen=True, slots=True)
class JiraAccess:
    """How to reach Jira: settings, database, HTTP session, and the clock tokens use."""

    settings: Settings
    engine: AsyncEngine
    session: aiohttp.ClientSession
    clock: Callable[[], float] = time.time
    policy: RetryPolicy = DEFAULT_POLICY

    @property
    def delivery_url(self) -> str | None:
        """Return the URL Jira delivers to (None without DEPLOYBOT_PUBLIC_URL)."""
        public_url = self.settings.public_url
        return None if not public_url else public_url.rstrip("/") + DELIVERY_PATH

    def _client(self, base_url: str, auth: ConnectAuth | SharedOAuthTokens) -> JiraClient:
        return JiraClient(self.session, base_url, auth, policy=self.policy, clock=self.clock)

    def connect_client(self, tenant: Tenant) -> JiraClient:
        """The client of one Connect tenant: requests signed with its shared secret."""
        auth = ConnectAuth(self.settings.jira_app_key, tenant.shared_secret)
        return self._client(tenant.base_url, auth)

    async def targets(self) -> list[Target]:
        """Return every Jira to manage: enabled Connect tenants, or the configured OAuth app."""
        s = self.settings
        if s.jira_auth_mode == "connect":
            return [
                Target(t.client_key, self.connect_client(t))
                for t in await Tenants(self.engine).all_enabled()
            ]
        client = await self.oauth_client()
        return [] if client is None else [Target("", client)]

    async def oauth_client(self) -> JiraClient | None:
        """The OAuth app's client, its access token shared through the database (None when
        the OAuth settings are incomplete)."""
        s = self.settings
        if not (s.jira_base_url and s.jira_client_id and s.jira_client_secret):
            return None
        configured = s.jira_refresh_token
        initial = await self.refresh_token()
        if not configured and initial is None:
            return None
        tokens = SharedOAuthTokens(
            self.session,
            OAuthTokenStore(self.engine, s.jira_client_secret),
            s.jira_token_url,
            s.jira_client_id,
            s.jira_client_secret,
            configured or "",
            initial_refresh_token=initial,
            policy=self.policy,
            clock=self.clock,
        )
        return self._client(s.jira_base_url, tokens)

    async def refresh_token(self) -> str | None:
        """Return the newest OAuth refresh token: the stored rotated one, else the setting."""
        configured = self.settings.jira_refresh_token
        seed = token_seed(configured or "")
        state = await OAuthTokenStore(self.engine, self.settings.jira_client_secret or "").current()
        if state is not None and state.seed == seed:
            return state.refresh_token
        # Where versions before the shared token kept it.
        stored = await kv_get(self.engine, OAUTH_REFRESH_TOKEN_KEY)
        if stored is not None:
            stored_seed, _, token = stored.partition(":")
            if token and stored_seed == seed:
                return token
        return configured


class JiraActionClients:
    """The clients `jira.*` actions use: the Jira of the event's tenant.

    Connect mode: each installed, enabled tenant is its own site, reached with requests
    signed by its shared secret. OAuth mode: the app's one site (tenant ""), its access
    token shared with every worker, replica and the scheduler through the database.
    """

    def __init__(self, access: JiraAccess, forge: ForgeSystemTokens | None = None) -> None:
        self._access = access
        self._tenants = Tenants(access.engine)  # its lookups are cached
        self._oauth: JiraClient | None = None
        self._forge = forge

    async def client(self, tenant: str) -> JiraClient | None:
        mode = self._access.settings.jira_auth_mode
        if mode in ("oauth", "secret"):  # secret mode writes back with the OAuth app
            if tenant != "":
                return None
            if self._oauth is None:
                self._oauth = await self._access.oauth_client()
            if self._oauth is None and self._forge is not None:
                return self._forge_client()
            return self._oauth
        if mode != "connect":
            return None
        found = await self._tenants.get(tenant)
        if found is None or not found.enabled:
            return None
        return self._access.connect_client(found)

    def _forge_client(self) -> JiraClient | None:
        """Forge mode without the OAuth app: the app system token Forge events bring. Once
        one came, its site is known: a stale token makes the call fail retryably (the next
        event brings a fresh one); before any came there is no client (the run is dead)."""
        assert self._forge is not None
        held = self._forge.fresh() or self._forge.latest()
        if held is None:
            return None
        auth = ForgeSystemAuth(self._forge, held.api_base_url)
        a = self._access
        return JiraClient(a.session, held.api_base_url, auth, policy=a.policy, clock=a.clock)
