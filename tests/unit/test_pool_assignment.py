"""The queue's assignment as a pure function (orchestrator/domain/pool_assignment.py): the
rule both the in-memory pool and the pool shared by replicas on PostgreSQL serve with."""
from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_equal_selectors_hash_alike_and_unequal_ones_stay_apart():
    made_apart = [ReaderSelector(gateway_id="gw1", kind=cards.ReaderKind.PKCS11, labels={"desk": "3"})
                  for _ in range(2)]
    assert made_apart[0] is not made_apart[1] and made_apart[0] == made_apart[1]
    assert hash(made_apart[0]) == hash(made_apart[1])
    assert len({made_apart[0], made_apart[1], ReaderSelector(gateway_id="gw1", kind=cards.ReaderKind.PKCS11),
                dataclasses.replace(made_apart[0], site="hq")}) == 3
    assert hash(dataclasses.replace(made_apart[0], site="hq")) == hash(ReaderSelector(
        gateway_id="gw1", kind=cards.ReaderKind.PKCS11, site="hq", labels={"desk": "3"}))


def _assign_waiter_by_waiter(queue, candidates, held, last_used):
    """The rule as docs/pool.md states it, each waiter on its own: what `assign` must equal."""
    granted, waiting, hopeless, taken = [], [], [], set()
    for want in queue:
        matching = [c for c in candidates if want.wants(c)]
        if not matching:
            hopeless.append(want.waiter)
            continue
        free = [c for c in matching if c.key not in taken and not held(c.key)
                and (bool(c.reader.token_serial) or not want.need_card)
                and (want.accepts is None or want.accepts(c.gateway_id, c.reader))]
        if not free:
            waiting.append(want.waiter)
            continue
        chosen = min(free, key=lambda c: (last_used(c.key), c.gateway_id, c.reader.reader_id))
        taken.add(chosen.key)
        granted.append((want.waiter, chosen.key))
    return granted, [(w, p) for p, w in enumerate(waiting, start=1)], hopeless


_GATEWAYS = ("gw1", "gw2", "gw3")
_SELECTORS = [ReaderSelector(), ReaderSelector(gateway_id="gw1"), ReaderSelector(gateway_id="gw9"),
              ReaderSelector(site="hq"), ReaderSelector(reader_id="r1")]


def _refuses(serial: str):
    return lambda gid, reader: reader.token_serial != serial


_ACCEPTS = [None, _refuses("s1"), _refuses("s2")]


@settings(max_examples=300, deadline=None)
@given(readers=st.lists(st.tuples(st.sampled_from(_GATEWAYS), st.sampled_from(["r1", "r2", "r3"]),
                                  st.sampled_from(["", "s1", "s2", "s3", "s4"])),
                        max_size=9, unique_by=lambda r: r[:2]),
       wants=st.lists(st.tuples(st.integers(0, len(_SELECTORS) - 1), st.booleans(),
                                st.integers(0, len(_ACCEPTS) - 1), st.booleans()), max_size=25),
       held=st.sets(st.tuples(st.sampled_from(_GATEWAYS), st.sampled_from(["r1", "r2", "r3"]))),
       used=st.dictionaries(st.tuples(st.sampled_from(_GATEWAYS), st.sampled_from(["r1", "r2", "r3"])),
                            st.floats(0, 100)))
def test_serving_alike_waiters_together_hands_out_exactly_what_serving_each_alone_does(readers, wants, held, used):
    candidates = _candidates(*readers)
    # own: the waiter asks with a selector of its own, equal to another's but not the same object.
    queue = [Want(f"w{i}", dataclasses.replace(_SELECTORS[s]) if own else _SELECTORS[s], need_card=need,
                  accepts=_ACCEPTS[a]) for i, (s, need, a, own) in enumerate(wants)]
    # The readers each kind of request matches, kept from an earlier serve of the same readers.
    kept: dict = {}
    assign(queue[::-1], candidates, lambda key: False, lambda key: 0.0, kept)
    result = assign(queue, candidates, held.__contains__, lambda key: used.get(key, 0.0), kept)
    expected = _assign_waiter_by_waiter(queue, candidates, held.__contains__, lambda key: used.get(key, 0.0))
    assert ([(w.waiter, c.key) for w, c in result.granted], [(w.waiter, p) for w, p in result.positions],
            [w.waiter for w in result.hopeless]) == expected
