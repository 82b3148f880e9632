"""Jira endpoints: webhook deliveries, and the Connect descriptor and lifecycle callbacks."""

from __future__ import annotations

import json
import logging

import orjson
from aiohttp import web
from yarl import URL

from bot import logs
from bot.core import verify
from bot.core.delivery import parse_delivery
from bot.core.hub_signature import SIGNATURE_HEADER, verify_hub_signature
from bot.core.text import is_identifier
from bot.errors import PayloadError, VerificationError
from bot.web.errors import read_body
from bot.web.install_keys import KeyServiceUnavailable
from bot.web.keys import CLOCK, INSTALL_KEYS, SETTINGS, STORE, TENANTS

log = logging.getLogger(__name__)

# The delivery answers, encoded without a JSON encoder (the hot path).
_JSON = "application/json"
_DUPLICATE = b'{"duplicate": true}'


def _request_target(request: web.Request) -> tuple[str, str, list[tuple[str, str]]]:
    """Return method, path relative to the app base URL, and query pairs (for qsh)."""
    settings = request.app[SETTINGS]
    base_path = URL(settings.public_url or "/").path
    path = verify.relative_path(request.path, base_path)
    return request.method, path, list(request.query.items())


async def _authenticate(request: web.Request) -> str:
    """Verify the delivery's token; return its tenant ("" for the OAuth app)."""
    settings = request.app[SETTINGS]
    authorization = request.headers.get("Authorization")
    now = request.app[CLOCK]()
    if settings.jira_auth_mode == "oauth":
        if not settings.jira_client_secret:
            raise VerificationError("deliveries are not accepted: no client secret configured")
        return verify.verify_oauth(authorization, settings.jira_client_secret, now=now).tenant
    issuer = verify.connect_issuer(authorization)
    secret = await request.app[TENANTS].active_secret(issuer)
    method, path, query = _request_target(request)
    return verify.verify_connect(
        authorization, method, path, query, lambda _: secret, now=now
    ).tenant


class Rejections:
    """Log refused deliveries as warnings, at most one per WINDOW_S: a wrong secret makes
    Jira refused on every delivery, and a flood of them must not flood the log."""

    WINDOW_S = 60.0

    def __init__(self) -> None:
        self._logged_at: float | None = None
        self._quiet = 0  # refusals not logged since the last warning

    def note(self, reason: str, status: int, remote: str | None, now: float) -> None:
        if self._logged_at is not None and now - self._logged_at < self.WINDOW_S:
            self._quiet += 1
            return
        more = f" ({self._quiet} more refused since the last warning)" if self._quiet else ""
        log.warning(
            "delivery refused (%d): %s%s",
            status,
            reason[:300],
            more,
            extra={"remote": remote or "", "status": status},
        )
        self._logged_at, self._quiet = now, 0


REJECTIONS = web.AppKey("rejections", Rejections)


async def receive_delivery(request: web.Request) -> web.Response:
    """Verify, store (commit), then acknowledge a Jira webhook delivery."""
    settings = request.app[SETTINGS]
    try:
        if settings.jira_auth_mode == "secret":
            # The signature covers the body: read it (within the size limit), then check it
            # before anything parses or stores it. Admin webhooks are the one site's: "".
            body = await read_body(request)
            verify_hub_signature(
                request.headers.get(SIGNATURE_HEADER), body, settings.jira_webhook_secret
            )
            tenant = ""
        else:
            tenant = await _authenticate(request)
            body = await read_body(request)
        delivery = parse_delivery(request.headers, body)
    except (VerificationError, PayloadError) as exc:
        status = 401 if isinstance(exc, VerificationError) else 400
        request.app[REJECTIONS].note(str(exc), status, request.remote, request.app[CLOCK]())
        raise
    stored = await request.app[STORE].add(tenant, delivery)
    logs.info(
        log,
        "delivery stored" if stored.created else "delivery duplicate",
        delivery_id=delivery.delivery_id,
        event_id=stored.event_id,
        webhook_event=delivery.webhook_event,
        issue_key=delivery.issue_key,
        tenant=tenant,
    )
    if stored.event_id is not None:  # created
        return web.Response(
            body=b'{"event_id": %d}' % stored.event_id, status=202, content_type=_JSON
        )
    return web.Response(body=_DUPLICATE, status=200, content_type=_JSON)


async def descriptor(request: web.Request) -> web.Response:
    """Serve the Connect app descriptor."""
    settings = request.app[SETTINGS]
    return web.json_response(
        {
            "key": settings.jira_app_key,
            "name": "deploybot",
            "description": "Turns Jira issue events into UbiOps and Genesys deployments.",
            "baseUrl": settings.public_url,
            "authentication": {"type": "jwt"},
            "lifecycle": {
                "installed": "/lifecycle/installed",
                "uninstalled": "/lifecycle/uninstalled",
            },
            "scopes": ["READ", "WRITE"],
            "apiMigrations": {"signed-install": True, "context-qsh": True},
            "modules": {},
        }
    )


