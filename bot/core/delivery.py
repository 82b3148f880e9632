"""Parsing of a Jira delivery: a pure function of its headers and body bytes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from bot.core.text import MAX_ID_CHARS, is_identifier
from bot.errors import PayloadError, UnsupportedMediaType

DELIVERY_ID_HEADER = "X-Atlassian-Webhook-Identifier"
RETRY_HEADER = "X-Atlassian-Webhook-Retry"


@dataclass(frozen=True, slots=True)
class Delivery:
    """A parsed, not yet stored, Jira webhook delivery."""

    delivery_id: str
    retry_count: int
    webhook_event: str
    issue_key: str | None
    body: bytes


def is_json_content_type(content_type: str | None) -> bool:
    """Tell whether a Content-Type header names JSON (`application/json; charset=...`)."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def parse_payload(body: bytes) -> dict[str, Any]:
    """Decode a delivery body: a JSON object with a string `webhookEvent`."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise PayloadError("body must be a JSON object")
    event = payload.get("webhookEvent")
    # Printable, as the identifier: stored as text, and PostgreSQL refuses a NUL in text
    # (that refusal would fail every delivery committed in the same batch).
    if not isinstance(event, str) or not event or len(event) > MAX_ID_CHARS:
        raise PayloadError("body has no webhookEvent")
    if not event.isprintable():
        raise PayloadError("webhookEvent is not a valid event name")
    return payload


def parse_delivery(
    headers: Mapping[str, str], body: bytes, *, delivery_id: str | None = None
) -> Delivery:
    """Check and parse a delivery; `delivery_id` overrides the header (failed-webhook replay)."""
    if not is_json_content_type(headers.get("Content-Type")):
        raise UnsupportedMediaType("Content-Type must be application/json")
    ident = delivery_id if delivery_id is not None else headers.get(DELIVERY_ID_HEADER, "")
    ident = ident.strip(" \t")  # HTTP whitespace only: "id\x85" is not "id"
    if not ident:
        raise PayloadError(f"missing {DELIVERY_ID_HEADER} header")
    if not is_identifier(ident):
        raise PayloadError(f"{DELIVERY_ID_HEADER} is not a valid identifier")
    retry_raw = headers.get(RETRY_HEADER, "0").strip() or "0"
    # Jira counts in ASCII digits; anything else ("²", 5,000 digits) counts as no retry.
    ascii_digits = retry_raw.isascii() and retry_raw.isdigit() and len(retry_raw) < 6
    retry_count = int(retry_raw) if ascii_digits else 0
    payload = parse_payload(body)
    issue = payload.get("issue")
    key = issue.get("key") if isinstance(issue, dict) else None
    return Delivery(
        delivery_id=ident,
        retry_count=retry_count,
        webhook_event=payload["webhookEvent"],
        # The key is an index column only (the body keeps the whole issue): none if odd.
        issue_key=key if is_identifier(key) else None,
        body=body,
    )
