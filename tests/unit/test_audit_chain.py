"""The hash chain's verification as pure code (orchestrator/domain/audit_chain.py): which
fault it names, and which row, for every kind of change to a chain."""
from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from orchestrator.domain.audit_chain import (
    GENESIS,
    ChainedRow,
    ChainFault,
    canonical,
    chained_row,
    link_hash,
    verify_chain,
)

AT = dt.datetime(2026, 11, 29, 15, 0, tzinfo=dt.UTC)


def _fields(n: int) -> dict:
    return {"at": AT + dt.timedelta(seconds=n), "actor": "operator:alice#1f", "action": "change_state",
            "object_type": "Certificate", "object_id": f"c{n}", "detail": {"n": n}}


def _chain(count: int) -> list[ChainedRow]:
    rows, prev = [], GENESIS
    for n in range(1, count + 1):
        digest = link_hash(prev, canonical(_fields(n)))
        rows.append(chained_row(n, prev, digest, _fields(n)))
        prev = digest
    return rows


def _faults(rows: list[ChainedRow], **kw) -> list[tuple[int, ChainFault]]:
    return [(p.row_id, p.fault) for p in verify_chain(rows, **kw).problems]


def test_audit_chain_intact_reports_rows_and_head():
    rows = _chain(4)
    report = verify_chain(rows)
    assert report.intact and report.rows == 4 and report.head == rows[-1].hash
    assert verify_chain([]).intact and verify_chain([]).head == GENESIS


def test_audit_chain_canonical_content_ignores_key_order_and_time_zone():
    fields = _fields(1)
    shifted = {**fields, "at": fields["at"].astimezone(dt.timezone(dt.timedelta(hours=2)))}
    assert canonical(dict(reversed(list(fields.items())))) == canonical(shifted)
    assert canonical(fields) != canonical({**fields, "actor": "admin:mallory#1"})
    with pytest.raises(ValueError):
        canonical({**fields, "at": AT.replace(tzinfo=None)})


def test_audit_chain_edited_row_is_named():
    rows = _chain(4)
    rows[1] = chained_row(2, rows[1].prev_hash, rows[1].hash, {**_fields(2), "actor": "admin:mallory#1"})
    assert _faults(rows) == [(2, ChainFault.EDITED)]


def test_audit_chain_deleted_row_names_the_row_after_it():
    rows = _chain(5)
    del rows[2]
    assert _faults(rows) == [(4, ChainFault.DELETED)]


def test_audit_chain_row_rewritten_with_a_new_hash_breaks_the_next_link():
    rows = _chain(4)
    forged = {**_fields(2), "actor": "admin:mallory#1"}
    rows[1] = chained_row(2, rows[1].prev_hash, link_hash(rows[1].prev_hash or "", canonical(forged)), forged)
    assert _faults(rows) == [(3, ChainFault.DELETED)]


def test_audit_chain_inserted_rows_are_named_forked_or_unhashed():
    rows = _chain(4)
    fork = chained_row(9, rows[0].hash, link_hash(rows[0].hash or "", canonical(_fields(9))), _fields(9))
    unhashed = ChainedRow(10, None, None, content_matches=False)
    assert _faults([*rows, fork, unhashed]) == [(9, ChainFault.INSERTED), (10, ChainFault.INSERTED)]


def test_audit_chain_swapped_ids_are_reordered():
    rows = _chain(4)
    rows[1], rows[2] = dataclasses.replace(rows[2], id=2), dataclasses.replace(rows[1], id=3)
    assert _faults(rows) == [(2, ChainFault.REORDERED)]


def test_audit_chain_newest_rows_deleted_are_found_against_a_noted_head():
    rows = _chain(4)
    head = rows[-1].hash
    assert _faults(rows[:3]) == []
    assert _faults(rows[:3], expected_head=head) == [(4, ChainFault.DELETED)]
    assert _faults(rows, expected_head=head) == []
