"""The reader pool with several gateway PROCESSES, each with its own SoftHSM2 directory and
token, and one in-process gateway on the private pcscd with the vpcd card emulator: batch
orders spread over every reader with visible queue positions, leases for other services
(expiry, gateway gone, APDU scripts through the orchestrator relay), and the faults of the
pool issue — a gateway killed, its stream cut, the card pulled — each ending in a defined
state with nothing left leased or running.

The orchestrator runs in-process (its store, pool and step boundaries are reachable), with
short heartbeats and step timeouts so the bounds are small here."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

import grpc
import pytest

from orchestrator import app as orchestrator_app
from orchestrator.services.pool import ReaderState
from shared import config
from shared.cards import ApduResponse
from shared.errors import UnexpectedStatusWord
from shared.proto import common_pb2, steps_pb2
from shared.proto import lease_service_pb2 as lease_pb
from shared.proto import order_service_pb2 as order_pb
from shared.proto import reader_pool_service_pb2 as pool_pb
from shared.rpc import error_from_rpc
from tests.support import softhsm
from tests.support.api import OrchestratorApi
from tests.support.netcut import TcpProxy
from tests.support.pki import default_pki
from tests.support.processes import CARDLINE, gateway_process
from tests.support.transport_puk import write_transport_key

pytestmark = pytest.mark.hardware
EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
PIN = "1234"
HEARTBEAT_S = 0.3                 # silence after 3 intervals (0.9 s) detaches a gateway
STEP_TIMEOUT_S = 8.0
FAULT_BOUND_S = 5.0               # a fault must end its task within this

POOL_ENCODING = """\
[Encoding]
Type=Chip

[Fields]
USER_PIN=
GeneratedCertApp_A=

[Description]
PIN=USER_PIN

[Application_A]
GenerateKeyPair=EC_P256
CertificateTemplate=EmployeeAuthentication
KeyLabel=Authentication
CertCoreObjectDescriptorReturnField=GeneratedCertApp_A
"""

SELECT = "00A4040C0AF0434152444C494E4501"
APDU_ENCODING = f"""\
[Encoding]
Type=Chip

[Application_A]
ApduScript={SELECT};{';'.join(['00B0000010'] * 60)}
"""

CARD_TEMPLATES = """
  - name: PoolCard
    state_graph: EmployeeCard
    encoding: pool-card
    produced_state: Active
    failed_state: ProductionFailed

  - name: VirtualCard
    state_graph: EmployeeCard
    encoding: apdu-card
    produced_state: Active
    failed_state: ProductionFailed
"""

POOL_PROCESS = """\
name: pool-produce
inputs: [person, pin]
secret_inputs: [pin]
tasks:
  - type: card_production
    card_template: PoolCard
    reader: {kind: pkcs11}
    subject: "CN=${person},O=Example"
    fields:
      USER_PIN: "${pin}"
      GeneratedCertApp_A: "${cert}"
    card: "${card}"
"""

APDU_PROCESS = """\
name: apdu-produce
inputs: [person]
tasks:
  - type: card_production
    card_template: VirtualCard
    reader: {kind: pcsc}
    subject: "CN=${person},O=Example"
    card: "${card}"
