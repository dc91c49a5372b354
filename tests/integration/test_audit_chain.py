"""The audit trail's hash chain (docs/audit.md) on SQLite and PostgreSQL: intact after writes,
also from concurrent writers; an edited, deleted, inserted or reordered row found and named
after a change made directly in the database; the filters of the listing."""
from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import text

from orchestrator.domain.audit_chain import GENESIS, ChainFault, canonical, link_hash
from orchestrator.store import CARD, CERTIFICATE, Store
from orchestrator.store.audit import AuditFilter
from orchestrator.store.records import TASK, AuditSubjects, certificate_subject
from tests.integration.test_store import ISSUED, make_cert, production


def _stored_cert(store: Store, task_id: str):
    return store.store_issued_certificate(task_id, make_cert(), template="EmployeeAuth", ca_name="local",
                                          state=ISSUED)


def _write_rows(store: Store, count: int = 5) -> list[int]:
    return [store.audit.record("lease_acquired", "Lease", f"lease-{n}", f"service:svc#{n:x}",
                               {"n": n}, subjects=AuditSubjects(gateway_id="gw-1", reader_id=f"r{n}")).id
            for n in range(count)]


def _sql(store: Store, statement: str, **params) -> None:
    with store._engine.begin() as conn:
        conn.execute(text(statement), params)


def _hash_of(store: Store, row_id: int) -> str:
    with store._engine.connect() as conn:
        return conn.execute(text("SELECT hash FROM audit_events WHERE id = :i"), {"i": row_id}).scalar_one()


def test_audit_chain_is_intact_after_writes_and_links_every_row(store: Store):
    task, card = production(store)
    cert = _stored_cert(store, task.id)
    ids = _write_rows(store, 3)
    store.certificates.change_state(cert.id, "Active", from_state=ISSUED, actor="operator:alice#1f",
                                    action="change_state")
    store.cards.change_state(card.id, "Blocked", from_state=None, actor="operator:alice#1f", action="change_state")

    report = store.audit.verify()
    assert report.intact, report.problems
    assert report.rows == 5
    rows = store.audit.list()
    assert rows[0].prev_hash == GENESIS
    assert [r.prev_hash for r in rows[1:]] == [r.hash for r in rows[:-1]]
    assert report.head == rows[-1].hash
    assert [r.id for r in rows[:3]] == ids
    # State changes say which certificate (with its CA and serial) and which card.
    cert_change, card_change = rows[3], rows[4]
    assert cert_change.certificates == (certificate_subject(cert.id, cert.ca_name, cert.serial_hex),)
    assert card_change.card_id == card.id


def test_audit_verify_names_an_edited_row(store: Store):
    ids = _write_rows(store)
    _sql(store, "UPDATE audit_events SET actor = 'admin:mallory#1' WHERE id = :i", i=ids[2])

    report = store.audit.verify()
    assert not report.intact
    assert report.first is not None
    assert (report.first.row_id, report.first.fault) == (ids[2], ChainFault.EDITED)
    assert f"row {ids[2]} was edited" in report.first.message


def test_audit_verify_names_the_row_after_a_deleted_one(store: Store):
    ids = _write_rows(store)
    _sql(store, "DELETE FROM audit_events WHERE id = :i", i=ids[1])

    report = store.audit.verify()
    assert [(p.row_id, p.fault) for p in report.problems] == [(ids[2], ChainFault.DELETED)]


def test_audit_verify_finds_the_newest_rows_deleted_against_a_noted_head(store: Store):
    _write_rows(store)
    head = store.audit.verify().head
    last = store.audit.list()[-1].id
    assert store.audit.verify(expected_head=head).intact
    _sql(store, "DELETE FROM audit_events WHERE id = :i", i=last)

    assert store.audit.verify().intact            # a shorter chain is a chain ...
    report = store.audit.verify(expected_head=head)   # ... that lost the noted head
    assert [(p.row_id, p.fault) for p in report.problems] == [(last, ChainFault.DELETED)]


def test_audit_verify_names_an_inserted_row(store: Store):
    ids = _write_rows(store)
    at = dt.datetime.now(dt.UTC)
    fields = {"at": at, "actor": "admin:mallory#1", "action": "change_state", "object_type": CERTIFICATE,
              "object_id": "forged", "detail": {}}
    prev = _hash_of(store, ids[1])          # made to look like it follows row 2
    forged = link_hash(prev, canonical(fields))
    _sql(store, "INSERT INTO audit_events (id, at, actor, action, object_type, object_id, detail, prev_hash, hash) "
                "VALUES (:id, :at, 'admin:mallory#1', 'change_state', 'Certificate', 'forged', '{}', :p, :h)",
         id=ids[-1] + 7, at=at, p=prev, h=forged)
    _sql(store, "INSERT INTO audit_events (id, at, actor, action, object_type, object_id, detail) "
                "VALUES (:id, :at, 'admin:mallory#1', 'change_state', 'Certificate', 'unhashed', '{}')",
         id=ids[-1] + 9, at=at)

    report = store.audit.verify()
    assert [(p.row_id, p.fault) for p in report.problems] == [(ids[-1] + 7, ChainFault.INSERTED),
                                                              (ids[-1] + 9, ChainFault.INSERTED)]


def test_audit_verify_names_reordered_rows(store: Store):
    ids = _write_rows(store)
    a, b = ids[1], ids[3]
    _sql(store, "UPDATE audit_events SET id = :t WHERE id = :a", t=-1, a=a)
    _sql(store, "UPDATE audit_events SET id = :a WHERE id = :b", a=a, b=b)
    _sql(store, "UPDATE audit_events SET id = :b WHERE id = :t", b=b, t=-1)

    report = store.audit.verify()
    assert report.first is not None
    assert (report.first.row_id, report.first.fault) == (a, ChainFault.REORDERED)
    assert {p.fault for p in report.problems} == {ChainFault.REORDERED}


