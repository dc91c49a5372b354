"""The Prometheus endpoint both servers share: a registry of their own (never the global
default one, so several servers can live in one process, as in the tests), served on
HOST:PORT at /metrics by prometheus-client's HTTP server on its own thread.

Collectors run on that thread at each scrape. What lives on the server's event loop (the
reader pool, the gateway's registry) is read ON the loop through `on_loop`, with a timeout,
so a scrape never races the loop nor waits for ever on a stuck one.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, start_http_server

from shared.errors import ConfigurationError
from shared.rpc import parse_listen

T = TypeVar("T")
PREFIX = "cardline_"
LOOP_READ_TIMEOUT_S = 2.0


def on_loop(loop: asyncio.AbstractEventLoop, read: Callable[[], T], timeout_s: float = LOOP_READ_TIMEOUT_S) -> T:
    """READ() run on LOOP from another thread; TimeoutError if the loop does not get to it."""
    async def call() -> T:
        return read()

    return asyncio.run_coroutine_threadsafe(call(), loop).result(timeout_s)


class MetricsEndpoint:
    """/metrics of REGISTRY on LISTEN (HOST:PORT; port 0 picks a free one)."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        host, port = parse_listen(listen)
        try:
            # [::] names IPv6 in HOST:PORT; the server wants the bare address.
            self._server, self._thread = start_http_server(port, addr=host.strip("[]"), registry=registry)
        except OSError as exc:
            raise ConfigurationError(f"metrics_listen {listen}: cannot listen: {exc.strerror or exc}") from None
        self.address = f"{host}:{self._server.server_port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
