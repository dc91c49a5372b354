"""One reader pool across two orchestrator replicas on one PostgreSQL database (docs/replicas.md).

Real parts: two `cardline orchestrator serve` processes (shared built-in CA directory and KEK
file), three `cardline gateway serve` processes, each with a SoftHSM2 token of its own, all
linked to replica B only; mutual TLS with the session's PKI throughout. Through replica A:
the readers of B's gateways are listed, a card is produced on one, a lease is taken and used
on another; the lease and the queue behind it are the same seen from B, and a release through
B frees the reader. A client certificate calling the replicas' own ReplicaService is refused."""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import pathlib
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import psycopg
import pytest
from sqlalchemy.engine import make_url

from gateway.softhsm import make_softhsm_dir
from shared.proto import card_service_pb2 as card_pb
from shared.proto import common_pb2, replica_service_pb2_grpc, steps_pb2
from shared.proto import lease_service_pb2 as lease_pb
from shared.proto import reader_pool_service_pb2 as pool_pb
from shared.proto import replica_service_pb2 as replica_pb
from tests.support.api import OrchestratorApi
from tests.support.pki import default_pki
from tests.support.processes import channel, gateway_process, wait_for_pooled_reader
from tests.support.replicas import Replicas, pooled_readers
from tests.support.softhsm import init_blank_token

pytestmark = [pytest.mark.hardware, pytest.mark.postgres]

PIN = "1234"
GATEWAYS = 3


#: Every replica looks at the pool every 0.5 s, beats every second, and counts as gone after 15 s without a beat.
REPLICA_ENV = {"CARDLINE_ORCHESTRATOR_REPLICA__POLL_INTERVAL_S": "0.5",
               "CARDLINE_ORCHESTRATOR_REPLICA__HEARTBEAT_INTERVAL_S": "1",
               "CARDLINE_ORCHESTRATOR_REPLICA__STALE_AFTER_S": "15"}


@contextlib.contextmanager
def stations(tmp_path: pathlib.Path, orchestrator: str, module: str, count: int = GATEWAYS) -> Iterator[list[str]]:
    """COUNT gateways linked to ORCHESTRATOR, each with one SoftHSM2 token of its own; their
    token labels."""
    labels = []
    with contextlib.ExitStack() as stack:
        for i in range(count):
            conf = make_softhsm_dir(tmp_path / f"hsm-{i}")
            label = f"replica-{i}"
            init_blank_token(conf, label, PIN)
            labels.append(label)
            stack.enter_context(gateway_process(orchestrator, f"station-r{i}", tmp_path / f"gateway-{i}",
                                                pkcs11_module=module, env={**os.environ, "SOFTHSM2_CONF": str(conf)}))
        yield labels


def _ready(label: str) -> Callable[[pool_pb.PooledReader], bool]:
    """The pooled reader of the token LABEL, holding it."""
    return lambda r: r.reader.token_label == label and r.state == pool_pb.POOLED_READER_STATE_CARD_PRESENT


def _readers(address: str) -> list[tuple[str, str, str, int]]:
    """(gateway, reader, token label, state) of each reader in the pool of ADDRESS, sorted."""
    return sorted((r.gateway_id, r.reader.reader_id, r.reader.token_label, r.state) for r in pooled_readers(address))


def _queue_depth(metrics: str) -> float:
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith("cardline_pool_queue_depth ")]
    return float(line.split()[1])


def _positions(database_url: str) -> list[tuple[str, int]]:
    """The queue as the database holds it: (holder, position) of each waiting request."""
    url = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url) as conn:
        return [tuple(r) for r in conn.execute(
            "SELECT holder, position FROM pool_waiters WHERE state = 'waiting' ORDER BY seq").fetchall()]


