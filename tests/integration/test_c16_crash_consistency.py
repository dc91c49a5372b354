"""Rule C16: no certificate a CA issued for cardline is unknown to the store, and every task
ends - after crashes (SIGKILL of the orchestrator process at every step boundary of a
production), with the CA unreachable, and with the CA's answer lost after it issued.

The store-level tests run on SQLite and PostgreSQL with a real LocalCa. The crash tests run
`cardline orchestrator serve` and `cardline gateway serve` as processes on a SoftHSM2 token;
the orchestrator runs from the test entry script tests/support/faulty_orchestrator.py (the
serve command with the faults of tests/support/faults.py installed through its hooks) in a
process group of its own and SIGKILLs that whole group, is restarted on the same data directory (the
reconciler runs before it serves), and the CA's own record - LocalCa's request records,
read by a LocalCa opened on the same directory - is compared with the store and with the
token as OpenSC's pkcs11-tool sees it. The counts are printed at the end of the session
("C16 crash-consistency summary").
"""
from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.ca import IssueProfile, LocalCa
from orchestrator.services.reconciler import Reconciler
from orchestrator.store import CaRequestState, DuplicateCertificate, StateConflict, Store
from orchestrator.store.records import ProcessState, TaskState
from shared.errors import CaUnavailable, NotFound
from shared.proto import ca_service_pb2 as ca_pb
from shared.proto import card_service_pb2 as card_pb
from shared.proto import certificate_service_pb2 as certificate_pb
from shared.proto import common_pb2
from shared.proto import reader_pool_service_pb2 as pool_pb
from tests.support.api import OrchestratorApi
from tests.support.faults import AnswerLosingCa, UnreachableCa
from tests.support.processes import CARDLINE, free_port

ISSUED, START_STATE = "Issued", "Active"
PROFILE = IssueProfile(validity_days=30, subject="CN=Test Card Holder", key_usage=frozenset({"digitalSignature"}))
ME = "orchestrator-test-me"
REPO = pathlib.Path(__file__).resolve().parents[2]

# -- the counts reported at the end of the session ------------------------------------------

SUMMARY: collections.Counter = collections.Counter()
INJECTION_POINTS: set[str] = set()


@pytest.fixture(scope="session", autouse=True)
def c16_summary(request):
    yield
    if not SUMMARY:
        return
    line = (f"C16 crash-consistency summary: runs={SUMMARY['runs']} injection_points={len(INJECTION_POINTS)} "
            f"({', '.join(sorted(INJECTION_POINTS))}) certificates_issued_by_ca={SUMMARY['ca_issued']} "
            f"certificates_found_in_store={SUMMARY['store_found']} unknown_to_store={SUMMARY['unknown']} "
            f"stored_by_reconciler={SUMMARY['stored_by_reconciler']} not_issued={SUMMARY['not_issued']} "
            f"tasks_ended_by_reconciler={SUMMARY['tasks_ended']} tasks_left_running={SUMMARY['running']}; "
            f"openssl ca index.txt: certificates={SUMMARY['openssl_index_certificates']} "
            f"unknown_to_store={SUMMARY['openssl_unknown']}")
    # Session teardown runs under output capture: step out of it to print the line.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line("")
            reporter.write_line(line)
        else:                                               # pragma: no cover
            print(line)


# -- store and reconciler (SQLite and PostgreSQL, real LocalCa, no hardware) ----------------

def _csr(cn: str = "Alice") -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def _production(store: Store, owner: str | None = ME, process_instance_id: str | None = None):
    task = store.tasks.create("card_production", "gw1", "r1", owner=owner, process_instance_id=process_instance_id)
    card = store.cards.create(task.id, "0815", "EmployeeCard", "InProduction", "gw1", "r1")
    return task, card


