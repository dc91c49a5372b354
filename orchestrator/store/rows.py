"""Row-level helpers the store's parts share inside one session: look-ups that raise the
store's errors, records from rows, JSON columns, the audit row and the relation insert."""
from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, astuple, fields
from typing import Any, TypeVar

from sqlalchemy import bindparam, event, insert, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from orchestrator.domain.audit_chain import CHAINED_FIELDS, GENESIS, canonical, link_hash
from orchestrator.store.models import (
    AuditEvent,
    Card,
    CaRequest,
    Certificate,
    ObjectRelation,
    ProcessInstance,
    Task,
    utcnow,
)
from orchestrator.store.records import (
    CARD,
    CERTIFICATE,
    TASK,
    AuditRecord,
    AuditSubjects,
    NewRelation,
    ProcessInstanceRecord,
    ProcessState,
    TaskState,
    WrappedKey,
    certificate_subject,
)
from shared.errors import InvalidArgument, NotFound, StateConflict, quoted

R = TypeVar("R")
# Audit rows a transaction has queued (session.info key) and the PostgreSQL advisory lock
# that serialises appends to the chain (an arbitrary constant, "audt").
_PENDING_AUDIT = "cardline_pending_audit"
_PG_AUDIT_CHAIN_LOCK = 0x61756474


def record(cls: type[R], obj: Any) -> R:
    return cls(**{f.name: getattr(obj, f.name) for f in fields(cls)})  # type: ignore[arg-type]


def new_id() -> str:
    return str(uuid.uuid4())


def json_object(value: Mapping[str, Any] | None, what: str) -> str:
    """JSON text of a mapping with string keys and JSON values; InvalidArgument otherwise."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{what} must be a mapping, not {type(value).__name__}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise InvalidArgument(f"{what}: keys must be strings, not {bad!r}")
    try:
        return json.dumps(dict(value), allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{what} is not JSON: {exc}") from None


def process_record(row: ProcessInstance) -> ProcessInstanceRecord:
    values = {f.name: getattr(row, f.name) for f in fields(ProcessInstanceRecord)}
    values["process_map"] = json.loads(row.process_map)
    return ProcessInstanceRecord(**values)


def audit_record(row: AuditEvent) -> AuditRecord:
    values = {f.name: getattr(row, f.name) for f in fields(AuditRecord)}
    values["detail"] = json.loads(row.detail)
    values["certificates"] = tuple(json.loads(row.certificates or "[]"))
    return AuditRecord(**values)


# -- tasks and process instances ------------------------------------------------------------

def task_row(session: Session, task_id: str) -> Task:
    task = session.get(Task, task_id)
    if task is None:
        raise NotFound(f"no task {quoted(task_id)}", task_id=task_id)
    return task


def task_facts(session: Session, task_id: str) -> Any:
    """The task's id, state and error (a row with those attributes), read without loading the
    ORM object: for the hot path's checks that only need these. NotFound as task_row."""
    session.flush()         # the transaction's pending rows first, as autoflush would
    facts = session.connection().execute(_TASK_FACTS, {"task_id": task_id}).first()
    if facts is None:
        raise NotFound(f"no task {quoted(task_id)}", task_id=task_id)
    return facts


_TASK_FACTS = select(Task.id, Task.state, Task.error_reason, Task.error_message).where(Task.id == bindparam("task_id"))


def running_task_facts(session: Session, task_id: str) -> Any:
    """The RUNNING task's id, state and card_id (a row with those attributes), read without
    loading the ORM object (a card's creation, a task's end). NotFound; StateConflict when the
    task has ended."""
    session.flush()         # the transaction's pending rows first, as autoflush would
    task = session.connection().execute(_RUNNING_TASK_FACTS, {"task_id": task_id}).first()
    if task is None:
        raise NotFound(f"no task {quoted(task_id)}", task_id=task_id)
    if task.state != TaskState.RUNNING:
        raise StateConflict(f"task {task_id} is already {task.state}", task_id=task_id, state=task.state)
    return task


# FOR UPDATE (PostgreSQL) serialises the finishes of one task across replicas; SQLite ignores
# it and is serialised by BEGIN IMMEDIATE.
_RUNNING_TASK_FACTS = select(Task.id, Task.state, Task.card_id).where(Task.id == bindparam("task_id")).with_for_update()


def process_row(session: Session, instance_id: str, *, lock: bool = False) -> ProcessInstance:
    q = select(ProcessInstance).where(ProcessInstance.id == instance_id)
    row = session.scalar(q.with_for_update() if lock else q)
    if row is None:
        raise NotFound(f"no process instance {quoted(instance_id)}", process_instance_id=instance_id)
    return row


def process_facts(session: Session, instance_id: str) -> Any:
    """The process instance's id and state (a row with those attributes), read without loading
    the ORM object (a card task's start checks it). NotFound as process_row."""
    session.flush()         # the transaction's pending rows first, as autoflush would
    facts = session.connection().execute(_PROCESS_FACTS, {"instance_id": instance_id}).first()
    if facts is None:
        raise NotFound(f"no process instance {quoted(instance_id)}", process_instance_id=instance_id)
    return facts


