"""A TCP proxy on 127.0.0.1 that a test can use to break the network between a gateway and
the orchestrator: `freeze()` silently drops every byte in both directions (a dead link: no
FIN, no RST, the peers only notice by silence), `cut()` closes every connection (both peers
see the stream end at once) and forwards again for the connections that follow; `stall()`
stops reading in both directions until `flow()` (a peer that reads nothing: TCP's own flow
control pushes back on the sender).

Runs on the test's asyncio loop. Only connects to the target it was given."""
from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.frozen = False
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._links: list[dict] = []          # per connection: {"dead": bool}
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    def freeze(self) -> None:
        self.frozen = True

    def stall(self) -> None:
        self._flowing.clear()

    def flow(self) -> None:
        self._flowing.set()

    def kill_silently(self) -> None:
        """Every open connection goes dead for good (bytes dropped, nothing closed), while
        new connections are forwarded: the network is back, the old link is not."""
        for link in self._links:
            link["dead"] = True

    def cut(self) -> None:
        """Close every open connection; new ones are forwarded again."""
        self.frozen = False
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.frozen:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update({writer, up_writer})
        link = {"dead": False}
        self._links.append(link)
        await asyncio.gather(self._pipe(reader, up_writer, link), self._pipe(up_reader, writer, link),
                             return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            with contextlib.suppress(Exception):
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: dict) -> None:
        while True:
            await self._flowing.wait()
            data = await reader.read(65536)
            if not data:
                writer.transport.abort()
                return
            if not self.frozen and not link["dead"]:   # frozen or dead: the bytes are lost, like on a dead link
                writer.write(data)
                await writer.drain()
