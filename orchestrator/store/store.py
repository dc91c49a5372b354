"""The store: one repository class over SQLAlchemy, SQLite by default, PostgreSQL for scale-out.

Every public method is one transaction and returns frozen records (records.py), never ORM
objects. Methods are blocking; async services call them through asyncio.to_thread, so a
Store is shared by many threads: each call opens its own session from a sessionmaker, and
the engine's pool hands each thread its own connection.

The certificate rules live here as transaction boundaries:
  C1  store_issued_certificate commits the certificate on its own, before anything is
      written to a card.
  C2  finish_task_succeeded moves the task's certificates, sets the card state, creates the
      relations and ends the task in ONE transaction; any failure changes nothing.
  C3  finish_task_failed leaves certificate states alone and records the task's error on them.
  C4  list_certificates searches by state, age, template, card, gateway, reader, task,
      process instance.
  C5  change_certificate_state / change_card_state change a state and write its audit event
      in ONE transaction; record_audit audits any other handling action (C17 included).
  C7  store_issued_certificate(archived_key=...) stores a certificate and its archived
      (wrapped) private key together; archive_key / get_archived_key for the rest.
  C9  add_relations creates relations on their own, idempotently, before the task ends;
      finish_task_* skip relations that already exist.
  C16 journal_ca_request commits a CA request (idempotency key, CSR) before the CA is
      called; store_issued_certificate(request_id=...) stores the certificate and moves its
      journal row to `stored` in ONE transaction, so a certificate is never in the store
      without its request settled, nor a request settled without its certificate;
      mark_ca_request / list_ca_requests for the card write and the reconciler.
"""
from __future__ import annotations

import datetime as dt
import json
import pathlib
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from cryptography import x509
from sqlalchemy import Engine, create_engine, event, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from shared.errors import AlreadyExists, InvalidArgument, NotFound, StateConflict
from orchestrator.store.models import (ArchivedKey, AuditEvent, CaRequest, Card, Certificate, ObjectRelation,
                                       OrchestratorInstance, ProcessInstance, Task, TaskStep, utcnow)
from orchestrator.store.records import (CA_REQUEST_NOT_ISSUED, CA_REQUEST_PENDING, CA_REQUEST_STATES,
                                        CA_REQUEST_STORED, CA_REQUEST_WRITTEN, CARD, CERTIFICATE,
                                        PROCESS_FINAL_STATES, PROCESS_RUNNING, TASK_FAILED, TASK_RUNNING,
                                        TASK_SUCCEEDED, ArchivedKeyRecord, AuditRecord, CardRecord,
                                        CaRequestRecord, CertificateRecord, NewRelation, ProcessInstanceRecord,
                                        RelationRecord, TaskRecord, TaskStepRecord)

MIGRATIONS_DIR = pathlib.Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000
# Arbitrary constant: replicas starting together on one PostgreSQL migrate one at a time.
_PG_MIGRATION_LOCK = 0x6361726C  # "carl"


class DuplicateCertificate(AlreadyExists):
    """A certificate with this issuer and serial is already stored."""


R = TypeVar("R")


def _record(cls: type[R], obj: Any) -> R:
    return cls(**{f.name: getattr(obj, f.name) for f in fields(cls)})  # type: ignore[arg-type]


def _new_id() -> str:
    return str(uuid.uuid4())


def _json_object(value: Mapping[str, Any] | None, what: str) -> str:
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


def _process_record(row: ProcessInstance) -> ProcessInstanceRecord:
    values = {f.name: getattr(row, f.name) for f in fields(ProcessInstanceRecord)}
    values["process_map"] = json.loads(row.process_map)
    return ProcessInstanceRecord(**values)


def _audit_record(row: AuditEvent) -> AuditRecord:
    values = {f.name: getattr(row, f.name) for f in fields(AuditRecord)}
    values["detail"] = json.loads(row.detail)
    return AuditRecord(**values)


def _relation_key(rel: NewRelation):
    return (ObjectRelation.source_type == rel.source_type, ObjectRelation.source_id == rel.source_id,
            ObjectRelation.target_type == rel.target_type, ObjectRelation.target_id == rel.target_id,
            ObjectRelation.relation_type == rel.relation_type)


