"""Checks of text from outside that becomes a key or an identifier column."""

from __future__ import annotations

# The identifier columns' width (delivery ids, client keys, issue keys).
MAX_ID_CHARS = 255


def is_identifier(value: object) -> bool:
    """A printable string of at most MAX_ID_CHARS: fit for an identifier column on both
    engines (PostgreSQL refuses a NUL in text) and for a log line."""
    return isinstance(value, str) and len(value) <= MAX_ID_CHARS and value.isprintable()