def test_c16_journal_is_idempotent_and_settled_with_the_certificate_in_one_transaction(store: Store, local_ca):
    task, _card = _production(store)
    csr = _csr()
    rid = f"{task.id}:2:Application_1"
    first = store.ca_requests.journal(rid, task.id, local_ca.name, "EmployeeAuthentication", csr)
    again = store.ca_requests.journal(rid, task.id, local_ca.name, "EmployeeAuthentication", csr)
    assert first == again and first.state == CaRequestState.PENDING and first.csr_der == csr
    assert store.ca_requests.list(states=[CaRequestState.PENDING]) == [first]
    with pytest.raises(NotFound):
        store.ca_requests.journal("x:1:A", "no-such-task", local_ca.name, "EmployeeAuthentication", csr)

    der = local_ca.issue(csr, PROFILE, rid)
    assert local_ca.issue(csr, PROFILE, rid) == der          # the CA's idempotency on the same key
    cert = store.store_issued_certificate(task.id, der, "EmployeeAuthentication", local_ca.name, ISSUED,
                                          request_id=rid)
    row = store.ca_requests.get(rid)
    assert (row.state, row.certificate_id, row.serial_hex) == (CaRequestState.STORED, cert.id, cert.serial_hex)
    # The same certificate for the same request again (a retry, or the reconciler was first):
    # the stored record, not a duplicate.
    assert store.store_issued_certificate(task.id, der, "EmployeeAuthentication", local_ca.name, ISSUED,
                                          request_id=rid) == cert
    with pytest.raises(DuplicateCertificate):                # without the request: still a duplicate
        store.store_issued_certificate(task.id, der, "EmployeeAuthentication", local_ca.name, ISSUED)
    assert store.ca_requests.mark(rid, CaRequestState.WRITTEN).state == CaRequestState.WRITTEN
    with pytest.raises(StateConflict):
        store.ca_requests.mark(rid, CaRequestState.NOT_ISSUED)
    assert store.ca_requests.list(states=[CaRequestState.PENDING]) == []


def test_c16_certificate_never_stored_against_a_request_settled_otherwise(store: Store, local_ca):
    task, _card = _production(store)
    csr = _csr()
    rid = f"{task.id}:2:Application_1"
    store.ca_requests.journal(rid, task.id, local_ca.name, "EmployeeAuthentication", csr)
    store.ca_requests.mark(rid, CaRequestState.NOT_ISSUED, "test")
    der = local_ca.issue(csr, PROFILE, rid)
    with pytest.raises(StateConflict):
        store.store_issued_certificate(task.id, der, "EmployeeAuthentication", local_ca.name, ISSUED, request_id=rid)
    assert store.certificates.list() == []                   # nothing half-written
    with pytest.raises(NotFound):
        store.store_issued_certificate(task.id, der, "EmployeeAuthentication", local_ca.name, ISSUED,
                                       request_id="never-journaled")


def _reconciler(store, cas, **kwargs) -> Reconciler:
    return Reconciler(store, cas, ISSUED, owner_id=ME,
                      card_failed_state=lambda template: "ProductionFailed", **kwargs)


def test_c16_reconciler_stores_what_the_ca_issued_and_ends_orphaned_work(store: Store, local_ca):
    instance = store.processes.create("produce-employee-card", {"person": "Alice"}, owner=ME)
    task, card = _production(store, process_instance_id=instance.id)
    lost, never = f"{task.id}:2:Application_1", f"{task.id}:4:Application_2"
    csr = _csr()
    store.ca_requests.journal(lost, task.id, local_ca.name, "EmployeeAuthentication", csr)
    store.ca_requests.journal(never, task.id, local_ca.name, "EmployeeSignature", _csr())
    der = local_ca.issue(csr, PROFILE, lost)                 # issued; the orchestrator died before storing it

    report = _reconciler(store, {local_ca.name: local_ca}).reconcile_once()
    assert (report.tasks_ended, report.examined, report.stored, report.not_issued) == (2, 2, 1, 1)
    task = store.tasks.get(task.id)
    assert task.state == TaskState.FAILED and task.error_reason == "ORCHESTRATOR_RESTARTED"
    assert store.cards.get(card.id).state == "ProductionFailed"
    instance = store.processes.get(instance.id)
    assert instance.state == ProcessState.FAILED and instance.error_reason == "ORCHESTRATOR_RESTARTED"
    [cert] = store.certificates.list(task_id=task.id)
    assert cert.der == der and cert.state == ISSUED                          # C3
    assert cert.task_error_reason == "ORCHESTRATOR_RESTARTED"                # C4: carries the task's error
    assert store.ca_requests.get(lost).certificate_id == cert.id
    assert store.ca_requests.get(never).state == CaRequestState.NOT_ISSUED
    assert {a.detail["action"] for a in store.audit.list(action="reconcile")} == {
        "end_orphaned_task", "end_orphaned_process", "store_found_certificate"}
    # Settled: a second round has nothing to do.
    assert _reconciler(store, {local_ca.name: local_ca}).reconcile_once().examined == 0


