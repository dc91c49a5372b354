"""The store's process instances, audited state changes (C5, C17), standalone relations (C9)
and archived keys (C7), on SQLite and PostgreSQL."""
from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import func, select

from orchestrator.store import (
    CARD,
    CERTIFICATE,
    NewRelation,
    ProcessState,
    StateConflict,
    Store,
    TaskRecord,
    TaskState,
    WrappedKey,
)
from orchestrator.store.models import ArchivedKey, Certificate
from shared.errors import AlreadyExists, InvalidArgument, NotFound
from tests.integration.test_store import ISSUED, make_cert, production

DESCRIPTOR = {"type": "Certificate", "template": "EmployeeAuth", "id": "0b9e5c1e-7f1d-4d7b-9d2a-6c1f0e2b3a4d"}


# -- process instances ---------------------------------------------------------------------

def test_process_map_round_trips_json(store: Store):
    process_map = {"person": "Zoë Müller", "count": 3, "ratio": 0.5, "ok": True, "none": None,
                   "theGeneratedCertificate": DESCRIPTOR, "list": [1, "two", [3.0], {"k": []}]}
    created = store.processes.create("produce-employee-card", process_map)

    assert created.state == ProcessState.RUNNING and created.definition == "produce-employee-card"
    assert created.finished_at is None and created.created_at == created.updated_at
    assert created.created_at.utcoffset() == dt.timedelta(0)
    assert created.process_map == process_map
    got = store.processes.get(created.id)
    assert got == created and got.process_map == process_map
    assert list(got.process_map) == list(process_map)          # order of the variables kept
    got.process_map["person"] = "changed behind the store's back"
    assert store.processes.get(created.id).process_map["person"] == "Zoë Müller"

    updated = store.processes.update_map(created.id, {**process_map, "count": 4})
    assert updated.process_map["count"] == 4 and updated.updated_at >= created.updated_at
    assert store.processes.get(created.id).process_map["count"] == 4


def test_process_map_that_is_not_json_is_refused(store: Store):
    for bad in ({"when": dt.datetime.now(dt.UTC)}, {1: "int key"}, {"x": float("nan")},
                {"b": b"bytes"}, ["not", "a", "dict"]):
        with pytest.raises(InvalidArgument):
            store.processes.create("p", bad)   # type: ignore[arg-type]
    assert store.processes.list() == []
    instance = store.processes.create("p", {})
    with pytest.raises(InvalidArgument):
        store.processes.update_map(instance.id, {"s": {1, 2}})
    assert store.processes.get(instance.id).process_map == {}


def test_process_instance_finishes_exactly_once_from_running(store: Store):
    instance = store.processes.create("produce-employee-card", {"person": "alice"})
    failed = store.processes.finish(instance.id, ProcessState.FAILED, error_reason="CARD_REMOVED",
                                           error_message="card pulled", process_map={"person": "alice", "n": 1})
    assert failed.state == ProcessState.FAILED and failed.finished_at is not None
    assert (failed.error_reason, failed.error_message) == ("CARD_REMOVED", "card pulled")
    assert failed.process_map == {"person": "alice", "n": 1}
    assert store.processes.get(instance.id) == failed

    with pytest.raises(StateConflict, match="already FAILED"):
        store.processes.finish(instance.id, ProcessState.SUCCEEDED)
    with pytest.raises(StateConflict, match="already FAILED"):
        store.processes.update_map(instance.id, {"late": True})
    with pytest.raises(StateConflict, match="already FAILED"):
        store.tasks.create("card_operation", "gw1", "r1", process_instance_id=instance.id)
    assert store.processes.get(instance.id) == failed

    other = store.processes.create("produce-employee-card", {"person": "bob"})
    with pytest.raises(InvalidArgument, match="ends in one of"):
        store.processes.finish(other.id, ProcessState.RUNNING)
    done = store.processes.finish(other.id, ProcessState.SUCCEEDED)
    assert done.process_map == {"person": "bob"}            # kept when no final map is given
    assert done.error_reason is None

    for call in (lambda: store.processes.get("nope"),
                 lambda: store.processes.update_map("nope", {}),
                 lambda: store.processes.finish("nope", ProcessState.SUCCEEDED),
                 lambda: store.tasks.create("card_operation", "g", "r", process_instance_id="nope")):
        with pytest.raises(NotFound):
            call()


def test_process_instances_listed_newest_first_with_filters(store: Store):
    a = store.processes.create("produce", {})
    b = store.processes.create("operate", {})
    c = store.processes.create("produce", {})
    store.processes.finish(a.id, ProcessState.SUCCEEDED)

    def ids(**kw):
        return [p.id for p in store.processes.list(**kw)]

    assert ids() == [c.id, b.id, a.id]
    assert ids(definition="produce") == [c.id, a.id]
    assert ids(state=ProcessState.RUNNING) == [c.id, b.id]
    assert ids(state=ProcessState.SUCCEEDED, definition="produce") == [a.id]
    assert ids(limit=2) == [c.id, b.id]