def alembic_config(database_url: str | None = None) -> Config:
    """An Alembic Config built in code: no alembic.ini, works from an installed package."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url:
        cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))  # ConfigParser escaping
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _make_engine(database_url: str) -> Engine:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        # pre_ping: a PostgreSQL restart must not surface as an error on the next call.
        return create_engine(url, pool_pre_ping=True)

    memory = url.database in (None, "", ":memory:")
    if memory:
        # One shared connection, or every thread would see its own empty database.
        # Good for single-threaded tools and tests only.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        pathlib.Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Take BEGIN away from the sqlite3 module (it starts transactions lazily, at the first
        # write, so a read-then-write could interleave with another writer); _on_begin below
        # emits it instead.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")            # off by default in SQLite
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")  # wait for the writer, don't fail
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")       # readers don't block the writer
            cur.execute("PRAGMA synchronous=NORMAL")     # WAL + NORMAL is durable across app crashes
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        # Writers take the write lock up front: upgrading a read transaction to a write one
        # fails at once with "database is locked" instead of waiting for busy_timeout.
        write = conn.get_execution_options().get("cardline_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class Store:
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._engine = _make_engine(database_url)
        self._write_engine = self._engine.execution_options(cardline_write=True)
        self._reading = sessionmaker(self._engine, expire_on_commit=False)
        self._writing = sessionmaker(self._write_engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    def close(self) -> None:
        self._engine.dispose()

    # -- schema --------------------------------------------------------------------------

    def migrate(self) -> None:
        """Upgrades the schema to the newest revision shipped with this package."""
        cfg = alembic_config(self.database_url)
        with self._write_engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def schema_revision(self) -> str | None:
        with self._engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    # -- sessions ------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._writing() as session, session.begin():
            yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._reading() as session, session.begin():
            yield session

    @staticmethod
    def _task(session: Session, task_id: str, *, lock: bool = False) -> Task:
        # FOR UPDATE (PostgreSQL) serialises the finishes of one task across replicas;
        # SQLite ignores it and is serialised by BEGIN IMMEDIATE.
        task = session.scalar(select(Task).where(Task.id == task_id).with_for_update(of=Task)) if lock \
            else session.get(Task, task_id)
        if task is None:
            raise NotFound(f"no task {task_id!r}", task_id=task_id)
        return task

    @staticmethod
    def _running_task(session: Session, task_id: str) -> Task:
        task = Store._task(session, task_id, lock=True)
        if task.state != TASK_RUNNING:
            raise StateConflict(f"task {task_id} is already {task.state}", task_id=task_id, state=task.state)
        return task

    # -- process instances ---------------------------------------------------------------

    @staticmethod
    def _process_instance(session: Session, instance_id: str, *, lock: bool = False) -> ProcessInstance:
        q = select(ProcessInstance).where(ProcessInstance.id == instance_id)
        row = session.scalar(q.with_for_update() if lock else q)
        if row is None:
            raise NotFound(f"no process instance {instance_id!r}", process_instance_id=instance_id)
        return row

    @staticmethod
    def _running_process_instance(session: Session, instance_id: str) -> ProcessInstance:
        row = Store._process_instance(session, instance_id, lock=True)
        if row.state != PROCESS_RUNNING:
            raise StateConflict(f"process instance {instance_id} is already {row.state}",
                                process_instance_id=instance_id, state=row.state)
        return row

    def create_process_instance(self, definition: str, process_map: Mapping[str, Any], *,
                                owner: str | None = None, instance_id: str | None = None) -> ProcessInstanceRecord:
        """A new RUNNING instance of the process `definition` with its initial process map
        (string keys, JSON values - e.g. ProcessMap.to_dict(); secrets never belong here).
        owner: the orchestrator instance running it; instance_id: chosen by the caller (so it
        can register the run before the row exists, see the reconciler), else a new UUID."""
        if not definition:
            raise InvalidArgument("a process instance needs its definition's name")
        text_map = _json_object(process_map, "process map")
        with self._write() as s:
            now = utcnow()
            row = ProcessInstance(id=instance_id or _new_id(), definition=definition, state=PROCESS_RUNNING,
                                  process_map=text_map, created_at=now, updated_at=now, owner=owner)
            s.add(row)
            s.flush()
            return _process_record(row)

    def update_process_map(self, instance_id: str, process_map: Mapping[str, Any]) -> ProcessInstanceRecord:
        """Replaces the whole process map of a RUNNING instance (StateConflict once it ended)."""
        text_map = _json_object(process_map, "process map")
        with self._write() as s:
            row = self._running_process_instance(s, instance_id)
            row.process_map = text_map
            row.updated_at = utcnow()
            s.flush()
            return _process_record(row)

    def finish_process_instance(self, instance_id: str, state: str, error_reason: str | None = None,
                                error_message: str | None = None,
                                process_map: Mapping[str, Any] | None = None) -> ProcessInstanceRecord:
        """Ends a RUNNING instance in SUCCEEDED or FAILED, exactly once (StateConflict
        otherwise), with its error and, if given, its final process map."""
        if state not in PROCESS_FINAL_STATES:
            raise InvalidArgument(f"a process instance ends in one of {list(PROCESS_FINAL_STATES)}, not {state!r}")
        text_map = None if process_map is None else _json_object(process_map, "process map")
        with self._write() as s:
            row = self._running_process_instance(s, instance_id)
            now = utcnow()
            row.state = state
            row.error_reason = error_reason
            row.error_message = error_message
            if text_map is not None:
                row.process_map = text_map
            row.updated_at = row.finished_at = now
            s.flush()
            return _process_record(row)

    def get_process_instance(self, instance_id: str) -> ProcessInstanceRecord:
        with self._read() as s:
            return _process_record(self._process_instance(s, instance_id))

    def list_process_instances(self, state: str | None = None, definition: str | None = None,
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
        with self._read() as s:
            return [_process_record(r) for r in s.scalars(q)]

    # -- tasks and the step journal ----------------------------------------------------------

    def create_task(self, type: str, gateway_id: str, reader_id: str, card_id: str | None = None, *,
                    process_instance_id: str | None = None, task_index: int | None = None,
                    owner: str | None = None, task_id: str | None = None) -> TaskRecord:
        """A new RUNNING task. card_id: the card a card operation works on (C8); a card
        production task gets its card from create_card instead. process_instance_id: the
        RUNNING process instance the task is part of (StateConflict if it has ended);
        task_index: the task's position in it (not unique: a retried task repeats it).
        owner: the orchestrator instance running it; task_id: chosen by the caller (so it can
        register the run before the row exists, see the reconciler), else a new UUID."""
        if task_index is not None and task_index < 0:
            raise InvalidArgument(f"task_index must not be negative, not {task_index}")
        with self._write() as s:
            if card_id is not None and s.get(Card, card_id) is None:
                raise NotFound(f"no card {card_id!r}", card_id=card_id)
            if process_instance_id is not None:
                instance = self._process_instance(s, process_instance_id)
                if instance.state != PROCESS_RUNNING:
                    raise StateConflict(f"process instance {process_instance_id} is already {instance.state}",
                                        process_instance_id=process_instance_id, state=instance.state)
            task = Task(id=task_id or _new_id(), type=type, state=TASK_RUNNING, gateway_id=gateway_id,
                        reader_id=reader_id, card_id=card_id, created_at=utcnow(),
                        process_instance_id=process_instance_id, task_index=task_index, owner=owner)
            s.add(task)
            s.flush()
            return _record(TaskRecord, task)

    def journal_step(self, task_id: str, step_number: int, name: str, state: str,
                     detail: str = "") -> TaskStepRecord:
        """Records where a task is (insert or overwrite the row of this step).

        One statement (an upsert returning the row): it runs for every step of every card,
        so it stays cheap; the task's existence is checked by the foreign key."""
        now = utcnow()
        dialect_insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        stmt = (dialect_insert(TaskStep)
                .values(task_id=task_id, step_number=step_number, name=name, state=state, detail=detail,
                        created_at=now, updated_at=now)
                .on_conflict_do_update(index_elements=[TaskStep.task_id, TaskStep.step_number],
                                       set_={"name": name, "state": state, "detail": detail, "updated_at": now})
                .returning(*TaskStep.__table__.columns))
        try:
            with self._write() as s:
                row = s.execute(stmt).one()
        except IntegrityError:
            raise NotFound(f"no task {task_id}", task_id=task_id) from None
        return _record(TaskStepRecord, row)

    def get_task(self, task_id: str) -> TaskRecord:
        with self._read() as s:
            return _record(TaskRecord, self._task(s, task_id))

    def list_tasks(self, process_instance_id: str | None = None, state: str | None = None) -> list[TaskRecord]:
        """Tasks, oldest first (so the tasks of a process instance come in the order they ran)."""
        q = select(Task)
        if process_instance_id is not None:
            q = q.where(Task.process_instance_id == process_instance_id)
        if state is not None:
            q = q.where(Task.state == state)
        with self._read() as s:
            return [_record(TaskRecord, t) for t in s.scalars(q.order_by(Task.created_at, Task.id))]

    def list_task_steps(self, task_id: str) -> list[TaskStepRecord]:
        with self._read() as s:
            self._task(s, task_id)
            rows = s.scalars(select(TaskStep).where(TaskStep.task_id == task_id).order_by(TaskStep.step_number))
            return [_record(TaskStepRecord, r) for r in rows]

    # -- cards ---------------------------------------------------------------------------

    def create_card(self, task_id: str, serial: str, template: str, state: str, gateway_id: str,
                    reader_id: str) -> CardRecord:
        """The card object of a card production task (C8); becomes the task's card."""
        with self._write() as s:
            task = self._running_task(s, task_id)
            if task.card_id is not None:
                raise StateConflict(f"task {task_id} already has card {task.card_id}", task_id=task_id)
            now = utcnow()
            card = Card(id=_new_id(), serial=serial, template=template, state=state, gateway_id=gateway_id,
                        reader_id=reader_id, created_at=now, updated_at=now)
            s.add(card)
            s.flush()
            task.card_id = card.id
            return _record(CardRecord, card)

    def get_card(self, card_id: str) -> CardRecord:
        with self._read() as s:
            card = s.get(Card, card_id)
            if card is None:
                raise NotFound(f"no card {card_id!r}", card_id=card_id)
            return _record(CardRecord, card)

    def change_card_state(self, card_id: str, to_state: str, *, from_state: str | None, actor: str,
                          action: str, reason: str | None = None,
                          detail: Mapping[str, Any] | None = None) -> CardRecord:
        """Like change_certificate_state, for a card: state change and audit event in ONE
        transaction; StateConflict (and nothing written) if the card is not in from_state."""
        with self._write() as s:
            card = s.scalar(select(Card).where(Card.id == card_id).with_for_update())
            if card is None:
                raise NotFound(f"no card {card_id!r}", card_id=card_id)
            self._change_state(s, card, CARD, to_state, from_state, actor, action, reason, detail)
            return _record(CardRecord, card)

    def certificate_ids_of_card(self, card_id: str) -> list[str]:
        """Certificates related to the card (relations Card -> Certificate), oldest first
        (by when the store received them).
        Unlike list_certificates(card_id=...), certificates of the card's failed tasks
        without a relation are not included: they are probably not on the card."""
        with self._read() as s:
            if s.get(Card, card_id) is None:
                raise NotFound(f"no card {card_id!r}", card_id=card_id)
            related = select(ObjectRelation.target_id).where(
                ObjectRelation.source_type == CARD, ObjectRelation.source_id == card_id,
                ObjectRelation.target_type == CERTIFICATE)
            return list(s.scalars(select(Certificate.id).where(Certificate.id.in_(related))
                                  .order_by(Certificate.created_at, Certificate.id)))

    # -- certificates --------------------------------------------------------------------

    def store_issued_certificate(self, task_id: str, der: bytes, template: str, ca_name: str,
                                 state: str, *,
                                 archived_key: tuple[str, str, bytes] | None = None,
                                 request_id: str | None = None) -> CertificateRecord:
        """C1: commits a certificate just received from the CA, in the internal issued state
        `state`, in its own transaction, so it is known before any card write is attempted.

        Also used by the reconciler (C16) after the task has ended: a certificate stored for a
        failed task carries that task's error, as if it had been there when the task failed.

        archived_key: (kek_id, algorithm, wrapped_key) of the certificate's private key,
        stored in the same transaction (C7): an archived certificate never exists without it.

        request_id (C16): the journaled CA request (journal_ca_request) this certificate
        answers; its row moves to `stored` with the serial and the certificate id in the same
        transaction. If the certificate is already stored for that very request (the
        reconciler found it first, or a retry), the stored record is returned instead of
        DuplicateCertificate. NotFound if the request was never journaled; StateConflict if
        it was settled otherwise (not_issued, or stored with another certificate).
        """
        if archived_key is not None:
            try:
                kek_id, algorithm, wrapped_key = archived_key
            except (TypeError, ValueError):
                raise InvalidArgument("archived_key must be (kek_id, algorithm, wrapped_key)") from None
            self._check_archived_key(kek_id, algorithm, wrapped_key)
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise InvalidArgument(f"not a DER X.509 certificate: {exc}") from None
        serial_hex = format(cert.serial_number, "x")
        issuer = cert.issuer.rfc4514_string()
        with self._write() as s:
            task = self._task(s, task_id)
            journal = self._ca_request_for(s, request_id, task_id) if request_id is not None else None
            existing = s.scalar(select(Certificate).where(Certificate.issuer == issuer,
                                                          Certificate.serial_hex == serial_hex))
            if existing is not None:
                if journal is not None and journal.certificate_id == existing.id:
                    self._add_archived_key_if_missing(s, existing.id, archived_key)
                    return _record(CertificateRecord, existing)
                raise DuplicateCertificate(
                    f"certificate {serial_hex} of {issuer} is already stored as {existing.id}",
                    certificate_id=existing.id, serial_hex=serial_hex, issuer=issuer)
            if journal is not None and journal.state != CA_REQUEST_PENDING:
                raise StateConflict(f"CA request {request_id} is already {journal.state}"
                                    + (f" with certificate {journal.certificate_id}" if journal.certificate_id else "")
                                    + f"; certificate {serial_hex} of {issuer} not stored",
                                    request_id=request_id, state=journal.state)
            now = utcnow()
            row = Certificate(
                id=_new_id(), serial_hex=serial_hex, issuer=issuer, subject=cert.subject.rfc4514_string(),
                not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc, der=bytes(der),
                template=template, ca_name=ca_name, state=state, task_id=task_id,
                task_error_reason=task.error_reason if task.state == TASK_FAILED else None,
                task_error_message=task.error_message if task.state == TASK_FAILED else None,
                created_at=now, updated_at=now)
            s.add(row)
            try:
                s.flush()
            except IntegrityError:  # a concurrent writer stored the same certificate first
                raise DuplicateCertificate(f"certificate {serial_hex} of {issuer} is already stored",
                                           serial_hex=serial_hex, issuer=issuer) from None
            if archived_key is not None:
                s.add(ArchivedKey(certificate_id=row.id, kek_id=kek_id, algorithm=algorithm,
                                  wrapped_key=bytes(wrapped_key), created_at=now))
                s.flush()
            if journal is not None:
                journal.state = CA_REQUEST_STORED
                journal.serial_hex = serial_hex
                journal.certificate_id = row.id
                journal.error = None
                journal.updated_at = now
                s.flush()
            return _record(CertificateRecord, row)

    @staticmethod
    def _add_archived_key_if_missing(s: Session, certificate_id: str,
                                     archived_key: tuple[str, str, bytes] | None) -> None:
        if archived_key is not None and s.get(ArchivedKey, certificate_id) is None:
            kek_id, algorithm, wrapped_key = archived_key
            s.add(ArchivedKey(certificate_id=certificate_id, kek_id=kek_id, algorithm=algorithm,
                              wrapped_key=bytes(wrapped_key), created_at=utcnow()))
            s.flush()

    # -- the CA request journal (C16) ----------------------------------------------------

    @staticmethod
    def _ca_request_for(s: Session, request_id: str, task_id: str | None = None) -> CaRequest:
        # FOR UPDATE (PostgreSQL): a live run and the reconciler settling one request queue
        # up here; SQLite writers are serial anyway.
        row = s.scalar(select(CaRequest).where(CaRequest.request_id == request_id).with_for_update())
        if row is None:
            raise NotFound(f"no journaled CA request {request_id!r}", request_id=request_id)
        if task_id is not None and row.task_id != task_id:
            raise InvalidArgument(f"CA request {request_id} belongs to task {row.task_id}, not {task_id}",
                                  request_id=request_id)
        return row

    def journal_ca_request(self, request_id: str, task_id: str, ca_name: str, template: str,
                           csr_der: bytes) -> CaRequestRecord:
        """C16: records, in its own transaction, a request about to be sent to CA `ca_name`
        (commit BEFORE calling the CA). request_id is the idempotency key the CA sees. A
        second call with the same request_id returns the row journaled first, whatever its
        state (AlreadyExists if it belongs to another task). NotFound if the task does not
        exist."""
        if not request_id or not ca_name or not template:
            raise InvalidArgument("a CA request needs its request_id, CA name and certificate template")
        if not isinstance(csr_der, (bytes, bytearray, memoryview)) or not bytes(csr_der):
            raise InvalidArgument("a CA request needs the certificate request (DER) as non-empty bytes")
        with self._write() as s:
            self._task(s, task_id)
            now = utcnow()
            dialect_insert = postgresql.insert if s.bind.dialect.name == "postgresql" else sqlite.insert
            s.execute(dialect_insert(CaRequest).values(
                request_id=request_id, task_id=task_id, ca_name=ca_name, template=template,
                csr_der=bytes(csr_der), state=CA_REQUEST_PENDING, created_at=now, updated_at=now,
            ).on_conflict_do_nothing(index_elements=[CaRequest.request_id]))
            row = s.get(CaRequest, request_id, populate_existing=True)
            assert row is not None
            if row.task_id != task_id:
                raise AlreadyExists(f"CA request {request_id} is journaled for task {row.task_id}, not {task_id}",
                                    request_id=request_id)
            return _record(CaRequestRecord, row)

    # Moves mark_ca_request allows: to -> states it may come from (the same state again is
    # a no-op retry). `stored` is reached only with the certificate (store_issued_certificate).
    _CA_REQUEST_MOVES = {
        CA_REQUEST_PENDING: (CA_REQUEST_PENDING,),          # records a problem in `error`, stays unsettled
        CA_REQUEST_WRITTEN: (CA_REQUEST_STORED, CA_REQUEST_WRITTEN),
        CA_REQUEST_NOT_ISSUED: (CA_REQUEST_PENDING, CA_REQUEST_NOT_ISSUED),
    }

    def mark_ca_request(self, request_id: str, state: str, error: str | None = None) -> CaRequestRecord:
        """Advances a journaled CA request: `written` once its certificate is on the card
        (from `stored`), `not_issued` when the CA issued nothing for it (from `pending`), or
        `pending` again with `error` saying why it is still unsettled. StateConflict for any
        other move (nothing written); InvalidArgument for `stored` (store_issued_certificate
        does that, with the certificate) or an unknown state."""
        if state not in CA_REQUEST_STATES:
            raise InvalidArgument(f"a CA request is in one of {list(CA_REQUEST_STATES)}, not {state!r}")
        if state == CA_REQUEST_STORED:
            raise InvalidArgument("a CA request becomes stored only with its certificate "
                                  "(store_issued_certificate(request_id=...))")
        with self._write() as s:
            row = self._ca_request_for(s, request_id)
            if row.state not in self._CA_REQUEST_MOVES[state]:
                raise StateConflict(f"CA request {request_id} is {row.state}; it cannot become {state}",
                                    request_id=request_id, state=row.state)
            row.state = state
            if error is not None or state != CA_REQUEST_WRITTEN:
                row.error = error
            row.updated_at = utcnow()
            s.flush()
            return _record(CaRequestRecord, row)

    def get_ca_request(self, request_id: str) -> CaRequestRecord:
        with self._read() as s:
            row = s.get(CaRequest, request_id)
            if row is None:
                raise NotFound(f"no journaled CA request {request_id!r}", request_id=request_id)
            return _record(CaRequestRecord, row)

    def list_ca_requests(self, states: Iterable[str] | None = None,
                         task_id: str | None = None) -> list[CaRequestRecord]:
        """Journaled CA requests, oldest first; states: only those in these states (e.g.
        ["pending"]: the unsettled ones)."""
        q = select(CaRequest)
        if states is not None:
            states = list(states)
            unknown = sorted(set(states) - set(CA_REQUEST_STATES))
            if unknown:
                raise InvalidArgument(f"unknown CA request state(s) {unknown}; known: {list(CA_REQUEST_STATES)}")
            q = q.where(CaRequest.state.in_(states))
        if task_id is not None:
            q = q.where(CaRequest.task_id == task_id)
        with self._read() as s:
            return [_record(CaRequestRecord, r)
                    for r in s.scalars(q.order_by(CaRequest.created_at, CaRequest.request_id))]

    # -- orchestrator instances (who runs what, for the reconciler) ------------------------

    def beat(self, instance_id: str) -> None:
        """The orchestrator instance `instance_id` is alive now (upsert of its heartbeat)."""
        if not instance_id:
            raise InvalidArgument("an orchestrator instance needs an id")
        with self._write() as s:
            now = utcnow()
            dialect_insert = postgresql.insert if s.bind.dialect.name == "postgresql" else sqlite.insert
            s.execute(dialect_insert(OrchestratorInstance)
                      .values(id=instance_id, started_at=now, heartbeat_at=now)
                      .on_conflict_do_update(index_elements=[OrchestratorInstance.id], set_={"heartbeat_at": now}))

    def heartbeats(self) -> dict[str, dt.datetime]:
        """Orchestrator instance id -> when it last beat."""
        with self._read() as s:
            return {r.id: r.heartbeat_at for r in s.scalars(select(OrchestratorInstance))}

    def certificate_known(self, der: bytes) -> bool:
        """Whether a certificate with this one's issuer and serial is stored (C16)."""
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise InvalidArgument(f"not a DER X.509 certificate: {exc}") from None
        with self._read() as s:
            return s.scalar(select(Certificate.id).where(
                Certificate.issuer == cert.issuer.rfc4514_string(),
                Certificate.serial_hex == format(cert.serial_number, "x"))) is not None

    def get_certificate(self, certificate_id: str) -> CertificateRecord:
        with self._read() as s:
            cert = s.get(Certificate, certificate_id)
            if cert is None:
                raise NotFound(f"no certificate {certificate_id!r}", certificate_id=certificate_id)
            return _record(CertificateRecord, cert)

    def list_certificates(self, state: str | None = None, template: str | None = None,
                          card_id: str | None = None, task_id: str | None = None,
                          issued_before: dt.datetime | None = None, limit: int | None = None,
                          gateway_id: str | None = None, reader_id: str | None = None,
                          process_instance_id: str | None = None) -> list[CertificateRecord]:
        """C4 search, oldest first. All filters combine with AND.

        issued_before: stored (received from the CA) strictly before this aware datetime.
        card_id: related to the card (Card -> Certificate relation) OR issued by a task of
          that card - so certificates of a failed production, which has no relation under
          CreateObjectRelation=success, are found by their card too.
        gateway_id / reader_id: of the task that issued the certificate.
        process_instance_id: issued by a task of that process instance.
        """
        q = select(Certificate)
        if state is not None:
            q = q.where(Certificate.state == state)
        if template is not None:
            q = q.where(Certificate.template == template)
        if task_id is not None:
            q = q.where(Certificate.task_id == task_id)
        if issued_before is not None:
            if issued_before.tzinfo is None:
                raise InvalidArgument("issued_before must be timezone-aware")
            q = q.where(Certificate.created_at < issued_before)
        if gateway_id is not None or reader_id is not None:
            q = q.join(Task, Certificate.task_id == Task.id)
            if gateway_id is not None:
                q = q.where(Task.gateway_id == gateway_id)
            if reader_id is not None:
                q = q.where(Task.reader_id == reader_id)
        if process_instance_id is not None:
            q = q.where(Certificate.task_id.in_(
                select(Task.id).where(Task.process_instance_id == process_instance_id)))
        if card_id is not None:
            related = select(ObjectRelation.target_id).where(
                ObjectRelation.source_type == CARD, ObjectRelation.source_id == card_id,
                ObjectRelation.target_type == CERTIFICATE)
            of_card_tasks = select(Task.id).where(Task.card_id == card_id)
            q = q.where(or_(Certificate.id.in_(related), Certificate.task_id.in_(of_card_tasks)))
        q = q.order_by(Certificate.created_at, Certificate.id)
        if limit is not None:
            q = q.limit(limit)
        with self._read() as s:
            return [_record(CertificateRecord, c) for c in s.scalars(q)]

    def change_certificate_state(self, certificate_id: str, to_state: str, *, from_state: str | None,
                                 actor: str, action: str, reason: str | None = None,
                                 detail: Mapping[str, Any] | None = None) -> CertificateRecord:
        """C5/C17: sets the certificate's state and writes the audit event of `action` in ONE
        transaction. The row is locked (FOR UPDATE on PostgreSQL; SQLite writers are serial),
        so two changes of one certificate cannot both pass the from_state check. from_state:
        the state the caller validated the transition from; StateConflict naming both states
        (and nothing written) if the certificate is elsewhere; None skips the check. The
        store knows no state graphs: callers validate the transition. The audit detail is
        `detail` plus {"from", "to", "reason"}."""
        with self._write() as s:
            cert = s.scalar(select(Certificate).where(Certificate.id == certificate_id).with_for_update())
            if cert is None:
                raise NotFound(f"no certificate {certificate_id!r}", certificate_id=certificate_id)
            self._change_state(s, cert, CERTIFICATE, to_state, from_state, actor, action, reason, detail)
            return _record(CertificateRecord, cert)

    def _change_state(self, s: Session, row: Card | Certificate, object_type: str, to_state: str,
                      from_state: str | None, actor: str, action: str, reason: str | None,
                      detail: Mapping[str, Any] | None) -> None:
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
        self._audit(s, action, object_type, row.id, actor, audit, now)
        s.flush()

    # -- archived keys (C7) ----------------------------------------------------------------

    @staticmethod
    def _check_archived_key(kek_id: str, algorithm: str, wrapped_key: bytes) -> None:
        if not kek_id or not algorithm:
            raise InvalidArgument("an archived key needs its kek_id and algorithm")
        if not isinstance(wrapped_key, (bytes, bytearray, memoryview)) or not bytes(wrapped_key):
            raise InvalidArgument("an archived key needs the wrapped (encrypted) key as non-empty bytes")

    def archive_key(self, certificate_id: str, kek_id: str, algorithm: str, wrapped_key: bytes) -> ArchivedKeyRecord:
        """Stores the wrapped private key of a stored certificate; AlreadyExists if it has one."""
        self._check_archived_key(kek_id, algorithm, wrapped_key)
        with self._write() as s:
            if s.get(Certificate, certificate_id) is None:
                raise NotFound(f"no certificate {certificate_id!r}", certificate_id=certificate_id)
            if s.get(ArchivedKey, certificate_id) is not None:
                raise AlreadyExists(f"certificate {certificate_id} already has an archived key",
                                    certificate_id=certificate_id)
            row = ArchivedKey(certificate_id=certificate_id, kek_id=kek_id, algorithm=algorithm,
                              wrapped_key=bytes(wrapped_key), created_at=utcnow())
            s.add(row)
            try:
                s.flush()
            except IntegrityError:  # a concurrent writer archived it first
                raise AlreadyExists(f"certificate {certificate_id} already has an archived key",
                                    certificate_id=certificate_id) from None
            return _record(ArchivedKeyRecord, row)

    def get_archived_key(self, certificate_id: str) -> ArchivedKeyRecord:
        with self._read() as s:
            row = s.get(ArchivedKey, certificate_id)
            if row is None:
                raise NotFound(f"no archived key for certificate {certificate_id!r}", certificate_id=certificate_id)
            return _record(ArchivedKeyRecord, row)

    # -- audit (C5) ----------------------------------------------------------------------

    @staticmethod
    def _audit(s: Session, action: str, object_type: str, object_id: str, actor: str,
               detail: Mapping[str, Any] | None, at: dt.datetime) -> AuditEvent:
        if not action or not actor or not object_type or not object_id:
            raise InvalidArgument("an audit event needs action, actor, object_type and object_id")
        row = AuditEvent(at=at, actor=actor, action=action, object_type=object_type, object_id=object_id,
                         detail=_json_object(detail, "audit detail"))
        s.add(row)
        return row

    def record_audit(self, action: str, object_type: str, object_id: str, actor: str,
                     detail: Mapping[str, Any] | None = None) -> AuditRecord:
        """Audits a handling action that changes no state in the store (a CA revocation, a
        sweep's decision, a recovery...). Append only; one transaction."""
        with self._write() as s:
            row = self._audit(s, action, object_type, object_id, actor, detail, utcnow())
            s.flush()
            return _audit_record(row)

    def list_audit(self, object_id: str | None = None, action: str | None = None,
                   limit: int | None = None) -> list[AuditRecord]:
        """Oldest first (in the order written)."""
        q = select(AuditEvent)
        if object_id is not None:
            q = q.where(AuditEvent.object_id == object_id)
        if action is not None:
            q = q.where(AuditEvent.action == action)
        q = q.order_by(AuditEvent.id)
        if limit is not None:
            q = q.limit(limit)
        with self._read() as s:
            return [_audit_record(r) for r in s.scalars(q)]

    # -- relations -----------------------------------------------------------------------

    def list_relations(self, source_id: str | None = None, target_id: str | None = None) -> list[RelationRecord]:
        q = select(ObjectRelation)
        if source_id is not None:
            q = q.where(ObjectRelation.source_id == source_id)
        if target_id is not None:
            q = q.where(ObjectRelation.target_id == target_id)
        with self._read() as s:
            return [_record(RelationRecord, r)
                    for r in s.scalars(q.order_by(ObjectRelation.created_at, ObjectRelation.id))]

    def add_relations(self, task_id: str | None,
                      relations: Iterable[NewRelation | tuple[str, str, str, str, str]]) -> list[RelationRecord]:
        """C9: creates relations on their own, in one transaction - e.g. the card->certificate
        relation of CreateObjectRelation=always right after the certificate is stored, so it
        survives a failure of the task. Idempotent: a relation that exists already (same
        source, target and type) is not an error; its stored record is returned (with the
        task that created it). Returns one record per given relation, in the given order.
        NotFound if the task or a Card/Certificate end does not exist."""
        relations = [NewRelation(*r) for r in relations]
        with self._write() as s:
            if task_id is not None:
                self._task(s, task_id)
            now = utcnow()
            out = []
            for rel in relations:
                self._check_relation_ends(s, rel)
                self._insert_relation(s, task_id, rel, now)
                row = s.scalar(select(ObjectRelation).where(*_relation_key(rel)))
                assert row is not None
                out.append(_record(RelationRecord, row))
            return out

    @staticmethod
    def _check_relation_ends(s: Session, rel: NewRelation) -> None:
        known = {CARD: Card, CERTIFICATE: Certificate}   # ends of other types are not checked
        for kind, obj_id in ((rel.source_type, rel.source_id), (rel.target_type, rel.target_id)):
            if kind in known and s.get(known[kind], obj_id) is None:
                raise NotFound(f"relation {tuple(rel)}: no {kind} {obj_id!r}")

    @staticmethod
    def _insert_relation(s: Session, task_id: str | None, rel: NewRelation, now: dt.datetime) -> None:
        """INSERT ... ON CONFLICT DO NOTHING: an existing relation (also one a concurrent
        transaction just committed) stays as it is, and the transaction goes on."""
        dialect_insert = postgresql.insert if s.bind.dialect.name == "postgresql" else sqlite.insert
        s.execute(dialect_insert(ObjectRelation)
                  .values(id=_new_id(), task_id=task_id, created_at=now, **rel._asdict())
                  .on_conflict_do_nothing(index_elements=[
                      ObjectRelation.source_type, ObjectRelation.source_id, ObjectRelation.target_type,
                      ObjectRelation.target_id, ObjectRelation.relation_type]))

    @staticmethod
    def _add_relations(s: Session, task_id: str, relations: list[NewRelation], now: dt.datetime) -> None:
        """The relations of a task's end. One that exists already (created earlier by
        add_relations, C9) is skipped; the same relation listed twice is a caller's bug."""
        seen: set[NewRelation] = set()
        for rel in relations:
            if rel in seen:
                raise StateConflict(f"task {task_id}: relation {tuple(rel)} is listed twice", task_id=task_id)
            seen.add(rel)
            Store._check_relation_ends(s, rel)
            Store._insert_relation(s, task_id, rel, now)

    def _set_card_state(self, s: Session, task: Task, card_state: str, now: dt.datetime) -> None:
        if task.card_id is None:
            raise InvalidArgument(f"task {task.id} has no card to set to {card_state!r}", task_id=task.id)
        card = s.get(Card, task.card_id)
        assert card is not None  # foreign key
        card.state = card_state
        card.updated_at = now

    # -- ending a task -------------------------------------------------------------------

    def finish_task_succeeded(self, task_id: str, from_state: str, certificate_states: Mapping[str, str],
                              card_state: str | None,
                              relations: Iterable[tuple[str, str, str, str, str]] = ()) -> TaskRecord:
        """C2: in ONE transaction, moves every certificate the task issued from the internal
        issued state `from_state` to its start state (certificate_states: id -> new state),
        sets the task's card to card_state (if given), creates the relations and marks the
        task SUCCEEDED. Any violation raises and nothing changes:
          - the task is not RUNNING;
          - a listed certificate was not issued by this task or is not in from_state;
          - a certificate of this task in from_state is not listed (C2 moves *every* one);
          - a relation already exists or names a missing card/certificate.
        """
        relations = [NewRelation(*r) for r in relations]
        with self._write() as s:
            task = self._running_task(s, task_id)
            mine = {c.id: c for c in s.scalars(
                select(Certificate).where(Certificate.task_id == task_id).with_for_update())}
            foreign = sorted(set(certificate_states) - set(mine))
            if foreign:
                raise InvalidArgument(f"task {task_id} did not issue certificate(s) {foreign}", task_id=task_id)
            moved = {c.id: c.state for c in mine.values() if c.id in certificate_states and c.state != from_state}
            if moved:
                raise StateConflict(f"certificate(s) not in the internal issued state {from_state!r}: {moved}",
                                    task_id=task_id)
            left = sorted(c.id for c in mine.values() if c.state == from_state and c.id not in certificate_states)
            if left:
                raise InvalidArgument(f"task {task_id}: certificate(s) {left} in {from_state!r} have no target "
                                      f"state; every certificate of a successful task moves (C2)", task_id=task_id)
            now = utcnow()
            for cert_id, new_state in certificate_states.items():
                mine[cert_id].state = new_state
                mine[cert_id].updated_at = now
            if card_state is not None:
                self._set_card_state(s, task, card_state, now)
            self._add_relations(s, task_id, relations, now)
            task.state = TASK_SUCCEEDED
            task.finished_at = now
            s.flush()
            return _record(TaskRecord, task)

    def finish_task_failed(self, task_id: str, reason: str, message: str, card_state: str | None = None,
                           relations: Iterable[tuple[str, str, str, str, str]] = (), *,
                           details: Mapping[str, Any] | None = None) -> TaskRecord:
        """C3: marks the task FAILED with its error; its certificates keep their state (the
        internal issued state) and carry the error so a C4 search shows why. card_state: the
        card's state after the failure, if it changes. relations: those to create even on
        failure (CreateObjectRelation=always, C9). details: the error's typed details
        (CardlineError.to_details()), kept as JSON. One transaction."""
        if not reason:
            raise InvalidArgument("a failed task needs an error reason")
        relations = [NewRelation(*r) for r in relations]
        with self._write() as s:
            task = self._running_task(s, task_id)
            now = utcnow()
            s.execute(update(Certificate).where(Certificate.task_id == task_id)
                      .values(task_error_reason=reason, task_error_message=message, updated_at=now))
            if card_state is not None:
                self._set_card_state(s, task, card_state, now)
            self._add_relations(s, task_id, relations, now)
            task.state = TASK_FAILED
            task.error_reason = reason
            task.error_message = message
            task.error_details = dict(details) if details else None
            task.finished_at = now
            s.flush()
            return _record(TaskRecord, task)
