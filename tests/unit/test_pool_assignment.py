"""The queue's assignment as a pure function (orchestrator/domain/pool_assignment.py): the
rule both the in-memory pool and the pool shared by replicas on PostgreSQL serve with."""
from __future__ import annotations

from orchestrator.domain.pool_assignment import Candidate, ReaderSelector, Want, assign
from shared import cards


def _reader(reader_id: str, serial: str = "") -> cards.Reader:
    return cards.Reader(reader_id, cards.ReaderKind.PKCS11, reader_id, card_present=bool(serial), token_serial=serial)


def _candidates(*specs: tuple[str, str, str]) -> list[Candidate]:
    return [Candidate(gid, "hq", {}, _reader(rid, serial)) for gid, rid, serial in specs]


def test_waiters_in_order_each_get_the_least_recently_used_free_reader_and_the_rest_are_numbered():
    readers = _candidates(("gw1", "r1", "s1"), ("gw1", "r2", "s2"), ("gw2", "r1", "s3"))
    queue = [Want(f"w{i}", ReaderSelector(), need_card=True) for i in range(5)]
    used = {("gw1", "r1"): 30.0, ("gw1", "r2"): 10.0, ("gw2", "r1"): 20.0}
    result = assign(queue, readers, lambda key: False, lambda key: used[key])
    assert [(w.waiter, c.key) for w, c in result.granted] == [
        ("w0", ("gw1", "r2")), ("w1", ("gw2", "r1")), ("w2", ("gw1", "r1"))]
    assert [(w.waiter, p) for w, p in result.positions] == [("w3", 1), ("w4", 2)]
    assert result.hopeless == []


def test_a_later_waiter_goes_first_only_when_no_reader_it_takes_suits_those_before_it():
    readers = _candidates(("gw1", "r1", "s1"), ("gw2", "r1", "s2"))
    queue = [Want("wants-gw1", ReaderSelector(gateway_id="gw1"), need_card=True),
             Want("wants-any", ReaderSelector(), need_card=True),
             Want("wants-gw1-too", ReaderSelector(gateway_id="gw1"), need_card=True)]
    result = assign(queue, readers, lambda key: key == ("gw1", "r1"), lambda key: 0.0)
    assert [(w.waiter, c.key) for w, c in result.granted] == [("wants-any", ("gw2", "r1"))]
    assert [(w.waiter, p) for w, p in result.positions] == [("wants-gw1", 1), ("wants-gw1-too", 2)]


def test_a_waiter_nothing_matches_is_hopeless_and_one_refusing_a_card_leaves_it_to_others():
    readers = _candidates(("gw1", "r1", "already-had"), ("gw1", "r2", ""))
    queue = [Want("gone", ReaderSelector(gateway_id="gw9"), need_card=True),
             Want("not-that-card", ReaderSelector(), need_card=True,
                  accepts=lambda gid, r: r.token_serial != "already-had"),
             Want("anyone", ReaderSelector(), need_card=True)]
    result = assign(queue, readers, lambda key: False, lambda key: 0.0)
    assert [w.waiter for w in result.hopeless] == ["gone"]
    assert [(w.waiter, c.key) for w, c in result.granted] == [("anyone", ("gw1", "r1"))]
    assert [(w.waiter, p) for w, p in result.positions] == [("not-that-card", 1)]


def test_a_selector_round_trips_through_its_data():
    selector = ReaderSelector(gateway_id="gw1", kind=cards.ReaderKind.PKCS11, site="hq", labels={"desk": "3"},
                              card_present=True)
    assert ReaderSelector.from_data(selector.to_data()) == selector
