"""Outgoing calls through a proxy: the explicit setting, and the standard variables.

A real forward proxy on localhost (tests/fakes/forward_proxy.py) carries the calls of a
UbiOps client built as `deploybot serve` builds it, to the UbiOps fake.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestServer

from bot.errors import SettingsError
from bot.services.http import client_session
from bot.settings import Settings, from_env
from bot.web.app import service_clients
from tests.fakes.forward_proxy import ForwardProxy
from tests.fakes.ubiops import FakeUbiOps

ServerFactory = Callable[..., Awaitable[TestServer]]
TOKEN = "proxy-test-token-0123456789"
PROXY_PASSWORD = "pr0xy-s3cret-value"


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    forward = ForwardProxy()
    await forward.start()
    yield forward
    await forward.close()


@pytest.fixture
async def ubiops_url(aiohttp_server: ServerFactory) -> str:
    fake = FakeUbiOps(token=TOKEN, projects=("ml-prod",))
    server = await aiohttp_server(fake.app())
    return str(server.make_url(fake.prefix))


async def _list_deployments(settings: Settings) -> object:
    async with client_session(proxy=settings.proxy) as session:
        ubiops = service_clients(settings, session)["ubiops"]
        assert ubiops is not None
        return await ubiops.call("deployments_list", {"project_name": "ml-prod"})


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_the_explicit_proxy_carries_calls_with_its_credentials(
    proxy: ForwardProxy, ubiops_url: str
) -> None:
    with_url_credentials = proxy.url.replace("http://", f"http://ops:{PROXY_PASSWORD}@")
    settings = from_env(
        {
            "UBIOPS_API_URL": ubiops_url,
            "UBIOPS_API_TOKEN": TOKEN,
            "DEPLOYBOT_HTTP_PROXY": with_url_credentials,
        },
        dotenv=None,
    )
    assert await _list_deployments(settings) == []
    assert proxy.request_lines == [f"GET {ubiops_url}/projects/ml-prod/deployments HTTP/1.1"]
    assert proxy.proxy_authorizations == [_basic("ops", PROXY_PASSWORD)]


async def test_separate_proxy_credentials_replace_those_of_the_url(
    proxy: ForwardProxy, ubiops_url: str
) -> None:
    settings = from_env(
        {
            "UBIOPS_API_URL": ubiops_url,
            "UBIOPS_API_TOKEN": TOKEN,
            "DEPLOYBOT_HTTP_PROXY": proxy.url.replace("http://", "http://old:old@"),
            "DEPLOYBOT_HTTP_PROXY_USER": "ops@corp",
            "DEPLOYBOT_HTTP_PROXY_PASSWORD": PROXY_PASSWORD + ":/@",
        },
        dotenv=None,
    )
    assert await _list_deployments(settings) == []
    assert proxy.proxy_authorizations == [_basic("ops@corp", PROXY_PASSWORD + ":/@")]


async def test_the_standard_proxy_variables_are_honoured_with_no_proxy(
    proxy: ForwardProxy, ubiops_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = from_env({"UBIOPS_API_URL": ubiops_url, "UBIOPS_API_TOKEN": TOKEN}, dotenv=None)
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("http_proxy", proxy.url)
    assert await _list_deployments(settings) == []
    assert proxy.request_lines == [f"GET {ubiops_url}/projects/ml-prod/deployments HTTP/1.1"]
    assert proxy.proxy_authorizations == [None]
    # NO_PROXY names the host: the call goes direct
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert await _list_deployments(settings) == []
    assert len(proxy.request_lines) == 1


async def test_without_any_proxy_calls_go_direct(
    proxy: ForwardProxy, ubiops_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    settings = from_env({"UBIOPS_API_URL": ubiops_url, "UBIOPS_API_TOKEN": TOKEN}, dotenv=None)
    assert settings.proxy is None
    assert await _list_deployments(settings) == []
    assert proxy.request_lines == []


def test_proxy_credentials_are_never_shown() -> None:
    url = f"http://ops:{PROXY_PASSWORD}@proxy.corp:3128"
    settings = from_env({"DEPLOYBOT_HTTP_PROXY": url}, dotenv=None)
    assert PROXY_PASSWORD not in repr(settings)
    assert PROXY_PASSWORD in settings.secrets  # so the log filter masks it anywhere
    [note] = settings.startup_notes()
    assert "http://***@proxy.corp:3128" in note
    assert PROXY_PASSWORD not in note and "ops" not in note
    separate = from_env(
        {
            "DEPLOYBOT_HTTP_PROXY": "http://proxy.corp:3128",
            "DEPLOYBOT_HTTP_PROXY_USER": "ops",
            "DEPLOYBOT_HTTP_PROXY_PASSWORD": PROXY_PASSWORD,
        },
        dotenv=None,
    )
    assert PROXY_PASSWORD not in repr(separate)
    assert PROXY_PASSWORD in separate.secrets
    assert all(PROXY_PASSWORD not in note for note in separate.startup_notes())
    with pytest.raises(SettingsError) as refused:
        from_env({"DEPLOYBOT_HTTP_PROXY": f"ops:{PROXY_PASSWORD}@proxy.corp:3128"}, dotenv=None)
    assert PROXY_PASSWORD not in str(refused.value)
