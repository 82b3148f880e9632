"""A small HTTP forward proxy on localhost that records what it was asked to carry.

It reads the request a client sends to a proxy (absolute-form request line, optional
Proxy-Authorization), records both, and relays the request to its origin with the
origin-form line, one request per connection. Enough for plain-HTTP targets (the fake
services); HTTPS targets would need CONNECT, which it refuses with 501.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

HOP_BY_HOP = frozenset({"proxy-authorization", "proxy-connection", "connection", "keep-alive"})


@dataclass
class ForwardProxy:
    """Record each proxied request line and its Proxy-Authorization, then relay it."""

    request_lines: list[str] = field(default_factory=list)
    proxy_authorizations: list[str | None] = field(default_factory=list)
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            method, target, version = request_line.split(" ")
            headers = [tuple(line.split(":", 1)) for line in header_lines if line]
            lower = {name.strip().lower(): value.strip() for name, value in headers}
            self.request_lines.append(request_line)
            self.proxy_authorizations.append(lower.get("proxy-authorization"))
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\n\r\n")
                return
            origin = urlsplit(target)
            size = int(lower.get("content-length", "0"))
            body = await reader.readexactly(size) if size else b""
            up_reader, up_writer = await asyncio.open_connection(origin.hostname, origin.port)
            path = origin.path + (f"?{origin.query}" if origin.query else "")
            kept = [f"{n}:{v}" for n, v in headers if n.strip().lower() not in HOP_BY_HOP]
            lines = [f"{method} {path} {version}", *kept, "Connection: close", "", ""]
            up_writer.write("\r\n".join(lines).encode("latin-1") + body)
            await up_writer.drain()
            writer.write(await up_reader.read())  # the origin closes after its answer
            up_writer.close()
            await up_writer.wait_closed()
        finally:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
