"""The orchestrator, wired in one place: store, CAs, templates, pool, services, servicers."""
from __future__ import annotations

import asyncio
import signal
import uuid
from dataclasses import dataclass

from orchestrator.api.link import GatewayLinkServicer
from orchestrator.api.servicer import OrchestratorServicer
from orchestrator.ca.base import CaConnector
from orchestrator.ca.local import LocalCa
from orchestrator.domain.templates import embedded_defaults
from orchestrator.services.pool import ReaderPool
from orchestrator.services.production import BoundaryHook, ProductionService
from orchestrator.store.store import Store
from shared.config import OrchestratorSettings
from shared.logging import get_logger
from shared.proto import link_pb2, link_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc
from shared.rpc import Server

log = get_logger(__name__)


@dataclass
class Orchestrator:
    settings: OrchestratorSettings
    store: Store
    cas: dict[str, CaConnector]
    pool: ReaderPool
    production: ProductionService
    server: Server

    @property
    def address(self) -> str:
        return self.server.address

    async def stop(self) -> None:
        await self.server.stop()


async def start(settings: OrchestratorSettings, *, boundary: BoundaryHook | None = None) -> Orchestrator:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.effective_database_url())
    await asyncio.to_thread(store.migrate)
    local_ca = await asyncio.to_thread(LocalCa, settings.data_dir / "ca", "local")
    cas: dict[str, CaConnector] = {local_ca.name: local_ca}
    pool = ReaderPool()
    production = ProductionService(store, pool, cas, embedded_defaults(), step_timeout_s=settings.step_timeout_s,
                                   boundary=boundary)
    server = Server(settings.listen, [
        (orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server,
         OrchestratorServicer(store, pool, production, cas),
         orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name),
        (link_pb2_grpc.add_GatewayLinkServicer_to_server,
         GatewayLinkServicer(pool, f"orchestrator-{uuid.uuid4().hex[:8]}", settings.heartbeat_interval_s),
         link_pb2.DESCRIPTOR.services_by_name["GatewayLink"].full_name),
    ])
    await server.start()
    log.info("orchestrator serving", address=server.address, database=_safe_url(settings.effective_database_url()))
    return Orchestrator(settings, store, cas, pool, production, server)


def _safe_url(url: str) -> str:
    """The database URL without its password."""
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)


async def serve(settings: OrchestratorSettings) -> None:
    orchestrator = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await orchestrator.stop()
