"""gRPC health that follows what the services depend on (docs/observability.md).

Every `interval_s` the monitor checks each component — the database, each CA — on a worker
thread, waiting at most `timeout_s` for it (a check still running from the round before
counts as failed, and is not started twice). Each gRPC service is SERVING only while every
component it needs passed its last check; the overall status "" only while all passed.
Status changes are logged (a warning on the way down, info on the way back).
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from orchestrator.ca.base import CaConnector
from orchestrator.store.store import Store
from shared.logging import get_logger

log = get_logger(__name__)

DATABASE = "database"
#: The request id a CA is asked about to see whether it answers; nothing is ever issued for it.
PROBE_REQUEST_ID = "cardline-health-probe"

Check = Callable[[], object]                     # blocking; raises when the component is away
SetStatus = Callable[[str, bool], Awaitable[None]]   # (service name, serving)


def ca_component(name: str) -> str:
    return f"ca:{name}"


def database_check(store: Store) -> Check:
    """A connection and a query on the schema's table that work."""
    return store.ping


def ca_check(ca: CaConnector) -> Check:
    """A CA answers a question about an unknown request (a connector may offer a cheaper
    `check()` of its own)."""
    own = getattr(ca, "check", None)
    if callable(own):
        return own
    return lambda: ca.find_issued(PROBE_REQUEST_ID)


class HealthMonitor:
    def __init__(self, checks: Mapping[str, Check], needs: Mapping[str, frozenset[str] | None],
                 set_status: SetStatus, *, interval_s: float, timeout_s: float,
                 observe: Callable[[str, str | None], None] = lambda component, error: None) -> None:
        """needs: gRPC service name -> the components it needs (None: every component); ""
        (the overall status) needs every component."""
        self.checks = dict(checks)
        self.needs = {"": None, **needs}
        self.set_status = set_status
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.observe = observe
        self.errors: dict[str, str | None] = {}
        self._running: dict[str, asyncio.Future] = {}
        self._published: dict[str, bool] = {}

    async def check_once(self) -> dict[str, str | None]:
        """Runs every check (at most timeout_s), publishes the statuses; component -> error."""
        results = await asyncio.gather(*(self._check(c) for c in self.checks))
        for component, error in zip(self.checks, results, strict=True):
            before = self.errors.get(component, "")
            if error and before != error:
                log.warning("health check failed", component=component, error=error)
            elif not error and before:
                log.info("health check passed again", component=component)
            self.errors[component] = error
            self.observe(component, error)
        failing = {c for c, e in self.errors.items() if e}
        for service, needed in self.needs.items():
            serving = not (failing if needed is None else failing & needed)
            if self._published.get(service) != serving:
                await self.set_status(service, serving)
                self._published[service] = serving
        return dict(self.errors)

    async def _check(self, component: str) -> str | None:
        running = self._running.get(component)
        if running is None or running.done():
            running = self._running[component] = asyncio.ensure_future(asyncio.to_thread(self.checks[component]))
        try:
            await asyncio.wait_for(asyncio.shield(running), self.timeout_s)
        except TimeoutError:
            return f"no answer within {self.timeout_s:g} s"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        return None

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check_once()
            except Exception:
                log.exception("health round failed")
