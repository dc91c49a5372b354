"""Rule C16, the reconciler settles what a crash leaves half-done, without an operator, on a
real store (SQLite and PostgreSQL) and a real LocalCa:
- a process instance whose tasks all finished ends consistently with them;
- a certificate whose CA status (revoked, held, hold lifted) disagrees with the store after an
  interrupted handling is moved to the state the handling meant;
each fix audited (action "reconcile"), and a second round has nothing to do.

The crash inside a handling is the process dying right after the CA acted: a CA wrapper
raises `ProcessDied` (a BaseException, which no handler catches) once the CA has done its
part, so nothing after the CA call runs - as after a SIGKILL."""
from __future__ import annotations

import pytest

from orchestrator.ca import LocalCa
from orchestrator.services.certificates import CertificateService
from orchestrator.services.handling_intents import AUDIT_CA_INTENT_SETTLED, open_intents
from orchestrator.services.reconciler import Reconciler
from orchestrator.store import Store
from orchestrator.store.records import ProcessState, TaskState
from tests.integration.test_certificate_handling import (  # noqa: F401
    AUTH,
    ISSUED,
    LAB,
    active,
    crl,
    graphs,
    issue,
    production,
)

ME = "orchestrator-test-me"


class ProcessDied(BaseException):
    """The orchestrator died here: no except clause of the code under test runs."""


class DyingAfterTheCa:
    """LocalCa that acts (revoke, lift a hold) and then the process dies."""

    def __init__(self, inner: LocalCa) -> None:
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def revoke(self, serial: int, reason: str) -> None:
        self._inner.revoke(serial, reason)
        raise ProcessDied

    def lift_hold(self, serial: int) -> None:
        self._inner.lift_hold(serial)
        raise ProcessDied


def _service(store, ca, graphs) -> CertificateService:  # noqa: F811
    of_template = {AUTH: "EmployeeCertificate", LAB: "Lab"}
    return CertificateService(store, {ca.name: ca}, graphs, lambda t: graphs[of_template[t]],
                              internal_issued_state=ISSUED)


def _reconciler(store, local_ca, task_count=None) -> Reconciler:
    return Reconciler(store, {local_ca.name: local_ca}, ISSUED, owner_id=ME,
                      card_failed_state=lambda template: "ProductionFailed",
                      process_task_count=lambda name: task_count)


def _reconcile_audits(store, action: str) -> list:
    return [a for a in store.audit.list(action="reconcile") if a.detail.get("action") == action]


# -- process instances ------------------------------------------------------------------------

def _instance_with_task(store: Store, task_state: str | None, task_index: int = 0):
    instance = store.processes.create("produce-employee-card", {"person": "Alice"}, owner=ME)
    task = store.tasks.create("card_production", "gw1", "r1", owner=ME, process_instance_id=instance.id,
                             task_index=task_index)
    card = store.cards.create(task.id, "0815", "EmployeeCard", "InProduction", "gw1", "r1")
    if task_state == "SUCCEEDED":
        store.finish_task_succeeded(task.id, ISSUED, {}, card_state="Active")
    elif task_state == "FAILED":
        store.finish_task_failed(task.id, "CARD_REMOVED", "the card left the reader", "ProductionFailed")
    return instance, task, card


def test_c16_instance_whose_last_task_succeeded_is_finished_succeeded(store: Store, local_ca):
    instance, task, card = _instance_with_task(store, "SUCCEEDED")   # killed before the instance's end
    report = _reconciler(store, local_ca, task_count=1).reconcile_once()
    assert report.tasks_ended == 1
    ended = store.processes.get(instance.id)
    assert (ended.state, ended.error_reason) == (ProcessState.SUCCEEDED, None)
    assert store.cards.get(card.id).state == "Active"
    [audit] = _reconcile_audits(store, "end_orphaned_process")
    assert audit.detail["state"] == ProcessState.SUCCEEDED and audit.detail["following_task"] == task.id
    assert _reconciler(store, local_ca, task_count=1).reconcile_once().tasks_ended == 0


def test_c16_instance_with_steps_left_after_its_task_fails_as_restarted(store: Store, local_ca):
    instance, _task, _card = _instance_with_task(store, "SUCCEEDED")
    _reconciler(store, local_ca, task_count=2).reconcile_once()       # a second task never ran
    ended = store.processes.get(instance.id)
    assert (ended.state, ended.error_reason) == (ProcessState.FAILED, "ORCHESTRATOR_RESTARTED")


def test_c16_instance_follows_its_failed_task_and_a_running_task_ends_first(store: Store, local_ca):
    failed, _t, _c = _instance_with_task(store, "FAILED")
    running, task, card = _instance_with_task(store, None)
    _reconciler(store, local_ca, task_count=1).reconcile_once()
    assert (store.processes.get(failed.id).state,
            store.processes.get(failed.id).error_reason) == (ProcessState.FAILED, "CARD_REMOVED")
    # Its task was RUNNING: ended first (ORCHESTRATOR_RESTARTED), the instance follows it.
    assert store.tasks.get(task.id).state == TaskState.FAILED
    ended = store.processes.get(running.id)
    assert (ended.state, ended.error_reason) == (ProcessState.FAILED, "ORCHESTRATOR_RESTARTED")
    assert store.cards.get(card.id).state == "ProductionFailed"


# -- interrupted certificate handlings --------------------------------------------------------

