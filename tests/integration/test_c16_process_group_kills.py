"""Rule C16 under process-group kills: what a container stop, a cgroup OOM kill or systemd's
KillMode=control-group do - the orchestrator and every child it runs (`openssl ca`) die in
the same instant.

One station per CA kind (`openssl ca` connector, local CA): an orchestrator process in a
process group of its own, a gateway process with a SoftHSM2 token at site "hq", and rounds of
the `produce-employee-card` process, each ended by a SIGKILL of the orchestrator's whole
process group:
- at every card task boundary (tests/support/faulty_orchestrator.py --kill-at),
- inside the CA call, just before and just after issuing (--kill-in-ca-issue),
- between a card task's success and its process instance's end (--kill-after-task-success):
  the instance must end SUCCEEDED, like its task,
- with `openssl ca`: inside openssl itself, just before and just after each of the six
  renames that commit an issuance (an LD_PRELOAD shim, tests/support/kill_at_rename.c, makes
  openssl kill its process group),
- at random moments of the production (the test calls os.killpg after a random delay within
  the time a production takes): 50 kills during a production with `openssl ca`, 10 with the
  local CA by default; CARDLINE_CRASH_ROUNDS=<n> (read by this test only) sets that number
  for both, for a larger campaign. A round whose production ended before its moment came
  does not count, and shortens the window (a loaded machine makes the first production slow).
After each kill the orchestrator is started again on the same data directory (its reconciler
runs before it serves) and the CA's own records (openssl: index.txt and newcerts/; local:
its request records) are compared with the store: 0 certificates issued by the CA and unknown
to the store, 0 tasks or process instances left RUNNING, 0 process instances whose outcome
contradicts their tasks. The counts are printed at the end ("C16 process-group kill campaign").
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import grpc
import pytest
from cryptography import x509

from orchestrator.store import Store
from orchestrator.store.records import ProcessState, TaskState
from shared.proto import common_pb2
from shared.proto import process_service_pb2 as process_pb
from shared.proto import reader_pool_service_pb2 as pool_pb
from tests.integration.test_c16_crash_consistency import (
    REPO,
    _insecure_env,
    _stop,
    _wait_healthy,
)
from tests.support.api import OrchestratorApi
from tests.support.processes import CARDLINE, free_port
from tests.support.transport_puk import write_transport_key

pytestmark = [pytest.mark.hardware,
              pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("gcc") is None,
                                 reason="needs openssl and gcc (for the rename shim)")]

EXAMPLES = REPO / "examples"
PROCESS = "produce-employee-card"
PROCESS_TASKS = 1                       # card_production; on_error only after a failure
BOUNDARY_KILLS = [("before_issue", 0), ("after_issue", 0), ("after_store", 0), ("write_sent", 0),
                  ("write_sent", 500), ("after_write", 0), ("before_finish", 0)]
RENAME_KILLS = [(n, when) for n in range(1, 7) for when in ("before", "after")]
RANDOM_ROUNDS = {"openssl": 50, "local": 10}

CAMPAIGN: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def campaign_summary(request):
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        for kind, c in sorted(CAMPAIGN.items()):
            line = (f"C16 process-group kill campaign ({kind} CA): rounds={c['rounds']} "
                    f"boundary_kills={c['boundary']} in_ca_kills={c['in_ca']} after_task_kills={c['after_task']} "
                    f"openssl_rename_kills={c['rename']} "
                    f"random_kills={c['random']} (during production {c['random_during']}) "
                    f"certificates_issued_by_ca={c['ca_issued']} unknown_to_store={c['unknown']} "
                    f"tasks_left_running={c['tasks_running']} processes_left_running={c['processes_running']} "
                    f"contradicting_processes={c['contradictions']} processes_succeeded={c['succeeded']} "
                    f"processes_failed={c['failed']} openssl_repairs={c['repairs']} wall_s={c['wall_s']}")
            if reporter is not None:
                reporter.write_line("")
                reporter.write_line(line)
            else:                                               # pragma: no cover
                print(line)


# -- the station ------------------------------------------------------------------------

def _rename_killer(where: pathlib.Path) -> pathlib.Path:
    shim = where / "kill_at_rename.so"
    if not shim.exists():
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim),
                        str(REPO / "tests" / "support" / "kill_at_rename.c"), "-ldl"], check=True)
    return shim


class CrashStation:
    """Orchestrator (restartable, own process group) and gateway processes for one CA kind."""

    def __init__(self, tmp_path: pathlib.Path, token, ca_kind: str) -> None:
        self.tmp = tmp_path
        self.token = token
        self.ca_kind = ca_kind
        self.data_dir = tmp_path / "orchestrator"
        self.data_dir.mkdir(parents=True)
        self.config_dir = tmp_path / "config"
        shutil.copytree(EXAMPLES, self.config_dir)
        write_transport_key(self.config_dir / "secrets")       # the token's SO PIN is derived from it
        # Every run produces on the same token again: a re-issuing production (docs/lifecycle.md,
        # "One card, one live card object"), or the second run would be refused.
        process = self.config_dir / "processes" / f"{PROCESS}.yaml"
        text = process.read_text()
        assert "\n    card: " in text
        process.write_text(text.replace("\n    card: ", "\n    reissue: true\n    card: ", 1))
        if ca_kind == "openssl":
            templates = self.config_dir / "templates" / "templates.yaml"
            templates.write_text(templates.read_text().replace("ca: local", "ca: openssl"))
        self.address = f"127.0.0.1:{free_port()}"
        self.orchestrator: subprocess.Popen | None = None
        self.gateway: subprocess.Popen | None = None
        self.starts = 0

    @property
    def openssl_dir(self) -> pathlib.Path:
        return self.data_dir / "openssl-ca"

    def _cas(self, openssl: str | None = None) -> str:
        if self.ca_kind != "openssl":
            return "[]"
        entry = {"name": "openssl", "kind": "openssl", "directory": "openssl-ca"}
        if openssl:
            entry["openssl"] = openssl
        return json.dumps([entry])

    def start_orchestrator(self, *faults: str, openssl: str | None = None) -> None:
        self.starts += 1
        serve = ["--migrate", "--listen", self.address, "--data-dir", str(self.data_dir),
                 "--config-dir", str(self.config_dir)]
        command = [sys.executable, "-m", "tests.support.faulty_orchestrator", *faults, "--", *serve] if faults \
            else [CARDLINE, "orchestrator", "serve", *serve]
        with open(self.data_dir / f"orchestrator-{self.starts}.log", "w") as log:
            self.orchestrator = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                env=_insecure_env(CARDLINE_ORCHESTRATOR_CAS=self._cas(openssl)))
        _wait_healthy(self.address, self.orchestrator)

    def start_gateway(self) -> None:
        gateway_dir = self.tmp / "gateway"
        gateway_dir.mkdir()
        with open(gateway_dir / "gateway.log", "w") as log:
            self.gateway = subprocess.Popen(
                [CARDLINE, "gateway", "serve", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(gateway_dir),
                 "--orchestrator", self.address, "--gateway-id", "crash-1", "--site", "hq",
                 "--pkcs11-module", self.token.module_path, "--no-pcsc"],
                stdout=log, stderr=subprocess.STDOUT,
                env={**_insecure_env(CARDLINE_GATEWAY_RECONNECT_MAX_S="0.5"), **self.token.env,
                     "CARDLINE_GATEWAY_INSECURE": "true"})

    def wait_reader(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = OrchestratorApi.on(channel)
            while time.monotonic() < deadline:
                readers = stub.pool.ListReaders(pool_pb.ListReadersRequest(), timeout=2).readers
                if any(r.reader.token_label == self.token.label and r.state == pool_pb.POOLED_READER_STATE_CARD_PRESENT
                       for r in readers):
                    return
                time.sleep(0.05)
        raise TimeoutError("the token's reader did not come back to the pool")

    def produce(self) -> process_pb.ProcessInstance | None:
        """One produce-employee-card run; None if the orchestrator died during it."""
        with grpc.insecure_channel(self.address) as channel:
            stub = OrchestratorApi.on(channel)
            try:
                events = list(stub.processes.StartProcess(process_pb.StartProcessRequest(
                    process=PROCESS, inputs={"person": common_pb2.Value(text="Crash Tester")},
                    secret_inputs={"pin": self.token.user_pin}), timeout=60))
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL,
                                  grpc.StatusCode.UNKNOWN):
                    return None
                raise
        return events[-1].instance if events and events[-1].HasField("instance") else None

    def kill_group(self) -> None:
        assert self.orchestrator is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.orchestrator.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.orchestrator is not None and self.orchestrator.poll() is None:
            self.kill_group()
            self.orchestrator.wait(10)
        if self.gateway is not None:
            _stop(self.gateway)


def _rename_killer_openssl(station: CrashStation, n: int, when: str) -> str:
    """An `openssl` whose issuing `openssl ca` run kills its process group at rename n."""
    shim = _rename_killer(station.tmp)
    script = station.tmp / f"openssl-kill-at-rename-{n}-{when}"
    real = shutil.which("openssl")
    script.write_text(f"""#!/bin/sh
