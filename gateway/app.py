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
from gateway.core.idempotency import STEP_MEMO_FILE, PersistedSteps, StepMemo
from gateway.core.registry import ReaderRegistry
from gateway.drivers.base import TokenDriver
from gateway.drivers.pkcs11 import Pkcs11TokenDriver
from gateway.metrics import GatewayMetrics
from shared.config import GatewaySettings
from shared.errors import ConfigurationError
from shared.logging import get_logger
from shared.metrics import MetricsEndpoint
from shared.permissions import PERMISSIONS, require_rows
from shared.pki import CRL, Enrollment, enrollment_of
from shared.proto import gateway_pb2, gateway_pb2_grpc
from shared.rpc import Server
from shared.tls import RevocationList, TlsFiles, server_security, settings_tls

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
    persisted_steps: PersistedSteps | None = None
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
        if self.persisted_steps is not None:
            await asyncio.to_thread(self.persisted_steps.close)
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


def station_place(settings: GatewaySettings, tls: TlsFiles | None) -> Enrollment:
    """Where this station stands: the site and labels enrolled in its certificate. Settings
    need not name them; when they do, they must be the enrolled ones (else the orchestrator
    would refuse every hello). Without TLS (development) the settings are all there is."""
    if tls is None:
        return Enrollment(settings.site, dict(settings.labels))
    enrolled = enrollment_of(tls.certificate())
    wrong = [f"site {settings.site!r}"] if settings.site and settings.site != enrolled.site else []
    if settings.labels and dict(settings.labels) != dict(enrolled.labels):
        wrong.append("labels {" + ", ".join(f"{k}={v}" for k, v in sorted(settings.labels.items())) + "}")
    if wrong:
        raise ConfigurationError(
            f"gateway {settings.gateway_id}: the settings give {' and '.join(wrong)} but the certificate "
            f"{tls.cert} is enrolled with {enrolled.describe()}; drop site/labels from the settings (the "
            f"enrollment decides) or enroll the station again (`cardline gateway enroll --site ... --label ...`)")
    return enrolled


def station_revocations(settings: GatewaySettings, tls: TlsFiles | None) -> RevocationList | None:
    """The CRL this gateway refuses callers by: DATA_DIR/crl.pem, which the orchestrator's
    link keeps up to date, started from the enrollment's CRL (TLS_DIR/crl.pem or tls_crl)
    when that one is newer."""
    if tls is None:
        return None
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = settings.data_dir / CRL
    try:
        revocations = RevocationList(path, tls.ca_pem(), missing_ok=True)
    except ConfigurationError as exc:     # e.g. kept from an enrollment under another CA
        log.warning("the CRL kept in the data directory is not usable; starting from the enrollment's",
                    path=str(path), error=exc.message)
        path.unlink()
        revocations = RevocationList(path, tls.ca_pem(), missing_ok=True)
    if tls.crl is not None:
        revocations.update(tls.crl.read_bytes(), str(tls.crl))
    return revocations


async def follow_crl_file(path: pathlib.Path, revocations: RevocationList, interval_s: float = 1.0) -> None:
    """Offers REVOCATIONS the CRL at PATH whenever that file changes: a CRL an operator copies
    to the station (its tls_dir or tls_crl) counts as one from the link does."""
    seen = None
    while True:
        try:
            st = path.stat()
        except OSError:                  # gone for now: the CRL already taken stays
            st = None
        if st is not None and (stamp := (st.st_mtime_ns, st.st_size, st.st_ino)) != seen:
            seen = stamp
            try:
                revocations.update(path.read_bytes(), str(path))
            except (OSError, ConfigurationError) as exc:
                log.error("CRL file not taken", path=str(path), error=str(exc))
        await asyncio.sleep(interval_s)


async def start(settings: GatewaySettings) -> Gateway:
    # Mutual TLS unless explicitly insecure: one certificate (CN = gateway id, role gateway)
    # serves GatewayService and authenticates the link to the orchestrator.
    tls = settings_tls(settings, f"gateway {settings.gateway_id}", settings.gateway_id, role="gateway",
                       common_name=settings.gateway_id)
    # Where it stands and whom it refuses, checked before any driver or reader is touched.
    place = station_place(settings, tls)
    revocations = station_revocations(settings, tls)
    drivers = await asyncio.to_thread(_token_drivers, settings.pkcs11_modules)
    pcsc = await asyncio.to_thread(_pcsc_driver) if settings.pcsc else None
    registry = ReaderRegistry(token_drivers=drivers, pcsc=pcsc)
    await registry.refresh()
    metrics = GatewayMetrics()
    # Finished steps are kept in the data directory: a step resent after a restart is answered
    # from there, not run again (gateway/core/idempotency.py).
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    persisted_steps = await asyncio.to_thread(PersistedSteps, settings.data_dir / STEP_MEMO_FILE)
    executor = StepExecutor(registry, StepMemo(store=persisted_steps), observer=metrics)
    credentials, interceptors = server_security(tls, PERMISSIONS, revocations=revocations)
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
    gateway = Gateway(settings, registry, executor, server, None, metrics, metrics_endpoint, persisted_steps)
    gateway._tasks.append(asyncio.create_task(registry.watch()))
    if revocations is not None and tls is not None and tls.crl is not None:
        gateway._tasks.append(asyncio.create_task(follow_crl_file(tls.crl, revocations)))
    if settings.orchestrator:
        gateway.link = OrchestratorLink(settings.orchestrator, settings.gateway_id, registry, executor,
                                        site=place.site, labels=dict(place.labels), revocations=revocations,
                                        credentials=tls.channel_credentials() if tls else None,
                                        backoff_min_s=settings.reconnect_min_s, backoff_max_s=settings.reconnect_max_s,
                                        observer=metrics)
        gateway._tasks.append(asyncio.create_task(gateway.link.run_forever()))
    log.info("gateway serving", address=server.address, gateway_id=settings.gateway_id, site=place.site,
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
