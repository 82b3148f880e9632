"""Error answers: deploybot's errors as statuses with a short JSON reason, nothing else.

A wrapper around each handler rather than a middleware: aiohttp's middleware chain cost
the delivery path more than the wrapped work (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from multidict import MultiDictProxy

from bot.errors import (
    PayloadError,
    RequestTimeout,
    StoreUnavailable,
    UnsupportedMediaType,
    VerificationError,
)
from bot.web.keys import SETTINGS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_STATUS: list[tuple[type[Exception], int]] = [
    (VerificationError, 401),
    (RequestTimeout, 408),
    (UnsupportedMediaType, 415),
    (PayloadError, 400),
    (StoreUnavailable, 503),
]
_MAPPED = tuple(kind for kind, _ in _STATUS)
_IDENTITY = ("", "identity")


def _utf8_headers(request: web.Request) -> bool:
    """Tell whether every header value is UTF-8 (aiohttp hands on other bytes as surrogates,
    which fail later wherever the text is encoded: an Authorization or Cookie check)."""
    for _name, value in request.raw_headers:
        if not value.isascii():
            try:
                value.decode()
            except UnicodeDecodeError:
                return False
    return True


def json_errors(handler: Handler) -> Handler:
    """`handler`, with deploybot's errors answered as their statuses (every route has it)."""

    @functools.wraps(handler)
    async def answer(request: web.Request) -> web.StreamResponse:
        # Jira does not compress: a compressed body is refused unread, before any token
        # check, so that no one makes us inflate anything (the server does not either:
        # create_app turns aiohttp's auto_decompress off).
        encoding = request.headers.get("Content-Encoding")
        if encoding is not None and encoding.strip().lower() not in _IDENTITY:
            refused = web.json_response(
                {"error": "Content-Encoding is not supported: send the body uncompressed"},
                status=415,
                headers={"Accept-Encoding": "identity"},
            )
            refused.force_close()  # no next request here: the unread body is not kept for one
            return refused
        if not _utf8_headers(request):
            return web.json_response({"error": "header bytes are not UTF-8"}, status=400)
        try:
            return await handler(request)
        except UnicodeError:  # request text (path, query, form) that is not UTF-8
            return web.json_response({"error": "request text is not UTF-8"}, status=400)
        except web.HTTPRequestEntityTooLarge:
            return web.json_response({"error": "request body too large"}, status=413)
        except _MAPPED as exc:
            status = next(code for kind, code in _STATUS if isinstance(exc, kind))
            headers = {"WWW-Authenticate": "JWT"} if status == 401 else None
            if status == 503:
                headers = {"Retry-After": "5"}
            response = web.json_response({"error": str(exc)}, status=status, headers=headers)
            if status == 408:
                response.force_close()  # the rest of a trickled body is not waited for
            return response

    return answer


async def read_body(request: web.Request) -> bytes:
    """The request body, read within the client timeout (a trickling client gets 408)."""
    if request.content.is_eof():
        # All of it has arrived (the common case: a Jira body fits a few packets): nothing
        # to wait for, so no timer (asyncio.timeout cost ~6% of the loop per delivery).
        return await request.read()
    try:
        async with asyncio.timeout(request.app[SETTINGS].client_timeout_s):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout("request body not received in time") from None


async def read_form(
    request: web.Request,
) -> MultiDictProxy[str | bytes | bytearray | web.FileField]:
    """The request's form fields, read within the client timeout."""
    try:
        async with asyncio.timeout(request.app[SETTINGS].client_timeout_s):
            return await request.post()
    except TimeoutError:
        raise RequestTimeout("request body not received in time") from None


def add_routes(app: web.Application, routes: Iterable[tuple[str, str, Handler]]) -> None:
    """Register `(method, path, handler)` routes, each handler behind `json_errors`."""
    for method, path, handler in routes:
        app.router.add_route(method, path, json_errors(handler))
