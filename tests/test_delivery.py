"""Delivery parsing: the identifier is taken as sent, apart from HTTP whitespace."""

from __future__ import annotations

import pytest

from bot.delivery import parse_delivery
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
