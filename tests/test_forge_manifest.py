"""forge/manifest.yml against the documented Forge manifest schema (keys, module names).

https://developer.atlassian.com/platform/forge/manifest-reference/ : `trigger` (key,
endpoint or function, events), `endpoint` (key, remote, route.path, auth.appSystemToken
.enabled / auth.appUserToken.enabled), `remotes` (key, baseUrl, operations), keys of at
most 23 characters matching ^[a-zA-Z0-9_-]+$.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from bot.core.forge import FORGE_EVENTS
from bot.web.forge import FORGE_PATH

MANIFEST = Path(__file__).resolve().parent.parent / "forge" / "manifest.yml"
KEY = re.compile(r"^[a-zA-Z0-9_-]{1,23}$")
TOP_LEVEL = {"modules", "remotes", "permissions", "app", "resources", "providers", "connectModules"}
MODULE_KEYS = {
    "trigger": ({"key", "events"}, {"key", "events", "endpoint", "function", "filter"}),
    "endpoint": ({"key", "remote"}, {"key", "remote", "route", "auth"}),
}
REMOTE_KEYS = {"key", "baseUrl", "operations", "auth"}
OPERATIONS = {"storage", "compute", "fetch", "other"}


def load() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    return data


def test_top_level_and_module_shapes() -> None:
    manifest = load()
    assert set(manifest) <= TOP_LEVEL
    assert set(manifest["modules"]) == set(MODULE_KEYS)
    for module, (required, allowed) in MODULE_KEYS.items():
        for item in manifest["modules"][module]:
            assert required <= set(item) <= allowed, (module, item)
            assert KEY.fullmatch(item["key"]), item["key"]
    for remote in manifest["remotes"]:
        assert set(remote) <= REMOTE_KEYS and {"key", "baseUrl"} <= set(remote)
        assert KEY.fullmatch(remote["key"])
        assert remote["baseUrl"].startswith("https://")
        assert set(remote.get("operations", [])) <= OPERATIONS
    assert re.fullmatch(r"ari:cloud:ecosystem::app/[0-9a-f-]{36}", manifest["app"]["id"])


def test_triggers_forward_every_mapped_event_to_deploybot() -> None:
    manifest = load()
    modules = manifest["modules"]
    endpoints = {e["key"]: e for e in modules["endpoint"]}
    remotes = {r["key"] for r in manifest["remotes"]}
    forwarded: set[str] = set()
    for trigger in modules["trigger"]:
        assert "function" not in trigger  # a remote, not a Forge function
        endpoint = endpoints[trigger["endpoint"]]
        assert endpoint["remote"] in remotes
        assert endpoint["route"]["path"] == FORGE_PATH
        assert endpoint["auth"] == {"appSystemToken": {"enabled": True}}
        forwarded |= set(trigger["events"])
    assert forwarded <= set(FORGE_EVENTS)  # deploybot maps every event it is sent
    assert {"avi:jira:updated:issue", "avi:jira:commented:issue"} <= forwarded
    # the system token is only minted with a product scope beside read:app-system-token
    scopes = set(manifest["permissions"]["scopes"])
    assert {"read:app-system-token", "read:jira-work"} <= scopes
