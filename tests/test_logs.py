"""Structured logs: one line per delivery, rule match and action attempt; no secret leaks."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot import logs
from bot.db.engine import create_engine
from bot.db.queries import get_event
from bot.logs import JsonFormatter, RedactionFilter, Redactor, TextFormatter, configure
from bot.settings import Settings
from tests import test_pipeline
from tests.conftest import CLIENT_SECRET, ClientFactory
from tests.fakes.ubiops import FakeUbiOps
from tests.helpers import TOKEN, headers, issue_updated, wait_for
from tests.signing import oauth_token

rules_dir = test_pipeline.rules_dir  # fixtures shared with the pipeline tests
ubiops = test_pipeline.ubiops

ADMIN_TOKEN = "admin-token-" + "a1" * 16
REFRESH_TOKEN = "refresh-token-" + "r2" * 16
GENESYS_SECRET = "genesys-secret-" + "g3" * 16


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer abc.def.ghi", "Authorization: ***"),
        (
            "{'Authorization': 'JWT eyJ0eXAi.eyJpc3Mi.c2ln', 'X': 1}",
            "{'Authorization': '***', 'X': 1}",
        ),
        ('{"authorization":"Token 0123456789abcdef0123"}', '{"authorization":"***"}'),
        ("sent Bearer 0123456789abcdefXYZ to jira", "sent Bearer *** to jira"),
        ("token eyJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqaXJhIn0.c2lnbmF0dXJl", "token ***"),
        (
            "postgresql+asyncpg://bot:pa55word@db:5432/bot",
            "postgresql+asyncpg://bot:***@db:5432/bot",
        ),
        ("the secret is s3cr3t-v4lue!", "the secret is ***!"),
        ("JWT verification failed: token expired", "JWT verification failed: token expired"),
        ("Bearer token missing", "Bearer token missing"),
        ("Déploiement BEARER 0123456789abcdefXYZ", "Déploiement BEARER ***"),
        ("clé s3cr3t-v4lue", "clé ***"),
    ],
)
def test_redactor(text: str, expected: str) -> None:
    assert Redactor(["s3cr3t-v4lue", "s3cr3t"])(text) == expected


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.sampled_from(["Bearer ", "TOKEN ", "authorization: ", "eyJ", "://", "s3cr3t", "@", "é"])
        | st.text(max_size=20),
        max_size=8,
    ).map("".join)
)
def test_the_redactors_first_look_misses_nothing(text: str) -> None:
    redactor = Redactor(["s3cr3t"])
    if redactor(text) != text:
        assert redactor.anything(text)


def test_plain_extras_pass_untouched_and_a_token_among_them_is_masked() -> None:
    plain = _record("delivery %s", "stored", event_id=7, delivery_id="d-1", tenant="")
    assert RedactionFilter(Redactor(["s3cr3t"])).filter(plain)
    fields = vars(plain)
    assert (plain.getMessage(), fields["delivery_id"], fields["event_id"]) == (
        "delivery stored",
        "d-1",
        7,
    )
    token = "eyJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqaXJhIn0.c2ln"
    leaky = _record("delivery %s", "stored", event_id=7, delivery_id=token, issue_key="s3cr3t")
    assert RedactionFilter(Redactor(["s3cr3t"])).filter(leaky)
    line = JsonFormatter().format(leaky)
    assert token not in line and "s3cr3t" not in line and '"event_id":7' in line


def _record(msg: str, *args: object, **extra: Any) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "bot.x", "levelno": 20, "levelname": "INFO"})
    record.msg, record.args = msg, args
    record.__dict__.update(extra)
    return record


def test_filter_redacts_message_args_extras_and_traceback() -> None:
    try:
        raise RuntimeError("call failed with key s3cr3t")
    except RuntimeError:
        import sys

        exc_info = sys.exc_info()
    record = _record("calling %s", "with s3cr3t", error="s3cr3t in body", nested={"k": ["s3cr3t"]})
    record.exc_info = exc_info
    assert RedactionFilter(Redactor(["s3cr3t"])).filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "calling with ***"
    assert line["error"] == "*** in body"
    assert line["nested"] == {"k": ["***"]}
    assert "RuntimeError: call failed with key ***" in line["exc"]
    assert "s3cr3t" not in json.dumps(line)


def test_formats_carry_the_extra_fields() -> None:
    record = _record("delivery %s", "stored", event_id=7, delivery_id="d-1", issue_key=None)
    line = json.loads(JsonFormatter().format(record))
    assert {k: line[k] for k in ("level", "logger", "msg", "event_id", "delivery_id")} == {
        "level": "INFO",
        "logger": "bot.x",
        "msg": "delivery stored",
        "event_id": 7,
        "delivery_id": "d-1",
    }
    assert "issue_key" not in line  # None fields are left out
    text = TextFormatter().format(record)
    assert text.endswith("INFO    bot.x: delivery stored  event_id=7 delivery_id=d-1")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("log_format", "stream", "kind"),
    [
        ("auto", io.StringIO(), JsonFormatter),
        ("auto", _Terminal(), TextFormatter),
        ("json", _Terminal(), JsonFormatter),
        ("text", io.StringIO(), TextFormatter),
    ],
)
def test_auto_format_is_text_on_a_terminal_only(
    log_format: str, stream: io.StringIO, kind: type[logging.Formatter], restore_logging: None
) -> None:
    handler = configure(Settings(log_format=log_format), stream=stream)  # type: ignore[arg-type]
    assert isinstance(handler.formatter, kind)


async def test_real_deliveries_and_actions_log_no_secret(
    make_client: ClientFactory,
    settings: Settings,
    rules_dir: Path,
    ubiops: tuple[FakeUbiOps, str],
    restore_logging: None,
) -> None:
    every_credential: dict[str, Any] = {
        "rules_dir": rules_dir,
        "admin_token": ADMIN_TOKEN,
        "jira_client_id": "jira-client",
        "jira_client_secret": CLIENT_SECRET,
        "jira_refresh_token": REFRESH_TOKEN,
        "jira_base_url": "http://127.0.0.1:9/ex/jira/cloud",
        "jira_token_url": "http://127.0.0.1:9/oauth/token",
        "ubiops_api_url": ubiops[1],
        "ubiops_api_token": TOKEN,
        "genesys_client_id": "genesys-client",
        "genesys_client_secret": GENESYS_SECRET,
        "genesys_api_url": "http://127.0.0.1:9",
        "genesys_login_url": "http://127.0.0.1:9",
    }
    configured = Settings(**{**_fields(settings), **every_credential})
    assert len(configured.secrets) == 5
    out = io.StringIO()
    handler = configure(configured, stream=out, level=logging.DEBUG)
    client = await make_client(configured)
    sent_tokens: list[str] = []
    event_ids: list[int] = []

    async def deliver(delivery_id: str, body: dict[str, Any], token: str | None = None) -> int:
        token = token or oauth_token(CLIENT_SECRET)
        sent_tokens.append(token)
        resp = await client.post(
            "/webhooks/jira", data=json.dumps(body), headers=headers(delivery_id, token=token)
        )
        if resp.status == 202:
            event_ids.append(int((await resp.json())["event_id"]))
        status: int = resp.status
        return status

    assert await deliver("leak-1", issue_updated("OPS-80")) == 202
    assert await deliver("leak-2", issue_updated("OPS-81", deployment=None)) == 202
    assert await deliver("leak-1", issue_updated("OPS-80")) == 200
    assert (
        await deliver("leak-3", issue_updated("OPS-82"), token=oauth_token("wrong-key-" * 4)) == 401
    )
    engine = create_engine(settings.database_url)

    async def settled() -> bool:
        shown = [await get_event(engine, i) for i in event_ids]
        runs = [r["status"] for e in shown if e for r in e["action_runs"]]
        return sorted(runs) == ["dead", "skipped", "succeeded", "succeeded"]

    try:
        await wait_for(settled)
    finally:
        await engine.dispose()
    # What careless code might log: a request's headers, an exception quoting a secret.
    careless = logging.getLogger("bot.careless")
    careless.info("request headers: %s", headers("x", token=sent_tokens[0]))
    careless.warning("ubiops said: invalid token %s", TOKEN)
    try:
        raise ValueError(f"refresh failed for {REFRESH_TOKEN}")
    except ValueError:
        careless.exception("genesys login with %s", GENESYS_SECRET)

    assert "genesys login" not in out.getvalue()  # on the loop: written on its next turn
    handler.flush()
    text = out.getvalue()
    for secret in (*configured.secrets, *sent_tokens):
        assert secret not in text
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    by_msg = {line["msg"]: line for line in lines}
    assert by_msg["delivery stored"]["delivery_id"] in {"leak-1", "leak-2"}
    assert {"event_id", "issue_key", "webhook_event"} <= set(by_msg["delivery stored"])
    assert by_msg["delivery duplicate"]["delivery_id"] == "leak-1"
    assert by_msg["rule matched"]["rule"] == "roll-out"
    attempts = [line for line in lines if line["msg"].startswith("action ")]
    assert {(a["action"], a["status"]) for a in attempts} >= {
        ("ubiops.deployment_versions_create", "succeeded"),
        ("ubiops.revisions_file_upload", "succeeded"),
        ("ubiops.deployment_versions_create", "dead"),
    }
    assert all({"event_id", "rule", "attempt"} <= set(a) for a in attempts)
    assert any(m.startswith("request headers: {'Authorization': '***'") for m in by_msg)
    assert "***" in by_msg["genesys login with ***"]["exc"]


def _fields(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}


async def test_lines_logged_on_the_loop_are_written_together_on_its_next_turn(
    restore_logging: None,
) -> None:
    out = io.StringIO()
    handler = configure(Settings(log_format="json"), stream=out)
    log = logging.getLogger("bot.test")
    for i in range(3):
        log.info("line %d", i)
    assert out.getvalue() == ""
    await asyncio.sleep(0)
    assert [json.loads(line)["msg"] for line in out.getvalue().splitlines()] == [
        "line 0",
        "line 1",
        "line 2",
    ]
    # Another thread's line is written at once, after what the loop had left.
    log.info("pending")
    await asyncio.to_thread(log.info, "from a thread")
    assert [json.loads(line)["msg"] for line in out.getvalue().splitlines()][3:] == [
        "pending",
        "from a thread",
    ]
    log.info("at exit")
    handler.flush()  # what logging.shutdown() calls
    assert out.getvalue().splitlines()[-1].endswith('"msg":"at exit"}')


@pytest.fixture
def only_handler(restore_logging: None) -> tuple[logging.Handler, io.StringIO]:
    """deploybot's JSON handler as the root logger's only one (no test runner's beside it:
    pytest adds its own at the start of each phase, so the test body calls `alone`)."""
    out = io.StringIO()
    handler = configure(Settings(log_format="json", ubiops_api_token="s3cr3t-ubiops"), stream=out)
    return handler, out


def alone(handler: logging.Handler) -> None:
    logging.getLogger().handlers[:] = [handler]


async def test_hot_path_lines_are_the_lines_of_the_standard_path(
    only_handler: tuple[logging.Handler, io.StringIO],
) -> None:
    handler, out = only_handler
    alone(handler)
    log = logging.getLogger("bot.test.hot")
    assert logs._direct_handler(log) is handler  # the direct path is taken
    token = "eyJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqaXJhIn0.c2ln"
    cases: list[dict[str, Any]] = [
        {"event_id": 7, "delivery_id": "d-1", "issue_key": None, "tenant": ""},
        {"status_code": 500, "error": "answer echoed s3cr3t-ubiops back", "attempt": 2},
        {"delivery_id": token, "ratio": 0.5},
        {"nested": {"k": ["s3cr3t-ubiops"]}, "raw": b"Bearer 0123456789abcdefXYZ"},
    ]
    for fields in cases:
        logs.info(log, "action failed", **fields)
        log.info("action failed", extra=fields)
    handler.flush()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 2 * len(cases)
    for direct, standard in zip(lines[::2], lines[1::2], strict=True):
        assert direct.pop("ts")[:16] == standard.pop("ts")[:16]  # same minute: same clock
        assert direct == standard
    assert "s3cr3t" not in out.getvalue() and token not in out.getvalue()
    assert "0123456789abcdefXYZ" not in out.getvalue()


async def test_hot_path_lines_reach_every_other_handler_through_logging(
    only_handler: tuple[logging.Handler, io.StringIO], caplog: pytest.LogCaptureFixture
) -> None:
    handler, out = only_handler
    alone(handler)
    log = logging.getLogger("bot.test.hot")
    logging.getLogger().addHandler(caplog.handler)
    assert logs._direct_handler(log) is None
    logs.info(log, "delivery stored", event_id=3)
    handler.flush()
    assert [(r.getMessage(), getattr(r, "event_id", None)) for r in caplog.records] == [
        ("delivery stored", 3)
    ]
    assert json.loads(out.getvalue())["event_id"] == 3  # and deploybot's handler too
    logging.getLogger().removeHandler(caplog.handler)
    for blocked in (logging.WARNING, logging.NOTSET):
        log.setLevel(blocked)  # NOTSET: the root's level decides again
        logs.info(log, "not at warning")
    handler.flush()
    assert [json.loads(line)["msg"] for line in out.getvalue().splitlines()] == [
        "delivery stored",
        "not at warning",
    ]


class _Broken(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("stream closed")


def test_a_broken_stream_does_not_fail_the_caller(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = configure(Settings(log_format="json"), stream=_Broken())
    alone(handler)
    log = logging.getLogger("bot.test.hot")
    assert logs._direct_handler(log) is handler
    logs.info(log, "delivery stored", event_id=1)  # no event loop here: written at once
    log.info("the standard path", extra={"event_id": 2})
    assert capsys.readouterr().err.count("OSError: stream closed") == 2  # reported, not raised
