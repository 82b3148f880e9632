"""Status page sessions: expiring cookies that logout revokes, and a throttled login.

The cookie is `<issued>.<nonce>.<HMAC(admin token, issued and nonce)>`: derived from the
token (never the token itself), valid SESSION_TTL_S, and refused once its holder logs
out. Revocations are kept in this process until the cookie would have expired anyway;
with several replicas a copied cookie stays good on the others until then. Failed logins
draw from a token bucket per client address, so guessing the admin token is slow.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict

from aiohttp import web

SESSION_TTL_S = 12 * 3600
LOGIN_BURST = 10  # failed logins in a row from one address ...
LOGIN_REFILL_S = 6.0  # ... then one more every 6 s
MAX_TRACKED = 4096  # addresses and revoked cookies held, oldest dropped first
_MAX_ISSUED_DIGITS = 12


class Sessions:
    """The session cookies of one admin token, and the login throttle."""

    def __init__(self, admin_token: str) -> None:
        self._key = admin_token.encode()
        self._revoked: OrderedDict[str, float] = OrderedDict()  # cookie -> when it expires
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def _mac(self, issued: int, nonce: str) -> str:
        message = f"deploybot:session:{issued}:{nonce}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def issue(self, now: float) -> str:
        # A nonce of its own: logging out revokes this login, not one made the same second.
        issued, nonce = int(now), secrets.token_hex(8)
        return f"{issued}.{nonce}.{self._mac(issued, nonce)}"

    def valid(self, cookie: str | None, now: float) -> bool:
        """Tell whether `cookie` is one we issued, not expired and not logged out."""
        if not cookie or not cookie.isascii() or cookie in self._revoked:
            return False
        issued_text, _, rest = cookie.partition(".")
        nonce, _, mac = rest.partition(".")
        if not issued_text.isdigit() or len(issued_text) > _MAX_ISSUED_DIGITS:
            return False
        issued = int(issued_text)
        if not issued - 60 <= now <= issued + SESSION_TTL_S:
            return False
        return hmac.compare_digest(mac.encode(), self._mac(issued, nonce).encode())

    def revoke(self, cookie: str | None, now: float) -> None:
        if not self.valid(cookie, now):
            return
        assert cookie is not None
        for stale in [c for c, expires in self._revoked.items() if expires < now]:
            del self._revoked[stale]
        self._revoked[cookie] = int(cookie.partition(".")[0]) + SESSION_TTL_S
        while len(self._revoked) > MAX_TRACKED:
            self._revoked.popitem(last=False)

    def _tokens(self, address: str, now: float) -> float:
        tokens, at = self._buckets.get(address, (float(LOGIN_BURST), now))
        return min(float(LOGIN_BURST), tokens + (now - at) / LOGIN_REFILL_S)

    def login_wait_s(self, address: str, now: float) -> float:
        """Seconds until `address` may try a login again (0: now)."""
        tokens = self._tokens(address, now)
        return 0.0 if tokens >= 1 else (1 - tokens) * LOGIN_REFILL_S

    def login_failed(self, address: str, now: float) -> None:
        self._buckets[address] = (self._tokens(address, now) - 1, now)
        self._buckets.move_to_end(address)
        while len(self._buckets) > MAX_TRACKED:
            self._buckets.popitem(last=False)


SESSIONS = web.AppKey("sessions", Sessions)
