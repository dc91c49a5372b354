"""Rule C16, interrupted handlings: the reconciler's open intents are followed incrementally
(orchestrator/services/handling_intents.py OpenIntents) — each round reads only the intent
and settlement rows written since the last one, by this replica or another, and sees the
same open intents as a full read of the trail (SQLite and PostgreSQL)."""
from __future__ import annotations

from types import SimpleNamespace

from orchestrator.services.handling_intents import OpenIntents, open_intents, record_intent, settle

MOVES = [("Issued", "Revoked", "unspecified")]


def _intent(store, n: int) -> int:
    certificate = SimpleNamespace(id=f"cert-{n}", ca_name="local", serial_hex=f"{n:x}")
    return record_intent(store, certificate, "operator:test", "revoke", "unspecified", MOVES)  # type: ignore[arg-type]


def test_c16_open_intents_read_incrementally_match_a_full_read_and_read_only_new_rows(store):
    rows_read: list[int] = []
    listing = store.audit.list

    def counted(*args, **kwargs):
        rows = listing(*args, **kwargs)
        rows_read.append(len(rows))
        return rows
    store.audit.list = counted

    for n in range(1, 41):                     # a history of 40 settled intents
        _intent(store, n)
    book = OpenIntents(store)
    for intent in book.read():
        settle(store, intent, "reconciler", "done")
    assert book.read() == [] == open_intents(store)

    open_one, open_two = _intent(store, 41), _intent(store, 42)
    rows_read.clear()
    assert [i.audit_id for i in book.read()] == [open_one, open_two]
    assert sum(rows_read) == 2                 # the two new intents, not the 80 rows of history

    other_replica = OpenIntents(store)
    settle(store, other_replica.read()[0], "another replica", "done")
    rows_read.clear()
    assert [i.audit_id for i in book.read()] == [open_two] == [i.audit_id for i in open_intents(store)]
    assert rows_read[0] == 1                   # the other replica's settlement, and nothing older
