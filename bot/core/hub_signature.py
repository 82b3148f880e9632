"""Admin webhooks signed with a secret: `X-Hub-Signature: sha256=<hex HMAC of the body>`.

Pure: the web layer reads the body (within the size limit) and passes it here before
anything parses or stores it. Jira Cloud signs the deliveries of webhooks an administrator
registers with a secret (settings page or REST, since February 2024):
https://developer.atlassian.com/cloud/jira/platform/webhooks/#secure-admin-webhooks
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from bot.errors import VerificationError

SIGNATURE_HEADER = "X-Hub-Signature"
_PREFIX = "sha256="
_HEX_CHARS = 64


def sign(body: bytes, secret: str) -> str:
    """The header value Jira sends for `body` signed with `secret`."""
    return _PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_hub_signature(header: str | None, body: bytes, secrets: Sequence[str]) -> None:
    """Refuse a delivery whose signature is not `body`'s under one of `secrets`.

    Several secrets are accepted during a rotation. Every one is compared in constant
    time, and all of them are tried, so the time taken does not tell which one came close.
    """
    if not secrets:
        raise VerificationError("deliveries are not accepted: no webhook secret configured")
    if not header:
        raise VerificationError(f"missing {SIGNATURE_HEADER} header")
    value = header.strip()
    if not value.lower().startswith(_PREFIX):
        raise VerificationError(f"{SIGNATURE_HEADER} must be sha256=<hex>")
    given = value[len(_PREFIX) :].lower()
    if len(given) != _HEX_CHARS or not given.isascii():
        raise VerificationError(f"{SIGNATURE_HEADER} must be sha256=<64 hex digits>")
    matched = False
    for secret in secrets:
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        matched |= hmac.compare_digest(expected, given)
    if not matched:
        raise VerificationError(f"{SIGNATURE_HEADER} does not match the body")