async def _install_public_key(request: web.Request, kid: str) -> str:
    try:
        return await request.app[INSTALL_KEYS].get(kid)
    except KeyServiceUnavailable as exc:
        # Not the caller's fault, but we cannot verify: Jira retries the install.
        raise web.HTTPServiceUnavailable(text="install key service unreachable") from exc


async def _verify_lifecycle(request: web.Request, client_key: str) -> None:
    """Accept a lifecycle callback signed by Atlassian, or by the tenant's current secret."""
    settings = request.app[SETTINGS]
    authorization = request.headers.get("Authorization")
    method, path, query = _request_target(request)
    now = request.app[CLOCK]()
    alg = verify.token_algorithm(authorization)
    if alg == "RS256":
        kid = verify.install_key_id(authorization)
        pem = await _install_public_key(request, kid)
        verified = verify.verify_install(
            authorization, method, path, query, pem, audience=settings.public_url or "", now=now
        )
    elif alg == "HS256":
        known = await request.app[TENANTS].get(client_key)
        # An uninstalled tenant's old secret may be known to others by now: only Atlassian
        # may bring it back (else an HS256 "re-install" revived it with a new base URL).
        if known is None or not known.enabled:
            raise VerificationError(
                "the install of a new or uninstalled tenant must be signed by Atlassian (RS256)"
            )
        verified = verify.verify_connect(
            authorization, method, path, query, lambda _: known.shared_secret, now=now
        )
    else:
        verify.install_key_id(authorization)  # raises the precise reason
        raise VerificationError("unsupported token")
    if verified.tenant != client_key:
        raise VerificationError("token issuer does not match the body's clientKey")
    # The signature covers the request line, not the body: bind the body to one fresh use
    # of its token, so a captured token cannot carry another secret or base URL.
    verify.check_lifecycle_freshness(verified.claims, now)
    token_id = verify.lifecycle_token_id(authorization)
    if not await request.app[TENANTS].claim_lifecycle_token(
        token_id, float(verified.claims["exp"])
    ):
        raise VerificationError("lifecycle token already used")


def _lifecycle_body(body: bytes, *required: str) -> dict[str, str]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise PayloadError("body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise PayloadError("body must be a JSON object")
    missing = [k for k in required if not isinstance(payload.get(k), str) or not payload[k]]
    if missing:
        raise PayloadError(f"body lacks {', '.join(missing)}")
    key = payload["clientKey"]  # looked up before any signature check: keep it plain text
    if not is_identifier(key):
        raise PayloadError("clientKey is not a valid client key")
    # Stored as text: a NUL (which PostgreSQL refuses) or a control character is no
    # secret or URL Jira sends.
    odd = [k for k in required if not payload[k].isprintable()]
    if odd:
        raise PayloadError(f"body has unprintable {', '.join(odd)}")
    return {k: payload[k] for k in required}


async def installed(request: web.Request) -> web.Response:
    """Store (or update) a Connect tenant from its signed `installed` callback."""
    if not request.app[SETTINGS].public_url:
        raise web.HTTPNotFound(text="Connect install needs DEPLOYBOT_PUBLIC_URL")
    body = _lifecycle_body(await read_body(request), "clientKey", "sharedSecret", "baseUrl")
    settings = request.app[SETTINGS]
    # The scheduler and `jira.*` actions call the baseUrl with the tenant's secret: it must
    # be Atlassian's (checked before the signature: nothing else is worth a key fetch).
    if not verify.allowed_base_url(body["baseUrl"], settings.jira_allowed_base_url_hosts):
        raise web.HTTPForbidden(
            text=json.dumps({"error": "baseUrl is not an allowed Jira site"}),
            content_type="application/json",
        )
    if not verify.allowed_tenant(body["clientKey"], body["baseUrl"], settings.jira_allowed_tenants):
        raise web.HTTPForbidden(
            text=json.dumps({"error": "this tenant may not install deploybot"}),
            content_type="application/json",
        )
    await _verify_lifecycle(request, body["clientKey"])
    await request.app[TENANTS].install(body["clientKey"], body["sharedSecret"], body["baseUrl"])
    log.info("tenant installed", extra={"tenant": body["clientKey"]})
    return web.Response(status=204)


async def uninstalled(request: web.Request) -> web.Response:
    """Disable a Connect tenant from its signed `uninstalled` callback."""
    body = _lifecycle_body(await read_body(request), "clientKey")
    await _verify_lifecycle(request, body["clientKey"])
    await request.app[TENANTS].disable(body["clientKey"])
    log.info("tenant uninstalled", extra={"tenant": body["clientKey"]})
    return web.Response(status=204)