def _failed_production_certificate(store: Store, ca: LocalCa):
    task, _card = production(store)
    cert = issue(store, ca, task.id)
    store.finish_task_failed(task.id, "CARD_REMOVED", "gone", "ProductionFailed")
    return cert


def test_c16_handle_issued_killed_after_the_revocation_is_finished_by_the_reconciler(store, local_ca, graphs):  # noqa: F811
    cert = _failed_production_certificate(store, local_ca)
    dying = _service(store, DyingAfterTheCa(local_ca), graphs)
    with pytest.raises(ProcessDied):
        dying.handle_issued([cert.id], revoke_reason="cessationOfOperation", target_state="Retired",
                            transition_reason="cardDestroyed", actor="sweeper")
    assert crl(local_ca) == {cert.serial: "cessationOfOperation"}
    assert store.certificates.get(cert.id).state == ISSUED             # CA and store disagree

    report = _reconciler(store, local_ca).reconcile_once()
    assert report.handlings_finished == 1
    assert store.certificates.get(cert.id).state == "Retired"          # what the handling meant
    moves = _reconcile_audits(store, "finish_interrupted_handling")
    assert [(a.detail["from"], a.detail["to"]) for a in moves] == [(ISSUED, "Active"), ("Active", "Retired")]
    assert {a.detail["ca_status"] for a in moves} == {"cessationOfOperation"}
    assert open_intents(store) == []
    assert _reconciler(store, local_ca).reconcile_once().handlings_finished == 0


def test_c16_handling_killed_between_its_two_moves_is_finished_from_where_it_stopped(store, local_ca, graphs):  # noqa: F811
    cert = _failed_production_certificate(store, local_ca)
    service = _service(store, local_ca, graphs)
    service.handle_issued([cert.id], revoke_reason="cessationOfOperation", target_state="Retired",
                          transition_reason="cardDestroyed", actor="sweeper")
    # Rewind the store to "after the first move" (as if killed before the second) and
    # reopen the intent: what a kill between the moves leaves.
    with store._engine.begin() as conn:
        from sqlalchemy import delete, update

        from orchestrator.store.models import AuditEvent, Certificate
        conn.execute(update(Certificate).where(Certificate.id == cert.id).values(state="Active"))
        conn.execute(delete(AuditEvent).where(AuditEvent.action == AUDIT_CA_INTENT_SETTLED))
    _reconciler(store, local_ca).reconcile_once()
    assert store.certificates.get(cert.id).state == "Retired"
    [move] = _reconcile_audits(store, "finish_interrupted_handling")
    assert (move.detail["from"], move.detail["to"]) == ("Active", "Retired")


def test_c16_change_state_in_ca_killed_after_the_hold_and_after_lifting_it(store, local_ca, graphs):  # noqa: F811
    cert = active(store, local_ca, LAB)
    dying = _service(store, DyingAfterTheCa(local_ca), graphs)
    with pytest.raises(ProcessDied):
        dying.change_state_in_ca(cert.id, "Suspended", actor="alice")
    assert crl(local_ca) == {cert.serial: "certificateHold"} and store.certificates.get(cert.id).state == "Valid"
    _reconciler(store, local_ca).reconcile_once()
    assert store.certificates.get(cert.id).state == "Suspended"

    with pytest.raises(ProcessDied):
        dying.change_state_in_ca(cert.id, "Valid", actor="alice")     # lifting the hold
    assert crl(local_ca) == {} and store.certificates.get(cert.id).state == "Suspended"
    assert _reconciler(store, local_ca).reconcile_once().handlings_finished == 1
    assert store.certificates.get(cert.id).state == "Valid"
    assert len(_reconcile_audits(store, "finish_interrupted_handling")) == 2


def test_c16_handling_killed_before_the_ca_acted_changes_nothing(store, local_ca, graphs):  # noqa: F811
    cert = _failed_production_certificate(store, local_ca)

    class DyingBeforeTheCa(DyingAfterTheCa):
        def revoke(self, serial: int, reason: str) -> None:
            raise ProcessDied

    with pytest.raises(ProcessDied):
        _service(store, DyingBeforeTheCa(local_ca), graphs).handle_issued(
            [cert.id], revoke_reason="cessationOfOperation", target_state="Retired",
            transition_reason="cardDestroyed", actor="sweeper")
    assert _reconciler(store, local_ca).reconcile_once().handlings_finished == 0
    assert store.certificates.get(cert.id).state == ISSUED and crl(local_ca) == {}
    assert open_intents(store) == []                                  # settled: the CA did not act
    [settled] = store.audit.list(action=AUDIT_CA_INTENT_SETTLED)
    assert "did not act" in settled.detail["outcome"]


def test_c16_a_live_handling_is_left_alone(store, local_ca, graphs):  # noqa: F811
    cert = _failed_production_certificate(store, local_ca)
    dying = _service(store, DyingAfterTheCa(local_ca), graphs)
    with pytest.raises(ProcessDied):
        dying.handle_issued([cert.id], revoke_reason="keyCompromise", target_state="Retired",
                            transition_reason="cardDestroyed", actor="sweeper")
    live = Reconciler(store, {local_ca.name: local_ca}, ISSUED, owner_id=ME, live_handlings=lambda: {cert.id})
    assert live.reconcile_once().handlings_finished == 0
    assert store.certificates.get(cert.id).state == ISSUED and len(open_intents(store)) == 1