"""


def make_config(tmp_path: pathlib.Path) -> pathlib.Path:
    target = tmp_path / "config"
    shutil.copytree(EXAMPLES, target)
    (target / "encodings" / "pool-card.ini").write_text(POOL_ENCODING)
    (target / "encodings" / "apdu-card.ini").write_text(APDU_ENCODING)
    with open(target / "templates" / "templates.yaml", "a") as f:
        f.write(CARD_TEMPLATES)
    (target / "processes" / "pool-produce.yaml").write_text(POOL_PROCESS)
    (target / "processes" / "apdu-produce.yaml").write_text(APDU_PROCESS)
    write_transport_key(target / "secrets")
    return target


@dataclass
class Station:
    """One gateway process with its own SoftHSM2 directory and token."""
    gateway_id: str
    conf: pathlib.Path
    serial: str
    data_dir: pathlib.Path
    module: str
    orchestrator: str
    proc: subprocess.Popen | None = None
    _cm: contextlib.AbstractContextManager | None = None

    @property
    def reader_id(self) -> str:
        return f"pkcs11:softhsm2:{self.serial}"

    @property
    def log(self) -> str:
        return (self.data_dir / "gateway.log").read_text()

    def env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf), "CARDLINE_GATEWAY_RECONNECT_MAX_S": "0.5"}

    def start(self) -> None:
        # Where the station stands is enrolled in its certificate, not configured.
        self._cm = gateway_process(self.orchestrator, self.gateway_id, self.data_dir, pkcs11_module=self.module,
                                   env=self.env(), site="hq", labels={"line": self.gateway_id})
        _addr, self.proc = self._cm.__enter__()

    def kill(self) -> None:
        assert self.proc is not None, "kill() before start()"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)


def new_station(tmp_path: pathlib.Path, name: str, module: str, orchestrator: str) -> Station:
    conf = softhsm.make_softhsm_dir(tmp_path / f"hsm-{name}")
    serial = softhsm.init_blank_token(conf, f"tok-{name}", PIN)
    return Station(name, conf, serial, tmp_path / f"gw-{name}", module, orchestrator)


def settings_for(tmp_path: pathlib.Path, **overrides):
    return config.load(config.OrchestratorSettings, listen="127.0.0.1:0", migrate=True,
                       data_dir=tmp_path / "orchestrator",
                       config_dir=make_config(tmp_path), step_timeout_s=STEP_TIMEOUT_S,
                       heartbeat_interval_s=HEARTBEAT_S, **default_pki().settings(), **overrides)


async def wait_until(predicate, timeout_s: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{what} not reached within {timeout_s} s")


@contextlib.asynccontextmanager
async def pool_rig(tmp_path, module: str, gateways: int, *, boundary=None, via_proxy: bool = False, **overrides):
    """In-process orchestrator + `gateways` gateway processes (started in parallel)."""
    orch = await orchestrator_app.start(settings_for(tmp_path, **overrides), boundary=boundary)
    proxy = None
    stations: list[Station] = []
    try:
        target = orch.address
        if via_proxy:
            host, _, port = orch.address.rpartition(":")
            proxy = await TcpProxy(host, int(port)).start()
            target = proxy.address
        stations = [new_station(tmp_path, f"gw{i}", module, target) for i in range(gateways)]
        await asyncio.gather(*(asyncio.to_thread(s.start) for s in stations))
        await wait_until(lambda: {p.reader.reader_id for p in orch.pool.list() if p.state is ReaderState.CARD_PRESENT}
                         == {s.reader_id for s in stations},
                         what="every token in the pool")
        yield orch, stations, proxy
    finally:
        await asyncio.gather(*(asyncio.to_thread(s.stop) for s in stations))
        if proxy is not None:
            await proxy.close()
        await orch.stop()


def pcsc_tls(site: str = "") -> dict:
    default_pki().gateway("pcsc-1", site=site)          # the in-process gateway's certificate
    return default_pki().settings()


def api_for(orch):
    channel = default_pki().aio_channel(orch.address)
    return channel, OrchestratorApi.on(channel)


def tokens(orch) -> list:
    """The pooled readers holding an initialised token (not SoftHSM2's free slots)."""
    return [p for p in orch.pool.list() if p.reader.token_serial]


def assert_nothing_held_or_running(orch) -> None:
    assert [(p.reader.reader_id, p.state, p.holder) for p in orch.pool.list() if p.busy] == []
    assert orch.pool.queue() == []
    assert orch.store.tasks.list(state="RUNNING") == []
    assert orch.store.processes.list(state="RUNNING") == []
    assert orch.leases.list() == []


def step_lines(log: str, task_id: str) -> list[tuple[int, bool]]:
    """(step number, replayed) of every step the gateway ran or answered for this task."""
    out = []
    for line in log.splitlines():
        if task_id in line and ("step done" in line or "step failed" in line):
            step = re.search(r"step=(\d+)", line)
            out.append((int(step.group(1)) if step else -1, "replayed=True" in line))
    return out


# --- batch production ---------------------------------------------------------------------------

def test_batch_order_of_12_cards_over_3_gateways_uses_every_reader_with_fifo_queue_positions(
        tmp_path, softhsm_module):
    async def body():
        async with pool_rig(tmp_path, softhsm_module, 3) as (orch, stations, _):
            channel, api = api_for(orch)
            async with channel:
                gateways = (await api.pool.ListGateways(pool_pb.ListGatewaysRequest())).gateways
                order = (await api.orders.CreateOrder(order_pb.CreateOrderRequest(
                    process="pool-produce", selector=pool_pb.ReaderSelector(site="hq"),
                    items=[order_pb.OrderItem(inputs={"person": common_pb2.Value(text=f"Person {i}")})
                           for i in range(12)],
                    secret_inputs={"pin": PIN}))).order
                # An order never puts two people on one card (docs/lifecycle.md): after one card
                # per token the other nine wait, queued, for the card in a reader to change.
                # None does here, so the order is cancelled once that is seen.
                snapshots = []
                async for e in api.orders.WatchOrder(order_pb.WatchOrderRequest(order_id=order.id)):
                    snapshots.append(e.order)
                    states = [c.state for c in e.order.cards]
                    in_pool_queue = [c for c in e.order.cards
                                     if c.state == order_pb.ORDER_CARD_STATE_QUEUED and c.queue_position]
                    # A card is QUEUED (position 0) from the order's start until its process asks
                    # the pool for a reader; on a loaded machine that can come after the first
                    # three succeeded. Cancel once all nine stand in the pool's queue.
                    if (states.count(order_pb.ORDER_CARD_STATE_SUCCEEDED) == 3
                            and len(in_pool_queue) == 9
                            and e.order.state == order_pb.ORDER_STATE_RUNNING):
                        await orch.orders.cancel(order.id)
                        waiting = list(snapshots)           # the snapshots before the cancellation
                listed = (await api.orders.ListOrders(order_pb.ListOrdersRequest())).orders
            cli = await asyncio.to_thread(
                subprocess.run, [CARDLINE, "orders", "list", "--json", "--orchestrator", orch.address],
                capture_output=True, text=True)
            readers_cli = await asyncio.to_thread(
                subprocess.run, [CARDLINE, "readers", "--json", "--site", "hq", "--orchestrator", orch.address],
                capture_output=True, text=True)
            assert_nothing_held_or_running(orch)
            certs = orch.store.certificates.list()
            return stations, gateways, order, snapshots, waiting, listed, cli, readers_cli, certs

    stations, gateways, order, snapshots, waiting, listed, cli, readers_cli, certs = asyncio.run(body())
    assert {g.gateway_id for g in gateways} == {s.gateway_id for s in stations}
    assert all(g.connected and g.site == "hq" and g.version and g.readers == 2 for g in gateways)  # token + free slot
    final = snapshots[-1]
    assert final.state == order_pb.ORDER_STATE_CANCELLED
    produced = [c for c in final.cards if c.state == order_pb.ORDER_CARD_STATE_SUCCEEDED]
    assert len(produced) == 3, [c.error for c in final.cards]
    assert {c.error.reason for c in final.cards if c not in produced} == {"CANCELLED"}
    used = {(c.gateway_id, c.reader_id) for c in produced}
    assert used == {(s.gateway_id, s.reader_id) for s in stations}            # every reader used, once
    assert len({c.process_instance_id for c in produced}) == 3
    assert len(certs) == 3 and {c.state for c in certs} == {"Active"}

    # Cards beyond the three readers waited with visible, distinct positions ...
    queued_state = order_pb.ORDER_CARD_STATE_QUEUED
    positions = [sorted(c.queue_position for c in s.cards if c.state == queued_state and c.queue_position)
                 for s in waiting]
    assert max(max(p, default=0) for p in positions) >= 6
    assert all(p == list(range(1, len(p) + 1)) for p in positions if p)
    # ... and left the queue in that order (FIFO): who was ahead started first.
    started: dict[int, int] = {}
    for n, s in enumerate(waiting):
        for c in s.cards:
            if c.state != order_pb.ORDER_CARD_STATE_QUEUED:
                started.setdefault(c.index, n)
    for s in waiting:
        queued = sorted((c for c in s.cards if c.state == order_pb.ORDER_CARD_STATE_QUEUED and c.queue_position),
                        key=lambda c: c.queue_position)
        for ahead, behind in itertools.pairwise(queued):
            if behind.index in started:            # the nine waiting for a new card never start here
                assert started[ahead.index] <= started[behind.index]

    assert [o.id for o in listed] == [order.id]
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)[0]["id"] == order.id
    rows = [r for r in json.loads(readers_cli.stdout) if r["reader"].get("token_serial")]
    assert readers_cli.returncode == 0 and len(rows) == 3
    assert {r["state"] for r in rows} == {"POOLED_READER_STATE_CARD_PRESENT"}
    assert all(r["site"] == "hq" and r["labels"]["line"] == r["gateway_id"] for r in rows)


