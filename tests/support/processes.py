"""Start cardline's own processes for tests and benchmarks: orchestrator and gateways as
real subprocesses on 127.0.0.1 ports they choose, stopped by PID."""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.proto import orchestrator_pb2 as pb
from shared.proto import orchestrator_pb2_grpc

CARDLINE = str(pathlib.Path(sys.executable).parent / "cardline")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(address: str, timeout_s: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before serving on {address}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError(f"nothing healthy on {address} after {timeout_s} s")


@contextlib.contextmanager
def cardline_process(args: list[str], address: str, log_path: pathlib.Path,
                     env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    with open(log_path, "w") as log:
        proc = subprocess.Popen([CARDLINE, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env or dict(os.environ))
    try:
        wait_healthy(address, proc=proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def orchestrator_process(data_dir: pathlib.Path, env: dict[str, str] | None = None) -> Iterator[str]:
    address = f"127.0.0.1:{free_port()}"
    data_dir.mkdir(parents=True, exist_ok=True)
    with cardline_process(["orchestrator", "serve", "--listen", address, "--data-dir", str(data_dir)], address,
                          data_dir / "orchestrator.log", env):
        yield address


@contextlib.contextmanager
def gateway_process(orchestrator: str, gateway_id: str, data_dir: pathlib.Path, *, pkcs11_module: str,
                    env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen]]:
    address = f"127.0.0.1:{free_port()}"
    data_dir.mkdir(parents=True, exist_ok=True)
    with cardline_process(["gateway", "serve", "--listen", address, "--data-dir", str(data_dir), "--orchestrator",
                           orchestrator, "--gateway-id", gateway_id, "--pkcs11-module", pkcs11_module, "--no-pcsc"],
                          address, data_dir / "gateway.log", env) as proc:
        yield address, proc


def wait_for_pooled_reader(orchestrator: str, predicate: Callable[[pb.PooledReader], bool],
                           timeout_s: float = 20.0) -> pb.PooledReader:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        while time.monotonic() < deadline:
            for r in stub.ListReaders(pb.ListReadersRequest(), timeout=2).readers:
                if predicate(r):
                    return r
            time.sleep(0.1)
    raise TimeoutError("no matching reader appeared in the pool")
