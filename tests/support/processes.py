"""Start cardline's own processes for tests and benchmarks: orchestrator and gateways as
real subprocesses on 127.0.0.1 ports they choose, stopped by PID. They talk mutual TLS with
certificates of the session's PKI (tests/support/pki.py); `channel(address)` is a client
channel with the "admin" certificate."""
from __future__ import annotations

import contextlib
import os
import pathlib
import queue
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.proto import link_pb2, link_pb2_grpc, reader_pool_service_pb2_grpc
from shared.proto import reader_pool_service_pb2 as pool_pb
from shared.tls import TlsFiles
from tests.support.pki import default_pki

CARDLINE = str(pathlib.Path(sys.executable).parent / "cardline")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def channel(address: str, name: str = "admin") -> grpc.Channel:
    """A client channel to a process started here: mutual TLS with certificate NAME."""
    return default_pki().channel(address, name)


def client_channel(address: str, client: TlsFiles | None = None, insecure: bool = False) -> grpc.Channel:
    """A client channel asking as CLIENT (default: the session's admin), or plaintext when INSECURE."""
    if insecure:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, client.channel_credentials()) if client else channel(address)


def wait_healthy(address: str, timeout_s: float = 20.0, proc: subprocess.Popen | None = None,
                 insecure: bool = False, client: TlsFiles | None = None) -> None:
    """Waits for SERVING, asking as CLIENT (default: the session's admin certificate)."""
    deadline = time.monotonic() + timeout_s
    with client_channel(address, client, insecure) as health_channel:
        stub = health_pb2_grpc.HealthStub(health_channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before serving on {address}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError(f"nothing healthy on {address} after {timeout_s} s")


@contextlib.contextmanager
def cardline_process(args: list[str], address: str, log_path: pathlib.Path,
                     env: dict[str, str] | None = None, insecure: bool = False,
                     client: TlsFiles | None = None) -> Iterator[subprocess.Popen]:
    with open(log_path, "w") as log:
        proc = subprocess.Popen([CARDLINE, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env or dict(os.environ))
    try:
        wait_healthy(address, proc=proc, insecure=insecure, client=client)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stops the process group PROC leads (started with start_new_session): SIGCONT, since a
    frozen group must run to stop, then SIGTERM; SIGKILL if PROC outlives TIMEOUT_S."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def orchestrator_process(data_dir: pathlib.Path, env: dict[str, str] | None = None, *,
                         insecure: bool = False, tls_dir: pathlib.Path | None = None,
                         address: str | None = None, args: tuple[str, ...] = ()) -> Iterator[str]:
    """An orchestrator serving mutual TLS with orchestrator.crt of TLS_DIR (default: the
    session's PKI; another PKI directory must hold a client certificate admin for the health
    check), or plaintext when INSECURE; on ADDRESS (default: a free port), with ARGS added
    to `cardline orchestrator serve`. Its output goes to DATA_DIR/orchestrator.log."""
    client = TlsFiles(tls_dir / "ca.crt", tls_dir / "admin.crt", tls_dir / "admin.key") if tls_dir else None
    address = address or f"127.0.0.1:{free_port()}"
    data_dir.mkdir(parents=True, exist_ok=True)
    tls = ["--insecure"] if insecure else ["--tls-dir", str(tls_dir or default_pki().directory)]
    with cardline_process(["orchestrator", "serve", "--migrate", "--listen", address, "--data-dir", str(data_dir),
                           *tls, *args], address,
                          data_dir / "orchestrator.log", env, insecure, client):
        yield address


@contextlib.contextmanager
def gateway_process(orchestrator: str, gateway_id: str, data_dir: pathlib.Path, *, pkcs11_module: str,
                    env: dict[str, str], insecure: bool = False, tls_dir: pathlib.Path | None = None,
                    client: TlsFiles | None = None, site: str = "", labels: Mapping[str, str] | None = None,
                    args: tuple[str, ...] = ()) -> Iterator[tuple[str, subprocess.Popen]]:
    """A gateway dialing ORCHESTRATOR with the certificate of GATEWAY_ID from TLS_DIR (default:
    the session's PKI, which issues it on first use, enrolled at SITE with LABELS); CLIENT
    checks its health (default: the session's admin)."""
    address = f"127.0.0.1:{free_port()}"
    data_dir.mkdir(parents=True, exist_ok=True)
    if tls_dir is None and not insecure:
        default_pki().gateway(gateway_id, site=site, labels=labels)
    tls = ["--insecure"] if insecure else ["--tls-dir", str(tls_dir or default_pki().directory)]
    with cardline_process(["gateway", "serve", "--listen", address, "--data-dir", str(data_dir), "--orchestrator",
                           orchestrator, "--gateway-id", gateway_id, "--pkcs11-module", pkcs11_module, "--no-pcsc",
                           *tls, *args], address, data_dir / "gateway.log", env, insecure, client) as proc:
        yield address, proc


def wait_for_pooled_reader(orchestrator: str, predicate: Callable[[pool_pb.PooledReader], bool],
                           timeout_s: float = 20.0, client: TlsFiles | None = None) -> pool_pb.PooledReader:
    deadline = time.monotonic() + timeout_s
    with client_channel(orchestrator, client) as pool_channel:
        stub = reader_pool_service_pb2_grpc.ReaderPoolServiceStub(pool_channel)
        while time.monotonic() < deadline:
            for r in stub.ListReaders(pool_pb.ListReadersRequest(), timeout=2).readers:
                if predicate(r):
                    return r
            time.sleep(0.1)
    raise TimeoutError("no matching reader appeared in the pool")


def open_link(channel: grpc.Channel, gateway_id: str, site: str = "",
              labels: Mapping[str, str] | None = None) -> link_pb2.OrchestratorMessage:
    """Opens GatewayLink with a hello naming GATEWAY_ID (claiming SITE and LABELS); the
    orchestrator's first answer."""
    outbox: queue.Queue = queue.Queue()
    outbox.put(link_pb2.GatewayMessage(hello=link_pb2.GatewayHello(gateway_id=gateway_id, site=site,
                                                                   labels=dict(labels or {}), version="test")))

    def messages():
        while (item := outbox.get()) is not None:
            yield item

    call = link_pb2_grpc.GatewayLinkStub(channel).Connect(messages(), timeout=10)
    try:
        return next(call)
    finally:
        outbox.put(None)
        call.cancel()