# --- faults ----------------------------------------------------------------------------------

def test_gateway_killed_mid_production_fails_the_task_c3_and_the_returning_gateway_runs_nothing_twice(
        tmp_path, softhsm_module):
    rig: dict = {}

    async def kill_after_store(name, task_id):
        if name == "after_store" and "killed_at" not in rig:
            rig["killed_at"] = time.monotonic()
            rig["task_id"] = task_id
            await asyncio.to_thread(rig["station"].kill)

    async def body():
        async with pool_rig(tmp_path, softhsm_module, 1, boundary=kill_after_store) as (orch, stations, _):
            station = rig["station"] = stations[0]
            instance = await orch.processes.start("pool-produce", {"person": "Jane Doe", "pin": PIN})
            ended_after = time.monotonic() - rig["killed_at"]
            offline = tokens(orch)
            gateways_gone = orch.pool.gateways()
            log_before = station.log
            assert_nothing_held_or_running(orch)
            await asyncio.to_thread(station.start)             # the gateway returns ...
            await wait_until(lambda: [p.state for p in tokens(orch)] == [ReaderState.CARD_PRESENT],
                             what="the returning gateway's reader")
            await asyncio.sleep(4 * HEARTBEAT_S)
            back = tokens(orch)
            certs = orch.store.certificates.list(task_id=rig["task_id"])
            steps = orch.store.tasks.steps(rig["task_id"])
            task = orch.store.tasks.get(rig["task_id"])
            return instance, ended_after, offline, gateways_gone, back, certs, steps, task, log_before, station.log

    instance, ended_after, offline, gateways_gone, back, certs, steps, task, log_before, log_after = asyncio.run(body())
    assert instance.state == "FAILED" and instance.error_reason == "GATEWAY_NOT_CONNECTED"
    assert task.state == "FAILED" and task.error_reason == "GATEWAY_NOT_CONNECTED"
    assert ended_after < FAULT_BOUND_S
    assert [c.state for c in certs] == ["Issued"]                  # C3: left in the internal issued state
    assert [(p.state, p.holder) for p in offline] == [(ReaderState.OFFLINE, "")]   # listed, not gone; not held
    assert [g.connected for g in gateways_gone] == [False]
    assert [(p.state, p.busy) for p in back] == [(ReaderState.CARD_PRESENT, False)]  # inventory re-read
    # Every step was journaled once; the killed gateway ran none twice, the new one none at all.
    numbers = [s.step_number for s in steps]
    assert numbers == sorted(set(numbers))
    ran = step_lines(log_before, task.id)
    assert len(ran) == len({n for n, _ in ran}) and not any(replayed for _, replayed in ran)
    assert step_lines(log_after, task.id) == []


