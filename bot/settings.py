"""Settings: one frozen object, built once at start-up from the environment and `.env`."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from dotenv import dotenv_values

from bot.core.regions import (
    GENESYS_REGION_NAMES,
    GENESYS_REGIONS,
    genesys_login_url,
    genesys_region,
    genesys_urls,
)
from bot.errors import SettingsError


def redacted_url(url: str) -> str:
    """A database URL as it may be shown: its password replaced by `***`."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything deploybot reads from its environment; nothing reads os.environ later."""

    database_url: str = "sqlite+aiosqlite:///./deploybot.db"
    rules_dir: Path = Path("./rules")
    host: str = "0.0.0.0"
    port: int = 8080
    public_url: str | None = None
    admin_token: str | None = field(default=None, repr=False)
    secure_cookies: bool = False  # behind a TLS-terminating proxy: mark the cookie Secure
    max_body_bytes: int = 1024 * 1024
    # A client's request line, headers (and idle keep-alive), and its body, each within
    # this: a trickling client is cut off instead of holding a connection for ever.
    client_timeout_s: float = 15.0
    lease_s: float = 60.0
    action_lease_s: float = 120.0  # a run's claim: longer than any one call of its action
    # Each process's heartbeat; one silent for 5 of them is dead and its claims are taken back.
    heartbeat_s: float = 2.0
    workers: int = 8
    http_timeout_s: float = 30.0  # one call to UbiOps/Genesys/Jira, connect to last byte
    http_attempts: int = 4  # calls per action attempt (a lost POST answer is never repeated)
    retry_attempts: int = 8  # action attempts before a run is dead
    retry_base_delay_s: float = 5.0  # first wait between attempts, doubling with jitter
    retry_max_delay_s: float = 900.0
    retention_days: int = 30
    # http.request may call these hosts ("host" any port, "host:port" that one); empty: none
    http_allowed_hosts: tuple[str, ...] = ()
    shutdown_timeout_s: float = 10.0
    scheduler_interval_s: float = 60.0
    webhooks_interval_s: float = 3600.0
    log_format: Literal["auto", "json", "text"] = "auto"
    jira_auth_mode: Literal["oauth", "connect", "secret"] = "oauth"
    # secret mode: the admin webhooks' secrets (several during a rotation)
    jira_webhook_secret: tuple[str, ...] = field(default=(), repr=False)
    # Forge Remote (POST /webhooks/forge): the app's id (the FIT's `aud`) and its keys
    forge_app_id: str | None = None
    forge_jwks_url: str = "https://forge.cdn.prod.atlassian-dev.net/.well-known/jwks.json"
    # Catch-up of changes no delivery brought: None is on in oauth mode (and in secret mode
    # with the OAuth app configured for reading), off otherwise.
    jira_catch_up: bool | None = None
    jira_catch_up_margin_s: float = 300.0
    jira_catch_up_max_changes: int = 500  # changes stored per tick at most
    jira_base_url: str | None = None
    jira_client_id: str | None = None
    jira_client_secret: str | None = field(default=None, repr=False)
    jira_refresh_token: str | None = field(default=None, repr=False)
    jira_token_url: str = "https://auth.atlassian.com/oauth/token"
    jira_connect_keys_url: str = "https://connect-install-keys.atlassian.com"
    jira_app_key: str = "deploybot"
    # Connect installs: where a tenant's baseUrl may point (`*.atlassian.net`: https, any
    # subdomain; `http://127.0.0.1`: that scheme and host, any port), and which tenants may
    # install at all (client keys or base URLs; empty: any).
    jira_allowed_base_url_hosts: tuple[str, ...] = ("*.atlassian.net",)
    jira_allowed_tenants: tuple[str, ...] = ()
    # The site's epic label custom field: the one `cf[id]` Jira's webhook filter takes.
    jira_epic_label_field: str | None = None
    ubiops_api_url: str = "https://api.ubiops.com/v2.1"
    ubiops_api_token: str | None = field(default=None, repr=False)
    genesys_region: str = "mypurecloud.com"
    genesys_api_url: str = ""
    genesys_login_url: str = ""
    genesys_client_id: str | None = None
    genesys_client_secret: str | None = field(default=None, repr=False)
    # Client-side limits under the accounts' per-minute quotas (429s are handled on top).
    ubiops_per_minute: int = 240
    genesys_per_minute: int = 300
    # An explicit proxy for every outgoing call (credentials in the URL or separately);
    # without it the standard HTTP_PROXY / HTTPS_PROXY / NO_PROXY variables apply.
    http_proxy: str | None = field(default=None, repr=False)
    http_proxy_user: str | None = None
    http_proxy_password: str | None = field(default=None, repr=False)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every configured secret value, for redaction and leak tests."""
        values = (
            self.admin_token,
            self.jira_client_secret,
            self.jira_refresh_token,
            *self.jira_webhook_secret,
            self.ubiops_api_token,
            self.genesys_client_secret,
            self.http_proxy_password,
            urlsplit(self.http_proxy).password if self.http_proxy else None,
        )
        return tuple(v for v in values if v)

    @property
    def proxy(self) -> str | None:
        """The explicit proxy as one URL; separate credentials replace those in the URL."""
        if not self.http_proxy:
            return None
        if not self.http_proxy_user:
            return self.http_proxy
        parts = urlsplit(self.http_proxy)
        user = quote(self.http_proxy_user, safe="")
        password = quote(self.http_proxy_password or "", safe="")
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))

    def in_use(self) -> str:
        """The start-up line saying what this process runs with (no secret)."""
        return (
            f"database {redacted_url(self.database_url)} (DEPLOYBOT_DATABASE_URL), rules "
            f"folder {self.rules_dir.resolve()} (DEPLOYBOT_RULES_DIR), Jira auth mode "
            f"{self.jira_auth_mode} (JIRA_AUTH_MODE), status page and admin API "
            f"{'on' if self.admin_token else 'off'} (DEPLOYBOT_ADMIN_TOKEN)"
        )

    def startup_notes(self) -> list[str]:
        """Describe how outgoing calls are routed (one start-up line each; no secret)."""
        notes: list[str] = []
        if self.http_proxy:
            notes.append(
                f"outgoing calls go through the proxy {masked_proxy(self.http_proxy)}"
                " (DEPLOYBOT_HTTP_PROXY; NO_PROXY does not apply to it)"
            )
        if genesys_login_url(self.genesys_api_url) is None and self.genesys_login_url == (
            f"https://login.{self.genesys_region}"
        ):
            notes.append(
                f"Genesys login stays on {self.genesys_login_url}: GENESYS_API_URL"
                f" {self.genesys_api_url} has no api. host to derive it from; set"
                " GENESYS_LOGIN_URL for a gateway"
            )
        return notes

    @property
    def catch_up(self) -> bool:
        """Whether the scheduler catches up on changes no delivery brought."""
        if self.jira_catch_up is not None:
            return self.jira_catch_up
        return self.jira_auth_mode in ("oauth", "secret") and bool(
            self.jira_base_url and self.jira_client_id and self.jira_client_secret
        )

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def disabled_features(self) -> list[str]:
        """Describe what is off for lack of credentials (one start-up warning each)."""
        off: list[str] = []
        if self.jira_auth_mode == "oauth" and not self.jira_client_secret:
            off.append("Jira deliveries are refused: JIRA_CLIENT_SECRET is not set")
        if self.jira_auth_mode == "oauth" and not (
            self.jira_base_url and self.jira_client_id and self.jira_refresh_token
        ):
            off.append(
                "Jira webhook registration is off: set JIRA_BASE_URL, JIRA_CLIENT_ID,"
                " JIRA_CLIENT_SECRET and JIRA_REFRESH_TOKEN"
            )
        if self.jira_auth_mode == "secret" and not self.jira_webhook_secret:
            off.append("Jira deliveries are refused: JIRA_WEBHOOK_SECRET is not set")
        if self.jira_auth_mode == "connect" and not self.public_url:
            off.append("Connect install is off: DEPLOYBOT_PUBLIC_URL is not set")
        if not self.ubiops_api_token:
            off.append("UbiOps actions are off: UBIOPS_API_TOKEN is not set")
        if not (self.genesys_client_id and self.genesys_client_secret):
            off.append(
                "Genesys actions are off (except the five guest operations, sent without"
                " credentials): set GENESYS_CLIENT_ID and GENESYS_CLIENT_SECRET"
            )
        if not self.admin_token:
            off.append("admin API and status page are off: DEPLOYBOT_ADMIN_TOKEN is not set")
        return off


def _int(name: str, low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise SettingsError(f"{name} must be between {low} and {high}, got {value}")
        return value

    return parse


def _float(name: str, low: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
        if value < low:
            raise SettingsError(f"{name} must be at least {low}, got {value}")
        return value

    return parse


def _bool(name: str) -> Callable[[str], bool]:
    def parse(raw: str) -> bool:
        value = raw.lower()
        if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise SettingsError(f"{name} must be true or false, got {raw!r}")
        return value in ("1", "true", "yes", "on")

    return parse


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in choices:
            raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
        return raw

    return parse


def _url(name: str, schemes: tuple[str, ...] = ("http", "https")) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in schemes or not parts.netloc:
            raise SettingsError(f"{name} must be an absolute {'/'.join(schemes)} URL, got {raw!r}")
        return raw.rstrip("/")

    return parse


def masked_proxy(url: str) -> str:
    """Show a proxy URL with its credentials masked."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _proxy(raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # the URL may hold credentials: never echo it
        raise SettingsError(
            "DEPLOYBOT_HTTP_PROXY must be an absolute http or https URL such as"
            " http://user:password@proxy.example:3128 (the value is not shown: it may hold"
            " credentials)"
        )
    return raw.rstrip("/")


