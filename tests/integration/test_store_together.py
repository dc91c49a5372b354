"""Store.together: several store methods in ONE transaction (what a card task uses to commit a
write with the next one that must be durable, services/card_tasks.py), on SQLite and on
PostgreSQL (the `store` fixture of tests/support/store_ca.py)."""
from __future__ import annotations

from functools import partial

import pytest

from orchestrator.store import CaRequestState, Store, TaskState
from orchestrator.store.records import TASK
from shared.errors import NotFound, StateConflict
from tests.integration.test_store import ISSUED, make_cert


def test_together_commits_every_call_and_returns_their_results_in_order(store: Store):
    task, step, audit = store.together(
        partial(store.tasks.create, "card_production", "gw1", "r1", task_id="task-together"),
        partial(store.tasks.journal_step, "task-together", 1, "read_card_info", "sent"),
        partial(store.audit.record, "task_started", TASK, "task-together", "card_task"))
    assert (task.id, step.step_number, audit.object_id) == ("task-together", 1, "task-together")
    assert store.tasks.get(task.id).state == TaskState.RUNNING
    assert [s.name for s in store.tasks.steps(task.id)] == ["read_card_info"]
    assert [a.action for a in store.audit.list(object_id=task.id)] == ["task_started"]
    assert store.audit.verify().intact


def test_together_writes_nothing_when_one_call_fails(store: Store):
    """All or nothing: the task row, its journal entry and audit written before the failing
    call are rolled back with it, and its error is the one raised."""
    with pytest.raises(NotFound, match="no card"):
        store.together(
            partial(store.tasks.create, "card_production", "gw1", "r1", task_id="task-lost"),
            partial(store.tasks.journal_step, "task-lost", 1, "read_card_info", "sent"),
            partial(store.tasks.create, "card_operation", "gw1", "r1", "no-such-card"),
            partial(store.audit.record, "task_started", TASK, "task-lost", "card_task"))
    with pytest.raises(NotFound):
        store.tasks.get("task-lost")
    assert store.audit.list(object_id="task-lost") == []
    # The store works on after the rollback.
    assert store.tasks.create("card_production", "gw1", "r1").state == TaskState.RUNNING


def test_together_calls_see_what_the_calls_before_them_wrote(store: Store):
    """A certificate stored with its request journaled earlier in the same transaction, the
    request marked written after it: the C16 moves of one card task, in one commit."""
    task = store.tasks.create("card_production", "gw1", "r1")
    der = make_cert()
    journaled, stored, marked = store.together(
        partial(store.ca_requests.journal, f"{task.id}:2:auth", task.id, "local", "EmployeeAuthentication", b"csr"),
        partial(store.store_issued_certificate, task.id, der, "EmployeeAuthentication", "local", ISSUED,
                request_id=f"{task.id}:2:auth"),
        partial(store.ca_requests.mark, f"{task.id}:2:auth", CaRequestState.WRITTEN))
    assert journaled.state == CaRequestState.PENDING
    assert marked.state == CaRequestState.WRITTEN and marked.certificate_id == stored.id
    assert store.ca_requests.get(f"{task.id}:2:auth").state == CaRequestState.WRITTEN


def test_together_refuses_a_move_the_store_refuses_alone(store: Store):
    """The rules of each call hold inside together: a request cannot be marked written before
    its certificate is stored, and the journal row written before that refusal is not kept."""
    task = store.tasks.create("card_production", "gw1", "r1")
    with pytest.raises(StateConflict, match="cannot become written"):
        store.together(
            partial(store.ca_requests.journal, f"{task.id}:2:auth", task.id, "local", "EmployeeAuthentication",
                    b"csr"),
            partial(store.ca_requests.mark, f"{task.id}:2:auth", CaRequestState.WRITTEN))
    with pytest.raises(NotFound):
        store.ca_requests.get(f"{task.id}:2:auth")
