"""The store's process instances, audited state changes (C5, C17), standalone relations (C9)
and archived keys (C7), on SQLite and PostgreSQL."""
from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import func, select

from orchestrator.store import (CARD, CERTIFICATE, PROCESS_FAILED, PROCESS_RUNNING, PROCESS_SUCCEEDED,
                                TASK_FAILED, TASK_RUNNING, NewRelation, StateConflict, Store, TaskRecord)
from orchestrator.store.models import ArchivedKey, Certificate
from shared.errors import AlreadyExists, InvalidArgument, NotFound
from tests.integration.test_store import ISSUED, make_cert, production

DESCRIPTOR = {"type": "Certificate", "template": "EmployeeAuth", "id": "0b9e5c1e-7f1d-4d7b-9d2a-6c1f0e2b3a4d"}


# -- process instances ---------------------------------------------------------------------

def test_process_map_round_trips_json(store: Store):
    process_map = {"person": "Zoë Müller", "count": 3, "ratio": 0.5, "ok": True, "none": None,
                   "theGeneratedCertificate": DESCRIPTOR, "list": [1, "two", [3.0], {"k": []}]}
    created = store.create_process_instance("produce-employee-card", process_map)

    assert created.state == PROCESS_RUNNING and created.definition == "produce-employee-card"
    assert created.finished_at is None and created.created_at == created.updated_at
    assert created.created_at.utcoffset() == dt.timedelta(0)
    assert created.process_map == process_map
    got = store.get_process_instance(created.id)
    assert got == created and got.process_map == process_map
    assert list(got.process_map) == list(process_map)          # order of the variables kept
    got.process_map["person"] = "changed behind the store's back"
    assert store.get_process_instance(created.id).process_map["person"] == "Zoë Müller"

    updated = store.update_process_map(created.id, {**process_map, "count": 4})
    assert updated.process_map["count"] == 4 and updated.updated_at >= created.updated_at
    assert store.get_process_instance(created.id).process_map["count"] == 4


def test_process_map_that_is_not_json_is_refused(store: Store):
    for bad in ({"when": dt.datetime.now(dt.timezone.utc)}, {1: "int key"}, {"x": float("nan")},
                {"b": b"bytes"}, ["not", "a", "dict"]):
        with pytest.raises(InvalidArgument):
            store.create_process_instance("p", bad)   # type: ignore[arg-type]
    assert store.list_process_instances() == []
    instance = store.create_process_instance("p", {})
    with pytest.raises(InvalidArgument):
        store.update_process_map(instance.id, {"s": {1, 2}})
    assert store.get_process_instance(instance.id).process_map == {}


def test_process_instance_finishes_exactly_once_from_running(store: Store):
    instance = store.create_process_instance("produce-employee-card", {"person": "alice"})
    failed = store.finish_process_instance(instance.id, PROCESS_FAILED, error_reason="CARD_REMOVED",
                                           error_message="card pulled", process_map={"person": "alice", "n": 1})
    assert failed.state == PROCESS_FAILED and failed.finished_at is not None
    assert (failed.error_reason, failed.error_message) == ("CARD_REMOVED", "card pulled")
    assert failed.process_map == {"person": "alice", "n": 1}
    assert store.get_process_instance(instance.id) == failed

    with pytest.raises(StateConflict, match="already FAILED"):
        store.finish_process_instance(instance.id, PROCESS_SUCCEEDED)
    with pytest.raises(StateConflict, match="already FAILED"):
        store.update_process_map(instance.id, {"late": True})
    with pytest.raises(StateConflict, match="already FAILED"):
        store.create_task("card_operation", "gw1", "r1", process_instance_id=instance.id)
    assert store.get_process_instance(instance.id) == failed

    other = store.create_process_instance("produce-employee-card", {"person": "bob"})
    with pytest.raises(InvalidArgument, match="ends in one of"):
        store.finish_process_instance(other.id, PROCESS_RUNNING)
    done = store.finish_process_instance(other.id, PROCESS_SUCCEEDED)
    assert done.process_map == {"person": "bob"}            # kept when no final map is given
    assert done.error_reason is None

    for call in (lambda: store.get_process_instance("nope"),
                 lambda: store.update_process_map("nope", {}),
                 lambda: store.finish_process_instance("nope", PROCESS_SUCCEEDED),
                 lambda: store.create_task("card_operation", "g", "r", process_instance_id="nope")):
        with pytest.raises(NotFound):
            call()


