"""Rule C16, takeover (docs/rules.md): a card task whose replica died is taken over by another
replica after the dead one's heartbeat lapsed — resumed from its journals when its steps are
answered by the gateway's step memo, otherwise ended with the reason; C1–C3 and C16 hold
either way.

Real parts: PostgreSQL; two `cardline orchestrator serve` replicas A and B on one database with
one built-in CA directory and one KEK file, each leading a process group of its own; a
`cardline gateway serve` with a SoftHSM2 token and the address list [A, B]; mutual TLS with the
session's PKI. A runs the test-only entry script tests/support/faulty_orchestrator.py, which
SIGKILLs A's whole process group at a card task boundary of the first application, after its
key pair was generated on the token (KILL_POINTS: before or after the CA issued, after the
certificate was stored, with its card write sent or answered). Short
settings: a reconciliation round (and heartbeat) a second, so a replica is stale after 3 s."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from orchestrator.store import Store
from orchestrator.store.records import AUDIT_RECONCILE, CaRequestState, ProcessState, TaskState
from shared.proto import common_pb2
from shared.proto import process_service_pb2 as process_pb
from tests.support.api import OrchestratorApi
from tests.support.pki import default_pki
from tests.support.processes import CARDLINE, channel, free_port, stop_process_group, wait_for_pooled_reader
from tests.support.replicas import Replicas
from tests.support.softhsm import delete_token, init_blank_token
from tests.support.transport_puk import write_transport_key

pytestmark = [pytest.mark.hardware, pytest.mark.postgres]

REPO = pathlib.Path(__file__).resolve().parents[2]
# produce-employee-card (two key pairs, EC P-256 and RSA-2048, two certificates) followed by a
# second task: the instance taken over continues with it on the replica that took it over.
PROCESS = "produce-and-load"
GATEWAY = "station-takeover"


def takeover_config(tmp: pathlib.Path, token) -> pathlib.Path:
    """The examples' configuration with PROCESS: produce-employee-card on TOKEN, then load_certificates."""
    config_dir = tmp / "config"
    shutil.copytree(REPO / "examples", config_dir)
    write_transport_key(config_dir / "secrets")       # the token's SO PIN is derived from it
    produce = (config_dir / "processes" / "produce-employee-card.yaml").read_text()
    assert "\non_error:" in produce
    # The process takes the test's token only: the session's SoftHSM2 directory may hold
    # tokens other tests left, each a reader at the same site.
    assert "reader: {site: hq, kind: pkcs11}" in produce
    produce = produce.replace("reader: {site: hq, kind: pkcs11}",
                              f'reader: {{site: hq, kind: pkcs11, reader: "pkcs11:softhsm2:{token.serial}"}}')
    (config_dir / "processes" / f"{PROCESS}.yaml").write_text(produce.replace(
        "name: produce-employee-card", f"name: {PROCESS}").replace("\non_error:", """
  - type: load_certificates
    card: "${card}"
    state: Active
    into: "${certificates}"
on_error:""", 1))
    return config_dir


def takeover_replicas(tmp: pathlib.Path, database_url: str, token, **env: str) -> Replicas:
    """Replicas on one database, one CA, one KEK, with takeover_config; a reconciliation round a second."""
    return Replicas(tmp, database_url, env={"CARDLINE_ORCHESTRATOR_CONFIG_DIR": str(takeover_config(tmp, token)),
                                            "CARDLINE_ORCHESTRATOR_RECONCILE_INTERVAL_S": "1",
                                            # A replica is gone 3 s after its last heartbeat (one rule: tasks and pool).
                                            "CARDLINE_ORCHESTRATOR_REPLICA__STALE_AFTER_S": "3",
                                            "CARDLINE_ORCHESTRATOR_REPLICA__HEARTBEAT_INTERVAL_S": "0.5",
                                            "CARDLINE_ORCHESTRATOR_REPLICA__POLL_INTERVAL_S": "0.5", **env})


@contextlib.contextmanager
def gateway(addresses: list[str], data_dir: pathlib.Path, token) -> Iterator[subprocess.Popen]:
    default_pki().gateway(GATEWAY, site="hq")
    data_dir.mkdir()
    with open(data_dir / "gateway.log", "w") as log:
        proc = subprocess.Popen(
            [CARDLINE, "gateway", "serve", "--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(data_dir),
             "--orchestrator", ",".join(addresses), "--gateway-id", GATEWAY, "--pkcs11-module", token.module_path,
             "--no-pcsc", "--tls-dir", str(default_pki().directory)],
            stdout=log, stderr=subprocess.STDOUT, env={**token.env, "CARDLINE_GATEWAY_RECONNECT_MAX_S": "1"},
            start_new_session=True)
    try:
        yield proc
    finally:
        stop_process_group(proc, timeout_s=15)