def test_stream_frozen_then_cut_mid_production_ends_the_task_by_heartbeat_silence_and_nothing_reruns(
        tmp_path, softhsm_module):
    rig: dict = {}

    async def freeze_after_store(name, task_id):
        if name == "after_store" and "frozen_at" not in rig:
            rig["task_id"] = task_id
            rig["frozen_at"] = time.monotonic()
            rig["proxy"].freeze()                                  # a dead link: no FIN, no RST

    async def body():
        async with pool_rig(tmp_path, softhsm_module, 1, boundary=freeze_after_store, via_proxy=True) \
                as (orch, stations, proxy):
            rig["proxy"] = proxy
            instance = await orch.processes.start("pool-produce", {"person": "Jane Doe", "pin": PIN})
            ended_after = time.monotonic() - rig["frozen_at"]
            during = tokens(orch)
            assert_nothing_held_or_running(orch)
            connections = proxy.connections
            proxy.cut()                                             # the link comes back: the gateway redials
            await wait_until(lambda: [p.state for p in tokens(orch)] == [ReaderState.CARD_PRESENT],
                             what="the gateway back through the proxy")
            await asyncio.sleep(4 * HEARTBEAT_S)
            back = orch.pool.gateways()
            task = orch.store.tasks.get(rig["task_id"])
            certs = orch.store.certificates.list(task_id=task.id)
            # the reader works again: a second card on the same reader succeeds
            again = await orch.processes.start("pool-produce", {"person": "John Doe", "pin": PIN})
            return (instance, ended_after, during, connections, proxy.connections, back, task, certs, again,
                    stations[0].log)

    instance, ended_after, during, conns_before, conns_after, back, task, certs, again, log = asyncio.run(body())
    assert instance.state == "FAILED" and instance.error_reason == "GATEWAY_NOT_CONNECTED"
    # Ended by the silence, not by a step timeout. The silence is counted from the gateway's last message,
    # which may precede the freeze by up to an interval (more on a loaded machine): only one interval is sure.
    assert HEARTBEAT_S <= ended_after < FAULT_BOUND_S
    assert [c.state for c in certs] == ["Issued"]                  # C3
    assert [(p.state, p.holder) for p in during] == [(ReaderState.OFFLINE, "")]
    assert conns_after > conns_before and [g.connected for g in back] == [True]
    assert again.state == "SUCCEEDED", again.error_message
    ran = step_lines(log, task.id)                                  # the write step never reached the gateway,
    assert len(ran) == len({n for n, _ in ran}) and not any(r for _, r in ran)   # and nothing was run twice
    assert sorted(n for n, _ in ran) == [1, 2]                      # card info, key pair; the write never arrived


