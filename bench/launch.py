"""Start cardline's processes for the benchmarks and stop everything they started.

Every process runs in a session (process group) of its own and is stopped by that group's
id (SIGTERM, then SIGKILL after a grace period), so nothing a benchmark starts outlives it.
Servers listen on 127.0.0.1, on ports chosen here; they speak mutual TLS with the throwaway
PKI of tests/support/pki.py (`channel(address)` is the admin's client channel).

`counted=True` starts the orchestrator through bench/counted_cardline.py, which counts the
store's transactions into a small file (`TransactionCounter`) without changing the product.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import pathlib
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from orchestrator.ca.base import PASSPHRASE_ENV
from tests.support.pki import default_pki
from tests.support.processes import CARDLINE, free_port, wait_healthy

BENCH = pathlib.Path(__file__).resolve().parent
COUNTER_ENV = "CARDLINE_BENCH_TRANSACTION_COUNTER"
# read transactions, write transactions, microseconds writers waited in BEGIN IMMEDIATE
COUNTER_FORMAT = "<QQQ"
PROFILE_ENV = "CARDLINE_BENCH_PROFILE"


@dataclass(frozen=True)
class Transactions:
    reads: int
    writes: int
    write_lock_wait_us: int = 0          # SQLite: time writers spent waiting for the write lock

    @property
    def total(self) -> int:
        return self.reads + self.writes

    def __add__(self, other: Transactions) -> Transactions:
        return Transactions(self.reads + other.reads, self.writes + other.writes,
                            self.write_lock_wait_us + other.write_lock_wait_us)

    def __sub__(self, other: Transactions) -> Transactions:
        return Transactions(self.reads - other.reads, self.writes - other.writes,
                            self.write_lock_wait_us - other.write_lock_wait_us)


class TransactionCounter:
    """The file a counted orchestrator keeps its transaction counts in (little-endian 64-bit
    integers, rewritten in place at every BEGIN)."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        path.write_bytes(struct.pack(COUNTER_FORMAT, 0, 0, 0))

    def read(self) -> Transactions:
        return Transactions(*struct.unpack(COUNTER_FORMAT, self.path.read_bytes()[:struct.calcsize(COUNTER_FORMAT)]))


def map_counter(path: str) -> mmap.mmap:
    with open(path, "r+b") as f:
        return mmap.mmap(f.fileno(), struct.calcsize(COUNTER_FORMAT))


def profiled(program: list[str]) -> list[str]:
    """PROGRAM, run under the profiler when CARDLINE_BENCH_PROFILE names a directory
    (bench/profiled_cardline.py)."""
    if not os.environ.get(PROFILE_ENV):
        return program
    return [sys.executable, str(BENCH / "profiled_cardline.py"), program[-1]]


@contextlib.contextmanager
def process_group(argv: list[str], log_path: pathlib.Path, env: dict[str, str],
                  healthy_on: str | None = None) -> Iterator[subprocess.Popen]:
    """ARGV in a new session; waits for gRPC health SERVING on HEALTHY_ON when given; on
    exit its whole process group is terminated (killed after 10 s)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        if healthy_on is not None:
            wait_healthy(healthy_on, timeout_s=60, proc=proc)
        yield proc
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    with contextlib.suppress(ProcessLookupError):     # the group's other members, and a deaf leader
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def orchestrator(data_dir: pathlib.Path, env: dict[str, str] | None = None, *,
                 counter: TransactionCounter | None = None,
                 args: tuple[str, ...] = ()) -> Iterator[tuple[str, subprocess.Popen]]:
    """An orchestrator on a free 127.0.0.1 port with its store under DATA_DIR; yields its
    address and process. COUNTER: count its transactions there."""
    address = f"127.0.0.1:{free_port()}"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(env or os.environ)
    # The built-in CA's key passphrase: a file outside its directory, named by the variable.
    env.setdefault(PASSPHRASE_ENV, str(data_dir.parent / f"{data_dir.name}-ca-passphrase"))
    program = [CARDLINE]
    if counter is not None:
        program = [sys.executable, str(BENCH / "counted_cardline.py")]
        env[COUNTER_ENV] = str(counter.path)
    argv = [*profiled(program), "orchestrator", "serve", "--migrate", "--listen", address, "--data-dir", str(data_dir),
            "--tls-dir", str(default_pki().directory), *args]
    with process_group(argv, data_dir / "orchestrator.log", env, healthy_on=address) as proc:
        yield address, proc


@contextlib.contextmanager
def gateway(orchestrator_address: str, gateway_id: str, data_dir: pathlib.Path, env: dict[str, str],
            device_args: tuple[str, ...]) -> Iterator[str]:
    """A gateway process dialling ORCHESTRATOR_ADDRESS as GATEWAY_ID, its devices given by
    DEVICE_ARGS (e.g. --pkcs11-module M --no-pcsc, or --pcsc); yields its own address."""
    address = f"127.0.0.1:{free_port()}"
    data_dir.mkdir(parents=True, exist_ok=True)
    default_pki().gateway(gateway_id)
    argv = [*profiled([CARDLINE]), "gateway", "serve", "--listen", address, "--data-dir", str(data_dir),
            "--orchestrator", orchestrator_address, "--gateway-id", gateway_id,
            "--tls-dir", str(default_pki().directory), *device_args]
    with process_group(argv, data_dir / "gateway.log", env, healthy_on=address):
        yield address
