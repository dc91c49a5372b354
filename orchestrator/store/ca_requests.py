"""The CA request journal (C16): a request is journaled before the CA is called; the Store's
store_issued_certificate settles it with its certificate; the card write and the reconciler
move it on from there."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import bindparam, select, update

from orchestrator.store import paging
from orchestrator.store.models import CaRequest, utcnow
from orchestrator.store.paging import Keyset
from orchestrator.store.records import CaRequestRecord, CaRequestState
from orchestrator.store.rows import record, task_facts
from orchestrator.store.sessions import Sessions
from shared.errors import AlreadyExists, InvalidArgument, NotFound, StateConflict, quoted

_STATES = [str(state) for state in CaRequestState]
# FOR UPDATE (PostgreSQL): a live run and the reconciler moving one request queue up here.
_STATE_FOR_UPDATE = select(CaRequest.state).where(CaRequest.request_id == bindparam("request_id")).with_for_update()
_MOVE = update(CaRequest).where(CaRequest.request_id == bindparam("moved_request")).values(
    state=bindparam("state"), updated_at=bindparam("updated_at")).returning(*CaRequest.__table__.columns)
_MOVE_WITH_ERROR = _MOVE.values(error=bindparam("error"))

# Moves `mark` allows: to -> states it may come from (the same state again is a no-op
# retry). STORED is reached only with the certificate (Store.store_issued_certificate).
_MOVES = {
    CaRequestState.PENDING: (CaRequestState.PENDING,),          # records a problem in `error`, stays unsettled
    CaRequestState.WRITTEN: (CaRequestState.STORED, CaRequestState.WRITTEN),
    CaRequestState.NOT_ISSUED: (CaRequestState.PENDING, CaRequestState.NOT_ISSUED),
}


class CaRequests:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions
        # Built once (one per card's certificate): the values come with each execution.
        requests = CaRequest.__table__
        self._insert_new = sessions.insert(requests).on_conflict_do_nothing(index_elements=[requests.c.request_id])

    def journal(self, request_id: str, task_id: str, ca_name: str, template: str,
                csr_der: bytes) -> CaRequestRecord:
        """C16: records a request about to be sent to CA `ca_name` (commit BEFORE calling the
        CA: alone, or with a card task's waiting writes, Store.together). request_id is the
        idempotency key the CA sees. A second call with the same request_id returns the row
        journaled first, whatever its state (AlreadyExists if it belongs to another task).
        NotFound if the task does not exist."""
        if not request_id or not ca_name or not template:
            raise InvalidArgument("a CA request needs its request_id, CA name and certificate template")
        if not isinstance(csr_der, (bytes, bytearray, memoryview)) or not bytes(csr_der):
            raise InvalidArgument("a CA request needs the certificate request (DER) as non-empty bytes")
        with self._db.write() as s:
            task_facts(s, task_id)
            now = utcnow()
            values: dict[str, Any] = {
                "request_id": request_id, "task_id": task_id, "ca_name": ca_name, "template": template,
                "csr_der": bytes(csr_der), "state": str(CaRequestState.PENDING), "created_at": now, "updated_at": now}
            if s.connection().execute(self._insert_new, values).rowcount == 1:
                # Journaled now: the record is what was written, not read back (one card's
                # certificate, once per card).
                return CaRequestRecord(**values, serial_hex=None, certificate_id=None, error=None)
            row = s.get(CaRequest, request_id, populate_existing=True)   # journaled before
            assert row is not None
            if row.task_id != task_id:
                raise AlreadyExists(f"CA request {request_id} is journaled for task {row.task_id}, not {task_id}",
                                    request_id=request_id)
            return record(CaRequestRecord, row)

    def mark(self, request_id: str, state: CaRequestState, error: str | None = None) -> CaRequestRecord:
        """Advances a journaled CA request: WRITTEN once its certificate is on the card
        (from STORED), NOT_ISSUED when the CA issued nothing for it (from PENDING), or
        PENDING again with `error` saying why it is still unsettled. StateConflict for any
        other move (nothing written); InvalidArgument for STORED (store_issued_certificate
        does that, with the certificate) or an unknown state."""
        if state not in _STATES:
            raise InvalidArgument(f"a CA request is in one of {_STATES}, not {quoted(state)}")
        state = CaRequestState(state)
        if state == CaRequestState.STORED:
            raise InvalidArgument("a CA request becomes stored only with its certificate "
                                  "(store_issued_certificate(request_id=...))")
        with self._db.write() as s:
            # Core, the statements built once: a card marks each of its certificates written.
            s.flush()           # a joined transaction's pending rows first, as autoflush would
            conn = s.connection()
            current = conn.execute(_STATE_FOR_UPDATE, {"request_id": request_id}).scalar()
            if current is None:
                raise NotFound(f"no journaled CA request {quoted(request_id)}", request_id=request_id)
            if current not in _MOVES[state]:
                raise StateConflict(f"CA request {request_id} is {current}; it cannot become {state}",
                                    request_id=request_id, state=current)
            # A request written keeps the error its reconciliation last recorded, unless given one.
            keeps_error = error is None and state == CaRequestState.WRITTEN
            row = conn.execute(_MOVE if keeps_error else _MOVE_WITH_ERROR, {
                "moved_request": request_id, "state": str(state), "error": error, "updated_at": utcnow()}).one()
            return record(CaRequestRecord, row)

    def get(self, request_id: str) -> CaRequestRecord:
        with self._db.read() as s:
            row = s.get(CaRequest, request_id)
            if row is None:
                raise NotFound(f"no journaled CA request {quoted(request_id)}", request_id=request_id)
            return record(CaRequestRecord, row)

    def list(self, states: Iterable[CaRequestState] | None = None,
             task_id: str | None = None, *, after: Keyset | None = None,
             limit: int | None = None) -> list[CaRequestRecord]:
        """Journaled CA requests, oldest first; states: only those in these states (e.g.
        [CaRequestState.PENDING]: the unsettled ones); after: the (created_at, request_id)
        of the last request of the previous page."""
        q = select(CaRequest)
        if states is not None:
            states = list(states)
            unknown = sorted(set(states) - set(_STATES))
            if unknown:
                raise InvalidArgument(f"unknown CA request state(s) {unknown}; known: {_STATES}")
            q = q.where(CaRequest.state.in_(states))
        if task_id is not None:
            q = q.where(CaRequest.task_id == task_id)
        q = paging.after(q, CaRequest.created_at, CaRequest.request_id, after)
        if limit is not None:
            q = q.limit(limit)
        with self._db.read() as s:
            return [record(CaRequestRecord, r) for r in s.scalars(q)]
