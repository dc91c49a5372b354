"""Process instances: one run of a process definition and its process map."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select

from orchestrator.store.models import ProcessInstance, utcnow
from orchestrator.store.records import ProcessInstanceRecord, ProcessState
from orchestrator.store.rows import check_process_running, json_object, new_id, process_record, process_row
from orchestrator.store.sessions import Sessions
from shared.errors import InvalidArgument


class ProcessInstances:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions

    def create(self, definition: str, process_map: Mapping[str, Any], *,
               owner: str | None = None, instance_id: str | None = None) -> ProcessInstanceRecord:
        """A new RUNNING instance of the process `definition` with its initial process map
        (string keys, JSON values - e.g. ProcessMap.to_dict(); secrets never belong here).
        owner: the orchestrator instance running it; instance_id: chosen by the caller (so it
        can register the run before the row exists, see the reconciler), else a new UUID."""
        if not definition:
            raise InvalidArgument("a process instance needs its definition's name")
        text_map = json_object(process_map, "process map")
        with self._db.write() as s:
            now = utcnow()
            row = ProcessInstance(id=instance_id or new_id(), definition=definition, state=ProcessState.RUNNING,
                                  process_map=text_map, created_at=now, updated_at=now, owner=owner)
            s.add(row)
            s.flush()
            return process_record(row)

    def update_map(self, instance_id: str, process_map: Mapping[str, Any]) -> ProcessInstanceRecord:
        """Replaces the whole process map of a RUNNING instance (StateConflict once it ended)."""
        text_map = json_object(process_map, "process map")
        with self._db.write() as s:
            row = process_row(s, instance_id, lock=True)
            check_process_running(row)
            row.process_map = text_map
            row.updated_at = utcnow()
            s.flush()
            return process_record(row)

    def finish(self, instance_id: str, state: ProcessState, error_reason: str | None = None,
               error_message: str | None = None,
               process_map: Mapping[str, Any] | None = None) -> ProcessInstanceRecord:
        """Ends a RUNNING instance in SUCCEEDED or FAILED, exactly once (StateConflict
        otherwise), with its error and, if given, its final process map."""
        final = [p for p in ProcessState if p.final]
        if state not in final:
            raise InvalidArgument(f"a process instance ends in one of {[str(p) for p in final]}, not {state!r}")
        text_map = None if process_map is None else json_object(process_map, "process map")
        with self._db.write() as s:
            row = process_row(s, instance_id, lock=True)
            check_process_running(row)
            now = utcnow()
            row.state = state
            row.error_reason = error_reason
            row.error_message = error_message
            if text_map is not None:
                row.process_map = text_map
            row.updated_at = row.finished_at = now
            s.flush()
            return process_record(row)

    def get(self, instance_id: str) -> ProcessInstanceRecord:
        with self._db.read() as s:
            return process_record(process_row(s, instance_id))

    def list(self, state: ProcessState | None = None, definition: str | None = None,
             limit: int | None = None) -> list[ProcessInstanceRecord]:
        """Newest first."""
        q = select(ProcessInstance)
        if state is not None:
            q = q.where(ProcessInstance.state == state)
        if definition is not None:
            q = q.where(ProcessInstance.definition == definition)
        q = q.order_by(ProcessInstance.created_at.desc(), ProcessInstance.id.desc())
        if limit is not None:
            q = q.limit(limit)
        with self._db.read() as s:
            return [process_record(r) for r in s.scalars(q)]