def test_tasks_belong_to_a_process_instance_in_order(store: Store):
    instance = store.processes.create("produce-employee-card", {})
    first = store.tasks.create("card_production", "gw1", "r1", process_instance_id=instance.id, task_index=0)
    second = store.tasks.create("handle_issued", "gw1", "r1", None, process_instance_id=instance.id, task_index=1)
    lone = store.tasks.create("card_operation", "gw2", "r2")         # the positional signature still works

    assert (first.process_instance_id, first.task_index) == (instance.id, 0)
    assert store.tasks.get(second.id) == second and second.task_index == 1
    assert (lone.process_instance_id, lone.task_index) == (None, None)
    assert [t.id for t in store.tasks.list(process_instance_id=instance.id)] == [first.id, second.id]
    store.finish_task_failed(first.id, "CARD_IO", "reader gone")
    assert [t.id for t in store.tasks.list(state=TaskState.RUNNING)] == [second.id, lone.id]
    assert [t.id for t in store.tasks.list(process_instance_id=instance.id, state=TaskState.FAILED)] == [first.id]
    assert [t.id for t in store.tasks.list()] == [first.id, second.id, lone.id]
    with pytest.raises(InvalidArgument, match="negative"):
        store.tasks.create("card_operation", "gw1", "r1", process_instance_id=instance.id, task_index=-1)


def test_task_record_built_the_old_way_still_works():
    now = dt.datetime.now(dt.UTC)
    record = TaskRecord("id", "card_operation", TaskState.RUNNING, "gw", "r", None, None, None, now, None)
    assert (record.process_instance_id, record.task_index) == (None, None)


def test_certificates_of_a_process_instance(store: Store):
    instance = store.processes.create("produce-employee-card", {})
    t1, _card = production(store)
    store_task = store.tasks.create("card_operation", "gw1", "r1", process_instance_id=instance.id, task_index=0)
    t2 = store.tasks.create("card_operation", "gw2", "r2", process_instance_id=instance.id, task_index=1)
    a = store.store_issued_certificate(store_task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    b = store.store_issued_certificate(t2.id, make_cert(), "EmployeeSign", "local", ISSUED)
    store.store_issued_certificate(t1.id, make_cert(), "EmployeeAuth", "local", ISSUED)   # other process

    def ids(**kw):
        return [c.id for c in store.certificates.list(**kw)]

    assert ids(process_instance_id=instance.id) == [a.id, b.id]
    assert ids(process_instance_id=instance.id, template="EmployeeSign") == [b.id]
    assert ids(process_instance_id=instance.id, gateway_id="gw2") == [b.id]
    assert ids(process_instance_id="nope") == []


# -- audited state changes (C5, C17) -------------------------------------------------------

def test_c5_state_change_is_audited_in_same_transaction(store: Store):
    task, _card = production(store)
    cert = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    store.finish_task_failed(task.id, "CARD_REMOVED", "pulled")

    changed = store.certificates.change_state(cert.id, "Revoked", from_state=ISSUED, actor="sweeper",
                                             action="sweep", reason="cessationOfOperation",
                                             detail={"grace_period_s": 3600})

    assert changed.state == "Revoked" and changed.updated_at > cert.updated_at
    assert store.certificates.get(cert.id) == changed
    [event] = store.audit.list(object_id=cert.id)
    assert (event.action, event.actor, event.object_type, event.object_id) == ("sweep", "sweeper", CERTIFICATE,
                                                                               cert.id)
    assert event.detail == {"grace_period_s": 3600, "from": ISSUED, "to": "Revoked",
                            "reason": "cessationOfOperation"}
    assert event.at == changed.updated_at           # written by the same transaction
    assert event.at.utcoffset() == dt.timedelta(0)


def test_state_change_from_wrong_state_is_refused_and_nothing_audited(store: Store):
    task, card = production(store)
    cert = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)

    with pytest.raises(StateConflict, match="in state 'Issued', not 'Active'") as err:
        store.certificates.change_state(cert.id, "Hold", from_state="Active", actor="op", action="change_state")
    assert err.value.metadata["state"] == ISSUED and err.value.metadata["expected_state"] == "Active"
    with pytest.raises(StateConflict, match="in state 'Produced', not 'Active'"):
        store.cards.change_state(card.id, "Blocked", from_state="Active", actor="op", action="change_state")
    with pytest.raises(NotFound):
        store.certificates.change_state("nope", "Hold", from_state=None, actor="op", action="change_state")
    with pytest.raises(NotFound):
        store.cards.change_state("nope", "Blocked", from_state=None, actor="op", action="change_state")
    # A bad audit event rolls the state change back too.
    with pytest.raises(InvalidArgument):
        store.certificates.change_state(cert.id, "Hold", from_state=ISSUED, actor="", action="change_state")
    with pytest.raises(InvalidArgument):
        store.certificates.change_state(cert.id, "Hold", from_state=ISSUED, actor="op", action="change_state",
                                       detail={"when": dt.datetime.now(dt.UTC)})

    assert store.certificates.get(cert.id) == cert
    assert store.cards.get(card.id) == card
    assert store.audit.list() == []


