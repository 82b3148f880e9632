"""Make values storable on every engine: PostgreSQL refuses a NUL in text, and no
driver encodes a lone surrogate (both can come from Jira fields or API answers)."""

from __future__ import annotations

from typing import Any

import orjson

REPLACEMENT = "\ufffd"  # what takes the place of a character no engine can store


def clean_text(text: str) -> str:
    """`text` with NULs and lone surrogates replaced by U+FFFD."""
    if text.isascii():
        if "\x00" not in text:
            return text  # the common case, and cheap
        return text.replace("\x00", REPLACEMENT)
    text = text.replace("\x00", REPLACEMENT)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join(REPLACEMENT if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def clean_value(value: Any) -> Any:
    """`value` (text or a JSON value: keys, lists, nested) with every text cleaned."""
    if isinstance(value, dict | list):
        # One pass in C for the common case: orjson refuses a lone surrogate and writes a
        # NUL as \u0000, so a value it encodes without one is clean as it is.
        try:
            if b"\\u0000" not in orjson.dumps(value):
                return value
        except (TypeError, orjson.JSONEncodeError):
            pass  # a surrogate, or not plain JSON: walk it
    return _cleaned(value)


def _cleaned(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(k) if isinstance(k, str) else k: _cleaned(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_cleaned(item) for item in value]
    return value
