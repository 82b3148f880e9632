"""Settings: names from CONTRACT.md, defaults, `.env`, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.errors import SettingsError
from bot.settings import from_env


def test_defaults() -> None:
    s = from_env({}, dotenv=None)
    assert s.database_url == "sqlite+aiosqlite:///./deploybot.db"
    assert s.rules_dir == Path("./rules")
    assert (s.host, s.port) == ("0.0.0.0", 8080)
    assert s.jira_auth_mode == "oauth"
    assert s.jira_token_url == "https://auth.atlassian.com/oauth/token"
    assert s.jira_connect_keys_url == "https://connect-install-keys.atlassian.com"
    assert s.ubiops_api_url == "https://api.ubiops.com/v2.1"
    assert s.genesys_api_url == "https://api.mypurecloud.com"
    assert s.genesys_login_url == "https://login.mypurecloud.com"
    assert s.max_body_bytes == 1024 * 1024


def test_values_and_region() -> None:
    s = from_env(
        {
            "DEPLOYBOT_PORT": "9000",
            "JIRA_AUTH_MODE": "connect",
            "GENESYS_REGION": "mypurecloud.de",
            "DEPLOYBOT_PUBLIC_URL": "https://bot.example.com/",
            "UBIOPS_API_TOKEN": "tok-secret",
        },
        dotenv=None,
    )
    assert s.port == 9000
    assert s.jira_auth_mode == "connect"
    assert s.genesys_api_url == "https://api.mypurecloud.de"
    assert s.genesys_login_url == "https://login.mypurecloud.de"
    assert s.public_url == "https://bot.example.com"
    assert "tok-secret" not in repr(s)
    assert s.secrets == ("tok-secret",)


def test_dotenv_is_read_and_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("DEPLOYBOT_PORT=7000\nDEPLOYBOT_HOST=127.0.0.1\n")
    s = from_env({"DEPLOYBOT_PORT": "7001"}, dotenv=env_file)
    assert (s.host, s.port) == ("127.0.0.1", 7001)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("DEPLOYBOT_PORT", "eighty", "DEPLOYBOT_PORT must be a whole number"),
        ("DEPLOYBOT_PORT", "70000", "between 0 and 65535"),
        ("JIRA_AUTH_MODE", "basic", "JIRA_AUTH_MODE must be one of oauth, connect"),
        ("DEPLOYBOT_DATABASE_URL", "mysql://x", "DEPLOYBOT_DATABASE_URL must start with"),
        ("GENESYS_REGION", "mypurecloud.moon", "not a Genesys Cloud region"),
        ("DEPLOYBOT_PUBLIC_URL", "bot.example.com", "absolute http/https URL"),
        ("DEPLOYBOT_MAX_BODY_BYTES", "-1", "DEPLOYBOT_MAX_BODY_BYTES"),
        ("UBIOPS_RATE_LIMIT_PER_MINUTE", "0", "between 1 and"),
        ("GENESYS_RATE_LIMIT_PER_MINUTE", "many", "must be a whole number"),
    ],
)
def test_invalid_values_are_clear_errors(variable: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        from_env({variable: value}, dotenv=None)


def test_missing_credentials_are_warned_about() -> None:
    off = from_env({}, dotenv=None).disabled_features()
    assert any("UBIOPS_API_TOKEN" in line for line in off)
    assert any("GENESYS_CLIENT_ID" in line for line in off)
    assert any("JIRA_CLIENT_SECRET" in line for line in off)