def start_process_until_the_replica_dies(address: str, token) -> None:
    """StartProcess on the faulty replica: it dies inside the card task, the call breaks."""
    with channel(address) as ch, pytest.raises(grpc.RpcError) as broken:
        list(OrchestratorApi.on(ch).processes.StartProcess(process_pb.StartProcessRequest(
            process=PROCESS, inputs={"person": common_pb2.Value(text="Take Over")},
            secret_inputs={"pin": token.user_pin}), timeout=120))
    assert broken.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                   grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def wait_instance_ended(store: Store, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        instances = store.processes.list()
        if instances and all(i.state != ProcessState.RUNNING for i in instances):
            return instances[0]
        time.sleep(0.2)
    raise TimeoutError(f"the process instance did not end: {store.processes.list()}")


def token_objects(token, kind: str) -> int:
    """How many objects of KIND (privkey, pubkey, cert) the token holds."""
    out = subprocess.run(["pkcs11-tool", "--module", token.module_path, "--token-label", token.label, "--login",
                          "--pin", token.user_pin, "--list-objects", "--type", kind],
                         capture_output=True, text=True, timeout=30, env=token.env, check=True).stdout
    marker = {"privkey": "Private Key Object", "pubkey": "Public Key Object", "cert": "Certificate Object"}[kind]
    return out.count(marker)


def ca_issued(ca_dir: pathlib.Path) -> dict[str, x509.Certificate]:
    """The built-in CA's own record of every issuance: request id -> certificate."""
    out = {}
    for path in (ca_dir / "requests").glob("*.json"):
        entry = json.loads(path.read_text())
        out[entry["request_id"]] = x509.load_pem_x509_certificate(entry["certificate"].encode())
    return out


def _snapshot(store: Store) -> tuple:
    """What a replica could change: tasks, instances, certificates, CA requests (states, owners)."""
    return (sorted((t.id, t.state, t.owner, t.error_reason) for t in store.tasks.list()),
            sorted((i.id, i.state, i.owner) for i in store.processes.list()),
            sorted((c.id, c.state) for c in store.certificates.list()),
            sorted((r.request_id, r.state) for r in store.ca_requests.list()))


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# Where A dies in the first application, after its key generation was answered: the CA request
# journaled but not sent (pending, nothing issued), issued but not stored (pending, issued),
# stored (C1) with the card write not sent, the write sent, the write answered.
KILL_POINTS = ["before_issue", "after_issue", "after_store", "write_sent", "after_write"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("boundary", KILL_POINTS)
def test_c16_takeover_resumes_a_task_whose_replica_died_after_its_key_generation_and_produces_the_card(
        tmp_path, softhsm_token, postgres_store: Store, postgres_database_url: str, boundary: str):
    with takeover_replicas(tmp_path, postgres_database_url, softhsm_token) as replicas:
        a, b = replicas.start("a", "--kill-at", boundary), replicas.start("b")
        with gateway([a.address, b.address], tmp_path / "gateway", softhsm_token):
            mine = lambda r: r.reader.token_serial == softhsm_token.serial  # noqa: E731
            wait_for_pooled_reader(a.address, mine, timeout_s=30)
            start_process_until_the_replica_dies(a.address, softhsm_token)
            a.wait()
            killed = time.monotonic()
            instance = wait_instance_ended(postgres_store)
            took = time.monotonic() - killed

            tasks = postgres_store.tasks.list(process_instance_id=instance.id)
            assert [t.state for t in tasks] == [TaskState.SUCCEEDED], [(t.state, t.error_message) for t in tasks]
            assert instance.state == ProcessState.SUCCEEDED, instance.error_message
            assert len(instance.process_map["certificates"]) == 2     # the next task ran after the takeover
            task = tasks[0]
            steps = postgres_store.tasks.steps(task.id)
            # The token holds exactly the two key pairs: the first run's EC key came back from the
            # step memo (no second key generation), the RSA key was generated after the takeover.
            assert token_objects(softhsm_token, "privkey") == 2
            assert token_objects(softhsm_token, "cert") == 2
            # One certificate per key in the store, each issued once by the CA (C16), each the
            # answer to its journaled request, whose key is the key the card generated first.
            certificates = postgres_store.certificates.list(task_id=task.id)
            assert len(certificates) == 2 and {c.state for c in certificates} == {"Active"}
            issued = ca_issued(replicas.ca_dir)
            assert len(issued) == 2
            requests = postgres_store.ca_requests.list(task_id=task.id)
            assert {r.request_id for r in requests} == set(issued)
            assert {r.state for r in requests} == {CaRequestState.WRITTEN}
            for row in requests:
                cert = issued[row.request_id]
                assert format(cert.serial_number, "x") == row.serial_hex
                assert _spki(cert.public_key()) == _spki(x509.load_der_x509_csr(row.csr_der).public_key())
            # The takeover is audited: who took what from whom.
            taken = [e for e in postgres_store.audit.list(object_id=task.id, action=AUDIT_RECONCILE)
                     if e.detail.get("action") == "take_over_task"]
            assert len(taken) == 1 and taken[0].detail["resume"] is True, taken
            assert taken[0].detail["from_owner"] == a.orchestrator_id
            assert taken[0].detail["to_owner"] == b.orchestrator_id
            assert postgres_store.tasks.get(task.id).owner == taken[0].detail["to_owner"]
            assert postgres_store.process_secrets.find(instance.id) is None       # dropped at the end
            gateway_log = (tmp_path / "gateway" / "gateway.log").read_text()
            replayed = [line for line in gateway_log.splitlines()
                        if "op=GenerateKeyPair" in line and "replayed=True" in line]
            assert len(replayed) == 1, gateway_log[-4000:]
            # The killed replica restarted on its data directory (its reconciler runs before it
            # serves) changes nothing: the task is the other replica's, and ended.
            before = _snapshot(postgres_store)
            a.start()
            assert _snapshot(postgres_store) == before
            a.stop()
            print(f"takeover ({boundary}): task resumed by replica B and the card produced {took:.1f} s after "
                  f"replica A was killed ({len(steps)} journaled steps)")


@pytest.mark.timeout(300)
def test_c16_takeover_ends_the_task_with_the_reason_when_its_gateway_never_comes_back(
        tmp_path, softhsm_token, postgres_store: Store, postgres_database_url: str):
    with takeover_replicas(tmp_path, postgres_database_url, softhsm_token) as replicas:
        a, b = replicas.start("a", "--kill-at", "after_issue"), replicas.start("b")
        with gateway([a.address, b.address], tmp_path / "gateway", softhsm_token) as gateway_proc:
            wait_for_pooled_reader(a.address, lambda r: r.reader.token_serial == softhsm_token.serial, timeout_s=30)
            # The station goes down with the replica: SIGKILL of the gateway as soon as A is gone.
            start_process_until_the_replica_dies(a.address, softhsm_token)
            os.killpg(gateway_proc.pid, signal.SIGKILL)
            gateway_proc.wait(10)
            a.wait()
        instance = wait_instance_ended(postgres_store)
        tasks = postgres_store.tasks.list(process_instance_id=instance.id)
        main = [t for t in tasks if t.task_index == 0]
        assert [t.state for t in main] == [TaskState.FAILED]
        assert main[0].error_reason == "ORCHESTRATOR_RESTARTED"
        assert "did not attach" in (main[0].error_message or ""), main[0].error_message
        assert instance.state == ProcessState.FAILED and instance.error_reason == "ORCHESTRATOR_RESTARTED"
        # C16: the certificate the CA issued before A died is in the store (the reconciler
        # settles the request once the task has ended), C3: in the internal issued state with
        # the task's error; nothing RUNNING.
        deadline = time.monotonic() + 30
        while postgres_store.ca_requests.list(states=[CaRequestState.PENDING]) and time.monotonic() < deadline:
            time.sleep(0.2)
        issued = ca_issued(replicas.ca_dir)
        known = {(c.issuer, c.serial_hex) for c in postgres_store.certificates.list()}
        assert len(issued) == 1
        assert all((c.issuer.rfc4514_string(), format(c.serial_number, "x")) in known for c in issued.values())
        stored = postgres_store.certificates.list(task_id=main[0].id)
        assert [c.state for c in stored] == ["Issued"] and stored[0].task_error_reason == "ORCHESTRATOR_RESTARTED"
        assert main[0].card_id is not None
        assert postgres_store.cards.get(main[0].card_id).state == "ProductionFailed"
        assert postgres_store.tasks.list(state=TaskState.RUNNING) == []
        assert postgres_store.processes.list(state=ProcessState.RUNNING) == []
        taken = [e for e in postgres_store.audit.list(object_id=main[0].id, action=AUDIT_RECONCILE)
                 if e.detail.get("action") == "take_over_task"]
        assert len(taken) == 1 and taken[0].detail["resume"] is False


@pytest.mark.timeout(300)
def test_c16_takeover_ends_the_task_with_the_reason_when_another_card_is_in_the_reader(
        tmp_path, softhsm_token, postgres_store: Store, postgres_database_url: str):
    with takeover_replicas(tmp_path, postgres_database_url, softhsm_token) as replicas:
        a, b = replicas.start("a", "--kill-at", "after_issue"), replicas.start("b")
        with gateway([a.address, b.address], tmp_path / "gateway", softhsm_token) as gateway_proc:
            wait_for_pooled_reader(a.address, lambda r: r.reader.token_serial == softhsm_token.serial, timeout_s=30)
            start_process_until_the_replica_dies(a.address, softhsm_token)
            os.killpg(gateway_proc.pid, signal.SIGKILL)
            gateway_proc.wait(10)
            a.wait()
        # While the station is down its card is swapped for a blank one: the gateway comes
        # back (to B) with another token, whose reader is not the task's.
        delete_token(softhsm_token.conf_path, softhsm_token.serial)
        other = init_blank_token(softhsm_token.conf_path, f"other-{softhsm_token.label}", softhsm_token.user_pin)
        try:
            with gateway([a.address, b.address], tmp_path / "gateway-again", softhsm_token):
                wait_for_pooled_reader(b.address, lambda r: r.reader.token_serial == other, timeout_s=30)
                instance = wait_instance_ended(postgres_store)
        finally:
            delete_token(softhsm_token.conf_path, other)
        main = [t for t in postgres_store.tasks.list(process_instance_id=instance.id) if t.task_index == 0]
        assert [t.state for t in main] == [TaskState.FAILED]
        assert "no card in the task's reader" in (main[0].error_message or ""), main[0].error_message
        assert instance.state == ProcessState.FAILED
        assert main[0].card_id is not None
        card = postgres_store.cards.get(main[0].card_id)
        assert card.serial == softhsm_token.serial and card.state == "ProductionFailed"     # C3, C4
        assert postgres_store.tasks.list(state=TaskState.RUNNING) == []
        assert postgres_store.processes.list(state=ProcessState.RUNNING) == []


def _wait_for_line(path: pathlib.Path, text: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} not in {path}:\n{path.read_text()[-3000:]}")


@pytest.mark.timeout(300)
def test_c16_takeover_of_a_frozen_replica_which_writes_nothing_when_it_thaws(
        tmp_path, softhsm_token, postgres_store: Store, postgres_database_url: str):
    """A is frozen (SIGSTOP of its process group) right after the CA issued; the gateway finds
    it silent and fails over to B, which takes the task over and produces the card. Thawed, A
    finds the task no longer its own: it stores nothing and does not end the instance."""
    # Beats every 0.5 s: the gateway finds A silent in 1.5 s.
    with takeover_replicas(tmp_path, postgres_database_url, softhsm_token,
                           CARDLINE_ORCHESTRATOR_HEARTBEAT_INTERVAL_S="0.5") as replicas:
        a, b = replicas.start("a", "--stop-at", "after_issue"), replicas.start("b")
        with gateway([a.address, b.address], tmp_path / "gateway", softhsm_token):
            wait_for_pooled_reader(a.address, lambda r: r.reader.token_serial == softhsm_token.serial, timeout_s=30)
            call = threading.Thread(target=_start_process_on_frozen, args=(a.address, softhsm_token), daemon=True)
            call.start()
            instance = wait_instance_ended(postgres_store)
            assert instance.state == ProcessState.SUCCEEDED, instance.error_message
            a.thaw()
            _wait_for_line(a.data_dir / "orchestrator.log", "process instance taken over by another replica")
            call.join(30)

            b_id = b.orchestrator_id
            after = postgres_store.processes.get(instance.id)
            assert after.state == ProcessState.SUCCEEDED and after.owner == b_id and after.error_reason is None
            task, = postgres_store.tasks.list(process_instance_id=instance.id)
            assert task.state == TaskState.SUCCEEDED and task.owner == b_id
            assert token_objects(softhsm_token, "privkey") == 2 and token_objects(softhsm_token, "cert") == 2
            assert len(ca_issued(replicas.ca_dir)) == 2
            assert len(postgres_store.certificates.list(task_id=task.id)) == 2
            assert "was taken over by" in a.log


def _start_process_on_frozen(address: str, token) -> None:
    """StartProcess on A, which freezes inside the card task; the call ends however A answers."""
    with contextlib.suppress(grpc.RpcError), channel(address) as ch:
        list(OrchestratorApi.on(ch).processes.StartProcess(process_pb.StartProcessRequest(
            process=PROCESS, inputs={"person": common_pb2.Value(text="Take Over")},
            secret_inputs={"pin": token.user_pin}), timeout=120))
