"""A TCP proxy on localhost that can cut the connections it carries (a database dying)."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """Forward 127.0.0.1:<port> to a target; `cut_on` drops a connection mid-stream.

    `go_down()` plays the database server stopping (every connection cut, new ones
    refused) and `come_back()` its restart on the same port.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.cut_on: bytes | None = None  # drop when client->server data contains this
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is not None:
            return self._port
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def go_down(self) -> None:
        """Stop listening (connects are refused) and cut every open connection."""
        assert self._server is not None
        self._port = self.port
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def come_back(self) -> None:
        """Listen again on the same port after `go_down`."""
        assert self._port is not None
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self._port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection(*self.target)
        self._writers |= {c_writer, s_writer}

        async def pump(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool
        ) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await reader.read(65536):
                    if up and self.cut_on is not None and self.cut_on in data:
                        self.cuts += 1
                        break
                    writer.write(data)
                    await writer.drain()
            for w in (c_writer, s_writer):
                w.close()

        await asyncio.gather(pump(c_reader, s_writer, True), pump(s_reader, c_writer, False))
        self._writers -= {c_writer, s_writer}
