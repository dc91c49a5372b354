"""The PostgreSQL part of the pool shared by replicas (orchestrator/store/pool.py): holds are
exclusive across replicas, the one queue is served in order with the same positions for all,
and what a replica that stopped beating left is cleaned by the survivors."""
from __future__ import annotations

import threading

import pytest

from orchestrator.domain.pool_assignment import ReaderSelector
from orchestrator.store.pool import FAILED, GRANTED, WAITING, ReplicaPool, take_key
from orchestrator.store.sessions import Sessions
from orchestrator.store.store import Store
from shared import cards

pytestmark = pytest.mark.postgres

STALE_S = 30.0


def _reader(reader_id: str, serial: str) -> cards.Reader:
    return cards.Reader(reader_id, cards.ReaderKind.PKCS11, reader_id, card_present=True, token_serial=serial)


@pytest.fixture
def two_replicas(postgres_store: Store) -> tuple[ReplicaPool, ReplicaPool]:
    """Two replicas' store parts, each on its own engine (its own connections), one database."""
    a, b = postgres_store.replica_pool, ReplicaPool(Sessions(postgres_store.database_url))
    a.advertise("replica-a", "127.0.0.1:1")
    b.advertise("replica-b", "127.0.0.1:2")
    b.link_up("replica-b", "link-1", "gw1", "hq", {"desk": "3"}, "test", [_reader("r1", "card-1")])
    return a, b


def test_two_replicas_contending_for_one_reader_exactly_one_gets_it(two_replicas):
    a, b = two_replicas
    a.enqueue("wa", "replica-a", "lease", "A", ReaderSelector(), None, True, None)
    b.enqueue("wb", "replica-b", "lease", "B", ReaderSelector(), None, True, None)
    start = threading.Barrier(2)
    results = {}

    def serve(name: str, part: ReplicaPool) -> None:
        start.wait()
        results[name] = part.serve(STALE_S)

    threads = [threading.Thread(target=serve, args=(n, p)) for n, p in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    granted = [g for r in results.values() for g in r.granted]
    assert granted == [("wa", "gw1", "r1")]           # the first in the queue, once
    view_a, view_b = a.view(STALE_S), b.view(STALE_S)
    assert view_a.holds == view_b.holds and view_a.holds[("gw1", "r1")].hold_id == "wa"
    assert [(w.waiter_id, w.state, w.position) for w in view_a.waiters] == [("wa", GRANTED, 0), ("wb", WAITING, 1)]
    assert [(w.waiter_id, w.position) for w in view_b.waiters] == [("wa", 0), ("wb", 1)]

    assert b.release("wa")                            # any replica may give it back
    assert b.serve(STALE_S).granted == [("wb", "gw1", "r1")]
    assert not a.release("wa")                        # not held so any more


def test_a_waiter_takes_only_the_cards_its_owner_said_and_a_hopeless_one_fails(two_replicas):
    a, b = two_replicas
    a.enqueue("picky", "replica-a", "task", "", ReaderSelector(), None, True, [])
    a.enqueue("gone", "replica-a", "task", "", ReaderSelector(gateway_id="gw9"), None, True, None)
    served = b.serve(STALE_S)
    assert served.granted == [] and served.failed == ["gone"]
    a.set_takes({"picky": [take_key("gw1", _reader("r1", "card-1"), "card-1")]})
    assert b.serve(STALE_S).granted == [("picky", "gw1", "r1")]
    assert {w.waiter_id: w.state for w in a.view(STALE_S).waiters} == {"picky": GRANTED, "gone": FAILED}


def test_the_rows_of_a_replica_whose_heartbeat_lapsed_count_offline_and_are_cleaned(two_replicas, postgres_store):
    a, b = two_replicas
    b.enqueue("wb", "replica-b", "task", "", ReaderSelector(gateway_id="gw1"), None, True, None)
    b.serve(STALE_S)
    assert a.view(STALE_S).gateway("gw1").connected
    with postgres_store._engine.begin() as conn:                # replica-b stopped beating a minute ago
        from sqlalchemy import text
        conn.execute(text("UPDATE orchestrator_instances SET heartbeat_at = now() - interval '60 seconds' "
                          "WHERE id = 'replica-b'"))
    view = a.view(STALE_S)
    assert not view.gateway("gw1").connected and "replica-b" not in view.addresses
    assert a.clean(STALE_S, retention_s=600) >= 2
    view = a.view(STALE_S)
    assert view.holds == {} and view.waiters == []


def test_a_replica_whose_own_beat_is_late_still_serves_and_keeps_its_queue(two_replicas, postgres_store):
    """Staleness is for the others (docs/replicas.md): a replica whose beat is late - its event
    loop busy with a large order - serves its own gateways' readers and cleans nothing of its own,
    while another replica takes it for gone."""
    a, b = two_replicas
    with postgres_store._engine.begin() as conn:                # replica-b's last beat a minute ago
        from sqlalchemy import text
        conn.execute(text("UPDATE orchestrator_instances SET heartbeat_at = now() - interval '60 seconds' "
                          "WHERE id = 'replica-b'"))
    b.enqueue("first", "replica-b", "task", "", ReaderSelector(gateway_id="gw1"), None, True, None)
    b.enqueue("second", "replica-b", "task", "", ReaderSelector(gateway_id="gw1"), None, True, None)
    assert b.clean(STALE_S, retention_s=600, own="replica-b") == 0
    served = b.serve(STALE_S, own="replica-b")
    assert served.granted == [("first", "gw1", "r1")] and served.failed == []
    own_view = b.view(STALE_S, own="replica-b")
    assert own_view.gateway("gw1").connected and own_view.addresses["replica-b"] == "127.0.0.1:2"
    assert [(w.waiter_id, w.state, w.position) for w in own_view.waiters] == [("first", GRANTED, 0),
                                                                             ("second", WAITING, 1)]
    # Another replica sees it gone: its gateway offline.
    assert not a.view(STALE_S, own="replica-a").gateway("gw1").connected
