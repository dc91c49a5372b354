"""The gateway's Prometheus metrics, in one registry per gateway (docs/observability.md).

Steps and the link are counted through the StepExecutor's and the OrchestratorLink's
observer hooks, which `GatewayMetrics` implements; the readers are read at scrape time, on
the gateway's event loop."""
from __future__ import annotations

import asyncio
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.core.registry import ReaderRegistry
from shared import cards
from shared.logging import get_logger
from shared.metrics import PREFIX, on_loop

log = get_logger(__name__)

#: A step takes milliseconds (reading the inventory) to tens of seconds (RSA key generation).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.step_duration = Histogram(PREFIX + "gateway_step_duration_seconds",
                                       "Steps run on readers by operation and outcome (ok, replayed, failed).",
                                       ["operation", "outcome"], buckets=STEP_BUCKETS, registry=r)
        self.step_failures = Counter(PREFIX + "gateway_step_failures", "Failed steps by operation and error reason.",
                                     ["operation", "reason"], registry=r)
        self.link_up = Gauge(PREFIX + "gateway_orchestrator_link_up",
                             "1 while the link to the orchestrator is attached.", registry=r)
        self.attached_to = Gauge(PREFIX + "gateway_orchestrator_attached",
                                 "1 for the orchestrator address the link is attached to (none while down).",
                                 ["address"], registry=r)
        self.reconnects = Counter(PREFIX + "gateway_orchestrator_reconnects",
                                  "Times the link to the orchestrator was dialled again after it broke.", registry=r)

    # --- hooks (StepObserver, LinkObserver) ------------------------------------------------

    def step_done(self, operation: str, seconds: float, replayed: bool, reason: str | None) -> None:
        outcome = "failed" if reason is not None else "replayed" if replayed else "ok"
        self.step_duration.labels(operation, outcome).observe(seconds)
        if reason is not None:
            self.step_failures.labels(operation, reason).inc()

    def link_changed(self, up: bool, address: str) -> None:
        self.link_up.set(1 if up else 0)
        self.attached_to.clear()
        if up:
            self.attached_to.labels(address).set(1)

    def redialling(self) -> None:
        self.reconnects.inc()

    # --- collectors --------------------------------------------------------------------------

    def watch_readers(self, registry: ReaderRegistry, loop: asyncio.AbstractEventLoop) -> None:
        self.registry.register(_ReaderCollector(registry, loop))


class _ReaderCollector(Collector):
    def __init__(self, registry: ReaderRegistry, loop: asyncio.AbstractEventLoop) -> None:
        self.readers, self.loop = registry, loop

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter([self._family(Tally())])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            readers = on_loop(self.loop, self.readers.readers)
        except (TimeoutError, RuntimeError) as exc:      # loop stuck or closed: no reader figures this time
            log.warning("metrics: readers not read", error=type(exc).__name__)
            return iter(())
        return iter([self._family(Tally((r.kind.value, "true" if r.card_present else "false") for r in readers))])

    @staticmethod
    def _family(counts: Tally[tuple[str, str]]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(PREFIX + "gateway_readers", "This gateway's readers by kind and card presence.",
                                   labels=["kind", "card_present"])
        for kind in cards.ReaderKind:
            for present in ("true", "false"):
                family.add_metric([kind.value, present], counts[(kind.value, present)])
        return family