def _until(predicate, timeout_s: float = 20.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not hold within {timeout_s} s")


def test_a_replica_lists_produces_on_and_leases_the_readers_of_gateways_linked_to_another(
        tmp_path, postgres_store, postgres_database_url, softhsm_module):
    with Replicas(tmp_path, postgres_database_url, env=REPLICA_ENV, metrics=True) as replicas:
        replica_a, replica_b = replicas.start_all("a", "b")
        a, b = replica_a.address, replica_b.address
        with stations(tmp_path, b, softhsm_module) as labels:
            pooled = {label: wait_for_pooled_reader(a, _ready(label)) for label in labels}
            assert {p.gateway_id for p in pooled.values()} == {f"station-r{i}" for i in range(GATEWAYS)}
            _until(lambda: _readers(a) == _readers(b), what="A and B listing the same readers")

            # A process on A produces a card on a reader of a gateway linked to B.
            first = pooled[labels[0]]
            with channel(a) as ch:
                events = list(OrchestratorApi.on(ch).cards.ProduceCard(card_pb.ProduceCardRequest(
                    reader=pool_pb.ReaderSelector(gateway_id=first.gateway_id, reader_id=first.reader.reader_id),
                    subject="CN=Replica Test,O=Example", user_pin=PIN, card_template="EmployeeCard",
                    certificates=[card_pb.CertificateRequest(template="EmployeeAuthentication",
                                                             key_type=common_pb2.KEY_TYPE_EC_P256)]), timeout=120))
            task = events[-1].task
            assert task.state == card_pb.TASK_STATE_SUCCEEDED, task.error
            assert (task.gateway_id, task.reader_id) == (first.gateway_id, first.reader.reader_id)

            # A lease taken through A on a reader of B's gateway runs a step through A...
            second = pooled[labels[1]]
            selector = pool_pb.ReaderSelector(gateway_id=second.gateway_id, reader_id=second.reader.reader_id)
            with channel(a) as ch_a, channel(b) as ch_b:
                api_a, api_b = OrchestratorApi.on(ch_a), OrchestratorApi.on(ch_b)
                lease = api_a.leases.AcquireLease(lease_pb.AcquireLeaseRequest(selector=selector, ttl_s=120,
                                                                               holder="first"), timeout=20).lease
                outcome = api_a.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(
                    lease_id=lease.lease_id, step=steps_pb2.Step(read_card_info=steps_pb2.ReadCardInfo())),
                    timeout=30).outcome
                assert outcome.WhichOneof("result") == "card_info", outcome
                # ... and is the same seen from B, which runs steps on it too.
                assert [x.lease_id for x in api_b.leases.ListLeases(lease_pb.ListLeasesRequest(),
                                                                      timeout=5).leases] == [lease.lease_id]
                seen_b = api_b.leases.GetLease(lease_pb.GetLeaseRequest(lease_id=lease.lease_id), timeout=5).lease
                assert (seen_b.gateway_id, seen_b.reader.reader_id) == (second.gateway_id, second.reader.reader_id)
                assert api_b.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(
                    lease_id=lease.lease_id, step=steps_pb2.Step(read_card_info=steps_pb2.ReadCardInfo())),
                    timeout=30).outcome.WhichOneof("result") == "card_info"
                remote, local = _step_times(api_a, lease.lease_id), _step_times(api_b, lease.lease_id)
                print(f"read_card_info on a lease, median of {STEPS}: through A (relayed to B) {remote * 1000:.1f} ms, "
                      f"through B (holds the link) {local * 1000:.1f} ms")
                leased = next(r for r in _readers(b) if r[:2] == (second.gateway_id, second.reader.reader_id))
                assert leased[3] == pool_pb.POOLED_READER_STATE_LEASED

                # A second request for that reader, made through B, queues behind it: one queue.
                with concurrent.futures.ThreadPoolExecutor(1) as pool:
                    waiting = pool.submit(api_b.leases.AcquireLease, lease_pb.AcquireLeaseRequest(
                        selector=selector, ttl_s=120, holder="second", wait=True), timeout=60)
                    (holder, position), = _until(lambda: [w for w in _positions(postgres_database_url) if w[1]],
                                                 what="the second request queued and numbered")
                    assert holder.startswith("second") and position == 1
                    _until(lambda: _queue_depth(replica_a.metrics) == 1 and _queue_depth(replica_b.metrics) == 1,
                           what="both replicas showing the one queued request")
                    assert not waiting.done()

                    # Released through B (granted through A): the reader goes to the one waiting.
                    released = time.monotonic()
                    api_b.leases.ReleaseLease(lease_pb.ReleaseLeaseRequest(lease_id=lease.lease_id), timeout=10)
                    granted = waiting.result(timeout=30).lease
                    print(f"released through B, granted to the next in the queue "
                          f"{time.monotonic() - released:.3f} s later")
                assert (granted.gateway_id, granted.reader.reader_id) == (second.gateway_id, second.reader.reader_id)
                with pytest.raises(grpc.RpcError) as gone:
                    api_a.leases.GetLease(lease_pb.GetLeaseRequest(lease_id=lease.lease_id), timeout=5)
                assert gone.value.code() == grpc.StatusCode.NOT_FOUND
                api_a.leases.ReleaseLease(lease_pb.ReleaseLeaseRequest(lease_id=granted.lease_id), timeout=10)
                _until(lambda: next(r for r in _readers(a) if r[:2] == (second.gateway_id, second.reader.reader_id))[3]
                       == pool_pb.POOLED_READER_STATE_CARD_PRESENT, what="the reader free again")
                assert _queue_depth(replica_a.metrics) == 0