case "$* " in
  "ca -batch "*" -in "*) exec env LD_PRELOAD={shim} KILL_AT_RENAME={n}:{when} {real} "$@" ;;
esac
exec {real} "$@"
""")
    script.chmod(0o755)
    return str(script)


# -- the comparison -----------------------------------------------------------------------

def _ca_certificates(station: CrashStation) -> list[x509.Certificate]:
    """Every certificate the CA has a record of, read from its own files."""
    if station.ca_kind == "openssl":
        d = station.openssl_dir
        leftovers = [p.name for p in d.iterdir() if p.name.endswith(".new")] if d.exists() else []
        assert leftovers == [], f"openssl ca leftovers after the restart: {leftovers}"
        listed = {line.split("\t")[3] for line in (d / "index.txt").read_text().splitlines() if line.strip()} \
            if d.exists() else set()
        files = {p.stem for p in (d / "newcerts").glob("*.pem")} if d.exists() else set()
        assert files == listed, f"newcerts/ and index.txt disagree: {sorted(files ^ listed)}"
        return [x509.load_pem_x509_certificate((d / "newcerts" / f"{s}.pem").read_bytes()) for s in sorted(listed)]
    return [x509.load_pem_x509_certificate(json.loads(p.read_text())["certificate"].encode())
            for p in (station.data_dir / "ca" / "requests").glob("*.json")]


def compare_after_restart(station: CrashStation, point: str) -> None:
    """With the restarted orchestrator idle: the CA's records against the store (C16)."""
    issued = _ca_certificates(station)
    store = Store(f"sqlite:///{station.data_dir / 'cardline.db'}")
    try:
        known = {(c.issuer, c.serial_hex) for c in store.certificates.list()}
        tasks = store.tasks.list()
        instances = store.processes.list()
        tasks_of = {i.id: [t for t in tasks if t.process_instance_id == i.id] for i in instances}
    finally:
        store.close()
    unknown = [format(c.serial_number, "x") for c in issued
               if (c.issuer.rfc4514_string(), format(c.serial_number, "x")) not in known]
    running = [t.id for t in tasks if t.state == TaskState.RUNNING]
    instances_running = [i.id for i in instances if i.state == ProcessState.RUNNING]
    contradictions: list[tuple[str, ProcessState, list[TaskState]]] = []
    for instance in instances:
        own = tasks_of[instance.id]
        main = [t for t in own if t.task_index is not None and t.task_index < PROCESS_TASKS]
        if instance.state == ProcessState.SUCCEEDED and any(t.state != TaskState.SUCCEEDED for t in own):
            contradictions.append((instance.id, instance.state, [t.state for t in own]))
        if instance.state == ProcessState.FAILED and main and len(main) == PROCESS_TASKS \
                and all(t.state == TaskState.SUCCEEDED for t in own):
            contradictions.append((instance.id, instance.state, [t.state for t in own]))
    c = CAMPAIGN[station.ca_kind]
    c["unknown"] += len(unknown)
    c["tasks_running"] += len(running)
    c["processes_running"] += len(instances_running)
    c["contradictions"] += len(contradictions)
    c["ca_issued"] = len(issued)                                  # the CA's records only grow
    c["succeeded"] = sum(i.state == ProcessState.SUCCEEDED for i in instances)
    c["failed"] = sum(i.state == ProcessState.FAILED for i in instances)
    assert unknown == [], f"{point}: certificates issued by the CA and unknown to the store: {unknown}"
    assert running == [] and instances_running == [], f"{point}: left running: {running} {instances_running}"
    assert contradictions == [], f"{point}: process outcomes contradicting their tasks: {contradictions}"
    assert all(t.state in (TaskState.SUCCEEDED, TaskState.FAILED) for t in tasks)


