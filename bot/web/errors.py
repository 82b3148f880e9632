"""Error answers: deploybot's errors as statuses with a short JSON reason, nothing else.

A wrapper around each handler rather than a middleware: aiohttp's middleware chain cost
the delivery path more than the wrapped work (docs/performance.md).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web

from bot.errors import (
    PayloadError,
    StoreUnavailable,
    UnsupportedMediaType,
    VerificationError,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STATUS: list[tuple[type[Exception], int]] = [
    (VerificationError, 401),
    (UnsupportedMediaType, 415),
    (PayloadError, 400),
    (StoreUnavailable, 503),
]
_MAPPED = tuple(kind for kind, _ in _STATUS)


def json_errors(handler: Handler) -> Handler:
    """`handler`, with deploybot's errors answered as their statuses (every route has it)."""

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": "request body too large"}, status=413)
        except _MAPPED as exc:
            status = next(code for kind, code in _STATUS if isinstance(exc, kind))
            headers = {"WWW-Authenticate": "JWT"} if status == 401 else None
            if status == 503:
                headers = {"Retry-After": "5"}
            return web.json_response({"error": str(exc)}, status=status, headers=headers)

    return answer


def add_routes(app: web.Application, routes: Iterable[tuple[str, str, Handler]]) -> None:
    """Register `(method, path, handler)` routes, each handler behind `json_errors`."""
    for method, path, handler in routes:
        app.router.add_route(method, path, json_errors(handler))
