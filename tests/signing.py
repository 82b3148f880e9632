"""Sign requests the way Jira does, independently of the code under test.

Connect tokens come from the `atlassian-jwt` package (its own qsh implementation);
OAuth 2.0 deliveries are plain HS256 JWTs with the app's client secret.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import atlassian_jwt
import jwt
from atlassian_jwt.url_utils import hash_url
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def oauth_token(secret: str, *, exp_in_s: int = 300, **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": "jira", "iat": now, "exp": now + exp_in_s, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def connect_token(method: str, path_and_query: str, client_key: str, secret: str) -> str:
    token: str = atlassian_jwt.encode_token(method, path_and_query, client_key, secret)
    return token


def connect_claims_token(secret: str, **claims: Any) -> str:
    """An HS256 token with exactly these claims (for hostile variations)."""
    return jwt.encode(claims, secret, algorithm="HS256")


class InstallKeys:
    """An RSA key pair standing in for Atlassian's install-signing key."""

    def __init__(self, kid: str = "install-key-1") -> None:
        self.kid = kid
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @property
    def public_pem(self) -> str:
        return (
            self._key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def sign(
        self,
        method: str,
        path: str,
        *,
        client_key: str,
        audience: str,
        exp_in_s: int = 180,
        kid: str | None = None,
        issued_s_ago: int = 0,
    ) -> str:
        now = int(time.time())
        payload = {
            "iss": client_key,
            "aud": [audience],
            "iat": now - issued_s_ago,
            "exp": now + exp_in_s,
            "qsh": hash_url(method, path),
            # Two installs signed in one second are still two tokens (a reused one is
            # refused as a replay).
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(payload, self._key, algorithm="RS256", headers={"kid": kid or self.kid})


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JWT segments are written."""
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_token(header: dict[str, Any], claims: Any, key: bytes | None = None) -> str:
    """A JWT built by hand: HMAC-SHA256 over it with `key` (any bytes), or no signature.

    PyJWT refuses some hostile shapes (an RSA public key as an HMAC secret, `alg: none`
    with a signature, claims that are not an object); an attacker's token is not so polite.
    """
    import hashlib
    import hmac
    import json

    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = (
        b64url(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())
        if key is not None
        else ""
    )
    return f"{signing_input}.{signature}"
