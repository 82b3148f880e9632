"""Verification of Jira's signed requests: a pure function of the request and the keys.

Nothing here does I/O or imports aiohttp; the web layer passes method, path, query and
the Authorization header, and maps `VerificationError` to 401.

Connect JWT and qsh: https://developer.atlassian.com/cloud/jira/platform/understanding-jwt-for-connect-apps/
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import jwt

from bot.core.text import is_identifier
from bot.errors import VerificationError

LEEWAY_S = 30
# A lifecycle callback's token is refused once older than this (`iat`): with its replay
# refused as well (seen-token store), a captured token cannot be sent again with a body
# of the sender's choosing.
LIFECYCLE_MAX_AGE_S = 300
# How far ahead `exp` may be: a leaked token valid until 9999 would be a key for ever.
# Jira's Connect tokens live 3 minutes: an hour is plenty. OAuth 2.0 delivery tokens are
# not documented as short: a day (the longest seen in practice, bench/harness.py).
CONNECT_MAX_LIFETIME_S = 3600
OAUTH_MAX_LIFETIME_S = 24 * 3600
CONTEXT_QSH = "context-qsh"
_KID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

QueryPairs = Iterable[tuple[str, str]]
# (token, key, algorithm, audience, required claims) of a verified token
_CacheKey = tuple[str, str, str, str | None, tuple[str, ...]]


def _rfc3986(text: str) -> str:
    return quote(text, safe="~")


def canonical_request(method: str, path: str, query: QueryPairs) -> str:
    """Return Atlassian's canonical form `METHOD&path&query` of a request."""
    canon_path = path if path.startswith("/") else "/" + path
    if len(canon_path) > 1:
        canon_path = canon_path.rstrip("/") or "/"
    canon_path = canon_path.replace("&", "%26")
    grouped: dict[str, list[str]] = {}
    for key, value in query:
        if key == "jwt":
            continue
        grouped.setdefault(_rfc3986(key), []).append(_rfc3986(value))
    canon_query = "&".join(
        f"{key}={','.join(sorted(values))}" for key, values in sorted(grouped.items())
    )
    return f"{method.upper()}&{canon_path}&{canon_query}"


def query_string_hash(method: str, path: str, query: QueryPairs) -> str:
    """Return the `qsh` claim of a request: SHA-256 hex of its canonical form."""
    return hashlib.sha256(canonical_request(method, path, query).encode()).hexdigest()


def relative_path(path: str, base_path: str) -> str:
    """Return `path` relative to the app base URL's path (qsh is computed on that)."""
    base = base_path.rstrip("/")
    if base and (path == base or path.startswith(base + "/")):
        return path[len(base) :] or "/"
    return path


def _token(authorization: str | None, scheme: str) -> str:
    if not authorization:
        raise VerificationError("missing Authorization header")
    found, _, token = authorization.partition(" ")
    if found.lower() != scheme.lower() or not token.strip():
        raise VerificationError(f"expected Authorization: {scheme} <token>")
    return token.strip()


def _unverified_header(token: str) -> dict[str, Any]:
    try:
        return jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise VerificationError("malformed token") from exc


def _decode(
    token: str,
    key: Any,
    algorithm: str,
    *,
    now: float,
    audience: str | None = None,
    require: tuple[str, ...] = ("exp",),
    max_lifetime_s: float = CONNECT_MAX_LIFETIME_S,
) -> dict[str, Any]:
    # Jira signs a token once and sends it with many deliveries: a token whose signature
    # and claims were verified with these same parameters need not be verified again.
    # The time checks still run on every request, against the caller's clock.
    cache_key: _CacheKey | None = None
    claims: dict[str, Any] | None = None
    if isinstance(key, str):
        cache_key = (token, key, algorithm, audience, require)
        claims = _VERIFIED.get(cache_key)
    if claims is None:
        claims = _verify_signature(token, key, algorithm, audience=audience, require=require)
    _check_times(claims, now, max_lifetime_s)
    if cache_key is not None:
        _remember(cache_key, claims, now)
    return dict(claims)  # a copy: callers may not alter what the cache holds


