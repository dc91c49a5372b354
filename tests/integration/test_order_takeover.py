"""Orders outlive the orchestrator that runs them (issue 13; docs/pool.md, "Orders").

Real parts throughout: `cardline orchestrator serve` processes, each leading a process group
of its own (killed whole with SIGKILL), `cardline gateway serve` processes whose SoftHSM2
directories hold several initialised tokens (each one a reader), mutual TLS with the
session's PKI, and PostgreSQL or SQLite.

- PostgreSQL, two replicas A and B sharing the database, the built-in CA's directory and the
  KEK; three gateways whose address lists are [A, B]. An order of 12 cards is created on A and
  A's group is killed while it runs: B adopts the order once A's heartbeat lapses; every card
  ends SUCCEEDED or FAILED with a reason, every certificate the CA issued is in the store,
  nothing stays leased or running, and restarting A changes nothing.
- Get, List and Cancel of an order through the replica that does not run it.
- An order created on A while every gateway is linked to B completes, its steps going through B.
- SQLite, one orchestrator killed in the middle of an order: on restart it continues the
  order, and the cards it retries never go to a card the order already had.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import pathlib
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import inspect, text

from orchestrator.store import ProcessState, Store, TaskState
from shared.proto import common_pb2
from shared.proto import lease_service_pb2 as lease_pb
from shared.proto import order_service_pb2 as order_pb
from shared.proto import reader_pool_service_pb2 as pool_pb
from tests.integration.test_pool import make_config
from tests.support import softhsm
from tests.support.api import OrchestratorApi
from tests.support.processes import channel, gateway_process
from tests.support.replicas import Replicas, pooled_readers

pytestmark = pytest.mark.hardware

PIN = "583920"             # the tokens' user PIN: distinct enough to scan the database for
RECONCILE_S = 1.0          # takeover rounds and the orders' adoption every second
STALE_S = 3.0              # a replica is gone 3 s after its last heartbeat (one rule: tasks, orders, pool)
HEARTBEAT_S = 0.5
DONE_STATES = (order_pb.ORDER_CARD_STATE_SUCCEEDED, order_pb.ORDER_CARD_STATE_FAILED)


def replica_env(tmp_path: pathlib.Path, **extra: str) -> dict[str, str]:
    """What every replica is given besides the database, CA and KEK (tests/support/replicas.py): short heartbeats."""
    return {"CARDLINE_ORCHESTRATOR_CONFIG_DIR": str(make_config(tmp_path) if not (tmp_path / "config").exists()
                                                    else tmp_path / "config"),
            "CARDLINE_ORCHESTRATOR_RECONCILE_INTERVAL_S": str(RECONCILE_S),
            "CARDLINE_ORCHESTRATOR_REPLICA__STALE_AFTER_S": str(STALE_S),
            "CARDLINE_ORCHESTRATOR_REPLICA__HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
            "CARDLINE_ORCHESTRATOR_REPLICA__POLL_INTERVAL_S": "0.5",
            "CARDLINE_ORCHESTRATOR_HEARTBEAT_INTERVAL_S": "0.3",
            "CARDLINE_ORCHESTRATOR_STEP_TIMEOUT_S": "8",
            **extra}


@contextlib.contextmanager
def station(tmp_path: pathlib.Path, name: str, addresses: str, module: str, tokens: int) -> Iterator[list[str]]:
    """A gateway process with TOKENS initialised SoftHSM2 tokens (each a reader), dialling
    ADDRESSES in order; yields the tokens' serials."""
    conf = softhsm.make_softhsm_dir(tmp_path / f"hsm-{name}")
    serials = [softhsm.init_blank_token(conf, f"tok-{name}-{i}", PIN) for i in range(tokens)]
    env = {**os.environ, "SOFTHSM2_CONF": str(conf), "CARDLINE_GATEWAY_RECONNECT_MAX_S": "0.5"}
    with gateway_process(addresses, name, tmp_path / f"gw-{name}", pkcs11_module=module, env=env, site="hq",
                         labels={"line": name}):
        yield serials


def tokens_in_pool(address: str) -> set[str]:
    return {r.reader.token_serial for r in pooled_readers(address)
            if r.reader.token_serial and r.state == pool_pb.POOLED_READER_STATE_CARD_PRESENT}