def test_card_pulled_mid_encoding_fails_the_task_and_frees_the_reader(tmp_path, pcscd, vpcd_card_factory):
    from gateway import app as gateway_app

    async def body():
        orch = await orchestrator_app.start(settings_for(tmp_path))
        gw = await gateway_app.start(config.load(config.GatewaySettings, listen="127.0.0.1:0",
                                                 data_dir=tmp_path / "gw-pcsc", orchestrator=orch.address,
                                                 gateway_id="pcsc-1", pcsc=True, **pcsc_tls(site="lab")))
        try:
            card = vpcd_card_factory(0)
            reader_id = "pcsc:" + pcscd.reader_name(0)
            await wait_until(lambda: any(p.reader.reader_id == reader_id and p.state is ReaderState.CARD_PRESENT
                                         for p in orch.pool.list()), what="the emulator's card in the pool")
            card.reset_count()
            card.drop_after(20)                                  # pulled after 20 of the script's 61 APDUs
            started = time.monotonic()
            instance = await orch.processes.start("apdu-produce", {"person": "Jane Doe"})
            ended_after = time.monotonic() - started
            await wait_until(lambda: [p.state for p in orch.pool.list() if p.reader.reader_id == reader_id]
                             == [ReaderState.EMPTY], what="the reader seen empty")
            tasks = orch.store.tasks.list(process_instance_id=instance.id)
            assert_nothing_held_or_running(orch)
            return instance, ended_after, tasks, card.apdu_count
        finally:
            await gw.stop()
            await orch.stop()

    instance, ended_after, tasks, apdus = asyncio.run(body())
    assert instance.state == "FAILED"
    assert instance.error_reason in {"CARD_REMOVED", "CARD_IO", "CARD_NOT_PRESENT"}, instance.error_message
    assert [t.state for t in tasks] == ["FAILED"] and ended_after < FAULT_BOUND_S
    assert apdus == 21                                            # the 21st reached the card as it went away


# --- leases ------------------------------------------------------------------------------------

