"""One thread per PKCS#11 module: every driver call, and the driver's construction, run on it.

python-pkcs11 initialises modules as single-threaded (C_Initialize(NULL)), so SoftHSM2 turns
its own locking off and two threads inside one module crash the process. A single-thread
executor serialises the calls in arrival order; asyncio callers await them without blocking
the event loop. For parallelism, run modules in several processes, not threads.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import threading
from collections.abc import Callable
from typing import Any

from gateway.drivers.base import TokenDriver

_numbers = itertools.count()


class TokenWorker:
    def __init__(self, factory: Callable[[], TokenDriver], name: str = "") -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"token-{name or next(_numbers)}")
        self._closed = False
        # Built on the worker thread; a construction error is raised by every later call.
        self._driver_future = self._executor.submit(factory)

    def _invoke(self, method_name: str, args: tuple, kwargs: dict) -> Any:
        # Runs on the worker thread, after the factory (FIFO): result() does not wait.
        driver = self._driver_future.result()
        return getattr(driver, method_name)(*args, **kwargs)

    def _check(self, method_name: str) -> None:
        if method_name.startswith("_") or method_name == "close":
            raise ValueError(f"{method_name!r} is not a driver operation")
        if self._closed:
            raise RuntimeError("token worker is closed")

    async def call(self, method_name: str, *args: Any, **kwargs: Any) -> Any:
        """Runs driver.<method_name>(*args, **kwargs) on the worker thread."""
        self._check(method_name)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, functools.partial(self._invoke, method_name, args, kwargs))

    def call_sync(self, method_name: str, *args: Any, **kwargs: Any) -> Any:
        """Same as call() for threads without an event loop; blocks until done."""
        self._check(method_name)
        return self._executor.submit(self._invoke, method_name, args, kwargs).result()

    def driver_thread_ident(self) -> int:
        """The worker thread's id (for tests and diagnostics)."""
        return self._executor.submit(threading.get_ident).result()

    def close(self) -> None:
        """Closes the driver on its thread after queued calls finish, then stops the thread."""
        if self._closed:
            return
        self._closed = True
        # Queued calls run first (FIFO); a call that slips in after this finds the driver closed.
        done = self._executor.submit(self._close_driver)
        try:
            done.result()
        finally:
            self._executor.shutdown(wait=True)

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def _close_driver(self) -> None:
        try:
            driver = self._driver_future.result()
        except Exception:  # noqa: BLE001 - never built: nothing to close
            return
        driver.close()
