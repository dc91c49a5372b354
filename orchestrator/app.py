"""The orchestrator, wired in one place: configuration, store, CAs, key archive, pool,
services, servicers."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import os
import pathlib
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from orchestrator.api.audit import AuditServicer
from orchestrator.api.ca import CaServicer
from orchestrator.api.cards import CardServicer
from orchestrator.api.certificates import CertificateServicer
from orchestrator.api.leases import LeaseServicer
from orchestrator.api.link import GatewayLinkServicer
from orchestrator.api.orders import OrderServicer
from orchestrator.api.processes import ProcessServicer
from orchestrator.api.reader_pool import ReaderPoolServicer
from orchestrator.api.replica import ReplicaClient, ReplicaServicer
from orchestrator.ca.base import CaConnector
from orchestrator.ca.registry import build_cas, ca_names
from orchestrator.health import DATABASE, HealthMonitor, ca_check, ca_component, database_check
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.services.auditing import ORCHESTRATOR_ACTOR, AuditTrail
from orchestrator.services.card_secrets import CardPukStore
from orchestrator.services.card_tasks import BoundaryHook, CardTaskService
from orchestrator.services.certificates import CertificateService
from orchestrator.services.configuration import Configuration, load_configuration
from orchestrator.services.deployment_keys import require_shared_keys
from orchestrator.services.key_archive import KeyArchive, kek_from_settings
from orchestrator.services.leases import LeaseService, service_selectors
from orchestrator.services.orders import OrderService
from orchestrator.services.pool import ReaderPool
from orchestrator.services.pool_federated import FederatedPool, listen_for_changes
from orchestrator.services.processes import ProcessService
from orchestrator.services.reconciler import Reconciler
from orchestrator.services.sweeper import IssuedSweeper
from orchestrator.store.records import AUDIT_CONFIGURATION_LOADED, CONFIGURATION
from orchestrator.store.store import Store, prepare_schema
from shared.config import OrchestratorSettings
from shared.logging import get_logger
from shared.metrics import MetricsEndpoint
from shared.permissions import PERMISSIONS, require_rows
from shared.proto import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    ca_service_pb2,
    ca_service_pb2_grpc,
    card_service_pb2,
    card_service_pb2_grpc,
    certificate_service_pb2,
    certificate_service_pb2_grpc,
    lease_service_pb2,
    lease_service_pb2_grpc,
    link_pb2,
    link_pb2_grpc,
    order_service_pb2,
    order_service_pb2_grpc,
    process_service_pb2,
    process_service_pb2_grpc,
    reader_pool_service_pb2,
    reader_pool_service_pb2_grpc,
    replica_service_pb2,
    replica_service_pb2_grpc,
)
from shared.rpc import Server
from shared.tls import TlsFiles, revocation_list, server_security, settings_tls

log = get_logger(__name__)
#: The client API, one service per resource, each in its own generated module.
CLIENT_API = (card_service_pb2, certificate_service_pb2, process_service_pb2, reader_pool_service_pb2,
              lease_service_pb2, order_service_pb2, ca_service_pb2, audit_service_pb2)


def service_name(module) -> str:
    """The full name of the one service a generated module defines."""
    (service,) = module.DESCRIPTOR.services_by_name.values()
    return service.full_name


#: Orders to adopt and cancellations made on other replicas are looked for at least this often.
ORDER_ADOPT_INTERVAL_S = 5.0
#: What each service needs for its health to be SERVING (orchestrator/health.py): None = the
#: database and every CA; the reader pool, leases and the link work from memory alone.
HEALTH_NEEDS: dict[str, frozenset[str] | None] = {
    **{service_name(m): None for m in CLIENT_API},
    **{service_name(m): frozenset() for m in (reader_pool_service_pb2, lease_service_pb2, link_pb2)},
    service_name(replica_service_pb2): frozenset({DATABASE}),
}


@dataclass
class Orchestrator:
    settings: OrchestratorSettings
    configuration: Configuration
    store: Store
    cas: dict[str, CaConnector]
    pool: ReaderPool
    card_tasks: CardTaskService
    certificates: CertificateService
    processes: ProcessService
    server: Server
    _background: list[asyncio.Task] = field(default_factory=list)
    reconciler: Reconciler | None = None
    leases: LeaseService | None = None
    orders: OrderService | None = None
    metrics: OrchestratorMetrics | None = None
    metrics_endpoint: MetricsEndpoint | None = None
    health: HealthMonitor | None = None
    audit: AuditTrail | None = None
    replicas: ReplicaClient | None = None

    @property
    def address(self) -> str:
        return self.server.address

    async def stop(self) -> None:
        if self.orders is not None:
            await self.orders.stop()
        if self.leases is not None:
            self.leases.stop()
        if self.audit is not None:            # rows of leases and orders still being written
            await self.audit.drain()
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.metrics_endpoint is not None:
            await asyncio.to_thread(self.metrics_endpoint.stop)
        if isinstance(self.pool, FederatedPool):
            await self.pool.stop()
        await self.server.stop()
        if self.replicas is not None:
            await self.replicas.close()
        # Token-backed CAs and KEKs own a PKCS#11 module each: log out and finalise them.
        archive = self.card_tasks.key_archive
        await _close_key_owners([*self.cas.values(), archive.kek if archive else None])


async def _close_key_owners(owners: list[object]) -> None:
    """Closes each owner that can be closed (a token-backed CA or KEK releases its module)."""
    for owner in owners:
        close = getattr(owner, "close", None)
        if close is not None:
            await asyncio.to_thread(close)


#: Replaces the CAs before anything uses them (tests wrap them to lose answers or be unreachable).
CaWrapper = Callable[[dict[str, CaConnector]], dict[str, CaConnector]]


async def start(settings: OrchestratorSettings, *, boundary: BoundaryHook | None = None,
                wrap_cas: CaWrapper | None = None) -> Orchestrator:
    # Mutual TLS unless explicitly insecure: no TLS material stops start-up before anything else.
    tls = settings_tls(settings, "orchestrator", "orchestrator", role="orchestrator")
    # Configuration first: a wrong one stops start-up with every violation listed (C14),
    # before any CA or database is created or changed.
    configuration = await asyncio.to_thread(load_configuration, settings.config_dir,
                                            internal_issued_state=settings.certificate_internal_issued_state,
                                            known_cas=ca_names(settings.cas),
                                            secrets_dir=settings.effective_secrets_dir())
    for warning in configuration.warnings:
        log.warning("configuration", warning=warning)
    store = Store(settings.effective_database_url())
    try:
        await asyncio.to_thread(prepare_schema, store, settings.migrate)
    except BaseException:
        store.close()
        raise
    # Which configuration this orchestrator runs: every file read, with its hash.
    await asyncio.to_thread(store.audit.record, AUDIT_CONFIGURATION_LOADED, CONFIGURATION,
                            str(settings.config_dir), ORCHESTRATOR_ACTOR,
                            {"files": dict(configuration.files), "processes": sorted(configuration.processes)})
    # A card object in a final state of its card graph frees its physical card (docs/lifecycle.md).
    store.cards.final_states = {t.name: configuration.graphs[t.state_graph].final_states
                                for t in configuration.templates.cards.values()}
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    cas = await asyncio.to_thread(build_cas, settings.cas, settings.data_dir)
    # Health asks the connectors themselves, not what tests wrap around them.
    ca_checks = {ca_component(n): ca_check(ca) for n, ca in cas.items()}
    own_cas = cas
    if wrap_cas is not None:
        cas = wrap_cas(cas)
    owner_id = await asyncio.to_thread(orchestrator_id, settings.data_dir)
    metrics = OrchestratorMetrics()
    archive_settings = settings.key_archive
    kek = await asyncio.to_thread(kek_from_settings, archive_settings.kind, settings.data_dir,
                                  pkcs11_module=archive_settings.pkcs11_module,
                                  token_label=archive_settings.token_label,
                                  pin_file=archive_settings.pin_file, key_label=archive_settings.key_label,
                                  file_path=archive_settings.file_path)
    # Replicas on one database share its CAs and KEK: a different one is refused before the
    # reconciler settles any CA request against it (docs/ca-connectors.md).
    try:
        await asyncio.to_thread(require_shared_keys, store, own_cas, kek, owner_id)
    except BaseException:
        await _close_key_owners([*own_cas.values(), kek])
        store.close()
        raise
    pool, replicas = _reader_pool(settings, store, owner_id, tls, metrics)
    templates = configuration.templates
    card_puks = CardPukStore(store, kek)
    card_tasks = CardTaskService(store, pool, cas, templates, key_archive=KeyArchive(kek),
                                 step_timeout_s=settings.step_timeout_s,
                                 default_relation_type=settings.default_relation_type, boundary=boundary,
                                 owner_id=owner_id, card_puks=card_puks, observer=metrics)
    certificates = CertificateService(store, cas, configuration.graphs,
                                      lambda name: configuration.graphs[templates.certificate(name).state_graph],
                                      templates.internal_issued_state)
    processes = ProcessService(store, configuration, card_tasks, certificates)
    audit = AuditTrail(store)
    leases = LeaseService(pool, default_ttl_s=settings.pool.lease_default_ttl_s,
                          max_ttl_s=settings.pool.lease_max_ttl_s, step_timeout_s=settings.step_timeout_s,
                          max_per_caller=settings.pool.max_leases_per_caller,
                          service_readers=service_selectors(settings.pool.service_readers), audit=audit,
                          shared=store.replica_pool if isinstance(pool, FederatedPool) else None)
    # One CRL refuses revoked callers, travels to every gateway and ends a revoked gateway's link.
    revocations = revocation_list(tls)
    # Who may call what: one row per RPC (shared/permissions.py, docs/permissions.md).
    credentials, interceptors = server_security(tls, PERMISSIONS, revocations=revocations)
    # C16: before serving, settle what an earlier run left behind (pending CA requests,
    # RUNNING tasks and process instances), then again every reconcile_interval_s.
    # A replica whose heartbeat is older than replica.stale_after_s has died - the one rule the
    # shared pool (its gateways offline, its holds and queued requests gone), the reconciler
    # (its RUNNING card tasks taken over: resumed or ended with the reason; its gateways waited
    # for as long again) and the orders (adopted) all follow.
    stale_after = datetime.timedelta(seconds=settings.replica.stale_after_s)
    processes.enable_takeover(asyncio.get_running_loop(), stale_after.total_seconds())
    reconciler = Reconciler(store, cas, templates.internal_issued_state, owner_id=owner_id,
                            live_tasks=lambda: card_tasks.running, live_processes=lambda: processes.running,
                            card_failed_state=lambda name: _card_failed_state(templates, name),
                            stale_after=stale_after,
                            process_task_count=lambda name: _process_task_count(configuration, name),
                            live_handlings=lambda: certificates.running, take_over=processes.claim)
    report = await asyncio.to_thread(reconciler.reconcile_once)
    log.info("start-up reconciliation", **dataclasses.asdict(report))
    # Orders live in the store: this replica's unfinished ones (a restart) and those of replicas
    # gone are adopted once it serves (services/orders.py).
    orders = OrderService(processes, pool, store, owner_id=owner_id, kek=kek, audit=audit,
                          stale_after=reconciler.stale_after,
                          interval_s=min(settings.reconcile_interval_s, ORDER_ADOPT_INTERVAL_S),
                          retention=settings.orders.retention)
    server = Server(settings.listen, [
        (card_service_pb2_grpc.add_CardServiceServicer_to_server, CardServicer(store, card_tasks, templates,
                                                                                card_puks),
         service_name(card_service_pb2)),
        (certificate_service_pb2_grpc.add_CertificateServiceServicer_to_server,
         CertificateServicer(store, certificates), service_name(certificate_service_pb2)),
        (process_service_pb2_grpc.add_ProcessServiceServicer_to_server, ProcessServicer(store, processes),
         service_name(process_service_pb2)),
        (reader_pool_service_pb2_grpc.add_ReaderPoolServiceServicer_to_server, ReaderPoolServicer(pool),
         service_name(reader_pool_service_pb2)),
        (lease_service_pb2_grpc.add_LeaseServiceServicer_to_server, LeaseServicer(leases, store),
         service_name(lease_service_pb2)),
        (order_service_pb2_grpc.add_OrderServiceServicer_to_server, OrderServicer(orders, store),
         service_name(order_service_pb2)),
        (ca_service_pb2_grpc.add_CaServiceServicer_to_server, CaServicer(store, cas, reconciler),
         service_name(ca_service_pb2)),
        (audit_service_pb2_grpc.add_AuditServiceServicer_to_server, AuditServicer(store),
         service_name(audit_service_pb2)),
        (replica_service_pb2_grpc.add_ReplicaServiceServicer_to_server,
         ReplicaServicer(pool), service_name(replica_service_pb2)),
        (link_pb2_grpc.add_GatewayLinkServicer_to_server,
         GatewayLinkServicer(pool, f"orchestrator-{uuid.uuid4().hex[:8]}", settings.heartbeat_interval_s,
                             revocations=revocations),
         service_name(link_pb2)),
    ], credentials=credentials, interceptors=interceptors)
    require_rows("orchestrator", server.service_names, PERMISSIONS)
    metrics_endpoint = None
    if settings.metrics_listen:
        metrics.watch_pool(pool, asyncio.get_running_loop())
        # The store is read for the metrics at most as often as the health checks read it.
        metrics.watch_certificates(store.certificates.census, _internal_issued_states(templates),
                                   min_interval_s=settings.health_check_interval_s,
                                   timeout_s=settings.health_check_timeout_s)
        metrics_endpoint = MetricsEndpoint(settings.metrics_listen, metrics.registry)
    await server.start()
    if isinstance(pool, FederatedPool):
        pool.address = settings.replica.advertise_address or server.address
        if pool.address.rpartition(":")[0] in {"0.0.0.0", "[::]", "::", ""}:
            log.warning("replicas cannot reach this one at its listen address; set replica.advertise_address",
                        address=pool.address)
        pool.every_round(leases.end_expired)          # any replica ends any replica's expired leases
        await pool.start()
    orchestrator = Orchestrator(settings, configuration, store, cas, pool, card_tasks, certificates, processes, server)
    orchestrator.leases, orchestrator.orders, orchestrator.audit = leases, orders, audit
    orchestrator.reconciler = reconciler
    orders.start_adopting()
    orchestrator.replicas = replicas
    orchestrator.metrics, orchestrator.metrics_endpoint = metrics, metrics_endpoint
    # gRPC health follows the database and the CAs: checked now, then every interval.
    health = HealthMonitor({DATABASE: database_check(store), **ca_checks}, HEALTH_NEEDS,
                           lambda service, serving: _set_health(server, service, serving),
                           interval_s=settings.health_check_interval_s, timeout_s=settings.health_check_timeout_s,
                           observe=metrics.checked)
    await health.check_once()
    orchestrator.health = health
    orchestrator._background.append(asyncio.create_task(health.run_forever()))
    orchestrator._background.append(asyncio.create_task(_every(
        settings.reconcile_interval_s, reconciler.reconcile_once, "reconciliation round")))
    beat_s = settings.replica.heartbeat_interval_s
    if isinstance(pool, FederatedPool):         # replicas: a dead one's tasks move within a heartbeat
        orchestrator._background.append(asyncio.create_task(_every(
            beat_s, reconciler.take_over_once, "looking for a dead replica's tasks")))
    else:                                       # a federated pool beats with its address, on its own task
        orchestrator._background.append(asyncio.create_task(_every(
            beat_s, partial(store.instances.beat, owner_id), "heartbeat")))
    sweeper = settings.issued_sweeper
    if sweeper.enabled:        # C5: no automatic handling unless asked for
        import datetime as dt
        orchestrator._background.append(asyncio.create_task(IssuedSweeper(
            certificates, grace_period=dt.timedelta(seconds=sweeper.grace_period),
            revoke_reason=sweeper.revoke_reason, target_state=sweeper.target_state,
            transition_reason=sweeper.transition_reason, interval_s=sweeper.interval).run_forever()))
    log.info("orchestrator serving", address=server.address, database=_safe_url(settings.effective_database_url()),
             metrics=orchestrator.metrics_endpoint.address if orchestrator.metrics_endpoint else None,
             config_dir=str(settings.config_dir), processes=sorted(configuration.processes))
    return orchestrator


def _reader_pool(settings: OrchestratorSettings, store: Store, replica_id: str, tls: TlsFiles | None,
                 metrics: OrchestratorMetrics) -> tuple[ReaderPool, ReplicaClient | None]:
    """The reader pool: in memory on SQLite (one process); on PostgreSQL one pool shared with
    every replica on the database (orchestrator/services/pool_federated.py), whose steps on
    other replicas' readers go through their ReplicaService with this replica's certificate."""
    if store.dialect != "postgresql":
        return ReaderPool(queue_timeout_s=settings.pool.queue_timeout_s,
                          offline_retention_s=settings.pool.offline_retention_s, observer=metrics), None
    client, replica = ReplicaClient(tls), settings.replica
    database_url = settings.effective_database_url()
    return FederatedPool(store.replica_pool, replica_id, replica.advertise_address or settings.listen,
                         stale_after_s=replica.stale_after_s, poll_interval_s=replica.poll_interval_s,
                         heartbeat_interval_s=replica.heartbeat_interval_s, remote=client.run_step,
                         max_step_timeout_s=settings.step_timeout_s,
                         listen=lambda wake: listen_for_changes(database_url, wake),
                         queue_timeout_s=settings.pool.queue_timeout_s,
                         offline_retention_s=settings.pool.offline_retention_s, observer=metrics), client


def orchestrator_id(data_dir: pathlib.Path) -> str:
    """This orchestrator's stable id (the owner of the tasks it runs), kept in its data
    directory: a restart on the same directory is the same orchestrator, so the reconciler
    ends what the previous run left at once (C16)."""
    path = data_dir / "orchestrator-id"
    if not path.exists():
        tmp = path.with_name(f".orchestrator-id.{uuid.uuid4().hex}")
        tmp.write_text(f"orchestrator-{os.uname().nodename}-{uuid.uuid4().hex[:12]}\n")
        os.replace(tmp, path)
    return path.read_text().strip()


def _process_task_count(configuration: Configuration, definition: str) -> int | None:
    process = configuration.processes.get(definition)
    return len(process.tasks) if process is not None else None


def _card_failed_state(templates, card_template: str) -> str | None:
    try:
        return templates.card(card_template).failed_state
    except Exception:  # a template gone from the configuration: the card keeps its state
        log.warning("no card template for an orphaned production", card_template=card_template)
        return None


def _internal_issued_states(templates) -> set[str]:
    return {templates.internal_issued_state, *(t.internal_issued_state for t in templates.certificates.values())}


async def _set_health(server: Server, service: str, serving: bool) -> None:
    from grpc_health.v1 import health_pb2

    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    await server.health.set(service, status)


async def _every(interval_s: float, call: Callable[[], object], what: str) -> None:
    """CALL (blocking) on a thread every INTERVAL_S, for the orchestrator's life; a failure
    (the database away for a moment) is logged and the next turn comes as planned."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(call)
        except Exception:
            log.exception(f"{what} failed")


def _safe_url(url: str) -> str:
    """The database URL without its password."""
    from sqlalchemy.engine import make_url
    return make_url(url).render_as_string(hide_password=True)


async def serve(settings: OrchestratorSettings, *, boundary: BoundaryHook | None = None,
                wrap_cas: CaWrapper | None = None) -> None:
    """`cardline orchestrator serve`: start, serve until SIGINT/SIGTERM, stop. The hooks are
    for test entry scripts (tests/support/faulty_orchestrator.py); the command passes none."""
    orchestrator = await start(settings, boundary=boundary, wrap_cas=wrap_cas)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await orchestrator.stop()