def test_lease_expires_without_renewal_and_a_waiting_lease_gets_the_reader(tmp_path, softhsm_module):
    async def body():
        async with pool_rig(tmp_path, softhsm_module, 1) as (orch, _stations, _):
            channel, api = api_for(orch)
            async with channel:
                first = (await api.leases.AcquireLease(lease_pb.AcquireLeaseRequest(
                    selector=pool_pb.ReaderSelector(site="hq", card_present=True), ttl_s=2, holder="signer"))).lease
                held = tokens(orch)
                # PKCS#11 through the relay: list the token's objects with its PIN
                listing = (await api.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(
                    lease_id=first.lease_id, step=steps_pb2.Step(credentials=steps_pb2.Credentials(user_pin=PIN),
                                                                 list_objects=steps_pb2.ListObjects())))).outcome
                # a second holder that does not wait is refused; one that waits, but gives up, leaves no trace
                with pytest.raises(grpc.aio.AioRpcError) as busy:
                    await api.leases.AcquireLease(lease_pb.AcquireLeaseRequest(
                        selector=pool_pb.ReaderSelector(site="hq", card_present=True), ttl_s=5))
                with pytest.raises(grpc.aio.AioRpcError) as gave_up:
                    await api.leases.AcquireLease(lease_pb.AcquireLeaseRequest(
                        selector=pool_pb.ReaderSelector(site="hq", card_present=True), ttl_s=5, wait=True), timeout=0.3)
                await wait_until(lambda: orch.pool.queue() == [], what="the abandoned waiter gone")
                for _ in range(6):                                     # renewed: still held after 3 s > ttl
                    await asyncio.sleep(0.5)
                    await api.leases.RenewLease(lease_pb.RenewLeaseRequest(lease_id=first.lease_id))
                still = tokens(orch)
                waiting = asyncio.ensure_future(api.leases.AcquireLease(lease_pb.AcquireLeaseRequest(
                    selector=pool_pb.ReaderSelector(site="hq", card_present=True), ttl_s=5, holder="second",
                    wait=True)))
                await wait_until(lambda: len(orch.pool.queue()) == 1, what="the second holder queued")
                queued = orch.pool.queue()
                t0 = time.monotonic()
                second = (await waiting).lease                          # the first one expires: the second gets it
                waited = time.monotonic() - t0
                with pytest.raises(grpc.aio.AioRpcError) as expired:
                    await api.leases.RenewLease(lease_pb.RenewLeaseRequest(lease_id=first.lease_id))
                after = tokens(orch)
                await api.leases.ReleaseLease(lease_pb.ReleaseLeaseRequest(lease_id=second.lease_id))
            assert_nothing_held_or_running(orch)
            return first, held, listing, busy.value, gave_up.value, still, queued, second, waited, expired.value, after

    first, held, listing, busy, gave_up, still, queued, second, waited, expired, after = asyncio.run(body())
    assert first.gateway_id == "gw0" and first.reader.token_label == "tok-gw0"
    assert [(p.state, p.holder) for p in held] == [(ReaderState.LEASED, f"signer (lease {first.lease_id})")]
    assert listing.WhichOneof("result") == "object_list"
    assert error_from_rpc(busy).reason == "READER_BUSY"
    assert gave_up.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [p.state for p in still] == [ReaderState.LEASED]
    assert [(pos, kind) for pos, kind, _ in queued] == [(1, "lease")]
    assert second.reader.reader_id == first.reader.reader_id and waited < 2.5
    assert error_from_rpc(expired).reason == "NOT_FOUND" and "expired" in expired.details()
    assert [(p.state, p.holder) for p in after] == [(ReaderState.LEASED, f"second (lease {second.lease_id})")]


def test_lease_is_freed_when_its_gateway_goes_away(tmp_path, softhsm_module):
    async def body():
        async with pool_rig(tmp_path, softhsm_module, 2) as (orch, stations, _):
            channel, api = api_for(orch)
            async with channel:
                lease = (await api.leases.AcquireLease(lease_pb.AcquireLeaseRequest(
                    selector=pool_pb.ReaderSelector(gateway_id="gw1"), ttl_s=60, holder="svc"))).lease
                await asyncio.to_thread(stations[1].kill)
                await wait_until(lambda: not orch.leases.list(), timeout_s=FAULT_BOUND_S, what="the lease ended")
                with pytest.raises(grpc.aio.AioRpcError) as gone:
                    await api.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(
                        lease_id=lease.lease_id, step=steps_pb2.Step(read_card_info=steps_pb2.ReadCardInfo())))
                readers = (await api.pool.ListReaders(pool_pb.ListReadersRequest())).readers
                gateways = (await api.pool.ListGateways(pool_pb.ListGatewaysRequest())).gateways
            assert_nothing_held_or_running(orch)
            return gone.value, readers, gateways

    gone, readers, gateways = asyncio.run(body())
    assert error_from_rpc(gone).reason == "NOT_FOUND" and "went away" in gone.details()
    states = {r.gateway_id: (r.state, r.holder) for r in readers if r.reader.token_serial}
    assert states == {"gw0": (pool_pb.POOLED_READER_STATE_CARD_PRESENT, ""),
                      "gw1": (pool_pb.POOLED_READER_STATE_OFFLINE, "")}
    assert {g.gateway_id: g.connected for g in gateways} == {"gw0": True, "gw1": False}


