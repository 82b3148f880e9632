"""Hostile input against a running deploybot: no 5xx, no stored row, no action. Ever.

A real localhost server (make_client) in OAuth mode, and in Connect mode with an installed
tenant, gets crafted attacks (forged and tampered tokens, absurd bodies, bad delivery
identifiers) mixed with hypothesis-generated garbage. A rule that fires for every Jira
event is loaded and the fake UbiOps listens, so any forged delivery that slipped through
would show up as a stored event, a planned run or a request to UbiOps. At the end one
honest delivery must be stored and acted on: the app was alive and the rule armed.

Both engines run (the `database_url` fixture): in Connect mode the attacker chooses the
`iss` that is looked up in the tenants table, and text that SQLite takes (NUL, huge) is
exactly what PostgreSQL may refuse, so the check is engine-dependent.

The number of hostile inputs tried is printed and written, by category, to
test-artifacts/system-hostile.json (one entry per engine and mode).
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import select

from bot.db.engine import create_engine
from bot.db.models import tenants
from bot.rules.loader import JIRA_EVENTS
from bot.settings import Settings
from tests.conftest import CLIENT_SECRET, ClientFactory
from tests.fakes.ubiops import FakeUbiOps
from tests.helpers import (
    CLIENT_KEY,
    PUBLIC_URL,
    SECRET,
    TOKEN,
    KeyServer,
    install,
    install_body,
    issue_updated,
    row_counts,
    wait_for,
)
from tests.signing import InstallKeys, connect_claims_token, connect_token, forge_token
from tests.signing import oauth_token as signed_oauth_token

ARTIFACT = Path(__file__).resolve().parents[2] / "test-artifacts" / "system-hostile.json"
MAX_EXAMPLES = 100  # per hypothesis category: bounded (the whole file runs in seconds)
DELIVERY_HEADER = "X-Atlassian-Webhook-Identifier"
NUL_ISSUER = "jira:ten\x00ant-1"
HS256 = {"alg": "HS256", "typ": "JWT"}

ANY_EVENT_RULE = f"""
rules:
  - name: fires-for-anything
    on: {{events: [{", ".join(JIRA_EVENTS)}]}}
    do:
      - action: ubiops.deployments_list
        with: {{project_name: ml-prod}}