def wait_for(predicate: Callable[[], object], what: str, timeout_s: float = 60.0):
    """Polls PREDICATE (each call one look at a process's answers or the database) until truthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached within {timeout_s} s")


def create_order(address: str, cards: int) -> order_pb.Order:
    with channel(address) as ch:
        return OrchestratorApi.on(ch).orders.CreateOrder(order_pb.CreateOrderRequest(
            process="pool-produce", selector=pool_pb.ReaderSelector(site="hq"),
            items=[order_pb.OrderItem(inputs={"person": common_pb2.Value(text=f"Person {i}")}) for i in range(cards)],
            secret_inputs={"pin": PIN}), timeout=30).order


def watch_until(address: str, order_id: str, predicate: Callable[[order_pb.Order], bool],
                timeout_s: float = 120.0) -> order_pb.Order:
    """Follows WatchOrder on ADDRESS until PREDICATE holds for a snapshot; returns it."""
    last = None
    with channel(address) as ch:
        for event in OrchestratorApi.on(ch).orders.WatchOrder(order_pb.WatchOrderRequest(order_id=order_id),
                                                              timeout=timeout_s):
            if predicate(event.order):
                return event.order
            last = event.order
    cards = [(c.index, order_pb.OrderCardState.Name(c.state), c.error.reason) for c in last.cards] if last else None
    raise AssertionError(f"order {order_id} ended its watch on {address} without the awaited state; last seen: "
                         f"{order_pb.OrderState.Name(last.state) if last else None} {cards}")


def get_order(address: str, order_id: str) -> order_pb.Order:
    with channel(address) as ch:
        return OrchestratorApi.on(ch).orders.GetOrder(order_pb.GetOrderRequest(order_id=order_id), timeout=10).order


def count(order: order_pb.Order, *states: int) -> int:
    return sum(c.state in states for c in order.cards)


def ca_issued(tmp_path: pathlib.Path) -> set[str]:
    return {p.stem for p in (tmp_path / "shared" / "ca" / "issued").glob("*.pem")}


def settled(store: Store, order_id: str) -> dict:
    """Everything about the order's outcome in the store, to compare before and after a restart."""
    order = store.orders.get(order_id)
    return {"order": (order.state, [(c.state, c.error_reason, c.process_instance_id) for c in order.cards]),
            "certificates": sorted((c.id, c.state) for c in store.certificates.list()),
            "tasks": sorted((t.id, t.state) for t in store.tasks.list()),
            "processes": sorted((p.id, p.state) for p in store.processes.list())}


def assert_nothing_running(store: Store) -> None:
    assert store.tasks.list(state=TaskState.RUNNING) == []
    assert store.processes.list(state=ProcessState.RUNNING) == []


def assert_no_pin_stored(store: Store) -> None:
    """No row of any table holds the PIN in plain (the orders' secret inputs are sealed)."""
    with store._engine.connect() as conn:
        tables = inspect(conn).get_table_names()
        assert {"orders", "order_cards"} <= set(tables)
        for table in tables:
            rows = conn.execute(text(f'SELECT * FROM "{table}"')).all()
            assert PIN not in repr(rows), f"the PIN is stored plain in {table}"
        sealed = conn.execute(text("SELECT sealed_secrets FROM order_cards")).scalars().all()
        assert sealed and all(sealed), "every card's secret inputs are kept, sealed"


def beats_after(store: Store, orchestrator_id: str, since: dt.datetime, beats: int) -> bool:
    """The orchestrator beat BEATS heartbeat intervals after SINCE (each beat one look for a
    dead replica's work)."""
    beat = store.instances.heartbeats().get(orchestrator_id)
    return beat is not None and beat >= since + dt.timedelta(seconds=beats * HEARTBEAT_S)


# --- PostgreSQL: two replicas, one killed ------------------------------------------------------------

