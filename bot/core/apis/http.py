"""`http.request` as data: its parameters (the hosts it may call are checked in
`bot.core.hosts`)."""

from __future__ import annotations

from bot.core.catalog import Operation, Param

SERVICE = "http"
OPERATIONS: tuple[Operation, ...] = ()
PARAMS = (
    Param("method", "body"),
    Param("url", "body", required=True),
    Param("json", "body"),
    Param("headers", "body"),
    Param("expect_status", "body"),
)
