"""Delivery parsing: the identifier is taken as sent, apart from HTTP whitespace; text
stored in columns is printable (PostgreSQL refuses a NUL in text)."""

from __future__ import annotations

import json

import pytest

from bot.core.delivery import parse_delivery
from bot.errors import PayloadError

HEADERS = {"Content-Type": "application/json"}
BODY = b'{"webhookEvent": "jira:issue_updated"}'


def test_only_http_whitespace_is_trimmed_from_a_delivery_identifier() -> None:
    assert parse_delivery(HEADERS, BODY, delivery_id=" \tid-1\t ").delivery_id == "id-1"


@pytest.mark.parametrize("ident", ["id\x85", "\xa0id", "id\u2028"])
def test_unicode_space_is_not_trimmed_into_another_identifier(ident: str) -> None:
    # "id\x85" stripped would dedupe against a genuine "id": it is refused instead.
    with pytest.raises(PayloadError, match="not a valid identifier"):
        parse_delivery(HEADERS, BODY, delivery_id=ident)


def test_an_unprintable_event_name_is_refused() -> None:
    with pytest.raises(PayloadError, match="not a valid event name"):
        parse_delivery(HEADERS, b'{"webhookEvent": "jira:issue_updated\\u0000"}', delivery_id="x")


@pytest.mark.parametrize("key", ["OPS-1\x00", "OPS\n1", "K" * 256, 42])
def test_an_odd_issue_key_is_no_key_and_the_body_keeps_it(key: object) -> None:
    body = json.dumps({"webhookEvent": "jira:issue_updated", "issue": {"key": key}}).encode()
    delivery = parse_delivery(HEADERS, body, delivery_id="x")
    assert delivery.issue_key is None and delivery.body == body
    ok = json.dumps({"webhookEvent": "jira:issue_updated", "issue": {"key": "OPS-1"}})
    assert parse_delivery(HEADERS, ok.encode(), delivery_id="x").issue_key == "OPS-1"
