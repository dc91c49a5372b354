"""Contract of the store's per-aggregate parts, on SQLite and on PostgreSQL (the `store`
fixture of tests/support/store_ca.py builds one Store per backend; every test runs on each).

The parts' contracts live in three files, one suite each, run on both backends:
  test_store.py                  migrations; the facade's rule transactions C1-C3 (with
                                 cards, tasks and the step journal they use)
  test_store_processes_audit.py  processes, tasks.list, certificates.change_state and
                                 cards.change_state with their audit (C5), audit, relations
                                 (C9), archived keys (C7)
  test_c16_crash_consistency.py  ca_requests (C16) and the facade's settling of a request
This file holds what those do not: certificates.known, instances, the CA journal's refusals,
the state enums records hand out, and the typed records the store takes instead of tuples.
"""
from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError

from orchestrator.store import (
    CARD,
    CERTIFICATE,
    CaRequestState,
    NewRelation,
    ProcessState,
    Store,
    TaskState,
    WrappedKey,
)
from orchestrator.store.models import Card, ObjectRelation
from shared.errors import AlreadyExists, InvalidArgument, NotFound
from tests.integration.test_store import ISSUED, make_cert, production


def test_certificates_known_by_issuer_and_serial(store: Store):
    task, _card = production(store)
    der = make_cert(serial=0x4242)
    assert not store.certificates.known(der)
    store.store_issued_certificate(task.id, der, "EmployeeAuth", "local", ISSUED)
    assert store.certificates.known(der)
    assert store.certificates.known(make_cert(serial=0x4242))                 # same issuer and serial
    assert not store.certificates.known(make_cert(serial=0x4242, issuer_cn="Another CA"))
    with pytest.raises(InvalidArgument, match=r"not a DER X\.509 certificate"):
        store.certificates.known(b"not DER")


def test_instances_beat_upserts_one_heartbeat_per_instance(store: Store):
    assert store.instances.heartbeats() == {}
    before = dt.datetime.now(dt.UTC)
    store.instances.beat("orch-a")
    first = store.instances.heartbeats()["orch-a"]
    store.instances.beat("orch-b")
    store.instances.beat("orch-a")
    beats = store.instances.heartbeats()
    assert sorted(beats) == ["orch-a", "orch-b"]
    assert before <= first <= beats["orch-a"] and beats["orch-a"].tzinfo is not None
    with pytest.raises(InvalidArgument, match="needs an id"):
        store.instances.beat("")


def test_ca_requests_refuse_unknown_states_and_stored_without_its_certificate(store: Store):
    task, _card = production(store)
    rid = f"{task.id}:1:A"
    store.ca_requests.journal(rid, task.id, "local", "EmployeeAuth", b"csr")
    with pytest.raises(InvalidArgument, match="one of \\['pending', 'stored', 'written', 'not_issued'\\]"):
        store.ca_requests.mark(rid, "bogus")                  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="only with its certificate"):
        store.ca_requests.mark(rid, CaRequestState.STORED)
    with pytest.raises(InvalidArgument, match="unknown CA request state"):
        store.ca_requests.list(states=["bogus"])              # type: ignore[list-item]
    with pytest.raises(NotFound):
        store.ca_requests.mark("never-journaled", CaRequestState.NOT_ISSUED)
    with pytest.raises(InvalidArgument, match="non-empty bytes"):
        store.ca_requests.journal(f"{task.id}:2:A", task.id, "local", "EmployeeAuth", b"")
    assert store.ca_requests.get(rid).state == CaRequestState.PENDING
    assert [r.request_id for r in store.ca_requests.list(task_id=task.id)] == [rid]


def test_records_hand_out_state_enums_equal_to_the_stored_strings(store: Store):
    instance = store.processes.create("produce", {})
    task = store.tasks.create("card_production", "gw1", "r1", process_instance_id=instance.id)
    store.ca_requests.journal(f"{task.id}:1:A", task.id, "local", "EmployeeAuth", b"csr")
    written = (store.tasks.get(task.id), store.processes.get(instance.id), store.ca_requests.get(f"{task.id}:1:A"))
    assert [type(r.state) for r in written] == [TaskState, ProcessState, CaRequestState]
    assert [r.state for r in written] == ["RUNNING", "RUNNING", "pending"]
    done = store.processes.finish(instance.id, "SUCCEEDED")   # type: ignore[arg-type]  # a plain string is taken too
    assert done.state is ProcessState.SUCCEEDED
    assert [t.id for t in store.tasks.list(state=TaskState.RUNNING)] == [task.id]
    assert [p.id for p in store.processes.list(state=ProcessState.SUCCEEDED)] == [instance.id]