@pytest.mark.postgres
def test_replica_killed_mid_order_of_12_cards_the_other_adopts_it_every_card_ends_and_nothing_is_lost(
        tmp_path, softhsm_module, postgres_store, postgres_database_url):
    # Reconciliation rounds far apart: the takeover follows the heartbeats, not the rounds.
    env = replica_env(tmp_path, CARDLINE_ORCHESTRATOR_RECONCILE_INTERVAL_S="300")
    store = postgres_store
    with Replicas(tmp_path, postgres_database_url, env=env) as replicas:
        a, b = replicas.start_all("a", "b")
        both = f"{a.address},{b.address}"
        with (station(tmp_path, "gw0", both, softhsm_module, 4) as s0,
              station(tmp_path, "gw1", both, softhsm_module, 4) as s1,
              station(tmp_path, "gw2", both, softhsm_module, 4) as s2):
            serials = set(s0 + s1 + s2)
            wait_for(lambda: tokens_in_pool(a.address) == serials, "all 12 tokens in A's pool")
            order = create_order(a.address, 12)
            # Seen from B, which does not run it: the same order, from the database.
            listed = wait_for(lambda: [o for o in _list(b.address) if o.id == order.id], "the order listed on B")
            assert listed[0].process == "pool-produce" and len(listed[0].cards) == 12
            mid = watch_until(a.address, order.id, lambda o: count(o, order_pb.ORDER_CARD_STATE_SUCCEEDED) >= 2
                              and count(o, *DONE_STATES) <= 10)
            a.kill()
            killed = time.monotonic()
            print(f"A killed with {count(mid, order_pb.ORDER_CARD_STATE_SUCCEEDED)} of 12 cards produced")
            # Every gateway fails over to B; once A's heartbeat is STALE_S old, B drops A's holds
            # from the shared pool, takes A's tasks over and adopts the order, and follows it to its end.
            final = watch_until(b.address, order.id, lambda o: count(o, *DONE_STATES) == 12, timeout_s=240)
            took = time.monotonic() - killed
            assert final.state == order_pb.ORDER_STATE_DONE
            for card in final.cards:
                assert card.state == order_pb.ORDER_CARD_STATE_SUCCEEDED or card.error.reason, card
            assert store.orders.get(order.id).owner == b.orchestrator_id
            assert "order adopted" in b.log and order.id in b.log
            wait_for(lambda: tokens_in_pool(b.address) == serials, "all 12 tokens in B's pool")
            assert_nothing_running(store)
            with channel(b.address) as ch:
                api = OrchestratorApi.on(ch)
                assert [r for r in api.pool.ListReaders(pool_pb.ListReadersRequest(), timeout=5).readers
                        if r.busy] == []
                assert list(api.leases.ListLeases(lease_pb.ListLeasesRequest(), timeout=5).leases) == []
            # Every certificate the CA issued is in the store (C16), and no PIN is.
            issued = ca_issued(tmp_path)
            stored = {c.serial_hex for c in store.certificates.list()}
            assert issued and issued <= stored, f"issued by the CA, unknown to the store: {issued - stored}"
            assert_no_pin_stored(store)
            wait_for(lambda: store.orders.get(order.id).state == "DONE", "the order ended in the database")
            before = settled(store, order.id)
            produced = count(final, order_pb.ORDER_CARD_STATE_SUCCEEDED)
            print(f"order {order.id} ended on B {took:.1f} s after A was killed: {produced} produced, "
                  f"{12 - produced} failed ({sorted({c.error.reason for c in final.cards if c.error.reason})})")

            # A comes back: it settles nothing again, and the order stays as B ended it.
            restarted = dt.datetime.now(dt.UTC)
            a.start()
            wait_for(lambda: beats_after(store, a.orchestrator_id, restarted, 4), "four beats of the restarted A")
            assert settled(store, order.id) == before
            assert get_order(a.address, order.id) == get_order(b.address, order.id)


def _list(address: str) -> list[order_pb.Order]:
    with channel(address) as ch:
        return list(OrchestratorApi.on(ch).orders.ListOrders(order_pb.ListOrdersRequest(), timeout=10).orders)


@pytest.mark.postgres
def test_order_run_by_one_replica_is_read_and_cancelled_through_the_other(
        tmp_path, softhsm_module, postgres_store, postgres_database_url):
    env = replica_env(tmp_path)
    with Replicas(tmp_path, postgres_database_url, env=env) as replicas:
        a, b = replicas.start_all("a", "b")
        with station(tmp_path, "gw0", a.address, softhsm_module, 2) as serials:
            wait_for(lambda: tokens_in_pool(a.address) == set(serials), "both tokens in A's pool")
            # Four people, two cards: after two cards the other two wait for a card to change.
            order = create_order(a.address, 4)
            waiting = watch_until(b.address, order.id, lambda o: count(o, order_pb.ORDER_CARD_STATE_SUCCEEDED) == 2
                                  and count(o, order_pb.ORDER_CARD_STATE_QUEUED) == 2)
            assert waiting.state == order_pb.ORDER_STATE_RUNNING
            # B reads what A writes down (queue positions alone at most a second late).
            wait_for(lambda: get_order(b.address, order.id) == get_order(a.address, order.id), "the same order on B")
            with channel(b.address) as ch:
                cancelled = OrchestratorApi.on(ch).orders.CancelOrder(
                    order_pb.CancelOrderRequest(order_id=order.id), timeout=10).order
            assert cancelled.state == order_pb.ORDER_STATE_CANCELLED
            # A, which runs it, sees the cancellation: its queued cards fail CANCELLED.
            final = watch_until(a.address, order.id, lambda o: count(o, *DONE_STATES) == 4, timeout_s=30)
            assert final.state == order_pb.ORDER_STATE_CANCELLED
            assert sorted(c.error.reason for c in final.cards) == ["", "", "CANCELLED", "CANCELLED"]
            # B reads it from the database, as A wrote it down.
            assert watch_until(b.address, order.id, lambda o: count(o, *DONE_STATES) == 4, timeout_s=30) == final
            assert_nothing_running(postgres_store)


