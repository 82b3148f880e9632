"""Logging: JSON lines (or human text on a terminal), with every secret redacted.

Records carry context through `extra=` (event_id, delivery_id, issue_key, rule, action,
...); both formats print those fields. The redaction filter sits on the handler, so it
sees every record whatever logger it came from, before any formatter renders it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from bot.settings import Settings

MASK = "***"
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# Token text that must never reach a log, whatever configured secrets are.
_TOKEN_PATTERNS = (
    # An Authorization header's value, in header, dict or repr form.
    r"(?i)(?<=authorization)(['\"]?\s*[:=]\s*['\"]?)[^'\"\r\n,}]+",
    # A credential after its scheme; long enough not to eat prose ("JWT verification").
    r"(?i)\b((?:bearer|jwt|token|basic)\s+)[A-Za-z0-9\-._~+/]{16,}=*",
    # A bare JWT anywhere ("eyJ" is the base64url of '{"').
    r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*",
    # The password of a URL such as postgresql+asyncpg://user:password@host/db.
    r"(?<=://)([^:/@\s]+:)[^@\s]+(?=@)",
)


# Literals every pattern above needs (`authorization`, a scheme, `eyJ`, `://`).
_CLUES_ANY_CASE = ("authorization", "bearer", "jwt", "token", "basic")
_CLUES = ("eyJ", "://")


def _scoped(pattern: str) -> str:
    """`pattern` as a group of an alternation (a leading `(?i)` becomes `(?i:...)`)."""
    if pattern.startswith("(?i)"):
        return f"(?i:{pattern[4:]})"
    return f"(?:{pattern})"


class Redactor:
    """Replace configured secrets and token-like text with `***`."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a secret containing another is masked whole.
        literal = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._secrets = re.compile("|".join(map(re.escape, literal))) if literal else None
        self._tokens = [re.compile(p) for p in _TOKEN_PATTERNS]
        # Most text (identifiers, issue keys, event names) has nothing to mask. No pattern
        # matches without one of these literals in the text, and looking for literals is
        # far cheaper than running the patterns (see `anything`).
        self._clues = (*_CLUES, *literal)
        self._anything = re.compile(
            "|".join([*map(_scoped, _TOKEN_PATTERNS), *map(re.escape, literal)])
        )

    def anything(self, text: str) -> bool:
        """Whether `text` may hold something to mask (a cheap first look, never a miss)."""
        if any(clue in text for clue in self._clues):
            return True
        if text.isascii():  # str.lower() and the patterns' (?i) agree on ASCII
            lowered = text.lower()
            return any(word in lowered for word in _CLUES_ANY_CASE)
        return self._anything.search(text) is not None

    def __call__(self, text: str) -> str:
        if not self.anything(text):
            return text
        # Token shapes first: a short secret masked inside a token would hide its shape.
        for pattern in self._tokens:
            text = pattern.sub(lambda m: (m.group(1) if m.re.groups else "") + MASK, text)
        if self._secrets is not None:
            text = self._secrets.sub(MASK, text)
        return text

    def value(self, value: Any) -> Any:
        """Redact strings inside a value (dicts, lists and tuples walked)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        if isinstance(value, bytes):
            return self(value.decode("utf-8", "replace"))
        return value


class RedactionFilter(logging.Filter):
    """Rewrite each record with its message, extras and traceback redacted."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string still gets logged, redacted
            message = f"{record.msg!r} {record.args!r}"
        fields = extra_fields(record)
        record.msg, extras = self.redact(message, fields)
        record.args = None
        if extras is not fields:
            vars(record).update(extras)
        record._extras = extras  # the formatters' copy (a "_" name is not an extra field)
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._redact(record.exc_text)
        record.exc_info = None  # the formatters print the redacted exc_text instead
        if record.stack_info:
            record.stack_info = self._redact(record.stack_info)
        return True

    def redact(self, message: str, fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Return message and fields redacted (the same objects when nothing is to mask)."""
        # Most records (a delivery stored, an action done) carry identifiers and numbers
        # with nothing to mask: one search over all their text says so. A match inside
        # one of the texts is a match in the joined text, so nothing is missed.
        texts = [message]
        for value in fields.values():
            if isinstance(value, str):
                texts.append(value)
            elif not (value is None or isinstance(value, int | float)):
                break  # bytes, containers, objects: redact value by value
        else:
            if not self._redact.anything("\n".join(texts)):
                return message, fields
        return self._redact(message), {k: self._redact.value(v) for k, v in fields.items()}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Return the fields a record got through `extra=`."""
    found: dict[str, Any] | None = getattr(record, "_extras", None)  # set by the filter
    if found is not None:
        return found
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and k[0] != "_"}


_last_stamp: tuple[int, str] = (-1, "")  # (whole milliseconds, their ISO text)


