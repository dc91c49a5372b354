"""Process instances: one run of a process definition and its process map."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.store import paging
from orchestrator.store.client_requests import claim_in
from orchestrator.store.models import ProcessInstance, utcnow
from orchestrator.store.paging import Keyset
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
            return process_record(self._add(s, definition, text_map, owner, instance_id or new_id()))

    def create_once(self, definition: str, process_map: Mapping[str, Any], request_id: str, fingerprint: str, *,
                    owner: str | None = None, instance_id: str | None = None) -> tuple[ProcessInstanceRecord, bool]:
        """create() for a StartProcess with a client-chosen request id: in the same
        transaction, the id is recorded with the new instance, or, on a retry, the instance
        the first call created is returned. Returns the instance and whether this call
        created it; AlreadyExists if the id was used for a different request (fingerprint)."""
        if not definition:
            raise InvalidArgument("a process instance needs its definition's name")
        text_map = json_object(process_map, "process map")
        with self._db.write() as s:
            new = instance_id or new_id()
            first = claim_in(s, "process_instance", request_id, new, fingerprint)
            if first != new:
                return process_record(process_row(s, first)), False
            return process_record(self._add(s, definition, text_map, owner, new)), True

    @staticmethod
    def _add(s: Session, definition: str, text_map: str, owner: str | None, instance_id: str) -> ProcessInstance:
        now = utcnow()
        row = ProcessInstance(id=instance_id, definition=definition, state=ProcessState.RUNNING,
                              process_map=text_map, created_at=now, updated_at=now, owner=owner)
        s.add(row)
        s.flush()
        return row

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
             limit: int | None = None, after: Keyset | None = None) -> list[ProcessInstanceRecord]:
        """Newest first; after: the (created_at, id) of the last instance of the previous page."""
        q = select(ProcessInstance)
        if state is not None:
            q = q.where(ProcessInstance.state == state)
        if definition is not None:
            q = q.where(ProcessInstance.definition == definition)
        q = paging.after(q, ProcessInstance.created_at, ProcessInstance.id, after, newest_first=True)
        if limit is not None:
            q = q.limit(limit)
        with self._db.read() as s:
            return [process_record(r) for r in s.scalars(q)]
