"""The store's searches and secrets behind the lifecycle processes (docs/lifecycle.md), on
SQLite and PostgreSQL: cards by holder / state / template / token serial, certificates
expiring within N days, each card's PUK sealed under the key-encryption key."""
from __future__ import annotations

import datetime as dt

import pytest

from orchestrator.services.card_secrets import CardPukStore
from orchestrator.services.key_archive import FileKek
from orchestrator.store import Store
from shared.errors import ConfigurationError, InvalidArgument, NotFound
from tests.integration.test_store import ISSUED, make_cert


def _card(store: Store, serial: str, *, holder: str | None, template: str = "EmployeeCard", state: str = "Active"):
    task = store.tasks.create("card_production", "gw1", "r1")
    return store.cards.create(task.id, serial=serial, template=template, state=state, gateway_id="gw1",
                              reader_id="r1", holder=holder)


def test_cards_are_found_by_holder_state_template_and_token_serial_and_paged(store: Store):
    a = _card(store, "AAA", holder="Jane Doe")
    b = _card(store, "BBB", holder="Jane Doe", template="TemporaryCard")
    c = _card(store, "CCC", holder="John Roe", state="Blocked")
    assert [x.id for x in store.cards.list(holder="Jane Doe")] == [a.id, b.id]
    assert [x.id for x in store.cards.list(holder="Jane Doe", template="TemporaryCard")] == [b.id]
    assert [x.id for x in store.cards.list(state="Blocked")] == [c.id]
    assert [x.id for x in store.cards.list(token_serial="AAA")] == [a.id]
    assert store.cards.list(holder="Nobody") == []
    first = store.cards.list(limit=1)                                   # keyset paging: after the last row
    assert [x.id for x in first] == [a.id]
    assert [x.id for x in store.cards.list(after=(first[0].created_at, first[0].id), limit=1)] == [b.id]
    assert store.cards.get(a.id).holder == "Jane Doe"


def test_certificates_expiring_within_days_are_those_valid_now_with_not_after_before_the_limit(store: Store):
    task = store.tasks.create("card_production", "gw1", "r1")
    cert = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)   # 30 days
    now = dt.datetime.now(dt.UTC)
    expiring = lambda days, at=now: [c.id for c in store.certificates.list(  # noqa: E731
        valid_at=at, expiring_before=at + dt.timedelta(days=days))]
    assert expiring(31) == [cert.id]
    assert expiring(29) == []
    assert expiring(31, at=now + dt.timedelta(days=31)) == []          # already expired then: not "expiring"
    with pytest.raises(InvalidArgument, match="expiring_before must be timezone-aware"):
        store.certificates.list(expiring_before=dt.datetime(2030, 1, 1))


def test_card_puk_is_sealed_bound_to_its_serial_and_audited_without_the_puk(store: Store, tmp_path):
    puks = CardPukStore(store, FileKek(tmp_path / "kek.key"))
    assert puks.get("AAA") is None
    puks.set("AAA", "puk-of-aaa", actor="admin")
    puks.set("AAA", "puk-of-aaa-2", actor="admin")                       # replaced, audited again
    row = store.card_secrets.get("AAA")
    assert b"puk-of-aaa" not in row.sealed and puks.get("AAA") == "puk-of-aaa-2"
    audit = store.audit.list(object_id="AAA")
    assert [(a.action, a.detail["replaced"]) for a in audit] == [("set_card_puk", False), ("set_card_puk", True)]
    assert "puk-of-aaa" not in str([a.detail for a in audit])
    # A sealed PUK copied onto another card's row does not open (bound to the token serial).
    store.card_secrets.put("BBB", row.kek_id, row.algorithm, row.sealed, actor="intruder", action="set_card_puk")
    with pytest.raises(InvalidArgument):
        puks.get("BBB")
    # One sealed by another key-encryption key is reported as such.
    store.card_secrets.put("CCC", "file:elsewhere", row.algorithm, row.sealed, actor="admin", action="set_card_puk")
    with pytest.raises(ConfigurationError, match="sealed by key-encryption key"):
        puks.get("CCC")
    with pytest.raises(NotFound):
        store.card_secrets.get("DDD")
    with pytest.raises(InvalidArgument, match="PUK must be non-empty"):
        puks.set("AAA", "", actor="admin")