def test_state_change_without_from_state_is_unchecked_but_audited(store: Store):
    task, card = production(store)
    changed = store.cards.change_state(card.id, "Blocked", from_state=None, actor="helpdesk",
                                      action="change_state", reason="lost")
    assert changed.state == "Blocked" and store.cards.get(card.id).state == "Blocked"
    [event] = store.audit.list(object_id=card.id)
    assert event.object_type == CARD and event.detail == {"from": "Produced", "to": "Blocked", "reason": "lost"}
    assert task.id  # the card's task is untouched by card state changes
    assert store.tasks.get(task.id).state == TaskState.RUNNING


def test_c17_concurrent_state_changes_of_one_certificate_only_one_wins(store: Store):
    task, _card = production(store)
    cert = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def change(n: int) -> None:
        barrier.wait()
        try:
            store.certificates.change_state(cert.id, f"Target{n}", from_state=ISSUED, actor=f"worker{n}",
                                           action="change_state_in_ca", reason="keyCompromise")
            outcomes.append("ok")
        except StateConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=change, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["conflict"] * 5 + ["ok"]
    [event] = store.audit.list(object_id=cert.id)
    assert store.certificates.get(cert.id).state == event.detail["to"]


def test_audit_trail_lists_oldest_first_and_filters(store: Store):
    task, card = production(store)
    cert = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    e1 = store.audit.record("revoke_on_issue", CERTIFICATE, cert.id, "orchestrator",
                            {"ca_reason": "certificateHold"})
    e2 = store.audit.record("change_state_in_ca", CERTIFICATE, cert.id, "alice", {"ca_action": "removeFromCRL"})
    e3 = store.audit.record("recover", CARD, card.id, "bob", {"certificate": cert.id})
    store.certificates.change_state(cert.id, "Active", from_state=ISSUED, actor="orchestrator",
                                   action="handle_issued")

    assert e1.id < e2.id < e3.id and e1.detail == {"ca_reason": "certificateHold"}
    assert [e.action for e in store.audit.list()] == ["revoke_on_issue", "change_state_in_ca", "recover",
                                                      "handle_issued"]
    assert [e.id for e in store.audit.list(object_id=cert.id)][:2] == [e1.id, e2.id]
    assert store.audit.list(action="recover") == [e3]
    assert [e.action for e in store.audit.list(object_id=cert.id, limit=2)] == ["revoke_on_issue",
                                                                                "change_state_in_ca"]
    assert store.audit.record("sweep", CERTIFICATE, cert.id, "sweeper").detail == {}
    with pytest.raises(InvalidArgument):
        store.audit.record("", CERTIFICATE, cert.id, "x", {})


# -- relations on their own (C9) -------------------------------------------------------------

def test_c9_relation_added_before_task_end_survives_failure(store: Store):
    task, card = production(store)
    cert = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    [rel] = store.relations.add(task.id, [NewRelation(CARD, card.id, CERTIFICATE, cert.id, "HAS_A")])
    assert (rel.source_id, rel.target_id, rel.relation_type, rel.task_id) == (card.id, cert.id, "HAS_A", task.id)

    # The encoding fails afterwards; the failure passes the same relation again (tolerated).
    store.finish_task_failed(task.id, "CARD_REMOVED", "pulled",
                             relations=[NewRelation(CARD, card.id, CERTIFICATE, cert.id, "HAS_A")])

    assert store.relations.list(source_id=card.id) == [rel]
    assert store.cards.certificate_ids(card.id) == [cert.id]
    assert store.certificates.get(cert.id).state == ISSUED


def test_finish_succeeded_skips_relation_created_earlier(store: Store):
    task, card = production(store)
    a = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    b = store.store_issued_certificate(task.id, make_cert(), "EmployeeSign", "local", ISSUED)
    [early] = store.relations.add(task.id, [NewRelation(CARD, card.id, CERTIFICATE, a.id, "HAS_A")])

    store.finish_task_succeeded(task.id, ISSUED, {a.id: "Active", b.id: "Active"}, "Active",
                                [NewRelation(CARD, card.id, CERTIFICATE, a.id, "HAS_A"),
                                 NewRelation(CARD, card.id, CERTIFICATE, b.id, "HAS_A")])

    rels = store.relations.list(source_id=card.id)
    assert len(rels) == 2 and early in rels
    assert store.certificates.get(a.id).state == "Active"


