"""Forge Remote: the Forge Invocation Token (FIT) and Forge product events. Pure: no I/O.

A Forge app's product-event trigger calls a remote backend with `POST`, a 5 s timeout and
up to 4 retries; `Authorization: Bearer <FIT>`, an RS256 JWT signed by Atlassian whose
keys are published as a JWKS; `aud` is the app's id and `iss` `forge/invocation-token`.
When the manifest's endpoint asks for it (`auth.appSystemToken: true`), the request also
carries `x-forge-oauth-system: <token>` to call Jira back, at `app.apiBaseUrl` of the FIT.
- https://developer.atlassian.com/platform/forge/forge-remote-invocation-contract
  (Forge Remote essentials: remote contract, timeout, retries, the FIT)
- https://developer.atlassian.com/platform/forge/remote/calling-product-apis/
  (x-forge-oauth-system / x-forge-oauth-user, `app.apiBaseUrl`)
- Jira's Forge events: https://developer.atlassian.com/platform/forge/events-reference/jira/
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import orjson

from bot.core.text import is_identifier
from bot.errors import PayloadError, VerificationError

FIT_ISSUER = "forge/invocation-token"
FIT_ALGORITHM = "RS256"  # pinned: `none`, HS256 (a public key used as an HMAC secret) never
SYSTEM_TOKEN_HEADER = "x-forge-oauth-system"
LEEWAY_S = 30
# A FIT is minted per invocation and lives minutes; a token valid for longer is refused.
FIT_MAX_LIFETIME_S = 3600
MAX_JWKS_KEYS = 32
_KID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._:-]{0,127}")

# Forge product events with a Jira webhook equivalent: a rule may name either, and a rule
# written for the webhook event fires on the Forge one (the payload is mapped below).
FORGE_EVENTS: Mapping[str, str] = {
    "avi:jira:created:issue": "jira:issue_created",
    "avi:jira:updated:issue": "jira:issue_updated",
    "avi:jira:deleted:issue": "jira:issue_deleted",
    "avi:jira:commented:issue": "comment_created",
    "avi:jira:created:comment": "comment_created",
    "avi:jira:updated:comment": "comment_updated",
    "avi:jira:deleted:comment": "comment_deleted",
}


@dataclass(frozen=True, slots=True)
class Invocation:
    """A verified Forge invocation: its claims and, when sent, the app system token."""

    claims: Mapping[str, Any]
    system_token: str | None

    @property
    def api_base_url(self) -> str | None:
        app = self.claims.get("app")
        url = app.get("apiBaseUrl") if isinstance(app, Mapping) else None
        # Signed by Atlassian with the rest of the FIT: it names the site to call back.
        return url.rstrip("/") if isinstance(url, str) and url.startswith("http") else None


def bearer(authorization: str | None) -> str:
    if not authorization:
        raise VerificationError("missing Authorization header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise VerificationError("expected Authorization: Bearer <Forge Invocation Token>")
    return token.strip()


def fit_key_id(token: str) -> str:
    """The `kid` of a FIT, after checking its algorithm is RS256 (before any key fetch)."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise VerificationError("malformed token") from exc
    if header.get("alg") != FIT_ALGORITHM:
        raise VerificationError(f"token algorithm must be {FIT_ALGORITHM}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise VerificationError("token has no usable kid")
    return kid


def parse_jwks(body: bytes) -> dict[str, Any]:
    """The RSA signing keys of a JWKS document, by `kid` (other keys are skipped)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PayloadError("JWKS is not JSON") from exc
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise PayloadError("JWKS has no keys")
    found: dict[str, Any] = {}
    for item in keys[:MAX_JWKS_KEYS]:
        if not isinstance(item, dict) or item.get("kty") != "RSA":
            continue
        kid = item.get("kid")
        if not isinstance(kid, str) or not _KID.fullmatch(kid) or item.get("use", "sig") != "sig":
            continue
        try:
            found[kid] = jwt.PyJWK(item, algorithm=FIT_ALGORITHM).key
        except jwt.PyJWTError:
            continue
    return found


def verify_fit(
    token: str, key: Any, *, app_id: str, now: float, system_token: str | None = None
) -> Invocation:
    """Verify a FIT's signature (RS256 with `key`) and claims: aud, iss, exp, nbf, iat."""
    fit_key_id(token)
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[FIT_ALGORITHM],
            audience=app_id,
            issuer=FIT_ISSUER,
            leeway=LEEWAY_S,
            # times are checked below against the caller's clock
            options={
                "require": ["exp", "iat", "iss", "aud"],
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidAudienceError as exc:
        raise VerificationError("token is not for this app (aud)") from exc
    except jwt.InvalidIssuerError as exc:
        raise VerificationError("token issuer is not forge/invocation-token") from exc
    except jwt.InvalidSignatureError as exc:
        raise VerificationError("bad token signature") from exc
    except jwt.PyJWTError as exc:
        raise VerificationError(f"invalid token: {exc}") from exc
    exp, iat = claims["exp"], claims["iat"]
    if not isinstance(exp, int | float) or not isinstance(iat, int | float):
        raise VerificationError("token exp and iat must be numbers")
    if exp + LEEWAY_S < now:
        raise VerificationError("token expired")
    if exp - LEEWAY_S > now + FIT_MAX_LIFETIME_S:
        raise VerificationError("token expires too far in the future")
    if iat - LEEWAY_S > now:
        raise VerificationError("token issued in the future")
    nbf = claims.get("nbf")
    if isinstance(nbf, int | float) and nbf - LEEWAY_S > now:
        raise VerificationError("token not yet valid")
    usable = system_token if system_token and system_token.isascii() else None
    return Invocation(claims=claims, system_token=usable)


def _event(body: Any) -> dict[str, Any]:
    """The event object: the body itself, or its `payload` (both shapes are accepted)."""
    if isinstance(body, dict) and isinstance(body.get("eventType"), str):
        return body
    inner = body.get("payload") if isinstance(body, dict) else None
    if isinstance(inner, dict) and isinstance(inner.get("eventType"), str):
        return inner
    raise PayloadError("body is not a Forge event (no eventType)")


def to_webhook_payload(body: bytes, *, now_ms: int) -> tuple[str, dict[str, Any]]:
    """Map a Forge product event to the shape of the Jira webhook it corresponds to.

    Returns (a delivery id, the payload). The issue, changelog and comment are Jira's
    own objects in both; the rest is renamed: `webhookEvent` is the Jira event,
    `forgeEventType` keeps the Forge one, `user` is built from `atlassianId`. The
    delivery id is the same for a retry of the event: it names the site, the event, the
    issue and the change (changelog or comment id), or, for an event naming no change,
    the event's bytes without the retry context.
    """
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PayloadError(f"body is not valid JSON: {exc}") from None
    event = _event(raw)
    forge_type = event["eventType"]
    webhook_event = FORGE_EVENTS.get(forge_type)
    if webhook_event is None:
        raise PayloadError(f"Forge event {forge_type[:80]!r} has no Jira webhook equivalent")
    issue = event.get("issue")
    if not isinstance(issue, dict):
        raise PayloadError("Forge event has no issue")
    payload = {k: v for k, v in event.items() if k not in ("eventType", "retryContext")}
    payload["webhookEvent"] = webhook_event
    payload["forgeEventType"] = forge_type
    if not isinstance(payload.get("timestamp"), int):
        payload["timestamp"] = now_ms
    account = event.get("atlassianId")
    if "user" not in payload and isinstance(account, str):
        payload["user"] = {"accountId": account}
    context = event.get("context")
    cloud = context.get("cloudId") if isinstance(context, dict) else None
    change = _change_id(payload)
    if change is None:
        stripped = orjson.dumps(payload | {"timestamp": None}, option=orjson.OPT_SORT_KEYS)
        change = "body:" + hashlib.sha256(stripped).hexdigest()
    basis = f"{cloud}|{forge_type}|{issue.get('id')}|{change}"
    delivery_id = "forge-" + hashlib.sha256(basis.encode()).hexdigest()[:48]
    assert is_identifier(delivery_id)
    return delivery_id, payload


def _change_id(payload: Mapping[str, Any]) -> str | None:
    changelog = payload.get("changelog")
    if isinstance(changelog, Mapping) and isinstance(changelog.get("id"), str | int):
        return f"changelog:{changelog['id']}"
    comment = payload.get("comment")
    if isinstance(comment, Mapping) and isinstance(comment.get("id"), str | int):
        return f"comment:{comment['id']}@{comment.get('updated')}"
    return None