def test_c16_reconciler_leaves_live_runs_and_beating_replicas_alone(store: Store, local_ca):
    live, _ = _production(store)
    other_alive, _ = _production(store, owner="replica-b")
    other_dead, _ = _production(store, owner="replica-c")
    store.instances.beat("replica-b")
    store.instances.beat("replica-c")
    rid = f"{live.id}:2:Application_1"
    store.ca_requests.journal(rid, live.id, local_ca.name, "EmployeeAuthentication", _csr())
    reconciler = _reconciler(store, {local_ca.name: local_ca}, live_tasks=lambda: {live.id},
                             stale_after=dt.timedelta(seconds=0.5))
    time.sleep(0.6)
    store.instances.beat("replica-b")          # replica-b still beats; replica-c stopped
    report = reconciler.reconcile_once()
    assert report.tasks_ended == 1 and report.examined == 0      # the live task's request is its own business
    assert store.tasks.get(live.id).state == TaskState.RUNNING
    assert store.tasks.get(other_alive.id).state == TaskState.RUNNING
    assert store.tasks.get(other_dead.id).state == TaskState.FAILED
    assert store.ca_requests.get(rid).state == CaRequestState.PENDING


def test_c16_unreachable_ca_leaves_the_request_pending_until_it_answers(store: Store, local_ca):
    task, _ = _production(store)
    rid = f"{task.id}:2:Application_1"
    csr = _csr()
    store.ca_requests.journal(rid, task.id, local_ca.name, "EmployeeAuthentication", csr)
    with pytest.raises(CaUnavailable):                       # issued, but the answer never came back
        AnswerLosingCa(local_ca, 1).issue(csr, PROFILE, rid)
    store.finish_task_failed(task.id, "CA_UNAVAILABLE", "lost")
    down = _reconciler(store, {local_ca.name: UnreachableCa(local_ca)}).reconcile_once()
    assert (down.examined, down.stored, down.still_pending) == (1, 0, 1)
    assert "CA_UNAVAILABLE" in (store.ca_requests.get(rid).error or "")
    up = _reconciler(store, {local_ca.name: local_ca}).reconcile_once()
    assert (up.examined, up.stored) == (1, 1)
    [cert] = store.certificates.list(task_id=task.id)
    assert cert.state == ISSUED and cert.task_error_reason == "CA_UNAVAILABLE"
    assert local_ca.issued_by_request() == {rid: cert.der}


# -- crash tests: orchestrator and gateway processes on a SoftHSM2 token ---------------------

def _insecure_env(**extra: str) -> dict[str, str]:
    """Plaintext gRPC on 127.0.0.1 (the processes run with this test's own ports only)."""
    return {**os.environ, "CARDLINE_ORCHESTRATOR_INSECURE": "true", "CARDLINE_GATEWAY_INSECURE": "true", **extra}