STEPS = 20


def _step_times(api: OrchestratorApi, lease_id: str) -> float:
    """The median time of STEPS read_card_info steps on the lease."""
    times = []
    for _ in range(STEPS):
        started = time.monotonic()
        assert _read_card_info(api, lease_id) == "card_info"
        times.append(time.monotonic() - started)
    return sorted(times)[STEPS // 2]


def _read_card_info(api: OrchestratorApi, lease_id: str) -> str:
    """The kind of outcome of a read_card_info step on the lease."""
    return str(api.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(
        lease_id=lease_id, step=steps_pb2.Step(read_card_info=steps_pb2.ReadCardInfo())),
        timeout=30).outcome.WhichOneof("result"))


def test_a_lease_outlives_a_restart_of_the_replica_that_granted_it(tmp_path, postgres_store, postgres_database_url,
                                                                   softhsm_module):
    with Replicas(tmp_path, postgres_database_url, env=REPLICA_ENV) as replicas:
        b = replicas.start("b").address
        with stations(tmp_path, b, softhsm_module, count=1) as (label,):
            replica_a = replicas.start("a")
            a = replica_a.address
            pooled = wait_for_pooled_reader(a, _ready(label))
            with channel(a) as ch:
                lease = OrchestratorApi.on(ch).leases.AcquireLease(lease_pb.AcquireLeaseRequest(
                    selector=pool_pb.ReaderSelector(gateway_id=pooled.gateway_id, reader_id=pooled.reader.reader_id),
                    ttl_s=300, holder="long"), timeout=20).lease
            replica_a.stop()
            # A is down: B still knows the lease, and its reader stays leased.
            with channel(b) as ch:
                api_b = OrchestratorApi.on(ch)
                assert api_b.leases.GetLease(lease_pb.GetLeaseRequest(lease_id=lease.lease_id),
                                             timeout=5).lease.lease_id
                assert _read_card_info(api_b, lease.lease_id) == "card_info"
                assert next(r for r in _readers(b) if r[2] == label)[3] == pool_pb.POOLED_READER_STATE_LEASED
            replica_a.start()
            with channel(a) as ch:
                api_a = OrchestratorApi.on(ch)
                assert [x.lease_id for x in api_a.leases.ListLeases(lease_pb.ListLeasesRequest(),
                                                                      timeout=5).leases] == [lease.lease_id]
                assert _read_card_info(api_a, lease.lease_id) == "card_info"
                api_a.leases.ReleaseLease(lease_pb.ReleaseLeaseRequest(lease_id=lease.lease_id), timeout=10)
                _until(lambda: next(r for r in _readers(b) if r[2] == label)[3]
                       == pool_pb.POOLED_READER_STATE_CARD_PRESENT, what="the reader free after the release")
            replica_a.stop()


@pytest.mark.parametrize("caller", ["admin", "service"])
def test_a_client_certificate_calling_the_replicas_own_service_is_refused(tmp_path, postgres_store,
                                                                        postgres_database_url, caller):
    if caller == "service" and not default_pki().pki.cert_path(caller).exists():
        default_pki().pki.issue(caller, "service")
    with Replicas(tmp_path, postgres_database_url, env=REPLICA_ENV) as replicas:
        a = replicas.start("a").address
        with channel(a, caller) as ch:
            with pytest.raises(grpc.RpcError) as refused:
                replica_service_pb2_grpc.ReplicaServiceStub(ch).RunStep(replica_pb.RunStepRequest(
                    gateway_id="station-r0", reader_id="r", hold_id="h",
                    step=steps_pb2.Step(read_card_info=steps_pb2.ReadCardInfo())), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # The replica's own certificate is let in, and still refused a reader it does not hold.
            with channel(a, "orchestrator") as own, pytest.raises(grpc.RpcError) as not_held:
                replica_service_pb2_grpc.ReplicaServiceStub(own).RunStep(replica_pb.RunStepRequest(
                    gateway_id="station-r0", reader_id="r", hold_id="h",
                    step=steps_pb2.Step(read_card_info=steps_pb2.ReadCardInfo())), timeout=10)
            assert not_held.value.code() != grpc.StatusCode.PERMISSION_DENIED
