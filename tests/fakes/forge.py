"""Stand-in for Atlassian's Forge platform: an RSA key, a JWKS server, FITs and events.

FIT claims as Forge Remote documents them
(https://developer.atlassian.com/platform/forge/forge-remote-invocation-contract):
`iss` forge/invocation-token, `aud` the app id, `app.apiBaseUrl`, `context.cloudId`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

APP_ID = "ari:cloud:ecosystem::app/6f2c1b0e-8a7d-4c3e-9f21-0a5b7c9d1e23"
CLOUD_ID = "a436116f-02ce-4520-8fbb-7301462a1674"
API_BASE_URL = f"https://api.atlassian.com/ex/jira/{CLOUD_ID}"


def _b64(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


@dataclass
class FakeForge:
    kid: str = "forge-key-1"
    jwks_requests: int = 0
    _key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    _runner: web.AppRunner | None = None
    url: str = ""

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
        return {"keys": [jwk | {"kid": self.kid, "use": "sig", "alg": "RS256"}]}

    async def _serve(self, _request: web.Request) -> web.Response:
        self.jwks_requests += 1
        return web.json_response(self.jwks())

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self._serve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": "forge/invocation-token",
            "aud": APP_ID,
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": str(uuid.uuid4()),
            "app": {
                "id": APP_ID,
                "apiBaseUrl": API_BASE_URL,
                "installationId": "ari:cloud:ecosystem::installation/1",
                "environment": {"type": "PRODUCTION", "id": "env-1"},
                "module": {"type": "core:endpoint", "key": "deploybot-remote"},
            },
            "context": {"cloudId": CLOUD_ID, "moduleKey": "forward-issue-events"},
        } | changes

    def fit(
        self, *, kid: str | None = None, key: rsa.RSAPrivateKey | None = None, **changes: Any
    ) -> str:
        return jwt.encode(
            self.claims(**changes),
            key or self._key,
            algorithm="RS256",
            headers={"kid": kid or self.kid},
        )

    def fit_alg_none(self) -> str:
        return f"{_b64({'alg': 'none', 'kid': self.kid})}.{_b64(self.claims())}."

    def fit_hs256(self) -> str:
        # The public key as an HMAC secret: the classic algorithm confusion (signed by
        # hand: PyJWT itself refuses a public key as an HMAC secret).
        secret = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        signing_input = (
            f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': self.kid})}.{_b64(self.claims())}"
        )
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def issue_updated_event(
    *,
    key: str = "OPS-7",
    changelog_id: str = "10296",
    status: str = "Ready to deploy",
    from_status: str = "In Progress",
) -> dict[str, Any]:
    """An `avi:jira:updated:issue` event as Forge sends it (Jira's issue and changelog)."""
    return {
        "eventType": "avi:jira:updated:issue",
        "atlassianId": "5b10a2844c20165700ede21g",
        "associatedUsers": [{"accountId": "5b10a2844c20165700ede21g"}],
        "issue": {
            "id": "10073",
            "key": key,
            "fields": {
                "summary": "Roll out model",
                "status": {"name": status},
                "project": {"key": key.split("-")[0], "id": "10000"},
                "issuetype": {"name": "Deployment"},
            },
        },
        "changelog": {
            "id": changelog_id,
            "items": [
                {
                    "field": "status",
                    "fieldtype": "jira",
                    "fieldId": "status",
                    "from": "3",
                    "fromString": from_status,
                    "to": "10001",
                    "toString": status,
                }
            ],
        },
        "context": {"cloudId": CLOUD_ID, "moduleKey": "forward-issue-events"},
    }