def _database_url(raw: str) -> str:
    if not raw.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        raise SettingsError(
            "DEPLOYBOT_DATABASE_URL must start with sqlite+aiosqlite:// or"
            f" postgresql+asyncpg://, got {raw.split('://')[0]!r}://..."
        )
    return raw


def _region(raw: str) -> str:
    domain = genesys_region(raw)
    if domain is None:
        raise SettingsError(
            f"GENESYS_REGION {raw!r} is not a Genesys Cloud region; known: "
            + ", ".join(sorted(GENESYS_REGIONS))
            + " (or the SDK's names: "
            + ", ".join(GENESYS_REGION_NAMES)
            + ")"
        )
    return domain


def _str(raw: str) -> str:
    return raw


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _hosts(raw: str) -> tuple[str, ...]:
    return tuple(h.strip().lower().rstrip(".") for h in raw.split(",") if h.strip())


def _epic_label_field(raw: str) -> str:
    if not re.fullmatch(r"(?:customfield_|cf\[)?\d+\]?", raw, re.IGNORECASE):
        raise SettingsError(
            f"JIRA_EPIC_LABEL_FIELD must be a custom field id such as customfield_10011,"
            f" got {raw!r}"
        )
    return raw


# attribute -> (environment variable, parser)
_VARIABLES: dict[str, tuple[str, Callable[[str], object]]] = {
    "database_url": ("DEPLOYBOT_DATABASE_URL", _database_url),
    "rules_dir": ("DEPLOYBOT_RULES_DIR", Path),
    "host": ("DEPLOYBOT_HOST", _str),
    "port": ("DEPLOYBOT_PORT", _int("DEPLOYBOT_PORT", 0, 65535)),
    "public_url": ("DEPLOYBOT_PUBLIC_URL", _url("DEPLOYBOT_PUBLIC_URL")),
    "admin_token": ("DEPLOYBOT_ADMIN_TOKEN", _str),
    "secure_cookies": ("DEPLOYBOT_SECURE_COOKIES", _bool("DEPLOYBOT_SECURE_COOKIES")),
    "client_timeout_s": ("DEPLOYBOT_CLIENT_TIMEOUT_S", _float("DEPLOYBOT_CLIENT_TIMEOUT_S", 0.1)),
    "max_body_bytes": ("DEPLOYBOT_MAX_BODY_BYTES", _int("DEPLOYBOT_MAX_BODY_BYTES", 1024, 1 << 30)),
    "lease_s": ("DEPLOYBOT_LEASE_S", _float("DEPLOYBOT_LEASE_S", 1.0)),
    "action_lease_s": ("DEPLOYBOT_ACTION_LEASE_S", _float("DEPLOYBOT_ACTION_LEASE_S", 1.0)),
    "heartbeat_s": ("DEPLOYBOT_HEARTBEAT_S", _float("DEPLOYBOT_HEARTBEAT_S", 0.1)),
    "workers": ("DEPLOYBOT_WORKERS", _int("DEPLOYBOT_WORKERS", 0, 64)),
    "http_timeout_s": ("DEPLOYBOT_HTTP_TIMEOUT_S", _float("DEPLOYBOT_HTTP_TIMEOUT_S", 0.1)),
    "http_attempts": ("DEPLOYBOT_HTTP_ATTEMPTS", _int("DEPLOYBOT_HTTP_ATTEMPTS", 1, 20)),
    "retry_attempts": ("DEPLOYBOT_RETRY_ATTEMPTS", _int("DEPLOYBOT_RETRY_ATTEMPTS", 1, 100)),
    "retry_base_delay_s": (
        "DEPLOYBOT_RETRY_BASE_DELAY_S",
        _float("DEPLOYBOT_RETRY_BASE_DELAY_S", 0.01),
    ),
    "retry_max_delay_s": (
        "DEPLOYBOT_RETRY_MAX_DELAY_S",
        _float("DEPLOYBOT_RETRY_MAX_DELAY_S", 0.01),
    ),
    "http_allowed_hosts": ("DEPLOYBOT_HTTP_ALLOWED_HOSTS", _hosts),
    "retention_days": ("DEPLOYBOT_RETENTION_DAYS", _int("DEPLOYBOT_RETENTION_DAYS", 1, 3650)),
    "shutdown_timeout_s": (
        "DEPLOYBOT_SHUTDOWN_TIMEOUT_S",
        _float("DEPLOYBOT_SHUTDOWN_TIMEOUT_S", 1.0),
    ),
    "scheduler_interval_s": (
        "DEPLOYBOT_SCHEDULER_INTERVAL_S",
        _float("DEPLOYBOT_SCHEDULER_INTERVAL_S", 1.0),
    ),
    "webhooks_interval_s": (
        "DEPLOYBOT_WEBHOOKS_INTERVAL_S",
        _float("DEPLOYBOT_WEBHOOKS_INTERVAL_S", 60.0),
    ),
    "log_format": (
        "DEPLOYBOT_LOG_FORMAT",
        _choice("DEPLOYBOT_LOG_FORMAT", ("auto", "json", "text")),
    ),
    "jira_auth_mode": (
        "JIRA_AUTH_MODE",
        _choice("JIRA_AUTH_MODE", ("oauth", "connect", "secret")),
    ),
    "jira_webhook_secret": ("JIRA_WEBHOOK_SECRET", _csv),
    "forge_app_id": ("FORGE_APP_ID", _str),
    "forge_jwks_url": ("FORGE_JWKS_URL", _url("FORGE_JWKS_URL")),
    "jira_catch_up": ("JIRA_CATCH_UP", _bool("JIRA_CATCH_UP")),
    "jira_catch_up_margin_s": ("JIRA_CATCH_UP_MARGIN_S", _float("JIRA_CATCH_UP_MARGIN_S", 0.0)),
    "jira_catch_up_max_changes": (
        "JIRA_CATCH_UP_MAX_CHANGES",
        _int("JIRA_CATCH_UP_MAX_CHANGES", 1, 100_000),
    ),
    "jira_base_url": ("JIRA_BASE_URL", _url("JIRA_BASE_URL")),
    "jira_client_id": ("JIRA_CLIENT_ID", _str),
    "jira_client_secret": ("JIRA_CLIENT_SECRET", _str),
    "jira_refresh_token": ("JIRA_REFRESH_TOKEN", _str),
    "jira_token_url": ("JIRA_TOKEN_URL", _url("JIRA_TOKEN_URL")),
    "jira_connect_keys_url": ("JIRA_CONNECT_KEYS_URL", _url("JIRA_CONNECT_KEYS_URL")),
    "jira_app_key": ("JIRA_APP_KEY", _str),
    "jira_allowed_base_url_hosts": ("JIRA_ALLOWED_BASE_URL_HOSTS", _csv),
    "jira_allowed_tenants": ("JIRA_ALLOWED_TENANTS", _csv),
    "jira_epic_label_field": ("JIRA_EPIC_LABEL_FIELD", _epic_label_field),
    "ubiops_api_url": ("UBIOPS_API_URL", _url("UBIOPS_API_URL")),
    "ubiops_api_token": ("UBIOPS_API_TOKEN", _str),
    "genesys_region": ("GENESYS_REGION", _region),
    "genesys_api_url": ("GENESYS_API_URL", _url("GENESYS_API_URL")),
    "genesys_login_url": ("GENESYS_LOGIN_URL", _url("GENESYS_LOGIN_URL")),
    "genesys_client_id": ("GENESYS_CLIENT_ID", _str),
    "genesys_client_secret": ("GENESYS_CLIENT_SECRET", _str),
    "ubiops_per_minute": (
        "UBIOPS_RATE_LIMIT_PER_MINUTE",
        _int("UBIOPS_RATE_LIMIT_PER_MINUTE", 1, 1_000_000),
    ),
    "genesys_per_minute": (
        "GENESYS_RATE_LIMIT_PER_MINUTE",
        _int("GENESYS_RATE_LIMIT_PER_MINUTE", 1, 1_000_000),
    ),
    "http_proxy": ("DEPLOYBOT_HTTP_PROXY", _proxy),
    "http_proxy_user": ("DEPLOYBOT_HTTP_PROXY_USER", _str),
    "http_proxy_password": ("DEPLOYBOT_HTTP_PROXY_PASSWORD", _str),
}
assert set(_VARIABLES) == {f.name for f in fields(Settings)}, "every setting has a variable"


def from_env(env: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")) -> Settings:
    """Build the settings from `env` (default os.environ) over the `.env` file's values."""
    merged: dict[str, str] = {}
    if dotenv is not None and dotenv.is_file():
        merged.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None})
    merged.update(os.environ if env is None else env)
    values: dict[str, object] = {}
    for attr, (variable, parse) in _VARIABLES.items():
        raw = merged.get(variable, "").strip()
        if raw:
            values[attr] = parse(raw)
    settings = Settings(**values)  # type: ignore[arg-type]
    api_url, login_url = genesys_urls(
        settings.genesys_region, settings.genesys_api_url, settings.genesys_login_url
    )
    return replace(settings, genesys_api_url=api_url, genesys_login_url=login_url)