# -- the campaign -------------------------------------------------------------------------

def _rounds(ca_kind: str) -> list[tuple[str, Any]]:  # (kind, its argument: a boundary, a count, ...)
    random_rounds = int(os.environ.get("CARDLINE_CRASH_ROUNDS") or RANDOM_ROUNDS[ca_kind])
    rounds: list[tuple[str, Any]] = [("boundary", b) for b in BOUNDARY_KILLS]
    rounds += [("in_ca", when) for when in ("before", "after")]
    rounds += [("after_task", None)]
    if ca_kind == "openssl":
        rounds += [("rename", r) for r in RENAME_KILLS]
    rounds += [("random", random_rounds)]
    return rounds


# Each round restarts the orchestrator and produces a card: ~3.5 min on an idle machine, much
# longer on a loaded one; the suite's 300 s per test would cut a healthy campaign short.
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("ca_kind", ["openssl", "local"])
def test_c16_process_group_killed_at_every_boundary_inside_the_ca_and_at_random_moments(
        tmp_path, softhsm_token, ca_kind):
    rng = random.Random(int(os.environ.get("CARDLINE_CRASH_SEED") or 1916))
    started = time.monotonic()
    station = CrashStation(tmp_path, softhsm_token, ca_kind)
    c = CAMPAIGN[ca_kind]
    try:
        station.start_orchestrator()
        station.start_gateway()
        station.wait_reader()
        # A clean production first: it says how long one takes (the window of the random kills).
        t0 = time.monotonic()
        instance = station.produce()
        production_s = time.monotonic() - t0
        assert instance is not None and instance.state == process_pb.PROCESS_STATE_SUCCEEDED, instance
        station.kill_group()
        assert station.orchestrator is not None
        station.orchestrator.wait(10)

        rounds = _rounds(ca_kind)
        *fixed, (_, random_kills) = rounds
        plan = iter(fixed + [("random", None)] * (2 * random_kills))
        for kind, arg in plan:
            if kind == "random" and c["random_during"] >= random_kills:
                break
            faults: list[str] = []
            openssl = None
            if kind == "boundary":
                boundary, delay_ms = arg
                faults = ["--kill-at", boundary] + (["--kill-delay-ms", str(delay_ms)] if delay_ms else [])
                point = f"{boundary}" + (f"+{delay_ms}ms" if delay_ms else "")
            elif kind == "in_ca":
                faults, point = ["--kill-in-ca-issue", arg], f"inside the CA call, {arg} issuing"
            elif kind == "after_task":
                faults, point = ["--kill-after-task-success"], "after the task succeeded"
            elif kind == "rename":
                n, when = arg
                openssl, point = _rename_killer_openssl(station, n, when), f"openssl ca rename #{n} ({when})"
            else:
                point = "random"
            station.start_orchestrator(*faults, openssl=openssl)   # its reconciler settles the last round
            compare_after_restart(station, f"after the round before {point}")
            station.wait_reader()
            timer = None
            if kind == "random":
                delay = rng.uniform(0, production_s)
                timer = threading.Timer(delay, station.kill_group)
                timer.start()
            started_production = time.monotonic()
            result = station.produce()
            if timer is not None:
                timer.cancel()
                c["random_during"] += result is None
                if result is not None:               # the moment came after the production
                    production_s = min(production_s, 0.9 * (time.monotonic() - started_production))
            else:
                assert result is None, f"{point}: the orchestrator should have died during the production"
            station.kill_group()                      # if the random moment came after the production
            assert station.orchestrator is not None and station.orchestrator.wait(30) == -signal.SIGKILL
            c[kind] += 1
            c["rounds"] += 1

        station.start_orchestrator()
        compare_after_restart(station, "the last round")
        store = Store(f"sqlite:///{station.data_dir / 'cardline.db'}")
        try:
            settled = [a for a in store.audit.list(action="reconcile")
                       if a.detail.get("action") == "end_orphaned_process"
                       and a.detail.get("state") == ProcessState.SUCCEEDED]
        finally:
            store.close()
        # The instance killed after its task succeeded was ended SUCCEEDED, like its task (a
        # random kill landing between a task's success and its process's end adds more).
        assert c["after_task"] == 1 and len(settled) >= c["after_task"], settled
        repairs = sum(log.read_text().count("repaired after an interrupted run")
                      for log in station.data_dir.glob("orchestrator-*.log"))
        c["repairs"] = repairs
        # The station still works: a clean production succeeds after all the kills.
        station.wait_reader()
        final = station.produce()
        assert final is not None and final.state == process_pb.PROCESS_STATE_SUCCEEDED, final
        station.kill_group()
        assert station.orchestrator is not None
        station.orchestrator.wait(10)
        station.start_orchestrator()
        compare_after_restart(station, "after the final production")
    finally:
        station.stop()
        c["wall_s"] = round(time.monotonic() - started)
    if ca_kind == "openssl":
        assert c["rename"] == len(RENAME_KILLS)
    assert c["random_during"] >= int(os.environ.get("CARDLINE_CRASH_ROUNDS") or RANDOM_ROUNDS[ca_kind])