def test_process_instances_listed_newest_first_with_filters(store: Store):
    a = store.create_process_instance("produce", {})
    b = store.create_process_instance("operate", {})
    c = store.create_process_instance("produce", {})
    store.finish_process_instance(a.id, PROCESS_SUCCEEDED)

    def ids(**kw):
        return [p.id for p in store.list_process_instances(**kw)]

    assert ids() == [c.id, b.id, a.id]
    assert ids(definition="produce") == [c.id, a.id]
    assert ids(state=PROCESS_RUNNING) == [c.id, b.id]
    assert ids(state=PROCESS_SUCCEEDED, definition="produce") == [a.id]
    assert ids(limit=2) == [c.id, b.id]


def test_tasks_belong_to_a_process_instance_in_order(store: Store):
    instance = store.create_process_instance("produce-employee-card", {})
    first = store.create_task("card_production", "gw1", "r1", process_instance_id=instance.id, task_index=0)
    second = store.create_task("handle_issued", "gw1", "r1", None, process_instance_id=instance.id, task_index=1)
    lone = store.create_task("card_operation", "gw2", "r2")         # the positional signature still works

    assert (first.process_instance_id, first.task_index) == (instance.id, 0)
    assert store.get_task(second.id) == second and second.task_index == 1
    assert (lone.process_instance_id, lone.task_index) == (None, None)
    assert [t.id for t in store.list_tasks(process_instance_id=instance.id)] == [first.id, second.id]
    store.finish_task_failed(first.id, "CARD_IO", "reader gone")
    assert [t.id for t in store.list_tasks(state=TASK_RUNNING)] == [second.id, lone.id]
    assert [t.id for t in store.list_tasks(process_instance_id=instance.id, state=TASK_FAILED)] == [first.id]
    assert [t.id for t in store.list_tasks()] == [first.id, second.id, lone.id]
    with pytest.raises(InvalidArgument, match="negative"):
        store.create_task("card_operation", "gw1", "r1", process_instance_id=instance.id, task_index=-1)


def test_task_record_built_the_old_way_still_works():
    now = dt.datetime.now(dt.timezone.utc)
    record = TaskRecord("id", "card_operation", TASK_RUNNING, "gw", "r", None, None, None, now, None)
    assert (record.process_instance_id, record.task_index) == (None, None)


