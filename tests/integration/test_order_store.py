"""store.orders (revision 0011_persisted_orders) on SQLite and on PostgreSQL: an order and its
cards round-trip; one replica wins a claim; a replica that lost its order writes nothing over
the adopter's; Cancel from anywhere; which orders are left to adopt."""
from __future__ import annotations

import threading

from orchestrator.store import Store
from orchestrator.store.orders import OrderCardInputs, OrderChange


def _order(store: Store, order_id: str = "o1", owner: str = "replica-a", cards: int = 3):
    return store.orders.create(order_id, "produce", {"site": "hq"}, owner, [
        OrderCardInputs(i, {"person": f"Person {i}"}, "kek-1" if i == 0 else None,
                        b"sealed" if i == 0 else None) for i in range(cards)])


def test_order_round_trips_with_its_cards_inputs_and_sealed_secrets(store: Store):
    created = _order(store)
    got = store.orders.get("o1")
    assert got == created
    assert (got.state, got.owner, got.generation, got.selector) == ("RUNNING", "replica-a", 1, {"site": "hq"})
    assert [(c.index, c.state, c.attempt) for c in got.cards] == [(0, "queued", 0), (1, "queued", 0), (2, "queued", 0)]
    inputs = store.orders.card_inputs("o1")
    assert inputs[0] == OrderCardInputs(0, {"person": "Person 0"}, "kek-1", b"sealed")
    assert inputs[2] == OrderCardInputs(2, {"person": "Person 2"})
    assert [o.id for o in store.orders.page(10)] == ["o1"]


def test_save_merges_card_changes_and_ends_the_order_only_for_its_owner(store: Store):
    _order(store, cards=2)
    row = {"state": "succeeded", "attempt": 0, "queue_position": 0, "gateway_id": "gw", "reader_id": "r1",
           "process_instance_id": "p1", "error_reason": "", "error_message": ""}
    lost = store.orders.save("replica-a", [OrderChange("o1", 1, {0: row, 1: {**row, "reader_id": "r2"}},
                                                       had={"gw\nr1": "serial-1"}, done=True)])
    assert lost == set()
    got = store.orders.get("o1")
    assert got.state == "DONE" and got.had == {"gw\nr1": "serial-1"}
    assert [(c.state, c.reader_id) for c in got.cards] == [("succeeded", "r1"), ("succeeded", "r2")]


def test_one_replica_wins_a_claim_and_the_loser_writes_nothing_over_it(store: Store):
    _order(store)
    winners = []

    def claim(me: str) -> None:
        if store.orders.claim("o1", "replica-a", 1, me) is not None:
            winners.append(me)

    threads = [threading.Thread(target=claim, args=(f"replica-{n}",)) for n in "bcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    got = store.orders.get("o1")
    assert (got.owner, got.generation) == (winners[0], 2)
    # The old owner, taken for dead, comes back: its writes are refused, not merged in.
    stale = {"state": "failed", "attempt": 0, "queue_position": 0, "gateway_id": "", "reader_id": "",
             "process_instance_id": "", "error_reason": "X", "error_message": "late"}
    assert store.orders.save("replica-a", [OrderChange("o1", 1, {0: stale}, done=True)]) == {"o1"}
    assert store.orders.save(winners[0], [OrderChange("o1", 1, {0: stale})]) == {"o1"}      # old generation
    assert [c.state for c in store.orders.get("o1").cards] == ["queued"] * 3
    assert store.orders.get("o1").state == "RUNNING"


def test_cancel_from_any_replica_once_and_what_is_left_to_adopt(store: Store):
    _order(store, "running")
    _order(store, "cancelled")
    _order(store, "done", cards=1)
    ended = {"state": "succeeded", "attempt": 0, "queue_position": 0, "gateway_id": "", "reader_id": "",
             "process_instance_id": "", "error_reason": "", "error_message": ""}
    store.orders.save("replica-a", [OrderChange("done", 1, {0: ended}, done=True)])
    record, cancelled = store.orders.cancel("cancelled")
    assert cancelled and record.state == "CANCELLED"
    assert store.orders.cancel("cancelled")[1] is False
    assert store.orders.cancel("done")[1] is False and store.orders.get("done").state == "DONE"
    # A cancelled order's queued or running cards still need an outcome: it is adopted too.
    assert sorted(o[0] for o in store.orders.unfinished()) == ["cancelled", "running"]
    assert store.orders.states(["running", "cancelled"]) == {"running": ("RUNNING", "replica-a", 1),
                                                            "cancelled": ("CANCELLED", "replica-a", 1)}


def test_orders_page_oldest_first_by_creation_time_and_id(store: Store):
    for n in range(5):
        _order(store, f"o{n}", cards=1)
    first = store.orders.page(3)
    rest = store.orders.page(3, (first[-1].created_at, first[-1].id))
    assert [o.id for o in first + rest] == [f"o{n}" for n in range(5)]
    assert [len(o.cards) for o in first + rest] == [1] * 5


def test_ended_orders_leave_the_store_after_their_retention_and_open_ones_never(store: Store):
    """orders.retention_days (docs/pool.md): an order whose every card ended goes with its
    cards once older than the retention; a running order, or a cancelled one whose card still
    runs, stays whatever its age."""
    import datetime as dt

    for order_id in ("done", "cancelled-open", "running", "recent"):
        _order(store, order_id, cards=2)
    store.orders.save("replica-a", [OrderChange("done", 1, {i: _ended(i) for i in range(2)}, done=True)])
    store.orders.save("replica-a", [OrderChange("cancelled-open", 1, {0: _ended(0)})])
    store.orders.cancel("cancelled-open")               # card 1 still queued: not ended
    future = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)
    assert store.orders.purge_ended(dt.datetime.now(dt.UTC) - dt.timedelta(days=1)) == 0   # nothing that old
    store.orders.save("replica-a", [OrderChange("recent", 1, {i: _ended(i) for i in range(2)}, done=True)])
    assert store.orders.purge_ended(future, limit=1) == 1        # batches: the oldest first
    assert store.orders.purge_ended(future) == 1
    left = {o.id for o in store.orders.page(10)}
    assert left == {"cancelled-open", "running"}
    assert store.orders.card_inputs("done") == [] and store.orders.card_inputs("recent") == []
    assert [c.state for c in store.orders.get("cancelled-open").cards] == ["failed", "queued"]


def _ended(index: int) -> dict:
    return {"state": "failed", "queue_position": 0, "gateway_id": "", "reader_id": "", "process_instance_id": "",
            "error_reason": "CANCELLED", "error_message": "cancelled", "attempt": 0}