def _timestamp(created: float) -> str:
    """A record's time in ISO 8601 (UTC, milliseconds); records of one millisecond share it."""
    global _last_stamp
    millis = round(created * 1_000_000) // 1000  # as datetime rounds, then truncates
    last = _last_stamp  # one read: another thread may replace it meanwhile
    if last[0] == millis:
        return last[1]
    second = datetime.fromtimestamp(millis // 1000, UTC)
    stamp = second.replace(microsecond=millis % 1000 * 1000).isoformat(timespec="milliseconds")
    _last_stamp = (millis, stamp)
    return stamp


def json_line(
    created: float, level: str, logger: str, message: str, fields: dict[str, Any]
) -> dict[str, Any]:
    """A JSON line's object: ts, level, logger, msg, then the fields that are not None."""
    line: dict[str, Any] = {
        "ts": _timestamp(created),
        "level": level,
        "logger": logger,
        "msg": message,
    }
    line.update((k, v) for k, v in fields.items() if v is not None)
    return line


def _dumps(line: dict[str, Any]) -> str:
    return orjson.dumps(line, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line = json_line(
            record.created, record.levelname, record.name, record.getMessage(),
            extra_fields(record),
        )  # fmt: skip
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return _dumps(line)


class TextFormatter(logging.Formatter):
    """Human text: time, level, logger, message, then the extra fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = " ".join(f"{k}={v}" for k, v in extra_fields(record).items() if v is not None)
        if not extras:
            return text
        head, newline, rest = text.partition("\n")  # fields stay on the message's line
        return f"{head}  {extras}{newline}{rest}"


class _Handler(logging.StreamHandler[IO[str]]):
    """deploybot's own handler, told apart from others (a test runner's) on reconfigure.

    On the event loop's thread, lines are written once per loop iteration, together:
    a write is a system call that gives up the GIL, and taking it back from the SQLite
    write thread cost the loop more than the line itself (py-spy: a fifth of a
    delivery's time went to its log line under load). A line waits at most until the
    loop's next turn; `flush()` (called by `logging.shutdown` at exit) writes the rest.
    Other threads write at once.
    """

    def __init__(self, stream: IO[str] | None) -> None:
        super().__init__(stream or sys.stderr)
        self._follow_stderr = stream is None  # sys.stderr may be swapped later (tests)
        self._pending: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None  # loop a flush is due on

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except Exception:
            self.handleError(record)

    def write_line(self, line: str) -> None:
        """Write a formatted line: on the event loop's thread at its next turn, else now."""
        if self._follow_stderr:
            self.stream = sys.stderr
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            with self.lock:  # type: ignore[union-attr]  # StreamHandler always has one
                self.flush()  # what the loop left, first
                self.stream.write(line + self.terminator)
                self.stream.flush()
            return
        if self._flush_on is not loop:  # (a loop closed before its turn left none due)
            self._flush_on = loop
            loop.call_soon(self.flush)
        self._pending.append(line + self.terminator)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # StreamHandler always has one
            self._flush_on = None
            if self._pending:
                lines, self._pending = "".join(self._pending), []
                self.stream.write(lines)
            super().flush()


_configured: _Handler | None = None  # the handler `configure` installed last


def _direct_handler(logger: logging.Logger) -> _Handler | None:
    """deploybot's JSON handler, if a record of `logger` at INFO would reach it alone."""
    handler = _configured
    if (
        handler is None
        or not logger.isEnabledFor(logging.INFO)
        or handler.level > logging.INFO
        or type(handler.formatter) is not JsonFormatter
        or len(handler.filters) != 1
        or not isinstance(handler.filters[0], RedactionFilter)
    ):
        return None
    node = logger
    while node.parent is not None:
        if node.handlers or node.filters or not node.propagate or node.disabled:
            return None
        node = node.parent
    if node.filters or node.handlers != [handler]:
        return None
    return handler


def info(logger: logging.Logger, message: str, **fields: Any) -> None:
    """Log `message` at INFO with `fields`: the line `logger.info(message, extra=fields)`
    writes, at a fraction of its cost.

    For the lines of the hot paths (a delivery, a rule match, an action attempt): when
    deploybot's JSON handler is the only one the record would reach, the line goes to it
    straight, redacted the same way, without a LogRecord, the caller's frame lookup or
    the logging machinery (docs/performance.md), the same line (tests/test_logs.py).
    Anything else (another handler, text format) takes the standard path.
    """
    handler = _direct_handler(logger)
    if handler is None:
        logger.info(message, extra=fields)
        return
    redaction = handler.filters[0]
    assert isinstance(redaction, RedactionFilter)
    message, fields = redaction.redact(message, fields)
    try:
        handler.write_line(_dumps(json_line(time.time(), "INFO", logger.name, message, fields)))
    except Exception:  # as logging does: a broken stream is reported, not raised
        handler.handleError(logging.makeLogRecord({"name": logger.name, "msg": message}))


def make_formatter(log_format: str, stream: IO[str]) -> logging.Formatter:
    """Pick the formatter: `auto` means text on a terminal, JSON otherwise."""
    use_text = log_format == "text" or (log_format == "auto" and stream.isatty())
    return TextFormatter() if use_text else JsonFormatter()


def configure(
    settings: Settings, *, stream: IO[str] | None = None, level: int = logging.INFO
) -> logging.Handler:
    """Send every log record to `stream` (stderr), formatted and redacted; return the handler."""
    # Fields neither format prints: gathering them made every record dearer.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = _Handler(stream)
    handler.setFormatter(make_formatter(settings.log_format, stream or sys.stderr))
    handler.addFilter(RedactionFilter(Redactor(settings.secrets)))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)  # configured again (tests call main() repeatedly)
    root.addHandler(handler)
    root.setLevel(level)
    global _configured
    _configured = handler
    return handler
