"""Client request ids: what the first call of a creating RPC created, so that a retry with
the same id gets it back instead of creating a second one (docs/api.md)."""
from __future__ import annotations

import hashlib

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from orchestrator.store.models import ClientRequest, utcnow
from orchestrator.store.sessions import Sessions
from shared.errors import AlreadyExists, InvalidArgument, quoted
from shared.limits import MAX_REQUEST_ID_CHARS as MAX_REQUEST_ID


def fingerprint(*parts: object) -> str:
    """A digest of what a request asks for (never of its secrets: leave those out)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def claim_in(s: Session, kind: str, request_id: str, resource_id: str, print_: str) -> str:
    """Within the caller's write transaction: records that `request_id` creates
    `resource_id`, or returns the resource the first call with this id created.
    AlreadyExists if the id was first used for a different request."""
    if len(request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID} characters", field="request_id")
    # Insert-or-keep in one statement: two concurrent first calls cannot both win.
    insert = postgresql.insert if s.get_bind().dialect.name == "postgresql" else sqlite.insert
    s.execute(insert(ClientRequest).values(
        kind=kind, request_id=request_id, resource_id=resource_id, fingerprint=print_, created_at=utcnow(),
    ).on_conflict_do_nothing(index_elements=[ClientRequest.kind, ClientRequest.request_id]))
    row = s.get(ClientRequest, (kind, request_id), populate_existing=True)
    assert row is not None
    if row.fingerprint != print_:
        raise AlreadyExists(f"request_id {quoted(request_id)} was already used for a different {kind} request "
                            f"(which created {row.resource_id})", request_id=request_id)
    return row.resource_id


class ClientRequests:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions

    def claim(self, kind: str, request_id: str, resource_id: str, print_: str) -> str:
        """One transaction of claim_in: `resource_id` if this call is the first with the id
        (go on and create it), else the id of what the first call created."""
        with self._db.write() as s:
            return claim_in(s, kind, request_id, resource_id, print_)

    def release(self, kind: str, request_id: str, resource_id: str) -> None:
        """Forgets a claim whose call failed before it created `resource_id`, so that the
        client's retry with the same id tries again instead of waiting for nothing."""
        with self._db.write() as s:
            s.execute(delete(ClientRequest).where(ClientRequest.kind == kind, ClientRequest.request_id == request_id,
                                                  ClientRequest.resource_id == resource_id))

    def find(self, kind: str, request_id: str) -> str | None:
        """The resource a request id created, None if none (or its claim was released)."""
        with self._db.read() as s:
            row = s.get(ClientRequest, (kind, request_id))
            return None if row is None else row.resource_id
