"""Several orchestrators for one test: real `cardline orchestrator serve` processes, each
leading a process group of its own, so a test can kill or freeze one whole (docs/replicas.md).

    with Replicas(tmp_path, postgres_database_url, env={"CARDLINE_ORCHESTRATOR_RECONCILE_INTERVAL_S": "1"}) as replicas:
        a, b = replicas.start_all("a", "b")
        ...
        a.kill()           # SIGKILL of its process group
        a.start()          # again, on the same address and data directory

Given a database URL, the replicas share that database, one built-in CA directory
(`ca_dir`) and one KEK file, as replicas must; without one, each orchestrator is on its own
(SQLite, CA and KEK in its data directory): client-side failover, not replica coordination.
Every replica serves mutual TLS with the session's PKI (tests/support/pki.py) and logs to
DATA_DIR/orchestrator.log, appended to on each start. `pooled_readers` lists what a
replica's pool holds.
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Mapping
from types import TracebackType

from shared.proto import reader_pool_service_pb2 as pool_pb
from tests.support.api import OrchestratorApi
from tests.support.pki import default_pki
from tests.support.processes import CARDLINE, client_channel, free_port, stop_process_group, wait_healthy

REPO = pathlib.Path(__file__).resolve().parents[2]


class Replica:
    """One orchestrator of a Replicas: its address, data directory and environment stay the
    same across its starts."""

    def __init__(self, data_dir: pathlib.Path, env: Mapping[str, str], database_url: str | None,
                 metrics: str = "") -> None:
        self.data_dir = data_dir
        self.address = f"127.0.0.1:{free_port()}"
        self.metrics = metrics                      # HOST:PORT of its /metrics, "" for none
        self._env = {**env, "CARDLINE_ORCHESTRATOR_METRICS_LISTEN": metrics} if metrics else dict(env)
        self._database_url = database_url
        self.proc: subprocess.Popen | None = None

    def start(self, *faults: str) -> Replica:
        """Starts it and waits until it serves. With FAULTS (options of
        tests/support/faulty_orchestrator.py) the test entry script runs instead of `cardline`."""
        assert self.proc is None or self.proc.poll() is not None, f"{self.data_dir.name} is running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        serve = ["--migrate", "--listen", self.address, "--data-dir", str(self.data_dir)]
        if self._database_url:
            serve += ["--database-url", self._database_url]
        command = [sys.executable, "-m", "tests.support.faulty_orchestrator", *faults, "--", *serve] if faults \
            else [CARDLINE, "orchestrator", "serve", *serve]
        with open(self.data_dir / "orchestrator.log", "a") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self._env,
                                         start_new_session=True)
        wait_healthy(self.address, timeout_s=60, proc=self.proc)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL of its whole process group; returns once it is dead."""
        os.killpg(self.pid, signal.SIGKILL)
        self.wait()

    def freeze(self) -> None:
        """SIGSTOP of its process group: the kernel still accepts connections, nothing answers."""
        os.killpg(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def wait(self, timeout_s: float = 10.0) -> int:
        """Its exit status, once it ended (killed, or by a fault of its own)."""
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        """SIGTERM of its process group (thawed first), SIGKILL if it outlives 20 s."""
        if self.proc is not None:
            stop_process_group(self.proc, timeout_s=20)

    @property
    def log(self) -> str:
        return (self.data_dir / "orchestrator.log").read_text()

    @property
    def orchestrator_id(self) -> str:
        return (self.data_dir / "orchestrator-id").read_text().strip()


class Replicas:
    """Orchestrators in TMP/NAME with the environment's settings overridden by ENV
    (CARDLINE_ORCHESTRATOR_* variables), on DATABASE_URL if given; each gets a metrics address
    when METRICS. Leaving the `with` stops every one still running."""

    def __init__(self, tmp: pathlib.Path, database_url: str | None = None, *, env: Mapping[str, str] | None = None,
                 metrics: bool = False) -> None:
        self.tmp = tmp
        self.database_url = database_url
        self.ca_dir = tmp / "shared" / "ca"           # the built-in CA's, when on a database
        self._metrics = metrics
        self._env = {**os.environ, "CARDLINE_ORCHESTRATOR_TLS_DIR": str(default_pki().directory)}
        if database_url:
            self._env["CARDLINE_ORCHESTRATOR_CAS"] = json.dumps([{"name": "local", "kind": "local",
                                                                  "directory": str(self.ca_dir)}])
            self._env["CARDLINE_ORCHESTRATOR_KEY_ARCHIVE__FILE_PATH"] = str(tmp / "shared" / "kek.key")
        self._env.update(env or {})
        self._started: list[Replica] = []

    def start(self, name: str, *faults: str) -> Replica:
        """A new replica NAME, started (with FAULTS: see Replica.start)."""
        replica = Replica(self.tmp / name, self._env, self.database_url,
                          f"127.0.0.1:{free_port()}" if self._metrics else "")
        self._started.append(replica)
        return replica.start(*faults)

    def start_all(self, *names: str) -> list[Replica]:
        return [self.start(name) for name in names]

    def __enter__(self) -> Replicas:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for replica in reversed(self._started):
            replica.stop()


def pooled_readers(address: str, *, insecure: bool = False) -> list[pool_pb.PooledReader]:
    """The readers in the pool of the orchestrator at ADDRESS, as ListReaders answers now
    (asked as the session's admin, or over plaintext when INSECURE)."""
    with client_channel(address, insecure=insecure) as ch:
        return list(OrchestratorApi.on(ch).pool.ListReaders(pool_pb.ListReadersRequest(), timeout=5).readers)
