"""JIRA_AUTH_MODE=secret: admin webhooks signed `X-Hub-Signature: sha256=<HMAC of the body>`."""

from __future__ import annotations

import json

import pytest

from bot.core.hub_signature import sign, verify_hub_signature
from bot.errors import VerificationError
from bot.settings import Settings, from_env
from tests.conftest import ClientFactory
from tests.helpers import PAYLOAD, stored_count

SECRET = "admin-webhook-secret-0123456789"
NEXT = "the-next-secret-after-rotation-42"


def _headers(body: bytes, secret: str | None = SECRET, delivery_id: str = "d-1") -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Atlassian-Webhook-Identifier": delivery_id}
    if secret is not None:
        headers["X-Hub-Signature"] = sign(body, secret)
    return headers


def _secret_mode(settings: Settings, *secrets: str) -> dict[str, object]:
    return {"jira_auth_mode": "secret", "jira_webhook_secret": secrets or (SECRET,)}


async def test_signed_delivery_is_stored(make_client: ClientFactory, settings: Settings) -> None:
    client = await make_client(settings, **_secret_mode(settings))
    body = json.dumps(PAYLOAD).encode()
    resp = await client.post("/webhooks/jira", data=body, headers=_headers(body))
    assert resp.status == 202, await resp.text()
    again = await client.post("/webhooks/jira", data=body, headers=_headers(body))
    assert again.status == 200  # a redelivery: stored once
    assert await stored_count(settings) == 1


@pytest.mark.parametrize(
    "case",
    ["wrong secret", "missing", "another body", "not sha256", "short", "bearer instead"],
)
async def test_bad_signature_is_refused_and_nothing_stored(
    make_client: ClientFactory, settings: Settings, case: str
) -> None:
    client = await make_client(settings, **_secret_mode(settings))
    body = json.dumps(PAYLOAD).encode()
    headers = _headers(body)
    if case == "wrong secret":
        headers = _headers(body, "not-the-secret")
    elif case == "missing":
        headers = _headers(body, None)
    elif case == "another body":
        headers = _headers(json.dumps(PAYLOAD | {"webhookEvent": "x"}).encode())
    elif case == "not sha256":
        headers["X-Hub-Signature"] = headers["X-Hub-Signature"].replace("sha256=", "sha1=")
    elif case == "short":
        headers["X-Hub-Signature"] = headers["X-Hub-Signature"][:-2]
    else:
        del headers["X-Hub-Signature"]
        headers["Authorization"] = "Bearer whatever"
    resp = await client.post("/webhooks/jira", data=body, headers=headers)
    assert resp.status == 401, await resp.text()
    assert await stored_count(settings) == 0


async def test_rotation_accepts_both_secrets(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client(settings, **_secret_mode(settings, NEXT, SECRET))
    for i, secret in enumerate((SECRET, NEXT)):
        body = json.dumps(PAYLOAD | {"timestamp": i}).encode()
        resp = await client.post(
            "/webhooks/jira", data=body, headers=_headers(body, secret, f"d-{i}")
        )
        assert resp.status == 202, await resp.text()
    body = json.dumps(PAYLOAD).encode()
    resp = await client.post("/webhooks/jira", data=body, headers=_headers(body, "retired", "d-9"))
    assert resp.status == 401
    assert await stored_count(settings) == 2


async def test_no_secret_configured_refuses_everything(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client(settings, jira_auth_mode="secret", jira_webhook_secret=())
    body = json.dumps(PAYLOAD).encode()
    resp = await client.post("/webhooks/jira", data=body, headers=_headers(body))
    assert resp.status == 401
    assert await stored_count(settings) == 0


async def test_oversized_body_is_refused_before_the_signature(
    make_client: ClientFactory, settings: Settings
) -> None:
    client = await make_client(settings, max_body_bytes=2048, **_secret_mode(settings))
    body = json.dumps(PAYLOAD | {"pad": "x" * 4096}).encode()
    resp = await client.post("/webhooks/jira", data=body, headers=_headers(body))
    assert resp.status == 413
    assert await stored_count(settings) == 0


def test_pure_check() -> None:
    body = b'{"webhookEvent": "jira:issue_updated"}'
    verify_hub_signature(sign(body, SECRET), body, (SECRET,))
    verify_hub_signature(sign(body, SECRET).upper().replace("SHA256=", "sha256="), body, (SECRET,))
    with pytest.raises(VerificationError, match="does not match"):
        verify_hub_signature(sign(body + b" ", SECRET), body, (SECRET,))
    with pytest.raises(VerificationError, match="no webhook secret"):
        verify_hub_signature(sign(body, SECRET), body, ())


def test_settings_read_secrets_and_keep_them_out_of_repr() -> None:
    settings = from_env(
        {"JIRA_AUTH_MODE": "secret", "JIRA_WEBHOOK_SECRET": f"{SECRET}, {NEXT}"}, dotenv=None
    )
    assert settings.jira_webhook_secret == (SECRET, NEXT)
    assert SECRET not in repr(settings)
    assert SECRET in settings.secrets and NEXT in settings.secrets


def test_start_up_warns_without_a_secret() -> None:
    off = Settings(jira_auth_mode="secret").disabled_features()
    assert "Jira deliveries are refused: JIRA_WEBHOOK_SECRET is not set" in off
    assert not any("WEBHOOK_SECRET" in line for line in replace_secret().disabled_features())


def replace_secret() -> Settings:
    return Settings(jira_auth_mode="secret", jira_webhook_secret=(SECRET,))