def test_audit_chain_stays_intact_with_concurrent_writers(store: Store):
    task, card = production(store)
    certs = [_stored_cert(store, task.id) for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)
    replica = Store(store.database_url)      # a second orchestrator on the same database: its own engine

    def writer(n: int) -> None:
        mine = store if n % 2 else replica
        try:
            start.wait(timeout=30)
            for i in range(10):
                if n < 4 and i == 0:   # state changes queue their row inside a bigger transaction
                    mine.certificates.change_state(certs[n].id, f"S{n}", from_state=ISSUED, actor=f"w{n}",
                                                   action="change_state")
                mine.audit.record("raw_step", TASK, f"t{n}", f"service:w{n}#1", {"i": i},
                                  subjects=AuditSubjects(card_id=card.id, step=i))
        except BaseException as exc:  # reported below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    replica.close()
    assert not [t for t in threads if t.is_alive()], "writers still running after 120 s"
    assert errors == []
    report = store.audit.verify()
    assert report.intact, report.problems[:3]
    assert report.rows == 8 * 10 + 4


def test_audit_list_filters_and_pages(store: Store):
    task, card = production(store)
    cert = _stored_cert(store, task.id)
    first = store.audit.record("task_started", TASK, task.id, "operator:alice#1", subjects=AuditSubjects(
        card_id=card.id, gateway_id="gw", reader_id="r1"))
    second = store.audit.record("task_finished", TASK, task.id, "operator:alice#1", subjects=AuditSubjects(
        card_id=card.id, certificates=(certificate_subject(cert.id, cert.ca_name, cert.serial_hex),)))
    other = store.audit.record("lease_released", "Lease", "l1", "service:svc#2")
    moved = store.certificates.change_state(cert.id, "Active", from_state=ISSUED, actor="admin:root#3",
                                            action="change_state")
    assert moved.state == "Active"

    def ids(**kw) -> list[int]:
        return [r.id for r in store.audit.list(where=AuditFilter(**kw))]

    everything = ids()
    assert ids(card_id=card.id) == [first.id, second.id]
    assert ids(task_id=task.id) == [first.id, second.id]
    assert ids(certificate_id=cert.id) == [second.id, everything[-1]]
    assert ids(actor="service:svc#2") == [other.id]
    assert ids(action="task_started") == [first.id]
    assert ids(since=other.at) == [other.id, everything[-1]]
    assert ids(until=other.at) == [first.id, second.id]
    page = store.audit.list(limit=2)
    rest = store.audit.list(after_id=page[-1].id)
    assert [r.id for r in page + rest] == everything
    assert [r for r in store.audit.list(where=AuditFilter(card_id=CARD))] == []


def test_migration_0008_chains_the_rows_written_before_it(tmp_path):
    from alembic import command

    from orchestrator.store.store import alembic_config

    url = f"sqlite:///{tmp_path / 'old.db'}"
    store = Store(url)
    cfg = alembic_config(url)
    with store._engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0007")
    for n in range(3):
        _sql(store, "INSERT INTO audit_events (at, actor, action, object_type, object_id, detail) "
                    "VALUES (:at, 'api', 'change_state', 'Certificate', :o, :d)",
             at=dt.datetime(2026, 11, 28, 12, n, tzinfo=dt.UTC).isoformat(" "), o=f"c{n}", d=f'{{"n": {n}}}')
    store.migrate()

    report = store.audit.verify()
    assert report.intact and report.rows == 3
    store.audit.record("change_state", CERTIFICATE, "c3", "operator:alice#1")   # new rows follow the old ones
    assert store.audit.verify().intact and store.audit.verify().rows == 4
    store.close()


@pytest.mark.hardware
def test_cardline_audit_verify_names_the_row_of_each_change_made_in_the_database(store: Store):
    import subprocess

    from tests.support.processes import CARDLINE

    def verify() -> subprocess.CompletedProcess:
        return subprocess.run([CARDLINE, "audit", "verify", "--database-url", store.database_url],
                              capture_output=True, text=True, timeout=60)

    ids = _write_rows(store, 8)
    intact = verify()
    assert intact.returncode == 0 and "audit trail intact: 8 rows" in intact.stdout, intact.stderr
    _sql(store, "UPDATE audit_events SET detail = '{\"n\": 99}' WHERE id = :i", i=ids[6])
    edited = verify()
    assert edited.returncode == 1 and f"broken at row {ids[6]}: row {ids[6]} was edited" in edited.stderr
    _sql(store, "UPDATE audit_events SET id = :t WHERE id = :a", t=-1, a=ids[4])
    _sql(store, "UPDATE audit_events SET id = :a WHERE id = :b", a=ids[4], b=ids[5])
    _sql(store, "UPDATE audit_events SET id = :b WHERE id = :t", b=ids[5], t=-1)
    assert f"broken at row {ids[4]}: row {ids[4]} was reordered" in verify().stderr
    _sql(store, "INSERT INTO audit_events (id, at, actor, action, object_type, object_id, detail) "
                "VALUES (:id, :at, 'admin:mallory#1', 'change_state', 'Certificate', 'x', '{}')",
         id=ids[3] + 100, at=dt.datetime.now(dt.UTC))
    _sql(store, "DELETE FROM audit_events WHERE id = :i", i=ids[2])
    broken = verify()
    assert broken.returncode == 1 and f"broken at row {ids[3]}: row {ids[3]} follows a row that is not there" \
        in broken.stderr and "(and 3 more problems)" in broken.stderr