def _wait_healthy(address: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode} before serving on {address}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise TimeoutError(f"nothing healthy on {address} after {timeout_s} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Station:
    """An orchestrator process (restartable on the same port and data directory) and a
    gateway process holding the test's token."""

    def __init__(self, tmp_path: pathlib.Path, token) -> None:
        self.token = token
        self.data_dir = tmp_path / "orchestrator"
        self.data_dir.mkdir(parents=True)
        self.address = f"127.0.0.1:{free_port()}"
        self.orchestrator: subprocess.Popen | None = None
        self.gateway: subprocess.Popen | None = None
        self.gateway_dir = tmp_path / "gateway"
        self.gateway_dir.mkdir()
        self.starts = 0

    def start_orchestrator(self, *faults: str, **env: str) -> None:
        """`cardline orchestrator serve`, or with faults (tests/support/faulty_orchestrator.py
        options) the test entry script; either way in a process group of its own."""
        self.starts += 1
        serve = ["--migrate", "--listen", self.address, "--data-dir", str(self.data_dir)]
        command = [sys.executable, "-m", "tests.support.faulty_orchestrator", *faults, "--", *serve] if faults \
            else [CARDLINE, "orchestrator", "serve", *serve]
        with open(self.data_dir / f"orchestrator-{self.starts}.log", "w") as log:
            self.orchestrator = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                                 env=_insecure_env(**env), start_new_session=True)
        _wait_healthy(self.address, self.orchestrator)

    def start_gateway(self) -> str:
        gw_address = f"127.0.0.1:{free_port()}"
        with open(self.gateway_dir / "gateway.log", "w") as log:
            self.gateway = subprocess.Popen(
                [CARDLINE, "gateway", "serve", "--listen", gw_address, "--data-dir", str(self.gateway_dir),
                 "--orchestrator", self.address, "--gateway-id", "station-1", "--pkcs11-module",
                 self.token.module_path, "--no-pcsc"],
                stdout=log, stderr=subprocess.STDOUT,
                env={**_insecure_env(CARDLINE_GATEWAY_RECONNECT_MAX_S="1"), **self.token.env,
                     "CARDLINE_GATEWAY_INSECURE": "true"})
        _wait_healthy(gw_address, self.gateway)
        return self.reader_id()

    def reader_id(self, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            stub = OrchestratorApi.on(channel)
            while time.monotonic() < deadline:
                for r in stub.pool.ListReaders(pool_pb.ListReadersRequest(), timeout=2).readers:
                    if r.reader.token_label == self.token.label:
                        return r.reader.reader_id
                time.sleep(0.1)
        raise TimeoutError("the token's reader did not appear in the pool")

    def stub(self, channel) -> OrchestratorApi:
        return OrchestratorApi.on(channel)

    def produce(self, reader_id: str) -> card_pb.Task | None:
        """A production of two certificates (EC P-256); None if the orchestrator died."""
        certificates = [card_pb.CertificateRequest(template="EmployeeAuthentication",
                                                   key_type=common_pb2.KEY_TYPE_EC_P256),
                        card_pb.CertificateRequest(template="EmployeeSignature", key_type=common_pb2.KEY_TYPE_EC_P256)]
        with grpc.insecure_channel(self.address) as channel:
            try:
                events = list(self.stub(channel).cards.ProduceCard(card_pb.ProduceCardRequest(
                    reader=pool_pb.ReaderSelector(reader_id=reader_id), subject="CN=Crash Tester,O=Example",
                    certificates=certificates, user_pin=self.token.user_pin, card_template="EmployeeCard"),
                    timeout=60))
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    return None
                raise
        return events[-1].task

    def wait_killed(self, timeout_s: float = 30.0) -> int:
        assert self.orchestrator is not None
        return self.orchestrator.wait(timeout_s)

    def stop(self) -> None:
        for proc in (self.orchestrator, self.gateway):
            if proc is not None:
                _stop(proc)

    def stop_orchestrator(self) -> None:
        assert self.orchestrator is not None
        _stop(self.orchestrator)


@pytest.fixture
def station(tmp_path, softhsm_token):
    s = Station(tmp_path, softhsm_token)
    try:
        yield s
    finally:
        s.stop()


def token_certificates(token) -> list[x509.Certificate]:
    """The certificates on the token as OpenSC's pkcs11-tool reads them (an independent check)."""
    listing = subprocess.run(["pkcs11-tool", "--module", token.module_path, "--token-label", token.label, "--login",
                              "--pin", token.user_pin, "--list-objects", "--type", "cert"],
                             env=token.env, capture_output=True, text=True, check=True).stdout
    ids = [line.split(":", 1)[1].strip() for line in listing.splitlines() if line.strip().startswith("ID:")]
    out = []
    for object_id in ids:
        der = subprocess.run(["pkcs11-tool", "--module", token.module_path, "--token-label", token.label, "--login",
                              "--pin", token.user_pin, "--read-object", "--type", "cert", "--id", object_id],
                             env=token.env, capture_output=True, check=True).stdout
        out.append(x509.load_der_x509_certificate(der))
    return out


def compare_ca_with_store(station: Station, point: str) -> dict:
    """The CA's own record against the store and the token; asserts C16 and the state rules.
    Run with the orchestrator stopped (one LocalCa per directory and process)."""
    ca_issued = LocalCa(station.data_dir / "ca", "local").issued_by_request()   # request_id -> DER
    store = Store(f"sqlite:///{station.data_dir / 'cardline.db'}")
    try:
        certificates = {(c.issuer, c.serial_hex): c for c in store.certificates.list()}
        journal = {r.request_id: r for r in store.ca_requests.list()}
        tasks = store.tasks.list()
        reconciled = [a for a in store.audit.list(action="reconcile")]
        cards = {t.card_id: store.cards.get(t.card_id) for t in tasks if t.card_id}
        processes = store.processes.list(state=ProcessState.RUNNING)
    finally:
        store.close()
    on_token = {format(c.serial_number, "x"): c for c in token_certificates(station.token)}

    unknown = []
    for request_id, der in ca_issued.items():
        cert = x509.load_der_x509_certificate(der)
        stored = certificates.get((cert.issuer.rfc4514_string(), format(cert.serial_number, "x")))
        if stored is None:
            unknown.append(request_id)
            continue
        assert journal[request_id].certificate_id == stored.id, (point, request_id)
        assert journal[request_id].state in (CaRequestState.STORED, CaRequestState.WRITTEN), \
            (point, journal[request_id])
    assert unknown == [], f"{point}: certificates issued by the CA and unknown to the store: {unknown}"
    assert [r for r in journal.values() if r.state == CaRequestState.PENDING] == [], point
    for r in journal.values():
        if r.state == CaRequestState.NOT_ISSUED:
            assert r.request_id not in ca_issued, (point, r)
    running = [t for t in tasks if t.state == TaskState.RUNNING]
    assert running == [] and processes == [], f"{point}: still running after the restart: {running} {processes}"

    task_state = {t.id: t for t in tasks}
    for record in certificates.values():
        assert record.task_id is not None, (point, record)
        task = task_state[record.task_id]
        # The rule: a certificate is in its start state only if its task SUCCEEDED (C2/C3).
        assert (record.state == START_STATE) == (task.state == TaskState.SUCCEEDED), (point, record.state, task.state)
        if task.state == TaskState.FAILED:
            assert record.state == ISSUED and record.task_error_reason == task.error_reason, (point, record)
    for serial_hex, cert in on_token.items():           # what the card holds, the store knows
        stored = certificates.get((cert.issuer.rfc4514_string(), serial_hex))
        assert stored is not None, f"{point}: certificate {serial_hex} on the token is unknown to the store"
        # Written to the token but the task never finished: still in the internal issued state.
        assert stored.task_id is not None, (point, stored)
        if task_state[stored.task_id].state != TaskState.SUCCEEDED:
            assert stored.state == ISSUED, (point, stored)
    for r in journal.values():
        if r.state == CaRequestState.WRITTEN:
            assert r.serial_hex in on_token, f"{point}: journal says written, the token lacks {r.serial_hex}"
    for task in tasks:
        if task.type == "card_production" and task.state == TaskState.FAILED and task.card_id:
            assert cards[task.card_id].state == "ProductionFailed", (point, cards[task.card_id])

    counts = {"ca_issued": len(ca_issued), "store_found": len(ca_issued) - len(unknown), "unknown": len(unknown),
              "stored_by_reconciler": sum(a.detail.get("action") == "store_found_certificate" for a in reconciled),
              "tasks_ended": sum(a.detail.get("action") == "end_orphaned_task" for a in reconciled),
              "not_issued": sum(r.state == CaRequestState.NOT_ISSUED for r in journal.values()),
              "running": len(running), "on_token": len(on_token), "certificates": len(certificates),
              "tasks": tasks}
    SUMMARY.update({k: v for k, v in counts.items() if isinstance(v, int) and k not in ("on_token", "certificates")})
    SUMMARY["runs"] += 1
    INJECTION_POINTS.add(point)
    return counts


# (boundary, occurrence, delay ms, certificates the CA has issued when the kill comes)
KILL_POINTS = [
    ("before_issue", 1, 0, 0),     # journaled, CA not called
    ("before_issue", 2, 0, 1),
    ("after_issue", 1, 0, 1),      # the CA answered, the store commit not made
    ("after_issue", 2, 0, 2),
    ("after_store", 1, 0, 1),      # committed (C1), the card write not sent
    ("after_store", 2, 0, 2),
    ("write_sent", 1, 0, 1),       # the write handed to the gateway, killed at once
    ("write_sent", 2, 500, 2),     # killed 0.5 s into the write: the token holds the certificate
    ("after_write", 1, 0, 1),
    ("after_write", 2, 0, 2),
    ("before_finish", 1, 0, 2),    # every certificate written, the final transition (C2) not made
]


@pytest.mark.hardware
@pytest.mark.parametrize("boundary,occurrence,delay_ms,ca_issued", KILL_POINTS,
                         ids=[f"{b}#{n}" + (f"+{d}ms" if d else "") for b, n, d, _ in KILL_POINTS])
def test_c16_sigkill_at_every_boundary_leaves_no_certificate_unknown_and_no_task_running(
        station, boundary, occurrence, delay_ms, ca_issued):
    faults = ["--kill-at", f"{boundary}:{occurrence}"]
    if delay_ms:
        faults += ["--kill-delay-ms", str(delay_ms)]
    station.start_orchestrator(*faults)
    reader_id = station.start_gateway()
    assert station.produce(reader_id) is None, "the orchestrator should have died during the production"
    assert station.wait_killed() == -signal.SIGKILL

    station.start_orchestrator()               # same data directory: the reconciler runs before it serves
    with grpc.insecure_channel(station.address) as channel:
        unsettled = station.stub(channel).ca.ListCaRequests(ca_pb.ListCaRequestsRequest(unsettled_only=True))
        assert list(unsettled.requests) == []
        assert station.stub(channel).ca.Reconcile(ca_pb.ReconcileRequest()).tasks_ended == 0   # nothing left to do
    station.stop_orchestrator()

    counts = compare_ca_with_store(station, f"{boundary}#{occurrence}" + (f"+{delay_ms}ms" if delay_ms else ""))
    assert counts["ca_issued"] == ca_issued
    [task] = counts["tasks"]
    assert task.state == TaskState.FAILED and task.error_reason == "ORCHESTRATOR_RESTARTED"
    assert counts["tasks_ended"] == 1
    # The certificate whose answer came between the CA and the store commit is found by the
    # reconciler; a request journaled but never sent is settled as not issued.
    assert counts["stored_by_reconciler"] == (1 if boundary == "after_issue" else 0)
    assert counts["not_issued"] == (1 if boundary == "before_issue" else 0)
    written_before = {"before_issue": occurrence - 1, "after_issue": occurrence - 1, "after_store": occurrence - 1,
                      "write_sent": occurrence - 1, "after_write": occurrence, "before_finish": 2}[boundary]
    if delay_ms:
        assert counts["on_token"] == occurrence       # the gateway finished the write before the kill
    else:
        assert counts["on_token"] in (written_before, written_before + (boundary == "write_sent"))


@pytest.mark.hardware
def test_c16_ca_answer_lost_after_issuance_is_found_and_stored_by_the_periodic_reconciler(station):
    station.start_orchestrator("--ca-lost-answer", "2", CARDLINE_ORCHESTRATOR_RECONCILE_INTERVAL_S="0.5")
    reader_id = station.start_gateway()
    task = station.produce(reader_id)
    assert task is not None and task.state == card_pb.TASK_STATE_FAILED and task.error.reason == "CA_UNAVAILABLE", task
    assert len(task.certificate_ids) == 1            # the store knew only the first one when the task ended
    with grpc.insecure_channel(station.address) as channel:
        stub = station.stub(channel)
        deadline = time.monotonic() + 20
        while stub.ca.ListCaRequests(ca_pb.ListCaRequestsRequest(unsettled_only=True)).requests:
            assert time.monotonic() < deadline, "the periodic reconciler did not settle the lost answer"
            time.sleep(0.2)
        hits = stub.certificates.SearchIssuedCertificates(
            certificate_pb.SearchIssuedCertificatesRequest(task_id=task.id)).certificates
    # C4/C5: both are searchable in the internal issued state with the task's error, so
    # handle_issued or the sweeper can revoke the one that never reached the card.
    assert len(hits) == 2 and {h.task_error.reason for h in hits} == {"CA_UNAVAILABLE"}
    station.stop_orchestrator()
    counts = compare_ca_with_store(station, "ca_answer_lost#2")
    assert (counts["ca_issued"], counts["store_found"], counts["stored_by_reconciler"]) == (2, 2, 1)
    assert counts["on_token"] == 1 and counts["tasks_ended"] == 0


@pytest.mark.hardware
def test_c16_ca_unreachable_fails_the_task_and_the_request_settles_once_the_ca_answers(station):
    station.start_orchestrator("--ca-down")
    reader_id = station.start_gateway()
    task = station.produce(reader_id)
    assert task is not None and task.state == card_pb.TASK_STATE_FAILED and task.error.reason == "CA_UNAVAILABLE", task
    with grpc.insecure_channel(station.address) as channel:
        stub = station.stub(channel)
        report = stub.ca.Reconcile(ca_pb.ReconcileRequest())
        assert (report.examined, report.stored, report.not_issued) == (1, 0, 0)   # the CA cannot be asked
        [pending] = stub.ca.ListCaRequests(ca_pb.ListCaRequestsRequest(unsettled_only=True)).requests
        assert pending.task_id == task.id
    # The same through the CLI.
    cli = lambda *args: json.loads(subprocess.run(  # noqa: E731
        [CARDLINE, *args, "--orchestrator", station.address, "--json"], env=_insecure_env(CARDLINE_INSECURE="1"),
        capture_output=True, text=True, check=True).stdout)
    assert cli("reconcile") == {"examined": 1, "stored": 0, "not_issued": 0, "tasks_ended": 0}
    [row] = cli("ca-requests", "--unsettled")
    assert (row["request_id"], row["state"], row["task_id"]) == (
        pending.request_id, "CA_REQUEST_STATE_PENDING", task.id)
    station.stop_orchestrator()
    station.start_orchestrator()                      # the CA answers again: settled before serving
    with grpc.insecure_channel(station.address) as channel:
        rows = station.stub(channel).ca.ListCaRequests(ca_pb.ListCaRequestsRequest()).requests
        assert [(r.request_id, r.state) for r in rows] == [(pending.request_id, ca_pb.CA_REQUEST_STATE_NOT_ISSUED)]
    station.stop_orchestrator()
    counts = compare_ca_with_store(station, "ca_unreachable")
    assert (counts["ca_issued"], counts["certificates"], counts["on_token"], counts["not_issued"]) == (0, 0, 0, 1)


@pytest.mark.parametrize("tag_requests", [True, False], ids=["tagged", "untagged"])
def test_c16_openssl_ca_index_txt_has_no_certificate_unknown_to_the_store(store: Store, tmp_path, tag_requests):
    """`openssl ca` as the external CA: the orchestrator died after openssl issued (before
    the store commit) - once even before the connector wrote its own request journal - and
    after journaling a request it never sent. The reconciler finds the certificates by
    request id or, when the CA cannot confirm ids, by the request's public key; then
    index.txt and the store agree."""
    openssl = pytest.importorskip("orchestrator.ca.openssl", reason="the OpenSSL CA connector is not there")
    try:
        ca = openssl.OpenSslCa(tmp_path / "openssl-ca", name="openssl", tag_requests=tag_requests)
    except CaUnavailable as exc:
        pytest.skip(f"openssl ca cannot run here: {exc.message}")
    task, _card = _production(store)
    crashed, journal_lost, never = (f"{task.id}:{n}:Application_{n}" for n in (2, 4, 6))
    csrs = {rid: _csr(f"User {i}") for i, rid in enumerate((crashed, journal_lost, never))}
    for rid, csr in csrs.items():
        store.ca_requests.journal(rid, task.id, ca.name, "EmployeeAuthentication", csr)
    ca.issue(csrs[crashed], PROFILE, crashed)
    ca.issue(csrs[journal_lost], PROFILE, journal_lost)
    for path in (tmp_path / "openssl-ca" / "requests").glob("*.json"):   # killed before the connector's journal
        if journal_lost in path.read_text():
            path.unlink()

    report = _reconciler(store, {ca.name: ca}).reconcile_once()
    assert (report.tasks_ended, report.stored, report.not_issued) == (1, 2, 1)
    stored = {(c.issuer, c.serial_hex) for c in store.certificates.list(state=ISSUED)}
    index = [x509.load_der_x509_certificate(der) for der in ca.issued_certificates()]
    assert len(index) == 2
    assert {(c.issuer.rfc4514_string(), format(c.serial_number, "x")) for c in index} == stored
    assert store.ca_requests.get(never).state == CaRequestState.NOT_ISSUED
    SUMMARY["openssl_index_certificates"] += len(index)
    SUMMARY["openssl_unknown"] += len({(c.issuer.rfc4514_string(), format(c.serial_number, "x"))
                                       for c in index} - stored)
