"""Typed application keys shared by the web modules."""

from __future__ import annotations

from typing import Protocol

import aiohttp
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.db.store import EventStore
from bot.db.tenants import Tenants
from bot.pipeline.executor import ActionExecutor
from bot.pipeline.processor import EventProcessor
from bot.rules.watcher import RuleWatcher
from bot.settings import Settings
from bot.web.install_keys import InstallKeys

SETTINGS = web.AppKey("settings", Settings)
ENGINE = web.AppKey("engine", AsyncEngine)
STORE = web.AppKey("store", EventStore)
TENANTS = web.AppKey("tenants", Tenants)
HTTP = web.AppKey("http", aiohttp.ClientSession)


class Clock(Protocol):
    """Seconds since the epoch (time.time, or a test's controllable clock)."""

    def __call__(self) -> float: ...


CLOCK = web.AppKey("clock", Clock)
INSTALL_KEYS = web.AppKey("install_keys", InstallKeys)
RULES = web.AppKey("rules", RuleWatcher)
PROCESSOR = web.AppKey("processor", EventProcessor)
EXECUTOR = web.AppKey("executor", ActionExecutor)