def _verify_signature(
    token: str, key: Any, algorithm: str, *, audience: str | None, require: tuple[str, ...]
) -> dict[str, Any]:
    header = _unverified_header(token)
    if header.get("alg") != algorithm:
        raise VerificationError(f"token algorithm must be {algorithm}")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            leeway=LEEWAY_S,
            audience=audience,
            # `aud` is only meaningful for signed installs; deliveries may carry any.
            options={
                "require": list(require),
                "verify_iat": False,
                "verify_aud": audience is not None,
            },
        )
    except jwt.ExpiredSignatureError as exc:
        raise VerificationError("token expired") from exc
    except jwt.InvalidSignatureError as exc:
        raise VerificationError("bad token signature") from exc
    except jwt.PyJWTError as exc:
        raise VerificationError(f"invalid token: {exc}") from exc
    return claims


def _check_times(claims: Mapping[str, Any], now: float, max_lifetime_s: float) -> None:
    """Refuse a token expired, not yet valid, or issued in the future at `now`."""
    # PyJWT checks exp and nbf against the wall clock once; these run on every request,
    # cached or not, against the caller's clock (deterministic tests and replays).
    exp = float(claims["exp"])
    if exp + LEEWAY_S < now:
        raise VerificationError("token expired")
    if exp - LEEWAY_S > now + max_lifetime_s:
        raise VerificationError("token expires too far in the future")
    nbf = claims.get("nbf")
    if isinstance(nbf, int | float) and float(nbf) - LEEWAY_S > now:
        raise VerificationError("token not yet valid")
    iat = claims.get("iat")
    if isinstance(iat, int | float) and float(iat) - LEEWAY_S > now:
        raise VerificationError("token issued in the future")


_VERIFIED: dict[_CacheKey, dict[str, Any]] = {}
VERIFIED_CACHE_SIZE = 4096


def _remember(cache_key: _CacheKey, claims: dict[str, Any], now: float) -> None:
    """Keep a verified token's claims until it expires (bounded: expired ones go first)."""
    if cache_key in _VERIFIED:
        return
    if len(_VERIFIED) >= VERIFIED_CACHE_SIZE:
        for stale in [k for k, c in _VERIFIED.items() if float(c["exp"]) + LEEWAY_S < now]:
            del _VERIFIED[stale]
        while len(_VERIFIED) >= VERIFIED_CACHE_SIZE:
            del _VERIFIED[next(iter(_VERIFIED))]
    _VERIFIED[cache_key] = claims


@dataclass(frozen=True, slots=True)
class Verified:
    """Who a verified request came from."""

    tenant: str  # Connect clientKey, or "" for the OAuth app
    claims: Mapping[str, Any]


def verify_oauth(authorization: str | None, secret: str, *, now: float) -> Verified:
    """Verify an OAuth 2.0 app delivery: `Bearer` JWT, HS256 with the client secret."""
    token = _token(authorization, "Bearer")
    claims = _decode(token, secret, "HS256", now=now, max_lifetime_s=OAUTH_MAX_LIFETIME_S)
    return Verified(tenant="", claims=claims)


def verify_connect(
    authorization: str | None,
    method: str,
    path: str,
    query: QueryPairs,
    shared_secret: Callable[[str], str | None],
    *,
    now: float,
) -> Verified:
    """Verify a Connect delivery: `JWT` token, HS256 with the tenant's secret, exact qsh."""
    token = _token(authorization, "JWT")
    issuer = connect_issuer(authorization)
    secret = shared_secret(issuer)
    if secret is None:
        raise VerificationError("unknown tenant")
    claims = _decode(token, secret, "HS256", now=now)
    check_qsh(claims, method, path, query)
    return Verified(tenant=issuer, claims=claims)


def connect_issuer(authorization: str | None) -> str:
    """Return the unverified `iss` of a Connect token: which tenant's secret to check with."""
    token = _token(authorization, "JWT")
    _unverified_header(token)
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise VerificationError("malformed token") from exc
    issuer = unverified.get("iss")
    if not isinstance(issuer, str) or not issuer:
        raise VerificationError("token has no issuer")
    # Unverified, attacker-chosen text that is about to be looked up in the database:
    # a clientKey is short and printable (PostgreSQL refuses a NUL in text, a 500).
    if not is_identifier(issuer):
        raise VerificationError("token issuer is not a valid clientKey")
    return issuer


