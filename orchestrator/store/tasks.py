"""Tasks and their step journal."""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from orchestrator.store import paging
from orchestrator.store.models import Card, ProcessInstance, Task, TaskStep, utcnow
from orchestrator.store.paging import Keyset
from orchestrator.store.records import ProcessState, TaskRecord, TaskState, TaskStepRecord
from orchestrator.store.rows import check_process_running, new_id, process_facts, record, task_row
from orchestrator.store.sessions import Sessions
from shared.errors import InvalidArgument, NotFound, StateConflict, quoted

_TASK_OWNER_FOR_UPDATE = select(Task.owner).where(Task.id == bindparam("task_id")).with_for_update()
_CARD_EXISTS = select(Card.id).where(Card.id == bindparam("card_id"))
_INSERT_TASK = insert(Task)


class Tasks:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions
        steps = TaskStep.__table__
        insert = sessions.insert(steps)      # the values come with each execution
        self._journal_upsert = insert.on_conflict_do_update(
            index_elements=[steps.c.task_id, steps.c.step_number],
            set_={column: insert.excluded[column] for column in ("name", "state", "detail", "updated_at")},
        ).returning(*steps.columns)

    def create(self, type: str, gateway_id: str, reader_id: str, card_id: str | None = None, *,
               process_instance_id: str | None = None, task_index: int | None = None,
               owner: str | None = None, task_id: str | None = None) -> TaskRecord:
        """A new RUNNING task. card_id: the card a card operation works on (C8); a card
        production task gets its card from cards.create instead. process_instance_id: the
        RUNNING process instance the task is part of (StateConflict if it has ended);
        task_index: the task's position in it (not unique: a retried task repeats it).
        owner: the orchestrator instance running it; task_id: chosen by the caller (so it can
        register the run before the row exists, see the reconciler), else a new UUID."""
        if task_index is not None and task_index < 0:
            raise InvalidArgument(f"task_index must not be negative, not {task_index}")
        values: dict[str, Any] = {
            "id": task_id or new_id(), "type": type, "state": str(TaskState.RUNNING), "gateway_id": gateway_id,
            "reader_id": reader_id, "card_id": card_id, "error_reason": None, "error_message": None,
            "created_at": utcnow(), "finished_at": None, "process_instance_id": process_instance_id,
            "task_index": task_index, "owner": owner, "error_details": None}
        with self._db.write() as s:
            # Core statements built once: every card task starts here (no ORM unit of work).
            s.flush()           # a joined transaction's pending rows first, as autoflush would
            conn = s.connection()
            if card_id is not None and conn.execute(_CARD_EXISTS, {"card_id": card_id}).first() is None:
                raise NotFound(f"no card {quoted(card_id)}", card_id=card_id)
            if process_instance_id is not None:
                check_process_running(process_facts(s, process_instance_id))
            conn.execute(_INSERT_TASK, values)
        return TaskRecord(**values)

    def take_over(self, task_id: str, from_owner: str | None, to_owner: str) -> bool:
        """C16, takeover: claims the RUNNING task of FROM_OWNER (a replica whose heartbeat
        lapsed) for TO_OWNER, with its RUNNING process instance of the same owner, in one
        transaction of conditional UPDATEs (... WHERE owner = FROM_OWNER): of replicas claiming
        at once exactly one wins. True for the winner; False when the task has ended or another
        replica claimed it first (nothing written)."""
        if not to_owner:
            raise InvalidArgument("a takeover needs the new owner's id")
        def owned_by(column):
            return column.is_(None) if from_owner is None else column == from_owner
        with self._db.write() as s:
            claimed = s.execute(update(Task).where(Task.id == task_id, Task.state == TaskState.RUNNING,
                                                   owned_by(Task.owner)).values(owner=to_owner)
                                .returning(Task.process_instance_id)).first()
            if claimed is None:
                return False
            instance_id = claimed[0]
            if instance_id is not None:
                s.execute(update(ProcessInstance).where(ProcessInstance.id == instance_id,
                                                        ProcessInstance.state == ProcessState.RUNNING,
                                                        owned_by(ProcessInstance.owner))
                          .values(owner=to_owner, updated_at=utcnow()))
            return True

    def check_owner(self, task_id: str, owner: str) -> None:
        """Fencing (C16, takeover): StateConflict unless OWNER still runs the task. Joined to a
        card task's transactions (Store.together), with the task's row locked on PostgreSQL, so
        a replica that was only frozen, not dead, writes nothing once another took its task
        over: a claim waits for the transaction holding the lock, and the next one fails."""
        with self._db.write() as s:
            # Core on the session's connection, the statement built once: this runs in every
            # transaction of every card task.
            current = s.connection().execute(_TASK_OWNER_FOR_UPDATE, {"task_id": task_id}).scalar()
            if current is not None and current != owner:
                raise StateConflict(f"task {task_id} was taken over by {current}; {owner} no longer runs it",
                                    task_id=task_id, owner=current)

    def journal_step(self, task_id: str, step_number: int, name: str, state: str,
                     detail: str = "") -> TaskStepRecord:
        """Records where a task is (insert or overwrite the row of this step).

        One statement (an upsert returning the row), built once: it runs for every step of
        every card, so it stays cheap; the task's existence is checked by the foreign key."""
        now = utcnow()
        try:
            with self._db.write() as s:
                s.flush()           # a joined transaction's pending rows first, as autoflush would
                row = s.connection().execute(self._journal_upsert, {
                    "task_id": task_id, "step_number": step_number, "name": name, "state": state, "detail": detail,
                    "created_at": now, "updated_at": now}).one()
        except IntegrityError:
            raise NotFound(f"no task {task_id}", task_id=task_id) from None
        return record(TaskStepRecord, row)

    def get(self, task_id: str) -> TaskRecord:
        with self._db.read() as s:
            return record(TaskRecord, task_row(s, task_id))

    def steps(self, task_id: str) -> list[TaskStepRecord]:
        """The step journal of a task, by step number."""
        with self._db.read() as s:
            task_row(s, task_id)
            rows = s.scalars(select(TaskStep).where(TaskStep.task_id == task_id).order_by(TaskStep.step_number))
            return [record(TaskStepRecord, r) for r in rows]

    def ids_by_process(self, process_instance_ids: Collection[str]) -> dict[str, list[str]]:
        """The task ids of many process instances in one query (a page of a listing):
        instance id -> task ids in the order they ran (as list(process_instance_id=...))."""
        out: dict[str, list[str]] = {instance_id: [] for instance_id in process_instance_ids}
        if not out:
            return out
        q = paging.after(select(Task.process_instance_id, Task.id).where(Task.process_instance_id.in_(out)),
                         Task.created_at, Task.id, None)
        with self._db.read() as s:
            for instance_id, task_id in s.execute(q):
                if instance_id is not None:      # always: filtered on the instance ids
                    out[instance_id].append(task_id)
        return out

    def list(self, process_instance_id: str | None = None, state: TaskState | None = None, *,
             card_id: str | None = None, after: Keyset | None = None,
             limit: int | None = None) -> list[TaskRecord]:
        """Tasks, oldest first (so the tasks of a process instance come in the order they ran);
        after: the (created_at, id) of the last task of the previous page."""
        q = select(Task)
        if card_id is not None:
            q = q.where(Task.card_id == card_id)
        if process_instance_id is not None:
            q = q.where(Task.process_instance_id == process_instance_id)
        if state is not None:
            q = q.where(Task.state == state)
        q = paging.after(q, Task.created_at, Task.id, after)
        if limit is not None:
            q = q.limit(limit)
        with self._db.read() as s:
            return [record(TaskRecord, t) for t in s.scalars(q)]