"""

HYPOTHESIS = hsettings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=list(HealthCheck),
)

# Header text the HTTP client agrees to send (it refuses control characters itself).
header_text = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n\x00\x7f")
    .filter(lambda c: ord(c) >= 0x20 or c == "\t")
    .filter(lambda c: ord(c) < 0x100),
    max_size=300,
)
b64_alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def would_be_accepted(body: bytes) -> bool:
    """An independent oracle: is `body` a JSON object with a usable `webhookEvent`?"""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return False
    event = payload.get("webhookEvent") if isinstance(payload, dict) else None
    return isinstance(event, str) and 0 < len(event) <= 255


class Target:
    """A running deploybot plus what it takes to send it one request, and the tally."""

    def __init__(self, client: TestClient[Any, Any], mode: str, engine: str) -> None:
        self.client, self.mode, self.engine = client, mode, engine
        self.counts: Counter[str] = Counter()
        self.scheme = "Bearer" if mode == "oauth" else "JWT"
        self.seq = 0
        self.failures: list[str] = []
        self.strict = False  # inside hypothesis a failure raises, so that it shrinks

    def good_token(self) -> str:
        if self.mode == "oauth":
            return signed_oauth_token(CLIENT_SECRET)
        return connect_token("POST", "/webhooks/jira", CLIENT_KEY, SECRET)

    def good_headers(self) -> dict[str, str]:
        self.seq += 1
        return {
            "Authorization": f"{self.scheme} {self.good_token()}",
            "Content-Type": "application/json",
            DELIVERY_HEADER: f"hostile-{self.seq}",
        }

    async def post(
        self,
        category: str,
        overrides: dict[str, str | None],
        body: bytes | None = None,
        path: str = "/webhooks/jira",
    ) -> int:
        """POST; `None` in overrides drops that header. Return the status, counted."""
        headers = {**self.good_headers(), **overrides}
        sent = {k: v for k, v in headers.items() if v is not None}
        data = body if body is not None else json.dumps(issue_updated("OPS-1")).encode()
        async with self.client.session.post(
            self.client.make_url(path), data=io.BytesIO(data), headers=sent
        ) as resp:
            await resp.read()
            status = resp.status
        self.counts[category] += 1
        self.check(status, category, overrides, body[:200] if body else None)
        return status

    def check(self, status: int, *what: Any) -> None:
        """A 4xx is the only right answer; anything else is kept, the run goes on."""
        if not 400 <= status < 500:
            failure = f"{status} for {what!r}"[:600]
            self.failures.append(failure)
            if self.strict:
                raise AssertionError(failure)

    async def raw(self, category: str, header_lines: list[bytes], body: bytes) -> int:
        """Send bytes the HTTP client refuses to write (control characters in headers)."""
        host, port = self.client.host, self.client.port
        reader, writer = await asyncio.open_connection(host, port)
        try:
            head = [b"POST /webhooks/jira HTTP/1.1", f"Host: {host}:{port}".encode()]
            head += [*header_lines, f"Content-Length: {len(body)}".encode(), b"Connection: close"]
            writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.close()
        status = int(status_line.split()[1])
        self.counts[category] += 1
        self.check(status, category, header_lines)
        return status

    async def hypothesize(
        self, strategy: st.SearchStrategy[Any], send: Callable[[Any], Coroutine[Any, Any, int]]
    ) -> None:
        """Run hypothesis over `strategy`, each example sent to the live app by `send`.

        hypothesis is synchronous: it runs in a worker thread and hands each request to
        this event loop, which stays free to serve the app meanwhile.
        """
        loop = asyncio.get_running_loop()

        @HYPOTHESIS
        @given(strategy)
        def check(case: Any) -> None:
            asyncio.run_coroutine_threadsafe(send(case), loop).result(timeout=60)

        self.strict = True
        try:
            await asyncio.to_thread(check)
        except AssertionError as exc:  # hypothesis re-raises the smallest failing example
            self.failures.append(f"hypothesis: {exc}"[:600])
        finally:
            self.strict = False


@pytest.fixture
async def ubiops_fake(aiohttp_server: Callable[..., Any]) -> tuple[FakeUbiOps, str]:
    fake = FakeUbiOps(token=TOKEN)
    server: TestServer = await aiohttp_server(fake.app())
    return fake, str(server.make_url(fake.prefix))


@pytest.fixture
def any_event_rules(tmp_path: Path) -> Path:
    folder = tmp_path / "hostile-rules"
    folder.mkdir()
    (folder / "any.yaml").write_text(ANY_EVENT_RULE)
    return folder


def _engine_name(settings: Settings) -> str:
    return "postgresql" if settings.database_url.startswith("postgresql") else "sqlite"


# ----- the attacks ---------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


async def token_attacks(target: Target, keys: InstallKeys) -> None:
    """Forged, tampered and stale tokens on /webhooks/jira (both modes)."""
    now, scheme = _now(), target.scheme
    secret = CLIENT_SECRET if target.mode == "oauth" else SECRET
    good = target.good_token()
    public_pem = keys.public_pem.encode()
    claims: dict[str, Any] = {"iss": CLIENT_KEY if target.mode == "connect" else "jira"}
    claims |= {"iat": now, "exp": now + 300}
    if target.mode == "connect":
        claims["qsh"] = connect_token("POST", "/webhooks/jira", CLIENT_KEY, SECRET).split(".")[1]
    rs256 = keys.sign("POST", "/webhooks/jira", client_key=CLIENT_KEY, audience=PUBLIC_URL)

    def signed(token_claims: Any) -> str:
        return forge_token(HS256, token_claims, secret.encode())

    crafted: list[str | None] = [
        None,  # no Authorization header
        "",
        scheme,
        f"{scheme} ",
        f"Basic {good}",
        f"{'JWT' if scheme == 'Bearer' else 'Bearer'} {good}",
        f"{scheme} {forge_token({'alg': 'none', 'typ': 'JWT'}, claims)}",
        f"{scheme} {forge_token({'alg': 'None', 'typ': 'JWT'}, claims)}",
        f"{scheme} {forge_token({'alg': 'none'}, claims, secret.encode())}",
        # HS256 signed with the RSA public key as the HMAC secret (alg confusion).
        f"{scheme} {forge_token({'alg': 'HS256', 'kid': keys.kid}, claims, public_pem)}",
        f"{scheme} {rs256}",  # signed by a real RSA key: not the algorithm expected here
        f"{scheme} {forge_token({'alg': 'HS256'}, claims, b'wrong-secret-' * 4)}",
        f"{scheme} {signed({**claims, 'exp': now - 3600})}",  # expired
        f"{scheme} {signed({**claims, 'iat': now + 3600, 'exp': now + 7200})}",  # future iat
        f"{scheme} {signed({**claims, 'nbf': now + 3600})}",  # not yet valid
        f"{scheme} {forge_token({'alg': 'HS256'}, [claims], secret.encode())}",
        f"{scheme} {forge_token({'alg': 'HS256'}, 'claims', secret.encode())}",
        f"{scheme} {forge_token({'alg': 'HS512'}, claims, secret.encode())}",
        f"{scheme} {forge_token(['alg'], claims, secret.encode())}",  # type: ignore[arg-type]
        f"{scheme} {good[:-1]}",  # truncated signature
        f"{scheme} {good.rsplit('.', 1)[0]}",  # no signature segment
        f"{scheme} {good.split('.')[0]}",  # header only
        f"{scheme} {good[: len(good) // 2]}",
        f"{scheme} {good}.{good}",
        f"{scheme} {good}{'A' * 6000}",  # huge, under the header size limit
        f"{scheme} {'A' * 20000}",  # huge, over it
        f"{scheme} ....",
        f"{scheme} {good} trailing",
    ]
    if target.mode == "connect":
        base = {"iss": CLIENT_KEY, "iat": now, "exp": now + 300}
        crafted += [
            f"JWT {connect_token('POST', '/lifecycle/installed', CLIENT_KEY, SECRET)}",
            f"JWT {connect_token('GET', '/webhooks/jira', CLIENT_KEY, SECRET)}",
            f"JWT {connect_token('POST', '/webhooks/jira?a=1', CLIENT_KEY, SECRET)}",
            f"JWT {connect_claims_token(SECRET, **base, qsh='context-qsh')}",
            f"JWT {connect_claims_token(SECRET, **base)}",  # no qsh
            f"JWT {connect_claims_token(SECRET, **base, qsh=['x'])}",
            f"JWT {connect_token('POST', '/webhooks/jira', 'jira:unknown', SECRET)}",
            f"JWT {connect_token('POST', '/webhooks/jira', 'jira:unknown', 'x' * 40)}",
            f"JWT {connect_token('POST', '/webhooks/jira', NUL_ISSUER, SECRET)}",
            f"JWT {connect_token('POST', '/webhooks/jira', 'j' * 10_000, SECRET)[:7000]}",
            f"JWT {connect_token('POST', '/webhooks/jira', 'j' * 3000, SECRET)}",
            f"JWT {signed({'iss': 12, 'exp': now + 300, 'qsh': 'x'})}",
            f"JWT {signed({'iss': [CLIENT_KEY], 'exp': now + 300, 'qsh': 'x'})}",
            f"JWT {signed({'iss': {'k': 1}, 'exp': now + 300, 'qsh': 'x'})}",
            f"JWT {connect_claims_token(SECRET, exp=now + 300, qsh='x')}",  # no iss
        ]
    for value in crafted:
        await target.post("tokens (crafted)", {"Authorization": value})

    async def send_header(value: str) -> int:
        return await target.post("tokens (random header)", {"Authorization": value})

    await target.hypothesize(header_text, send_header)

    async def send_text_token(value: str) -> int:
        return await target.post("tokens (random token)", {"Authorization": f"{scheme} {value}"})

    await target.hypothesize(st.text(b64_alphabet, max_size=400), send_text_token)

    forged = st.tuples(
        st.dictionaries(st.sampled_from(["alg", "typ", "kid"]), json_values)
        | st.fixed_dictionaries({"alg": st.sampled_from(["HS256", "none", "RS256", "HS512"])}),
        st.fixed_dictionaries(
            {
                "iss": st.sampled_from([CLIENT_KEY, "jira"]) | st.text(),
                "exp": st.integers(-(2**63), 2**63) | json_values,
            },
            optional={"iat": json_values, "nbf": json_values, "qsh": st.text(), "aud": json_values},
        )
        | json_values,
        st.none() | st.binary(max_size=64),
    )

    async def send_forged(case: tuple[dict[str, Any], Any, bytes | None]) -> int:
        header, body_claims, key = case
        token = forge_token(header, body_claims, key)
        return await target.post("tokens (random JWT)", {"Authorization": f"{scheme} {token}"})

    await target.hypothesize(forged, send_forged)


async def lifecycle_attacks(target: Target, keys: InstallKeys) -> None:
    """Connect only: take over the installed tenant with a forged install or uninstall."""
    now = _now()
    attacker = install_body("attacker-secret-" + "e" * 48)
    body = json.dumps(attacker).encode()
    claims = {"iss": CLIENT_KEY, "aud": [PUBLIC_URL], "iat": now, "exp": now + 300}
    claims["qsh"] = connect_token("POST", "/lifecycle/installed", CLIENT_KEY, SECRET).split(".")[1]
    other = InstallKeys(kid=keys.kid)
    tokens = [
        None,
        "JWT " + forge_token({"alg": "HS256", "kid": keys.kid}, claims, keys.public_pem.encode()),
        "JWT " + forge_token({"alg": "none", "kid": keys.kid}, claims),
        "JWT " + forge_token({"alg": "HS256"}, claims, b"attacker-secret-" + b"e" * 48),
        "JWT "
        + other.sign("POST", "/lifecycle/installed", client_key=CLIENT_KEY, audience=PUBLIC_URL),
        "JWT "
        + keys.sign(
            "POST", "/lifecycle/installed", client_key=CLIENT_KEY, audience="https://evil.example"
        ),
        "JWT " + keys.sign("POST", "/webhooks/jira", client_key=CLIENT_KEY, audience=PUBLIC_URL),
        "JWT "
        + keys.sign("POST", "/lifecycle/installed", client_key=CLIENT_KEY, audience=PUBLIC_URL)
        + "x",
        "JWT "
        + keys.sign(
            "POST", "/lifecycle/installed", client_key=CLIENT_KEY, audience=PUBLIC_URL, kid="../x"
        ),
        "JWT "
        + keys.sign(
            "POST", "/lifecycle/installed", client_key=CLIENT_KEY, audience=PUBLIC_URL, kid="nope"
        ),
        "JWT " + connect_token("POST", "/lifecycle/installed", CLIENT_KEY, "x" * 40),
    ]
    for path in ("/lifecycle/installed", "/lifecycle/uninstalled"):
        for token in tokens:
            await target.post("lifecycle (crafted)", {"Authorization": token}, body, path=path)
    # The body's clientKey picks the tenant whose secret checks an HS256 re-install: it is
    # attacker-chosen text that reaches the database before any signature is checked.
    for client_key in (NUL_ISSUER, "k" * 10_000, "jira:\u2028tenant"):
        hostile = json.dumps(install_body("attacker-secret-" + "e" * 48, client_key)).encode()
        forged = forge_token(HS256, {**claims, "iss": client_key}, b"attacker-secret-" + b"e" * 48)
        for path in ("/lifecycle/installed", "/lifecycle/uninstalled"):
            await target.post(
                "lifecycle (crafted)", {"Authorization": f"JWT {forged}"}, hostile, path=path
            )
    for raw_body in (b"", b"{", b"[]", b'{"clientKey": 1}', b'{"clientKey": "\xff"}'):
        await target.post(
            "lifecycle (crafted)",
            {"Authorization": tokens[3]},
            raw_body,
            path="/lifecycle/installed",
        )

    async def send_forged(case: tuple[dict[str, Any], Any]) -> int:
        header, body_claims = case
        token = forge_token(header, body_claims, keys.public_pem.encode())
        return await target.post(
            "lifecycle (random JWT)",
            {"Authorization": f"JWT {token}"},
            body,
            path="/lifecycle/installed",
        )

    await target.hypothesize(
        st.tuples(
            st.fixed_dictionaries(
                {"alg": st.sampled_from(["HS256", "RS256", "none"]), "kid": st.text(max_size=20)}
            ),
            st.fixed_dictionaries({"iss": st.just(CLIENT_KEY) | st.text(), "exp": st.integers()}),
        ),
        send_forged,
    )


async def body_attacks(target: Target) -> None:
    """Validly signed deliveries whose body or content type is wrong."""
    bodies = [
        b"",
        b"{not json",
        b"[1, 2]",
        b'"jira:issue_updated"',
        b"null",
        b"42",
        b'{"issue": {}}',
        b'{"webhookEvent": 3}',
        b'{"webhookEvent": ""}',
        b'{"webhookEvent": "' + b"e" * 300 + b'"}',
        b'{"webhookEvent": "jira:issue_updated", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b"[" * 200_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"webhookEvent": "jira:issue_\xff\xfe"}',
        b'{"webhookEvent": "\xc0\xafjira"}',  # overlong encoding
        b'{"webhookEvent": "\xed\xa0\x80"}',  # an encoded surrogate
        b"\xef\xbb\xbf\xff" + b'{"webhookEvent": "x"}',
        b'{"webhookEvent": "jira:issue_updated"',  # truncated
        b'{"webhookEvent": NaN}',
        b'{"webhookEvent": "jira:issue_updated", "pad": "' + b"a" * (10 * 1024 * 1024) + b'"}',
        b"\x00" * 1024,
    ]
    for body in bodies:
        await target.post("bodies (crafted)", {}, body)
    content_types: list[str | None] = [
        None,
        "",
        "text/plain",
        "text/json",
        "application/jsonx",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "json",
        "application/ json",
    ]
    for content_type in content_types:
        await target.post("content types (crafted)", {"Content-Type": content_type})

    async def send_bytes(body: bytes) -> int:
        if would_be_accepted(body):
            return 0  # not hostile (astronomically unlikely from random bytes)
        return await target.post("bodies (random bytes)", {}, body)

    await target.hypothesize(st.binary(max_size=2048), send_bytes)

    async def send_json(value: Any) -> int:
        body = json.dumps(value).encode()
        if would_be_accepted(body):
            return 0  # a valid delivery is not hostile
        return await target.post("bodies (random JSON)", {}, body)

    await target.hypothesize(json_values, send_json)

    async def send_content_type(value: str) -> int:
        return await target.post("content types (random)", {"Content-Type": value})

    await target.hypothesize(
        header_text.filter(lambda t: "json" not in t.lower()), send_content_type
    )


async def header_attacks(target: Target) -> None:
    """Validly signed deliveries with a missing, blank, oversized or garbled identifier."""
    for value in [None, "", " ", "\t", "x" * 256, "x" * 8000, "x" * 9000, "i\x85d", "\xa0"]:
        await target.post("delivery id (crafted)", {DELIVERY_HEADER: value})
    body = json.dumps(issue_updated("OPS-1")).encode()
    auth = f"Authorization: {target.scheme} {target.good_token()}".encode()
    for ident in (b"a\x01b", b"a\x00b", b"\x7f", b"\x1b[31mred", b"\xff\xfe", b"a\x0bb"):
        await target.raw(
            "delivery id (raw bytes)",
            [auth, b"Content-Type: application/json", DELIVERY_HEADER.encode() + b": " + ident],
            body,
        )

    non_printable = st.characters(
        whitelist_categories=("Zs", "Zl", "Zp", "Cf", "Cc", "Co"),
        blacklist_characters=" \t\r\n\x00\x7f",
    ).filter(lambda c: ord(c) >= 0x20)
    visible = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)
    # Visible text on both sides: the identifier is stripped of surrounding white space.
    garbled = st.tuples(visible, non_printable, visible).map("".join)
    oversized = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=256)
    blank = st.text(" \t", max_size=20)

    async def send_ident(value: str) -> int:
        return await target.post("delivery id (random)", {DELIVERY_HEADER: value})

    await target.hypothesize(garbled | oversized | blank, send_ident)


# ----- the tests -----------------------------------------------------------------------


def _record(target: Target) -> int:
    total = sum(target.counts.values())
    report = json.loads(ARTIFACT.read_text()) if ARTIFACT.exists() else {}
    report[f"{target.engine}-{target.mode}"] = {
        **dict(sorted(target.counts.items())),
        "total": total,
    }
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{target.engine}/{target.mode}: {total} hostile inputs tried: {dict(target.counts)}")
    return total


async def _nothing_happened(target: Target, settings: Settings, fake: FakeUbiOps) -> None:
    assert target.failures == [], "\n".join(target.failures)
    assert await row_counts(settings) == {"events": 0, "rule_matches": 0, "action_runs": 0}
    assert fake.requests == []


async def _honest_delivery_acts(target: Target, settings: Settings, fake: FakeUbiOps) -> None:
    """The control: the same app stores a real delivery and the rule calls UbiOps."""
    resp = await target.client.post(
        "/webhooks/jira", data=json.dumps(issue_updated("OPS-2")), headers=target.good_headers()
    )
    assert resp.status == 202, await resp.text()

    async def acted() -> bool:
        return len(fake.calls("GET", r"/projects/ml-prod/deployments")) == 1

    await wait_for(acted)
    assert (await row_counts(settings))["events"] == 1


async def test_hostile_input_oauth_mode(
    make_client: ClientFactory,
    settings: Settings,
    any_event_rules: Path,
    ubiops_fake: tuple[FakeUbiOps, str],
) -> None:
    fake, url = ubiops_fake
    client = await make_client(
        settings, rules_dir=any_event_rules, ubiops_api_url=url, ubiops_api_token=TOKEN
    )
    target = Target(client, "oauth", _engine_name(settings))
    keys = InstallKeys()
    await token_attacks(target, keys)
    await body_attacks(target)
    await header_attacks(target)
    await asyncio.sleep(0.3)  # the workers had their chance to act on anything stored
    assert _record(target) >= 5 * MAX_EXAMPLES
    await _nothing_happened(target, settings, fake)
    await _honest_delivery_acts(target, settings, fake)


async def test_hostile_input_connect_mode(
    make_client: ClientFactory,
    settings: Settings,
    any_event_rules: Path,
    ubiops_fake: tuple[FakeUbiOps, str],
    aiohttp_server: Callable[..., Any],
) -> None:
    fake, url = ubiops_fake
    key_server = KeyServer(InstallKeys())
    keys_url = str((await aiohttp_server(key_server.app())).make_url("")).rstrip("/")
    client = await make_client(
        settings,
        rules_dir=any_event_rules,
        ubiops_api_url=url,
        ubiops_api_token=TOKEN,
        jira_auth_mode="connect",
        public_url=PUBLIC_URL,
        jira_connect_keys_url=keys_url,
    )
    assert await install(client, key_server.keys) == 204
    target = Target(client, "connect", _engine_name(settings))
    await token_attacks(target, key_server.keys)
    await lifecycle_attacks(target, key_server.keys)
    await body_attacks(target)
    await header_attacks(target)
    await asyncio.sleep(0.3)
    assert _record(target) >= 5 * MAX_EXAMPLES
    await _nothing_happened(target, settings, fake)
    engine = create_engine(settings.database_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(tenants))).all()
    finally:
        await engine.dispose()
    assert [(r.client_key, r.shared_secret, bool(r.enabled)) for r in rows] == [
        (CLIENT_KEY, SECRET, True)
    ]
    await _honest_delivery_acts(target, settings, fake)