def test_add_relations_is_idempotent(store: Store):
    task, card = production(store)
    a = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    b = store.store_issued_certificate(task.id, make_cert(), "EmployeeSign", "local", ISSUED)
    rel_a = NewRelation(CARD, card.id, CERTIFICATE, a.id, "HAS_A")

    first = store.relations.add(task.id, [rel_a])
    again = store.relations.add(task.id, [rel_a, NewRelation(CARD, card.id, CERTIFICATE, b.id, "HAS_A"), rel_a])
    assert again[0] == first[0] == again[2]
    assert again[1].target_id == b.id
    other_type = store.relations.add(None, [NewRelation(CARD, card.id, CERTIFICATE, a.id, "OWNS")])
    assert other_type[0].id != first[0].id and other_type[0].task_id is None
    assert len(store.relations.list()) == 3
    assert store.relations.add(task.id, []) == []

    with pytest.raises(NotFound, match="no Certificate"):
        store.relations.add(task.id, [NewRelation(CARD, card.id, CERTIFICATE, b.id, "X"),
                                      NewRelation(CARD, card.id, CERTIFICATE, "no-such-id", "X")])
    with pytest.raises(NotFound, match="no task"):
        store.relations.add("nope", [rel_a])
    assert len(store.relations.list()) == 3               # the failed call wrote nothing


def test_add_relations_concurrently_creates_one_relation(store: Store):
    task, card = production(store)
    cert = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    results, errors = [], []
    barrier = threading.Barrier(6)

    def add() -> None:
        barrier.wait()
        try:
            results.extend(store.relations.add(task.id, [NewRelation(CARD, card.id, CERTIFICATE, cert.id, "HAS_A")]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=add) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({r.id for r in results}) == 1 and len(results) == 6
    assert len(store.relations.list()) == 1


# -- archived keys (C7) --------------------------------------------------------------------

def test_archived_key_stored_with_certificate_atomically(store: Store):
    task = store.tasks.create("card_production", "gw1", "r1")
    der = make_cert(serial=0x5151)
    cert = store.store_issued_certificate(task.id, der, "EncryptionCert", "local", ISSUED,
                                          archived_key=WrappedKey("kek-2026", "AES-256-GCM", b"\x01wrapped"))
    key = store.archived_keys.get(cert.id)
    assert (key.certificate_id, key.kek_id, key.algorithm, key.wrapped_key) == (
        cert.id, "kek-2026", "AES-256-GCM", b"\x01wrapped")
    assert key.created_at == cert.created_at
    assert "wrapped" not in repr(key)                      # key material stays out of logs

    # The certificate fails (duplicate): its archive is not written either.
    with pytest.raises(AlreadyExists):
        store.store_issued_certificate(task.id, make_cert(serial=0x5151), "EncryptionCert", "local", ISSUED,
                                       archived_key=WrappedKey("kek-2026", "AES-256-GCM", b"\x02other"))
    # The archive is refused: the certificate is not stored either.
    bad_keys = (WrappedKey("kek", "AES-256-GCM", b""), WrappedKey("", "AES-256-GCM", b"x"),
                ("kek", "AES-256-GCM", b"x"))
    for bad in bad_keys:
        with pytest.raises(InvalidArgument):
            store.store_issued_certificate(task.id, make_cert(), "EncryptionCert", "local", ISSUED,
                                           archived_key=bad)   # type: ignore[arg-type]
    assert [c.id for c in store.certificates.list()] == [cert.id]
    with store._engine.connect() as conn:                  # no archive without its certificate and vice versa
        assert conn.scalar(select(func.count()).select_from(ArchivedKey)) == 1
        assert conn.scalar(select(func.count()).select_from(Certificate)) == 1


def test_archive_key_later_once_per_certificate(store: Store):
    task = store.tasks.create("card_production", "gw1", "r1")
    cert = store.store_issued_certificate(task.id, make_cert(), "EncryptionCert", "local", ISSUED)
    with pytest.raises(NotFound, match="no archived key"):
        store.archived_keys.get(cert.id)
    archived = store.archived_keys.add(cert.id, WrappedKey("kek-1", "AES-256-GCM", b"\xaa" * 48))
    assert store.archived_keys.get(cert.id) == archived
    with pytest.raises(AlreadyExists):
        store.archived_keys.add(cert.id, WrappedKey("kek-2", "AES-256-GCM", b"\xbb" * 48))
    assert store.archived_keys.get(cert.id).kek_id == "kek-1"
    with pytest.raises(NotFound, match="no certificate"):
        store.archived_keys.add("nope", WrappedKey("kek-1", "AES-256-GCM", b"\xaa"))
