"""What an operator sees when something around deploybot is wrong: one line naming the
setting (no traceback), the start-up line, alembic's noise gone, refused deliveries
logged once a minute with the reason."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bot.settings import Settings
from bot.web.jira import Rejections
from tests.conftest import PG_URL_ENV, ClientFactory
from tests.helpers import PAYLOAD, headers

ROOT = Path(__file__).resolve().parent.parent


def deploybot(*argv: str, timeout_s: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DEPLOYBOT_", "JIRA_"))}
    return subprocess.run(
        [sys.executable, "-m", "bot", *argv],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        env={**clean, "DEPLOYBOT_LOG_FORMAT": "json", **env},
    )


def only_line(stderr: str) -> str:
    """The one line not a JSON log record, and no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    plain = [line for line in stderr.splitlines() if not line.startswith("{")]
    assert len(plain) == 1, stderr
    return plain[0]


def test_sqlite_folder_missing(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/nowhere/deploybot.db"
    for command in (["db", "upgrade"], ["events", "list"], ["serve"]):
        done = deploybot(*command, DEPLOYBOT_DATABASE_URL=url, DEPLOYBOT_PORT="0")
        assert done.returncode == 2
        line = only_line(done.stderr)
        assert f"the folder {tmp_path}/nowhere does not exist" in line
        assert line.endswith("(DEPLOYBOT_DATABASE_URL)")


def test_database_unreachable_names_the_setting_without_the_password() -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    url = f"postgresql+asyncpg://deploybot:hunter2@127.0.0.1:{port}/deploybot"
    done = deploybot("db", "upgrade", DEPLOYBOT_DATABASE_URL=url)
    assert done.returncode == 1
    line = only_line(done.stderr)
    assert line.startswith("deploybot: cannot reach the database postgresql+asyncpg://")
    assert "deploybot:***@" in line and "hunter2" not in done.stderr
    assert line.endswith("(DEPLOYBOT_DATABASE_URL)")


@pytest.mark.skipif(not os.environ.get(PG_URL_ENV), reason=f"needs {PG_URL_ENV}")
def test_missing_postgres_database() -> None:
    base = os.environ[PG_URL_ENV]
    missing = base.rsplit("/", 1)[0] + "/deploybot_h21_does_not_exist"
    done = deploybot("db", "upgrade", DEPLOYBOT_DATABASE_URL=missing)
    assert done.returncode == 1
    assert "the database does not exist" in only_line(done.stderr)


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = deploybot(
            "serve",
            DEPLOYBOT_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/d.db",
            DEPLOYBOT_HOST="127.0.0.1",
            DEPLOYBOT_PORT=str(port),
        )
    assert done.returncode == 1
    assert only_line(done.stderr) == (
        f"deploybot: cannot listen on 127.0.0.1:{port}: address already in use "
        "(DEPLOYBOT_HOST, DEPLOYBOT_PORT)"
    )


def test_commands_do_not_print_alembic_dialect_lines(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/d.db"
    first = deploybot("db", "upgrade", DEPLOYBOT_DATABASE_URL=url)
    assert first.returncode == 0 and "Running upgrade" in first.stderr  # what it applies
    again = deploybot("events", "list", DEPLOYBOT_DATABASE_URL=url)
    assert again.returncode == 0
    for noise in ("Context impl", "non-transactional DDL"):
        assert noise not in first.stderr + again.stderr


def test_start_up_line_says_what_is_in_use(tmp_path: Path) -> None:
    settings = Settings(
        database_url="postgresql+asyncpg://bot:s3cret@db.internal:5432/deploybot",
        rules_dir=tmp_path,
        admin_token="x" * 32,
        jira_auth_mode="connect",
    )
    line = settings.in_use()
    assert "postgresql+asyncpg://bot:***@db.internal:5432/deploybot" in line
    assert "s3cret" not in line and str(tmp_path) in line
    assert "Jira auth mode connect" in line and "admin API on" in line


def test_rejections_are_logged_at_most_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    rejections = Rejections()
    with caplog.at_level(logging.WARNING, logger="bot.web.jira"):
        rejections.note("token expired", 401, "10.0.0.1", now=1000.0)
        rejections.note("token expired", 401, "10.0.0.1", now=1010.0)
        rejections.note("bad signature", 401, "10.0.0.2", now=1059.0)
        rejections.note("bad signature", 401, "10.0.0.2", now=1061.0)
    assert [r.getMessage() for r in caplog.records] == [
        "delivery refused (401): token expired",
        "delivery refused (401): bad signature (2 more refused since the last warning)",
    ]


async def test_a_refused_delivery_is_logged_with_its_reason(
    make_client: ClientFactory, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client(settings)
    with caplog.at_level(logging.WARNING, logger="bot.web.jira"):
        for n in range(3):
            refused = await client.post(
                "/webhooks/jira",
                data=json.dumps(PAYLOAD),
                headers=headers(f"bad-{n}", token="not-a-jwt"),
            )
            assert refused.status == 401
    warnings = [r for r in caplog.records if r.name == "bot.web.jira"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert warnings[0].getMessage().startswith("delivery refused (401): ")
    assert "not-a-jwt" not in caplog.text