_PROCESS_FACTS = select(ProcessInstance.id, ProcessInstance.state).where(ProcessInstance.id == bindparam("instance_id"))


def check_process_running(row: Any) -> None:
    # row: a ProcessInstance or its process_facts
    if row.state != ProcessState.RUNNING:
        raise StateConflict(f"process instance {row.id} is already {row.state}",
                            process_instance_id=row.id, state=row.state)


def card_row(session: Session, card_id: str, *, lock: bool = False) -> Card:
    card = session.scalar(select(Card).where(Card.id == card_id).with_for_update()) if lock \
        else session.get(Card, card_id)
    if card is None:
        raise NotFound(f"no card {quoted(card_id)}", card_id=card_id)
    return card


def certificate_row(session: Session, certificate_id: str, *, lock: bool = False) -> Certificate:
    cert = session.scalar(select(Certificate).where(Certificate.id == certificate_id).with_for_update()) if lock \
        else session.get(Certificate, certificate_id)
    if cert is None:
        raise NotFound(f"no certificate {quoted(certificate_id)}", certificate_id=certificate_id)
    return cert


def ca_request_facts(session: Session, request_id: str, task_id: str | None = None) -> Any:
    """The journaled CA request's request_id, task_id, state and certificate_id (a row with
    those attributes), locked, read without loading the ORM object (a card stores each of its
    certificates against one). NotFound if it was never journaled; InvalidArgument if it is
    another task's."""
    # FOR UPDATE (PostgreSQL): a live run and the reconciler settling one request queue
    # up here; SQLite writers are serial anyway.
    session.flush()         # the transaction's pending rows first, as autoflush would
    row = session.connection().execute(_CA_REQUEST_FACTS, {"request_id": request_id}).first()
    if row is None:
        raise NotFound(f"no journaled CA request {quoted(request_id)}", request_id=request_id)
    if task_id is not None and row.task_id != task_id:
        raise InvalidArgument(f"CA request {request_id} belongs to task {row.task_id}, not {task_id}",
                              request_id=request_id)
    return row


_CA_REQUEST_FACTS = select(CaRequest.request_id, CaRequest.task_id, CaRequest.state, CaRequest.certificate_id).where(
    CaRequest.request_id == bindparam("request_id")).with_for_update()


# -- audit and state changes (C5) -----------------------------------------------------------

def add_audit(session: Session, action: str, object_type: str, object_id: str, actor: str,
              detail: Mapping[str, Any] | None, at: dt.datetime,
              subjects: AuditSubjects | None = None) -> AuditEvent:
    """Queues an audit row in this transaction; it is chained and inserted when the
    transaction commits (append_audit), so that rows are chained in the order they commit."""
    if not action or not actor or not object_type or not object_id:
        raise InvalidArgument("an audit event needs action, actor, object_type and object_id")
    where = subjects or AuditSubjects()
    bad = [c for c in where.certificates if not isinstance(c, Mapping) or not c.get("id")]
    if bad:
        raise InvalidArgument(f"audit certificates need an id each, not {bad!r}")
    row = AuditEvent(at=at, actor=actor, action=action, object_type=object_type, object_id=object_id,
                     detail=json_object(detail, "audit detail"),
                     card_id=where.card_id or (object_id if object_type == CARD else None),
                     task_id=where.task_id or (object_id if object_type == TASK else None),
                     gateway_id=where.gateway_id, reader_id=where.reader_id, step=where.step,
                     certificates=json.dumps([dict(c) for c in where.certificates], separators=(",", ":"))
                     if where.certificates else None)
    session.info.setdefault(_PENDING_AUDIT, []).append(row)
    return row


def append_audit(session: Session) -> None:
    """Chains the audit rows this transaction queued after the newest chained row and inserts
    them (docs/audit.md). PostgreSQL: an advisory lock held to the commit serialises appends
    across connections and replicas; SQLite: writers are serial anyway (BEGIN IMMEDIATE).
    Runs at commit (the event below), after every other lock the transaction took."""
    pending: list[AuditEvent] = session.info.pop(_PENDING_AUDIT, [])
    if not pending:
        return
    # The transaction's other changes first, so the chain's lock is still taken after every
    # other lock. Then Core statements on the session's connection (built once, compiled
    # once): this runs in nearly every transaction, and the ORM's unit of work per audit row
    # cost more than SQLite's work.
    session.flush()
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK_AUDIT_CHAIN, {"k": _PG_AUDIT_CHAIN_LOCK})
    prev = conn.execute(_AUDIT_HEAD).scalar() or GENESIS
    for row in pending:
        row.prev_hash = prev
        row.hash = prev = link_hash(prev, canonical(chained_fields(row)))
        # One at a time: ids in chain order. The row object stays outside the session; it
        # gets its id for the caller's record (Audit.record).
        inserted = conn.execute(_INSERT_AUDIT, {c: getattr(row, c) for c in _AUDIT_INSERT_COLUMNS})
        key = inserted.inserted_primary_key
        assert key is not None       # an INSERT of one row
        row.id = key[0]


