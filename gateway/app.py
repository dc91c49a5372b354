"""The gateway, wired in one place: drivers, workers, registry, executor, servicer, link."""
from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
from dataclasses import dataclass, field

from gateway.api.link_client import OrchestratorLink
from gateway.api.servicer import GatewayServicer
from gateway.core.executor import StepExecutor
from gateway.core.registry import ReaderRegistry
from gateway.drivers.base import TokenDriver
from gateway.drivers.pkcs11 import Pkcs11TokenDriver
from gateway.metrics import GatewayMetrics
from shared.config import GatewaySettings
from shared.logging import get_logger
from shared.metrics import MetricsEndpoint
from shared.permissions import PERMISSIONS, require_rows
from shared.proto import gateway_pb2, gateway_pb2_grpc
from shared.rpc import Server
from shared.tls import server_security, settings_tls

log = get_logger(__name__)


@dataclass
class Gateway:
    settings: GatewaySettings
    registry: ReaderRegistry
    executor: StepExecutor
    server: Server
    link: OrchestratorLink | None
    metrics: GatewayMetrics | None = None
    metrics_endpoint: MetricsEndpoint | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.server.address

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.stop)
        await self.server.stop()
        await asyncio.to_thread(self.registry.close)


def _pcsc_driver():
    """PC/SC if pcscd answers; a gateway with only tokens runs fine without it."""
    try:
        from gateway.drivers.pcsc import PyscardDriver
        driver = PyscardDriver()
        driver.list_readers()
        return driver
    except Exception as exc:  # pcscd missing or not running
        log.warning("PC/SC not available, serving PKCS#11 tokens only", error=str(exc))
        return None


def _token_drivers(module_paths: list[pathlib.Path]) -> list[TokenDriver]:
    """A driver per configured PKCS#11 module; a module that cannot be loaded is a
    ConfigurationError (the drivers already built are closed again)."""
    drivers: list[TokenDriver] = []
    try:
        for path in module_paths:
            drivers.append(Pkcs11TokenDriver(str(path)))
    except BaseException:
        for driver in drivers:
            driver.close()
        raise
    return drivers


async def start(settings: GatewaySettings) -> Gateway:
    # Mutual TLS unless explicitly insecure: one certificate (CN = gateway id, role gateway)
    # serves GatewayService and authenticates the link to the orchestrator.
    tls = settings_tls(settings, f"gateway {settings.gateway_id}", settings.gateway_id, role="gateway",
                       common_name=settings.gateway_id)
    drivers = await asyncio.to_thread(_token_drivers, settings.pkcs11_modules)
    pcsc = await asyncio.to_thread(_pcsc_driver) if settings.pcsc else None
    registry = ReaderRegistry(token_drivers=drivers, pcsc=pcsc)
    await registry.refresh()
    metrics = GatewayMetrics()
    executor = StepExecutor(registry, observer=metrics)
    credentials, interceptors = server_security(tls, PERMISSIONS)
    server = Server(settings.listen, [
        (gateway_pb2_grpc.add_GatewayServiceServicer_to_server, GatewayServicer(registry, executor),
         gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name),
    ], credentials=credentials, interceptors=interceptors)
    require_rows(f"gateway {settings.gateway_id}", server.service_names, PERMISSIONS)
    metrics_endpoint = None
    if settings.metrics_listen:
        metrics.watch_readers(registry, asyncio.get_running_loop())
        metrics_endpoint = MetricsEndpoint(settings.metrics_listen, metrics.registry)
    await server.start()
    gateway = Gateway(settings, registry, executor, server, None, metrics, metrics_endpoint)
    gateway._tasks.append(asyncio.create_task(registry.watch()))
    if settings.orchestrator:
        gateway.link = OrchestratorLink(settings.orchestrator, settings.gateway_id, registry, executor,
                                        site=settings.site, labels=settings.labels,
                                        credentials=tls.channel_credentials() if tls else None,
                                        backoff_min_s=settings.reconnect_min_s, backoff_max_s=settings.reconnect_max_s,
                                        observer=metrics)
        gateway._tasks.append(asyncio.create_task(gateway.link.run_forever()))
    log.info("gateway serving", address=server.address, gateway_id=settings.gateway_id,
             readers=len(registry.readers()), orchestrator=settings.orchestrator or None,
             metrics=gateway.metrics_endpoint.address if gateway.metrics_endpoint else None)
    return gateway


async def serve(settings: GatewaySettings) -> None:
    gateway = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.stop()
