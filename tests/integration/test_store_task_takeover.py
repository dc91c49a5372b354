"""The store's part of the C16 takeover (docs/rules.md), on SQLite and on PostgreSQL: replicas
claiming a lapsed replica's task at once — exactly one wins, and its process instance moves
with it; the replica that lost its task writes nothing more (fencing); a running instance's
sealed secret inputs are kept until it ends."""
from __future__ import annotations

import threading
from functools import partial

import pytest

from orchestrator.store import ProcessState, Store, TaskState
from shared.errors import StateConflict

DEAD, REPLICAS = "orchestrator-dead", [f"orchestrator-{n}" for n in range(8)]


def _running_task(store: Store):
    instance = store.processes.create("produce-employee-card", {"person": "P"}, owner=DEAD)
    task = store.tasks.create("card_production", "gw1", "r1", process_instance_id=instance.id, task_index=0,
                              owner=DEAD)
    return instance, task


def test_takeover_claims_from_eight_replicas_at_once_one_wins_with_the_process_instance(store: Store):
    instance, task = _running_task(store)
    barrier = threading.Barrier(len(REPLICAS))
    won: dict[str, bool] = {}

    def claim(replica: str) -> None:
        barrier.wait()
        won[replica] = store.tasks.take_over(task.id, DEAD, replica)

    threads = [threading.Thread(target=claim, args=(r,)) for r in REPLICAS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [r for r, w in won.items() if w]
    assert len(won) == len(REPLICAS) and len(winners) == 1, won
    assert store.tasks.get(task.id).owner == winners[0]
    assert store.processes.get(instance.id).owner == winners[0]
    # Claimed already: a later claim from the dead owner finds nothing.
    assert not store.tasks.take_over(task.id, DEAD, "orchestrator-late")


def test_takeover_claims_no_ended_task(store: Store):
    _instance, task = _running_task(store)
    store.finish_task_failed(task.id, "ORCHESTRATOR_RESTARTED", "ended")
    assert not store.tasks.take_over(task.id, DEAD, REPLICAS[0])
    assert store.tasks.get(task.id).state == TaskState.FAILED and store.tasks.get(task.id).owner == DEAD


def test_takeover_fences_the_replica_that_lost_its_task(store: Store):
    _instance, task = _running_task(store)
    store.together(partial(store.tasks.journal_step, task.id, 1, "read_card_info", "sent"),
                   partial(store.tasks.check_owner, task.id, DEAD))
    assert store.tasks.take_over(task.id, DEAD, REPLICAS[0])
    # The frozen replica wakes up: its next transaction (a journal entry, the task's end) is
    # refused whole.
    with pytest.raises(StateConflict, match="taken over by orchestrator-0"):
        store.together(partial(store.tasks.journal_step, task.id, 2, "set_pins", "sent"),
                       partial(store.tasks.check_owner, task.id, DEAD),
                       partial(store.finish_task_failed, task.id, "GATEWAY_NOT_CONNECTED", "gone"))
    assert [s.step_number for s in store.tasks.steps(task.id)] == [1]
    assert store.tasks.get(task.id).state == TaskState.RUNNING
    store.tasks.check_owner(task.id, REPLICAS[0])       # the new owner writes on


def test_process_secrets_are_kept_sealed_until_the_instance_ends(store: Store):
    instance, _task = _running_task(store)
    store.process_secrets.put(instance.id, "kek-1", "AES-256-GCM", b"\x01sealed")
    store.process_secrets.put(instance.id, "kek-1", "AES-256-GCM", b"\x02retry")     # a retried start: the first stay
    kept = store.process_secrets.find(instance.id)
    assert kept is not None and kept.sealed == b"\x01sealed" and kept.kek_id == "kek-1"
    assert store.process_secrets.drop_ended() == 0          # still running
    store.processes.finish(instance.id, ProcessState.FAILED, "X", "y")
    assert store.process_secrets.drop_ended() == 1
    assert store.process_secrets.find(instance.id) is None