def check_qsh(claims: Mapping[str, Any], method: str, path: str, query: QueryPairs) -> None:
    """Refuse a token whose qsh is not this request's (`context-qsh` never passes)."""
    qsh = claims.get("qsh")
    if not isinstance(qsh, str):
        raise VerificationError("token has no qsh")
    if qsh == CONTEXT_QSH:
        raise VerificationError("context-qsh is not accepted here")
    if not hmac.compare_digest(qsh, query_string_hash(method, path, query)):
        raise VerificationError("qsh does not match the request")


def token_algorithm(authorization: str | None) -> str | None:
    """Return the `alg` a JWT claims (unverified), or None when there is no readable token."""
    token = authorization.partition(" ")[2].strip() if authorization else ""
    try:
        alg = jwt.get_unverified_header(token).get("alg")
    except jwt.PyJWTError:
        return None
    return alg if isinstance(alg, str) else None


def install_key_id(authorization: str | None) -> str:
    """Return the `kid` of a signed-install token (the key to fetch), checking its form."""
    token = _token(authorization, "JWT")
    header = _unverified_header(token)
    if header.get("alg") != "RS256":
        raise VerificationError("install token algorithm must be RS256")
    kid = header.get("kid")
    # The kid becomes a URL path segment fetched before any signature check: letters,
    # digits and `._-` only (Atlassian's are UUIDs), so no `/ ? # %` or `..` can reshape it.
    if not isinstance(kid, str) or not _KID.fullmatch(kid) or ".." in kid:
        raise VerificationError("install token has no usable kid")
    return kid


def verify_install(
    authorization: str | None,
    method: str,
    path: str,
    query: QueryPairs,
    public_key_pem: str,
    *,
    audience: str,
    now: float,
) -> Verified:
    """Verify a signed install/uninstall callback: RS256 by Atlassian, `aud` our base URL."""
    token = _token(authorization, "JWT")
    claims = _decode(
        token,
        public_key_pem,
        "RS256",
        now=now,
        audience=audience,
        require=("exp", "iss", "aud"),
    )
    check_qsh(claims, method, path, query)
    return Verified(tenant=str(claims["iss"]), claims=claims)


def sign_connect(
    method: str,
    path: str,
    query: QueryPairs,
    *,
    issuer: str,
    secret: str,
    now: float,
    ttl_s: int = 180,
) -> str:
    """Return an HS256 Connect JWT for an outgoing request (Jira REST calls)."""
    payload = {
        "iss": issuer,
        "iat": int(now),
        "exp": int(now) + ttl_s,
        "qsh": query_string_hash(method, path, query),
    }
    return jwt.encode(payload, secret, algorithm="HS256")


def check_lifecycle_freshness(claims: Mapping[str, Any], now: float) -> None:
    """Refuse a lifecycle token without `iat`, or issued more than LIFECYCLE_MAX_AGE_S ago."""
    iat = claims.get("iat")
    if not isinstance(iat, int | float) or isinstance(iat, bool):
        raise VerificationError("lifecycle token has no iat")
    if float(iat) + LIFECYCLE_MAX_AGE_S < now:
        raise VerificationError("lifecycle token is too old")


def lifecycle_token_id(authorization: str | None) -> str:
    """The SHA-256 hex of a lifecycle token: what the seen-token store keeps."""
    return hashlib.sha256(_token(authorization, "JWT").encode()).hexdigest()


def allowed_base_url(url: str, patterns: Iterable[str]) -> bool:
    """Whether a tenant's baseUrl is plain (no user, query or fragment) and matches one of
    `patterns`: `*.atlassian.net` (https, any subdomain), `host` (https, that host), or
    `scheme://host[:port]` (that scheme and host; any port unless one is given)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    if not host or "@" in parts.netloc or parts.query or parts.fragment:
        return False
    for pattern in patterns:
        scheme, _, rest = pattern.rpartition("://")
        want_host, _, want_port = rest.lower().partition(":")
        if parts.scheme != (scheme or "https"):
            continue
        if want_port and str(port) != want_port:
            continue
        if want_host.startswith("*."):
            if host.endswith(want_host[1:]) and len(host) > len(want_host) - 1:
                return True
        elif host == want_host:
            return True
    return False


def allowed_tenant(client_key: str, base_url: str, allowed: Iterable[str]) -> bool:
    """Whether the tenant allow-list (client keys or base URLs; empty: any) admits it."""
    entries = [a.rstrip("/") for a in allowed]
    return not entries or client_key in entries or base_url.rstrip("/") in entries