def test_relations_and_archived_keys_take_typed_records_not_tuples(store: Store):
    task, card = production(store)
    cert = store.store_issued_certificate(task.id, make_cert(), "EmployeeAuth", "local", ISSUED)
    positional = (CARD, card.id, CERTIFICATE, cert.id, "HAS_A")
    with pytest.raises(InvalidArgument, match="NewRelation"):
        store.relations.add(task.id, [positional])             # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match="NewRelation"):
        store.finish_task_succeeded(task.id, ISSUED, {cert.id: "Active"}, None, [positional])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument, match="WrappedKey"):
        store.archived_keys.add(cert.id, ("kek", "AES-256-GCM", b"x"))  # type: ignore[arg-type]
    with store._engine.connect() as conn:                      # nothing written by the refusals
        assert conn.scalar(select(func.count()).select_from(ObjectRelation)) == 0
    assert store.tasks.get(task.id).state == TaskState.RUNNING
    [rel] = store.relations.add(task.id, [NewRelation(*positional)])
    assert (rel.source_id, rel.target_id, rel.relation_type) == (card.id, cert.id, "HAS_A")
    key = store.archived_keys.add(cert.id, WrappedKey("kek", "AES-256-GCM", b"\x01wrapped"))
    assert (key.kek_id, key.algorithm, key.wrapped_key) == ("kek", "AES-256-GCM", b"\x01wrapped")
    assert "wrapped" not in repr(WrappedKey("kek", "AES-256-GCM", b"\x01wrapped"))


# --- one physical card, one live card object (docs/lifecycle.md) ----------------------------------

def _card_of(store: Store, identity: str | None, *, take_over: bool = False):
    task = store.tasks.create("card_production", "gw1", "r1")
    return store.cards.create(task.id, serial="9f3a", template="EmployeeCard", state="InProduction",
                              gateway_id="gw1", reader_id="r1", identity=identity, take_over=take_over)


def test_a_card_with_a_live_card_object_is_refused_in_the_same_transaction(store: Store):
    first = _card_of(store, "pkcs11:9f3a")
    assert (first.identity, first.live) == ("pkcs11:9f3a", True)
    with pytest.raises(AlreadyExists) as err:
        _card_of(store, "pkcs11:9f3a")
    assert "pkcs11:9f3a" in err.value.message and first.id in err.value.message
    live = store.cards.live("pkcs11:9f3a")
    assert live is not None and live.id == first.id
    # Nothing half-written: the refused task has no card, and only one card object exists.
    assert sum(1 for t in store.tasks.list() if t.card_id) == 1
    assert _card_of(store, None).identity is None and _card_of(store, None).live is False   # unbound cards


def test_the_database_itself_refuses_a_second_live_card_object(store: Store):
    first = _card_of(store, "pkcs11:beef")
    with store._engine.begin() as conn, pytest.raises(IntegrityError):
        conn.execute(insert(Card).values(id="another", serial="beef", template="EmployeeCard", state="Active",
                                         gateway_id="gw1", reader_id="r1", created_at=first.created_at,
                                         updated_at=first.created_at, identity="pkcs11:beef",
                                         live_identity="pkcs11:beef"))


def test_a_final_state_or_a_reissue_frees_the_card(store: Store):
    store.cards.final_states = {"EmployeeCard": frozenset({"Retired"})}
    first = _card_of(store, "pkcs11:c0de")
    store.cards.change_state(first.id, "Active", from_state=None, actor="op", action="change_state")
    assert store.cards.get(first.id).live                       # not final: still holds the card
    store.cards.change_state(first.id, "Retired", from_state=None, actor="op", action="change_state")
    assert not store.cards.get(first.id).live and store.cards.live("pkcs11:c0de") is None
    second = _card_of(store, "pkcs11:c0de")
    third = _card_of(store, "pkcs11:c0de", take_over=True)
    live = store.cards.live("pkcs11:c0de")
    assert live is not None and live.id == third.id and not store.cards.get(second.id).live
    [event] = store.audit.list(object_id=second.id, action="card_taken_over")
    assert event.detail["by_card"] == third.id