_LOCK_AUDIT_CHAIN = text("SELECT pg_advisory_xact_lock(:k)")
_AUDIT_HEAD = select(AuditEvent.hash).where(AuditEvent.hash.is_not(None)).order_by(AuditEvent.id.desc()).limit(1)
_AUDIT_INSERT_COLUMNS = tuple(c.key for c in AuditEvent.__table__.columns if c.key != "id")
_INSERT_AUDIT = insert(AuditEvent)


def chained_fields(row: AuditEvent) -> dict[str, Any]:
    """The row's values the chain covers (CHAINED_FIELDS), JSON columns parsed."""
    values = {name: getattr(row, name) for name in CHAINED_FIELDS}
    values["detail"] = json.loads(row.detail) if row.detail else {}
    values["certificates"] = json.loads(row.certificates) if row.certificates else []
    return values


@event.listens_for(Session, "before_commit")
def _chain_pending_audit(session: Session) -> None:
    append_audit(session)


def change_state(session: Session, row: Card | Certificate, object_type: str, to_state: str,
                 from_state: str | None, actor: str, action: str, reason: str | None,
                 detail: Mapping[str, Any] | None) -> None:
    """Sets row.state and writes its audit event; StateConflict if the row is not in from_state."""
    if not to_state:
        raise InvalidArgument(f"{object_type} {row.id}: the target state must not be empty")
    if from_state is not None and row.state != from_state:
        raise StateConflict(f"{object_type} {row.id} is in state {row.state!r}, not {from_state!r}; "
                            f"not changed to {to_state!r}", object_id=row.id, state=row.state,
                            expected_state=from_state)
    now = utcnow()
    audit = {**(detail or {}), "from": row.state, "to": to_state, "reason": reason}
    row.state = to_state
    row.updated_at = now
    subjects = AuditSubjects(certificates=(certificate_subject(row.id, row.ca_name, row.serial_hex),)) \
        if isinstance(row, Certificate) else None
    add_audit(session, action, object_type, row.id, actor, audit, now, subjects)
    session.flush()


# -- archived keys (C7) ---------------------------------------------------------------------

def check_wrapped_key(key: WrappedKey) -> None:
    if not isinstance(key, WrappedKey):
        raise InvalidArgument(f"an archived key must be a WrappedKey, not {type(key).__name__}")
    if not key.kek_id or not key.algorithm:
        raise InvalidArgument("an archived key needs its kek_id and algorithm")
    if not isinstance(key.wrapped_key, (bytes, bytearray, memoryview)) or not bytes(key.wrapped_key):
        raise InvalidArgument("an archived key needs the wrapped (encrypted) key as non-empty bytes")


# -- relations (C9) -------------------------------------------------------------------------

def relation_key(rel: NewRelation) -> tuple[Any, ...]:
    return (ObjectRelation.source_type == rel.source_type, ObjectRelation.source_id == rel.source_id,
            ObjectRelation.target_type == rel.target_type, ObjectRelation.target_id == rel.target_id,
            ObjectRelation.relation_type == rel.relation_type)


def new_relations(relations: Iterable[NewRelation]) -> list[NewRelation]:
    out = list(relations)
    wrong = [r for r in out if not isinstance(r, NewRelation)]
    if wrong:
        raise InvalidArgument(f"relations must be NewRelation records, not {type(wrong[0]).__name__}")
    return out


def check_relation_ends(session: Session, rel: NewRelation) -> None:
    session.flush()         # the transaction's pending rows first, as autoflush would
    conn = session.connection()
    for kind, obj_id in ((rel.source_type, rel.source_id), (rel.target_type, rel.target_id)):
        exists = _RELATION_END_EXISTS.get(kind)          # ends of other types are not checked
        if exists is not None and conn.execute(exists, {"id": obj_id}).first() is None:
            raise NotFound(f"relation {astuple(rel)}: no {kind} {quoted(obj_id)}")


# Built once: a card's end checks the ends of each of its relations.
_RELATION_END_EXISTS = {kind: select(model.id).where(model.id == bindparam("id"))
                        for kind, model in ((CARD, Card), (CERTIFICATE, Certificate))}


def insert_relation(session: Session, task_id: str | None, rel: NewRelation, now: dt.datetime) -> None:
    """INSERT ... ON CONFLICT DO NOTHING: an existing relation (also one a concurrent
    transaction just committed) stays as it is, and the transaction goes on. The statement
    is built once per dialect; the values come with each execution."""
    session.flush()         # the transaction's pending rows first, as autoflush would
    conn = session.connection()
    conn.execute(_INSERT_RELATION[conn.dialect.name == "postgresql"],
                 {"id": new_id(), "task_id": task_id, "created_at": now, **asdict(rel)})


_INSERT_RELATION = {postgres: (postgresql.insert if postgres else sqlite.insert)(ObjectRelation).on_conflict_do_nothing(
    index_elements=[ObjectRelation.source_type, ObjectRelation.source_id, ObjectRelation.target_type,
                    ObjectRelation.target_id, ObjectRelation.relation_type]) for postgres in (False, True)}