@pytest.mark.postgres
def test_order_created_on_one_replica_completes_on_gateways_linked_only_to_the_other(
        tmp_path, softhsm_module, postgres_store, postgres_database_url):
    """One pool across replicas (docs/replicas.md): A runs the order, every reader is B's; each
    step goes through B, which holds the links. The order and the pool read the same on both."""
    env = replica_env(tmp_path)
    with Replicas(tmp_path, postgres_database_url, env=env) as replicas:
        a, b = replicas.start_all("a", "b")
        with (station(tmp_path, "gw0", b.address, softhsm_module, 1) as s0,
              station(tmp_path, "gw1", b.address, softhsm_module, 1) as s1,
              station(tmp_path, "gw2", b.address, softhsm_module, 1) as s2):
            serials = set(s0 + s1 + s2)
            wait_for(lambda: tokens_in_pool(a.address) == serials, "B's three tokens in A's pool")
            order = create_order(a.address, 3)
            final = watch_until(a.address, order.id, lambda o: count(o, *DONE_STATES) == 3)
            assert final.state == order_pb.ORDER_STATE_DONE
            assert [c.state for c in final.cards] == [order_pb.ORDER_CARD_STATE_SUCCEEDED] * 3, final
            assert {c.gateway_id for c in final.cards} == {"gw0", "gw1", "gw2"}
            assert postgres_store.orders.get(order.id).owner == a.orchestrator_id
            tasks = postgres_store.tasks.list(state=TaskState.SUCCEEDED)
            assert len(tasks) == 3 and {t.owner for t in tasks} == {a.orchestrator_id}   # A ran them
            assert "gateway attached" not in a.log                       # ... through B's links
            wait_for(lambda: get_order(b.address, order.id) == get_order(a.address, order.id), "the same order on B")
            wait_for(lambda: _list(b.address) == _list(a.address), "the same orders listed on B")
            assert len({c.serial_hex for c in postgres_store.certificates.list()}) == 3
            assert_nothing_running(postgres_store)


# --- SQLite: one orchestrator, restarted -----------------------------------------------------------

def test_orchestrator_killed_mid_order_continues_it_on_restart_without_two_people_on_one_card(
        tmp_path, softhsm_module):
    env = replica_env(tmp_path)
    database_url = f"sqlite:///{tmp_path / 'orchestrator' / 'cardline.db'}"
    with Replicas(tmp_path, database_url, env=env) as replicas:
        orch = replicas.start("orchestrator")
        with station(tmp_path, "gw0", orch.address, softhsm_module, 3) as first:
            wait_for(lambda: tokens_in_pool(orch.address) == set(first), "the first gateway's tokens")
            # Six people, three cards for now: three are produced, three wait in the queue.
            order = create_order(orch.address, 6)
            watch_until(orch.address, order.id, lambda o: count(o, order_pb.ORDER_CARD_STATE_SUCCEEDED) == 3
                        and sum(c.state == order_pb.ORDER_CARD_STATE_QUEUED and c.queue_position > 0
                                for c in o.cards) == 3)
            orch.kill()
            orch.start()
            # The restarted orchestrator resumes the order; the cards it had wait for others.
            with station(tmp_path, "gw1", orch.address, softhsm_module, 3) as second:
                final = watch_until(orch.address, order.id, lambda o: count(o, *DONE_STATES) == 6, timeout_s=120)
            assert final.state == order_pb.ORDER_STATE_DONE
            assert [c.state for c in final.cards] == [order_pb.ORDER_CARD_STATE_SUCCEEDED] * 6, final
            # The three that waited in the queue were retried as their next attempt, once each.
            assert "order adopted" in orch.log and orch.log.count("order card retried") == 3
            assert all(c.process_instance_id for c in final.cards)
            store = Store(database_url)
            try:
                readers = sorted(t.reader_id for t in store.tasks.list(state=TaskState.SUCCEEDED))
                assert len(set(readers)) == 6, readers                  # six people, six cards
                assert {r.rsplit(":", 1)[1] for r in readers} == set(first + second)
                assert_nothing_running(store)
                assert_no_pin_stored(store)
            finally:
                store.close()
