"""Pure verification: the canonical request and qsh agree with atlassian-jwt."""

from __future__ import annotations

import time

import jwt
import pytest
from atlassian_jwt.url_utils import hash_url

from bot.core import verify
from bot.errors import VerificationError

SECRET = "s" * 48


@pytest.mark.parametrize(
    ("method", "path", "query", "url"),
    [
        ("POST", "/webhooks/jira", [], "/webhooks/jira"),
        (
            "get",
            "/rest/api/3/webhook",
            [("startAt", "0"), ("maxResults", "100")],
            "/rest/api/3/webhook?startAt=0&maxResults=100",
        ),
        (
            "GET",
            "/rest/api/3/webhook/failed",
            [("after", "1"), ("jwt", "x")],
            "/rest/api/3/webhook/failed?after=1&jwt=x",
        ),
        ("PUT", "/a&b/", [("b", "x y"), ("a", "2"), ("a", "1")], "/a&b/?b=x y&a=2&a=1"),
        ("DELETE", "/", [("q", "ä/~*")], "/?q=%C3%A4%2F~*"),
    ],
)
def test_qsh_matches_atlassian_jwt(
    method: str, path: str, query: list[tuple[str, str]], url: str
) -> None:
    assert verify.query_string_hash(method, path, query) == hash_url(method.upper(), url)


def test_relative_path() -> None:
    assert verify.relative_path("/app/webhooks/jira", "/app") == "/webhooks/jira"
    assert verify.relative_path("/app", "/app/") == "/"
    assert verify.relative_path("/webhooks/jira", "") == "/webhooks/jira"
    assert verify.relative_path("/application/x", "/app") == "/application/x"


def test_sign_connect_round_trip() -> None:
    now = time.time()
    token = verify.sign_connect(
        "GET", "/rest/api/3/webhook", [("a", "1")], issuer="app", secret=SECRET, now=now
    )
    verified = verify.verify_connect(
        f"JWT {token}", "GET", "/rest/api/3/webhook", [("a", "1")], lambda _: SECRET, now=now
    )
    assert verified.tenant == "app"


def test_future_iat_and_clock() -> None:
    now = time.time()
    token = jwt.encode({"exp": int(now) + 600, "iat": int(now) + 300}, SECRET, "HS256")
    with pytest.raises(VerificationError, match="future"):
        verify.verify_oauth(f"Bearer {token}", SECRET, now=now)
    ok = jwt.encode({"exp": int(now) + 60}, SECRET, "HS256")
    with pytest.raises(VerificationError, match="expired"):
        verify.verify_oauth(f"Bearer {ok}", SECRET, now=now + 3600)


def test_rs_hs_confusion_is_refused() -> None:
    # An HS256 token "signed" with a public key must not pass as an install.
    public_pem = "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----\n"
    token = jwt.encode({"exp": 9999999999, "iss": "x", "aud": "y", "qsh": "z"}, SECRET, "HS256")
    with pytest.raises(VerificationError, match="RS256"):
        verify.verify_install(
            f"JWT {token}",
            "POST",
            "/lifecycle/installed",
            [],
            public_pem,
            audience="y",
            now=time.time(),
        )
    with pytest.raises(VerificationError, match="RS256"):
        verify.install_key_id(f"JWT {token}")