def test_certificates_of_a_process_instance(store: Store):
    instance = store.create_process_instance("produce-employee-card", {})
    t1, _card = production(store)
    store_task = store.create_task("card_operation", "gw1", "r1", process_instance_id=instance.id, task_index=0)
    t2 = store.create_task("card_operation", "gw2", "r2", process_instance_id=instance.id, task_index=1)
    a = store.store_issued_certificate(store_task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    b = store.store_issued_certificate(t2.id, make_cert(), "EmployeeSign", "local", ISSUED)
    store.store_issued_certificate(t1.id, make_cert(), "EmployeeAuth", "local", ISSUED)   # other process

    def ids(**kw):
        return [c.id for c in store.list_certificates(**kw)]

    assert ids(process_instance_id=instance.id) == [a.id, b.id]
    assert ids(process_instance_id=instance.id, template="EmployeeSign") == [b.id]
    assert ids(process_instance_id=instance.id, gateway_id="gw2") == [b.id]
    assert ids(process_instance_id="nope") == []


# -- audited state changes (C5, C17) -------------------------------------------------------

def test_c5_state_change_is_audited_in_same_transaction(store: Store):
    task, _card = production(store)
    cert = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    store.finish_task_failed(task.id, "CARD_REMOVED", "pulled")

    changed = store.change_certificate_state(cert.id, "Revoked", from_state=ISSUED, actor="sweeper",
                                             action="sweep", reason="cessationOfOperation",
                                             detail={"grace_period_s": 3600})

    assert changed.state == "Revoked" and changed.updated_at > cert.updated_at
    assert store.get_certificate(cert.id) == changed
    [event] = store.list_audit(object_id=cert.id)
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
        store.change_certificate_state(cert.id, "Hold", from_state="Active", actor="op", action="change_state")
    assert err.value.metadata["state"] == ISSUED and err.value.metadata["expected_state"] == "Active"
    with pytest.raises(StateConflict, match="in state 'Produced', not 'Active'"):
        store.change_card_state(card.id, "Blocked", from_state="Active", actor="op", action="change_state")
    with pytest.raises(NotFound):
        store.change_certificate_state("nope", "Hold", from_state=None, actor="op", action="change_state")
    with pytest.raises(NotFound):
        store.change_card_state("nope", "Blocked", from_state=None, actor="op", action="change_state")
    # A bad audit event rolls the state change back too.
    with pytest.raises(InvalidArgument):
        store.change_certificate_state(cert.id, "Hold", from_state=ISSUED, actor="", action="change_state")
    with pytest.raises(InvalidArgument):
        store.change_certificate_state(cert.id, "Hold", from_state=ISSUED, actor="op", action="change_state",
                                       detail={"when": dt.datetime.now(dt.timezone.utc)})

    assert store.get_certificate(cert.id) == cert
    assert store.get_card(card.id) == card
    assert store.list_audit() == []


def test_state_change_without_from_state_is_unchecked_but_audited(store: Store):
    task, card = production(store)
    changed = store.change_card_state(card.id, "Blocked", from_state=None, actor="helpdesk",
                                      action="change_state", reason="lost")
    assert changed.state == "Blocked" and store.get_card(card.id).state == "Blocked"
    [event] = store.list_audit(object_id=card.id)
    assert event.object_type == CARD and event.detail == {"from": "Produced", "to": "Blocked", "reason": "lost"}
    assert task.id  # the card's task is untouched by card state changes
    assert store.get_task(task.id).state == TASK_RUNNING


def test_c17_concurrent_state_changes_of_one_certificate_only_one_wins(store: Store):
    task, _card = production(store)
    cert = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def change(n: int) -> None:
        barrier.wait()
        try:
            store.change_certificate_state(cert.id, f"Target{n}", from_state=ISSUED, actor=f"worker{n}",
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
    [event] = store.list_audit(object_id=cert.id)
    assert store.get_certificate(cert.id).state == event.detail["to"]


def test_audit_trail_lists_oldest_first_and_filters(store: Store):
    task, card = production(store)
    cert = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    e1 = store.record_audit("revoke_on_issue", CERTIFICATE, cert.id, "orchestrator",
                            {"ca_reason": "certificateHold"})
    e2 = store.record_audit("change_state_in_ca", CERTIFICATE, cert.id, "alice", {"ca_action": "removeFromCRL"})
    e3 = store.record_audit("recover", CARD, card.id, "bob", {"certificate": cert.id})
    store.change_certificate_state(cert.id, "Active", from_state=ISSUED, actor="orchestrator",
                                   action="handle_issued")

    assert e1.id < e2.id < e3.id and e1.detail == {"ca_reason": "certificateHold"}
    assert [e.action for e in store.list_audit()] == ["revoke_on_issue", "change_state_in_ca", "recover",
                                                      "handle_issued"]
    assert [e.id for e in store.list_audit(object_id=cert.id)][:2] == [e1.id, e2.id]
    assert store.list_audit(action="recover") == [e3]
    assert [e.action for e in store.list_audit(object_id=cert.id, limit=2)] == ["revoke_on_issue",
                                                                                "change_state_in_ca"]
    assert store.record_audit("sweep", CERTIFICATE, cert.id, "sweeper").detail == {}
    with pytest.raises(InvalidArgument):
        store.record_audit("", CERTIFICATE, cert.id, "x", {})


# -- relations on their own (C9) -------------------------------------------------------------

def test_c9_relation_added_before_task_end_survives_failure(store: Store):
    task, card = production(store)
    cert = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    [rel] = store.add_relations(task.id, [NewRelation(CARD, card.id, CERTIFICATE, cert.id, "HAS_A")])
    assert (rel.source_id, rel.target_id, rel.relation_type, rel.task_id) == (card.id, cert.id, "HAS_A", task.id)

    # The encoding fails afterwards; the failure passes the same relation again (tolerated).
    store.finish_task_failed(task.id, "CARD_REMOVED", "pulled",
                             relations=[(CARD, card.id, CERTIFICATE, cert.id, "HAS_A")])

    assert store.list_relations(source_id=card.id) == [rel]
    assert store.certificate_ids_of_card(card.id) == [cert.id]
    assert store.get_certificate(cert.id).state == ISSUED


def test_finish_succeeded_skips_relation_created_earlier(store: Store):
    task, card = production(store)
    a = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    b = store.store_issued_certificate(task.id, make_cert(), "EmployeeSign", "local", ISSUED)
    [early] = store.add_relations(task.id, [(CARD, card.id, CERTIFICATE, a.id, "HAS_A")])

    store.finish_task_succeeded(task.id, ISSUED, {a.id: "Active", b.id: "Active"}, "Active",
                                [(CARD, card.id, CERTIFICATE, a.id, "HAS_A"),
                                 (CARD, card.id, CERTIFICATE, b.id, "HAS_A")])

    rels = store.list_relations(source_id=card.id)
    assert len(rels) == 2 and early in rels
    assert store.get_certificate(a.id).state == "Active"


def test_add_relations_is_idempotent(store: Store):
    task, card = production(store)
    a = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    b = store.store_issued_certificate(task.id, make_cert(), "EmployeeSign", "local", ISSUED)
    rel_a = (CARD, card.id, CERTIFICATE, a.id, "HAS_A")

    first = store.add_relations(task.id, [rel_a])
    again = store.add_relations(task.id, [rel_a, (CARD, card.id, CERTIFICATE, b.id, "HAS_A"), rel_a])
    assert again[0] == first[0] == again[2]
    assert again[1].target_id == b.id
    other_type = store.add_relations(None, [(CARD, card.id, CERTIFICATE, a.id, "OWNS")])
    assert other_type[0].id != first[0].id and other_type[0].task_id is None
    assert len(store.list_relations()) == 3
    assert store.add_relations(task.id, []) == []

    with pytest.raises(NotFound, match="no Certificate"):
        store.add_relations(task.id, [(CARD, card.id, CERTIFICATE, b.id, "X"),
                                      (CARD, card.id, CERTIFICATE, "no-such-id", "X")])
    with pytest.raises(NotFound, match="no task"):
        store.add_relations("nope", [rel_a])
    assert len(store.list_relations()) == 3               # the failed call wrote nothing


def test_add_relations_concurrently_creates_one_relation(store: Store):
    task, card = production(store)
    cert = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    results, errors = [], []
    barrier = threading.Barrier(6)

    def add() -> None:
        barrier.wait()
        try:
            results.extend(store.add_relations(task.id, [(CARD, card.id, CERTIFICATE, cert.id, "HAS_A")]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({r.id for r in results}) == 1 and len(results) == 6
    assert len(store.list_relations()) == 1


# -- archived keys (C7) --------------------------------------------------------------------

def test_archived_key_stored_with_certificate_atomically(store: Store):
    task = store.create_task("card_production", "gw1", "r1")
    der = make_cert(serial=0x5151)
    cert = store.store_issued_certificate(task.id, der, "EncryptionCert", "local", ISSUED,
                                          archived_key=("kek-2026", "AES-256-GCM", b"\x01wrapped"))
    key = store.get_archived_key(cert.id)
    assert (key.certificate_id, key.kek_id, key.algorithm, key.wrapped_key) == (
        cert.id, "kek-2026", "AES-256-GCM", b"\x01wrapped")
    assert key.created_at == cert.created_at
    assert "wrapped" not in repr(key)                      # key material stays out of logs

    # The certificate fails (duplicate): its archive is not written either.
    with pytest.raises(AlreadyExists):
        store.store_issued_certificate(task.id, make_cert(serial=0x5151), "EncryptionCert", "local", ISSUED,
                                       archived_key=("kek-2026", "AES-256-GCM", b"\x02other"))
    # The archive is refused: the certificate is not stored either.
    for bad in (("kek", "AES-256-GCM", b""), ("", "AES-256-GCM", b"x"), ("kek", "AES-256-GCM")):
        with pytest.raises(InvalidArgument):
            store.store_issued_certificate(task.id, make_cert(), "EncryptionCert", "local", ISSUED,
                                           archived_key=bad)   # type: ignore[arg-type]
    assert [c.id for c in store.list_certificates()] == [cert.id]
    with store._engine.connect() as conn:                  # no archive without its certificate and vice versa
        assert conn.scalar(select(func.count()).select_from(ArchivedKey)) == 1
        assert conn.scalar(select(func.count()).select_from(Certificate)) == 1


def test_archive_key_later_once_per_certificate(store: Store):
    task = store.create_task("card_production", "gw1", "r1")
    cert = store.store_issued_certificate(task.id, make_cert(), "EncryptionCert", "local", ISSUED)
    with pytest.raises(NotFound, match="no archived key"):
        store.get_archived_key(cert.id)
    archived = store.archive_key(cert.id, "kek-1", "AES-256-GCM", b"\xaa" * 48)
    assert store.get_archived_key(cert.id) == archived
    with pytest.raises(AlreadyExists):
        store.archive_key(cert.id, "kek-2", "AES-256-GCM", b"\xbb" * 48)
    assert store.get_archived_key(cert.id).kek_id == "kek-1"
    with pytest.raises(NotFound, match="no certificate"):
        store.archive_key("nope", "kek-1", "AES-256-GCM", b"\xaa")
