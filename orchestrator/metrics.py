"""The orchestrator's Prometheus metrics, all in one registry per orchestrator
(docs/observability.md lists them).

Events are counted through the services' observer hooks (ReaderPool's PoolObserver,
CardTaskService's TaskObserver, the health monitor's results): `OrchestratorMetrics`
implements them. Levels (readers by state, the queue, gateway links, certificates by
state) are read at scrape time by collectors: the pool on its event loop, the store with
two aggregate queries, at most once every `store_min_interval_s` and for at most
`store_timeout_s` (an older answer is served meanwhile).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import threading
import time
from collections.abc import Callable, Collection, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orchestrator.services.pool import PoolCensus, ReaderPool, ReaderState
from shared.logging import get_logger
from shared.metrics import PREFIX, on_loop

log = get_logger(__name__)

#: Card tasks take seconds to minutes; CA calls milliseconds to seconds; queue waits up to an hour.
TASK_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
CA_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
WAIT_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class OrchestratorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.task_duration = Histogram(PREFIX + "card_task_duration_seconds",
                                       "Card tasks by type and outcome (end state), from reader taken to end.",
                                       ["type", "outcome"], buckets=TASK_BUCKETS, registry=r)
        self.task_failures = Counter(PREFIX + "card_task_failures", "Failed card tasks by type and error reason.",
                                     ["type", "reason"], registry=r)
        self.ca_duration = Histogram(PREFIX + "ca_request_duration_seconds",
                                     "Calls to a CA by CA, operation and outcome (ok or failed).",
                                     ["ca", "operation", "outcome"], buckets=CA_BUCKETS, registry=r)
        self.ca_failures = Counter(PREFIX + "ca_request_failures", "Failed calls to a CA by CA, operation and reason.",
                                   ["ca", "operation", "reason"], registry=r)
        self.queue_wait = Histogram(PREFIX + "pool_queue_wait_seconds",
                                    "Time from asking the pool for a reader to getting one, by holder kind.",
                                    ["kind"], buckets=WAIT_BUCKETS, registry=r)
        self.missed_heartbeats = Counter(PREFIX + "gateway_missed_heartbeats",
                                         "Gateways detached because their heartbeats stopped coming.",
                                         ["gateway"], registry=r)
        self.health = Gauge(PREFIX + "health_check_up", "1 if the last health check of the component passed.",
                            ["component"], registry=r)
        self.health_failures = Counter(PREFIX + "health_check_failures", "Failed health checks by component.",
                                       ["component"], registry=r)

    # --- hooks (PoolObserver, TaskObserver, the health monitor) --------------------------------

    def waited(self, kind: str, seconds: float) -> None:
        self.queue_wait.labels(kind).observe(seconds)

    def heartbeats_missed(self, gateway_id: str) -> None:
        self.missed_heartbeats.labels(gateway_id).inc()

    def task_finished(self, task_type: str, outcome: str, seconds: float, reason: str | None) -> None:
        self.task_duration.labels(task_type, outcome).observe(seconds)
        if reason is not None:
            self.task_failures.labels(task_type, reason).inc()

    def ca_called(self, ca: str, operation: str, seconds: float, reason: str | None) -> None:
        self.ca_duration.labels(ca, operation, "ok" if reason is None else "failed").observe(seconds)
        if reason is not None:
            self.ca_failures.labels(ca, operation, reason).inc()

    def checked(self, component: str, error: str | None) -> None:
        self.health.labels(component).set(0 if error else 1)
        if error:
            self.health_failures.labels(component).inc()

    # --- collectors ------------------------------------------------------------------------------

    def watch_pool(self, pool: ReaderPool, loop: asyncio.AbstractEventLoop) -> None:
        self.registry.register(_PoolCollector(pool, loop))

    def watch_certificates(self, census: Callable[[Collection[str]], tuple[dict[str, int], dt.datetime | None]],
                           internal_states: Collection[str], *, min_interval_s: float = 5.0,
                           timeout_s: float = 5.0) -> None:
        self.registry.register(_CertificateCollector(census, internal_states, min_interval_s, timeout_s))


class _PoolCollector(Collector):
    def __init__(self, pool: ReaderPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool, self.loop = pool, loop

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families(None))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            census = on_loop(self.loop, self.pool.census)
        except (TimeoutError, RuntimeError) as exc:      # loop stuck or closed: no pool figures this time
            log.warning("metrics: reader pool not read", error=type(exc).__name__)
            return iter(())
        return iter(self._families(census))

    @staticmethod
    def _families(census: PoolCensus | None) -> list[GaugeMetricFamily]:
        readers = GaugeMetricFamily(PREFIX + "readers", "Readers of attached gateways by state.", labels=["state"])
        depth = GaugeMetricFamily(PREFIX + "pool_queue_depth", "Requests waiting in the pool's queue for a reader.")
        oldest = GaugeMetricFamily(PREFIX + "pool_queue_oldest_wait_seconds",
                                   "How long the longest-waiting request has been in the queue (0: none).")
        links = GaugeMetricFamily(PREFIX + "gateway_links", "Gateways known to the pool by link state.",
                                  labels=["state"])
        up = GaugeMetricFamily(PREFIX + "gateway_link_up", "1 while the gateway's link is attached.",
                               labels=["gateway"])
        if census is not None:
            for state in ReaderState:
                readers.add_metric([state.value], census.readers.get(state, 0))
            depth.add_metric([], census.queue_depth)
            oldest.add_metric([], census.oldest_wait_s)
            connected = sum(census.gateways.values())
            links.add_metric(["connected"], connected)
            links.add_metric(["offline"], len(census.gateways) - connected)
            for gateway_id, attached in sorted(census.gateways.items()):
                up.add_metric([gateway_id], 1 if attached else 0)
        return [readers, depth, oldest, links, up]


class _CertificateCollector(Collector):
    """Certificates by state from the store, bounded: one query at a time on a worker thread,
    at most every min_interval_s, waited for at most timeout_s."""

    def __init__(self, census: Callable[[Collection[str]], tuple[dict[str, int], dt.datetime | None]],
                 internal_states: Collection[str], min_interval_s: float, timeout_s: float) -> None:
        self.census = census
        self.internal_states = frozenset(internal_states)
        self.min_interval_s, self.timeout_s = min_interval_s, timeout_s
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="metrics-store")
        self._lock = threading.Lock()
        self._pending: concurrent.futures.Future | None = None
        self._last: tuple[float, dict[str, int], dt.datetime | None] | None = None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families({}, None, ok=False))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            fresh = self._last is not None and time.monotonic() - self._last[0] < self.min_interval_s
            if not fresh:
                if self._pending is None:
                    self._pending = self._worker.submit(self.census, self.internal_states)
                pending = self._pending
                try:
                    counts, oldest = pending.result(self.timeout_s)
                    self._last = (time.monotonic(), counts, oldest)
                    self._pending = None
                except concurrent.futures.TimeoutError:
                    log.warning("metrics: certificate census still running; serving the previous one")
                except Exception as exc:
                    self._pending = None
                    log.warning("metrics: certificate census failed", error=str(exc))
                    return iter(self._families({}, None, ok=False))
            if self._last is None:
                return iter(self._families({}, None, ok=False))
            _, counts, oldest = self._last
            return iter(self._families(counts, oldest, ok=True))

    def _families(self, counts: dict[str, int], oldest: dt.datetime | None, *, ok: bool) -> list[GaugeMetricFamily]:
        by_state = GaugeMetricFamily(PREFIX + "certificates", "Stored certificates by state.", labels=["state"])
        internal = GaugeMetricFamily(PREFIX + "certificates_internal_issued",
                                     "Certificates in an internal issued state (C14), waiting for their task's end "
                                     "or for handling.")
        age = GaugeMetricFamily(PREFIX + "certificates_internal_issued_oldest_age_seconds",
                                "Age of the oldest certificate in an internal issued state (0: none).")
        census_ok = GaugeMetricFamily(PREFIX + "certificates_census_ok",
                                      "1 if the certificate figures come from a successful store query.")
        census_ok.add_metric([], 1 if ok else 0)
        if ok:
            for state, n in sorted(counts.items()):
                by_state.add_metric([state], n)
            internal.add_metric([], sum(n for state, n in counts.items() if state in self.internal_states))
            now = dt.datetime.now(dt.UTC)
            age.add_metric([], max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0)
        return [by_state, internal, age, census_ok]