def test_run_leased_step_runs_an_apdu_script_on_the_emulator_through_the_orchestrator(
        tmp_path, pcscd, vpcd_card_factory):
    from gateway import app as gateway_app

    script = steps_pb2.ApduScript(apdus=[
        steps_pb2.Apdu(command=bytes.fromhex(SELECT)),
        steps_pb2.Apdu(command=bytes.fromhex("00CA005A08")),                # the card's serial
        steps_pb2.Apdu(command=bytes.fromhex("0020008100"), expected_sw=["63CX", "9000"])])

    async def body():
        orch = await orchestrator_app.start(settings_for(tmp_path))
        gw = await gateway_app.start(config.load(config.GatewaySettings, listen="127.0.0.1:0",
                                                 data_dir=tmp_path / "gw-pcsc", orchestrator=orch.address,
                                                 gateway_id="pcsc-1", pcsc=True, **pcsc_tls()))
        try:
            card = vpcd_card_factory(0)
            await wait_until(lambda: any(p.state is ReaderState.CARD_PRESENT for p in orch.pool.list()),
                             what="the emulator's card")
            channel, api = api_for(orch)
            async with channel:
                lease = (await api.leases.AcquireLease(lease_pb.AcquireLeaseRequest(selector=pool_pb.ReaderSelector(
                    kind=common_pb2.READER_KIND_PCSC, card_present=True), ttl_s=10, holder="apdu-client"))).lease
                card.reset_count()
                first = (await api.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(
                    lease_id=lease.lease_id, step=steps_pb2.Step(apdu_script=script), step_number=1))).outcome
                count = card.apdu_count
                resent = (await api.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(  # a resent step: answered
                    lease_id=lease.lease_id, step=steps_pb2.Step(apdu_script=script), step_number=1))).outcome
                count_after_resend = card.apdu_count
                with pytest.raises(grpc.aio.AioRpcError) as wrong_sw:
                    await api.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(
                        lease_id=lease.lease_id, step=steps_pb2.Step(apdu_script=steps_pb2.ApduScript(apdus=[
                            steps_pb2.Apdu(command=bytes.fromhex(SELECT), expected_sw=["9000"]),
                            steps_pb2.Apdu(command=bytes.fromhex("0020008100"), expected_sw=["6A82"])]))))
                await api.leases.ReleaseLease(lease_pb.ReleaseLeaseRequest(lease_id=lease.lease_id))
            assert_nothing_held_or_running(orch)
            return first, count, resent, count_after_resend, wrong_sw.value
        finally:
            await gw.stop()
            await orch.stop()

    first, count, resent, count_after_resend, wrong_sw = asyncio.run(body())
    responses = first.apdu_script_result.responses
    assert [r.sw for r in responses] == [0x9000, 0x9000, 0x63C3]
    assert responses[1].data == bytes.fromhex("C0FFEE0012345678")
    assert count == 3 and count_after_resend == 3 and resent == first      # the gateway's StepMemo answered
    # Raised by the gateway's driver, carried on the link and by the orchestrator's status:
    # the same class, with the answers up to the failing one.
    error = error_from_rpc(wrong_sw)
    assert isinstance(error, UnexpectedStatusWord) and error.reason == "APDU_UNEXPECTED_SW"
    assert error.index == 1 and error.sw == 0x63C3
    assert error.responses == (ApduResponse(responses[0].data, 0x9000), ApduResponse(b"", 0x63C3))


def test_gateway_notices_a_silently_dead_link_and_redials_on_its_own(tmp_path, softhsm_module):
    """A NAT or firewall drops the link without FIN or RST: each side notices the other's
    heartbeats stop; the gateway gives the dead stream up and redials, and a new connection
    works — nobody has to close the old one for it."""

    async def body():
        async with pool_rig(tmp_path, softhsm_module, 1, via_proxy=True) as (orch, _stations, proxy):
            before = proxy.connections
            proxy.kill_silently()                                 # the link dies: bytes dropped, nothing closed;
            # One side notices first: the orchestrator drops the dead link, or the gateway has
            # already redialled (a new connection through the proxy).
            await wait_until(lambda: not [g for g in orch.pool.gateways() if g.connected]
                             or proxy.connections > before, what="the silence noticed")
            await wait_until(lambda: [p.state for p in tokens(orch)] == [ReaderState.CARD_PRESENT],
                             timeout_s=20, what="the gateway redialling by itself")
            again = await orch.processes.start("pool-produce", {"person": "Jane Doe", "pin": PIN})
            return before, proxy.connections, again

    before, after, again = asyncio.run(body())
    assert after > before                                         # a new connection, opened by the gateway
    assert again.state == "SUCCEEDED", again.error_message
