"""The store: SQLite by default, PostgreSQL for scale-out, over SQLAlchemy.

`Store` is the facade. It owns the schema (migrate) and the rule transactions, where the
certificate rules are transaction boundaries:
  C1  store_issued_certificate commits the certificate in the internal issued state before
      anything is written to a card (a card task commits it with the journal entry of the step
      that writes it, through together()).
  C2  finish_task_succeeded moves the task's certificates to their start states, sets the
      card state, creates the relations and ends the task in ONE transaction; any failure
      changes nothing.
  C3  finish_task_failed leaves certificate states alone and records the task's error on them.
  C7  store_issued_certificate(archived_key=...) stores a certificate and its archived
      (wrapped) private key together.
  C16 store_issued_certificate(request_id=...) stores the certificate and moves its CA
      request journal row to `stored` in ONE transaction, so a certificate is never in the
      store without its request settled, nor a request settled without its certificate.

Plain reads and writes live in one part per aggregate, sharing the facade's engine and
session factory: store.certificates (C4 search, C5 state changes), store.archived_keys (C7),
store.cards, store.card_secrets (sealed PUKs), store.tasks (and the step journal), store.processes,
store.ca_requests (C16 journal), store.relations (C9), store.audit (C5), store.instances (heartbeats),
store.client_requests (client-chosen request ids of creating RPCs), store.deployment_keys (the
CA and KEK fingerprints every replica shares), store.orders (production orders and their cards).

Every public method is one transaction and returns frozen records (records.py), never ORM
objects. Methods are blocking; async services call them through asyncio.to_thread.
`together(*calls)` runs several of them as ONE transaction (a card task's consecutive writes
that need not be durable apart, services/card_tasks.py).
"""
from __future__ import annotations

import datetime as dt
import pathlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import astuple
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from cryptography import x509
from sqlalchemy import bindparam, insert, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestrator.store.audit import Audit
from orchestrator.store.ca_requests import CaRequests
from orchestrator.store.card_secrets import CardSecrets
from orchestrator.store.cards import Cards, is_final
from orchestrator.store.certificates import ArchivedKeys, Certificates, parse_certificate
from orchestrator.store.client_requests import ClientRequests
from orchestrator.store.deployment_keys import DeploymentKeys
from orchestrator.store.instances import OrchestratorInstances
from orchestrator.store.models import ArchivedKey, Card, CaRequest, Certificate, Task, utcnow
from orchestrator.store.orders import Orders
from orchestrator.store.pool import ReplicaPool
from orchestrator.store.process_secrets import ProcessSecrets
from orchestrator.store.processes import ProcessInstances
from orchestrator.store.records import CaRequestState, CertificateRecord, NewRelation, TaskRecord, TaskState, WrappedKey
from orchestrator.store.relations import Relations
from orchestrator.store.rows import (
    ca_request_facts,
    check_relation_ends,
    check_wrapped_key,
    insert_relation,
    new_id,
    new_relations,
    record,
    running_task_facts,
    task_facts,
)
from orchestrator.store.sessions import Sessions
from orchestrator.store.tasks import Tasks
from shared.errors import AlreadyExists, ConfigurationError, InvalidArgument, StateConflict

# The statements of store_issued_certificate, built once (the values come with each execution).
_CERTIFICATE_BY_ISSUER_SERIAL = select(*Certificate.__table__.columns).where(
    Certificate.issuer == bindparam("issuer"), Certificate.serial_hex == bindparam("serial_hex"))
_INSERT_CERTIFICATE = insert(Certificate)
# ... and of the end of a task.
_TASK_CERTIFICATE_STATES_FOR_UPDATE = select(Certificate.id, Certificate.state).where(
    Certificate.task_id == bindparam("task_id")).with_for_update()
_MOVE_CERTIFICATE = update(Certificate).where(Certificate.id == bindparam("certificate_id")).values(
    state=bindparam("state"), updated_at=bindparam("updated_at"))
_CARD_TEMPLATE = select(Card.template).where(Card.id == bindparam("card_id"))
_SET_CARD_STATE = update(Card).where(Card.id == bindparam("card_id")).values(
    state=bindparam("state"), updated_at=bindparam("updated_at"))
_SET_CARD_STATE_RELEASED = _SET_CARD_STATE.values(live_identity=None)
_END_TASK = update(Task).where(Task.id == bindparam("ended_task")).values(
    state=bindparam("state"), finished_at=bindparam("finished_at")).returning(*Task.__table__.columns)
_END_TASK_WITH_ERROR = _END_TASK.values(error_reason=bindparam("error_reason"),
                                        error_message=bindparam("error_message"),
                                        error_details=bindparam("error_details"))
_SETTLE_CA_REQUEST = update(CaRequest).where(CaRequest.request_id == bindparam("settled_request")).values(
    state=str(CaRequestState.STORED), serial_hex=bindparam("serial_hex"), certificate_id=bindparam("certificate_id"),
    error=None, updated_at=bindparam("updated_at"))
MIGRATIONS_DIR = pathlib.Path(__file__).resolve().parent / "migrations"
# Arbitrary constant: replicas starting together on one PostgreSQL migrate one at a time.
_PG_MIGRATION_LOCK = 0x6361726C  # "carl"


class DuplicateCertificate(AlreadyExists):
    """A certificate with this issuer and serial is already stored."""


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


def prepare_schema(store: Store, migrate: bool) -> None:
    """Start-up: upgrades the schema when `migrate`, else refuses (ConfigurationError) a
    database that is not at this release's revision - an upgrade is the operator's step
    (`cardline db upgrade`), not a side effect of starting."""
    if migrate:
        store.migrate()
        return
    current, head = store.schema_revision(), head_revision()
    if current != head:
        state = "is empty (no schema)" if current is None else f"has schema revision {current}"
        raise ConfigurationError(f"the database {store.database_url_shown} {state}; this cardline needs "
                                 f"revision {head}: run `cardline db upgrade` (same settings), or start "
                                 f"with --migrate (setting migrate)")


class Store:
    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._db = Sessions(database_url)
        self._engine = self._db.engine
        self.certificates = Certificates(self._db)
        self.archived_keys = ArchivedKeys(self._db)
        self.cards = Cards(self._db)
        self.card_secrets = CardSecrets(self._db)
        self.tasks = Tasks(self._db)
        self.processes = ProcessInstances(self._db)
        self.ca_requests = CaRequests(self._db)
        self.relations = Relations(self._db)
        self.audit = Audit(self._db)
        self.instances = OrchestratorInstances(self._db)
        self.client_requests = ClientRequests(self._db)
        self.deployment_keys = DeploymentKeys(self._db)
        self.process_secrets = ProcessSecrets(self._db)    # sealed PINs of running instances (takeover)
        self.orders = Orders(self._db)
        self.replica_pool = ReplicaPool(self._db)      # PostgreSQL only (orchestrator/store/pool.py)

    @property
    def database_url_shown(self) -> str:
        """The database URL without its password, for messages."""
        return make_url(self.database_url).render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        return self._db.dialect

    def close(self) -> None:
        self._db.close()

    # -- schema --------------------------------------------------------------------------

    def migrate(self) -> None:
        """Upgrades the schema to the newest revision shipped with this package."""
        cfg = alembic_config(self.database_url)
        with self._db.write_engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def together(self, *calls: Callable[[], Any]) -> list[Any]:
        """Runs the store calls (each a method of this store with its arguments bound, e.g.
        functools.partial) in order, in ONE write transaction: committed together when the
        last returns, nothing written when any raises (its error is raised). Their results,
        in order. Each call sees what the calls before it wrote. Audit rows go last (they lock
        the audit chain on PostgreSQL until the commit)."""
        with self._db.one_transaction():
            return [call() for call in calls]

    def ping(self) -> None:
        """One query on the schema's own table; raises when the database cannot be reached
        or holds no cardline schema (the orchestrator's health check)."""
        with self._engine.connect() as conn:
            conn.execute(text("SELECT version_num FROM alembic_version")).all()

    def schema_revision(self) -> str | None:
        with self._engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    # -- C1, C7, C16: a certificate from the CA --------------------------------------------

    def store_issued_certificate(self, task_id: str, der: bytes, template: str, ca_name: str,
                                 state: str, *, archived_key: WrappedKey | None = None,
                                 request_id: str | None = None) -> CertificateRecord:
        """C1: commits a certificate just received from the CA, in the internal issued state
        `state`, so it is known before any card write is attempted (one transaction; a card
        task joins the write step's journal entry to it, together()).

        Also used by the reconciler (C16) after the task has ended: a certificate stored for a
        failed task carries that task's error, as if it had been there when the task failed.

        archived_key: the certificate's wrapped private key, stored in the same transaction
        (C7): an archived certificate never exists without it.

        request_id (C16): the journaled CA request (ca_requests.journal) this certificate
        answers; its row moves to `stored` with the serial and the certificate id in the same
        transaction. If the certificate is already stored for that very request (the
        reconciler found it first, or a retry), the stored record is returned instead of
        DuplicateCertificate. NotFound if the request was never journaled; StateConflict if
        it was settled otherwise (not_issued, or stored with another certificate).
        """
        if archived_key is not None:
            check_wrapped_key(archived_key)
        cert = parse_certificate(der)
        serial_hex = format(cert.serial_number, "x")
        issuer = cert.issuer.rfc4514_string()
        with self._db.write() as s:
            # Core statements on the session's connection (no ORM unit of work): every
            # certificate of every card is stored here.
            task = task_facts(s, task_id)
            journal = ca_request_facts(s, request_id, task_id) if request_id is not None else None
            conn = s.connection()
            existing = conn.execute(_CERTIFICATE_BY_ISSUER_SERIAL, {"issuer": issuer, "serial_hex": serial_hex}).first()
            if existing is not None:
                if journal is not None and journal.certificate_id == existing.id:
                    self._add_archived_key_if_missing(s, existing.id, archived_key, utcnow())
                    return record(CertificateRecord, existing)
                raise DuplicateCertificate(
                    f"certificate {serial_hex} of {issuer} is already stored as {existing.id}",
                    certificate_id=existing.id, serial_hex=serial_hex, issuer=issuer)
            if journal is not None:
                self._require_pending(journal, serial_hex, issuer)
            now = utcnow()
            values = self._certificate_values(cert, bytes(der), task, template, ca_name, state, now)
            try:
                conn.execute(_INSERT_CERTIFICATE, values)
            except IntegrityError:  # a concurrent writer stored the same certificate first
                raise DuplicateCertificate(f"certificate {serial_hex} of {issuer} is already stored",
                                           serial_hex=serial_hex, issuer=issuer) from None
            self._add_archived_key_if_missing(s, values["id"], archived_key, now)
            if journal is not None:
                # C16: the journal row of the request this certificate answers moves to `stored`.
                conn.execute(_SETTLE_CA_REQUEST, {"settled_request": journal.request_id, "serial_hex": serial_hex,
                                                  "certificate_id": values["id"], "updated_at": now})
            return CertificateRecord(**values)

    @staticmethod
    def _require_pending(journal: CaRequest, serial_hex: str, issuer: str) -> None:
        if journal.state != CaRequestState.PENDING:
            raise StateConflict(f"CA request {journal.request_id} is already {journal.state}"
                                + (f" with certificate {journal.certificate_id}" if journal.certificate_id else "")
                                + f"; certificate {serial_hex} of {issuer} not stored",
                                request_id=journal.request_id, state=journal.state)

    @staticmethod
    def _certificate_values(cert: x509.Certificate, der: bytes, task: Any, template: str, ca_name: str,
                            state: str, now: dt.datetime) -> dict[str, Any]:
        """The new certificate row's values (every column). task: its id, state and error
        (rows.task_facts)."""
        failed = task.state == TaskState.FAILED     # stored late (C16): it carries the task's error (C3)
        return {"id": new_id(), "serial_hex": format(cert.serial_number, "x"), "issuer": cert.issuer.rfc4514_string(),
                "subject": cert.subject.rfc4514_string(), "not_before": cert.not_valid_before_utc,
                "not_after": cert.not_valid_after_utc, "der": der, "template": template, "ca_name": ca_name,
                "state": state, "task_id": task.id, "task_error_reason": task.error_reason if failed else None,
                "task_error_message": task.error_message if failed else None, "created_at": now, "updated_at": now}

    @staticmethod
    def _add_archived_key_if_missing(s: Session, certificate_id: str, key: WrappedKey | None,
                                     now: dt.datetime) -> None:
        if key is not None and s.get(ArchivedKey, certificate_id) is None:
            s.add(ArchivedKey(certificate_id=certificate_id, kek_id=key.kek_id, algorithm=key.algorithm,
                              wrapped_key=bytes(key.wrapped_key), created_at=now))
            s.flush()

    # -- C2, C3: the end of a task ------------------------------------------------------------

    def finish_task_succeeded(self, task_id: str, from_state: str, certificate_states: Mapping[str, str],
                              card_state: str | None, relations: Iterable[NewRelation] = ()) -> TaskRecord:
        """C2: in ONE transaction, moves every certificate the task issued from the internal
        issued state `from_state` to its start state (certificate_states: id -> new state),
        sets the task's card to card_state (if given), creates the relations and marks the
        task SUCCEEDED. Any violation raises and nothing changes:
          - the task is not RUNNING;
          - a listed certificate was not issued by this task or is not in from_state;
          - a certificate of this task in from_state is not listed (C2 moves *every* one);
          - a relation already exists or names a missing card/certificate.
        """
        wanted = new_relations(relations)
        with self._db.write() as s:
            # Core statements built once (no ORM loads): every card ends here.
            task = running_task_facts(s, task_id)
            conn = s.connection()
            rows = conn.execute(_TASK_CERTIFICATE_STATES_FOR_UPDATE, {"task_id": task_id})
            mine = {cid: state for cid, state in rows}
            self._check_moves(task_id, mine, from_state, certificate_states)
            now = utcnow()
            if certificate_states:
                conn.execute(_MOVE_CERTIFICATE, [{"certificate_id": cert_id, "state": new_state, "updated_at": now}
                                                 for cert_id, new_state in certificate_states.items()])
            return self._end_task(s, task, TaskState.SUCCEEDED, card_state, wanted, now)

    @staticmethod
    def _check_moves(task_id: str, mine: Mapping[str, str], from_state: str,
                     certificate_states: Mapping[str, str]) -> None:
        """mine: the state of each certificate of the task, by id."""
        foreign = sorted(set(certificate_states) - set(mine))
        if foreign:
            raise InvalidArgument(f"task {task_id} did not issue certificate(s) {foreign}", task_id=task_id)
        moved = {cid: state for cid, state in mine.items() if cid in certificate_states and state != from_state}
        if moved:
            raise StateConflict(f"certificate(s) not in the internal issued state {from_state!r}: {moved}",
                                task_id=task_id)
        left = sorted(cid for cid, state in mine.items() if state == from_state and cid not in certificate_states)
        if left:
            raise InvalidArgument(f"task {task_id}: certificate(s) {left} in {from_state!r} have no target "
                                  f"state; every certificate of a successful task moves (C2)", task_id=task_id)

    def finish_task_failed(self, task_id: str, reason: str, message: str, card_state: str | None = None,
                           relations: Iterable[NewRelation] = (), *,
                           details: Mapping[str, Any] | None = None) -> TaskRecord:
        """C3: marks the task FAILED with its error; its certificates keep their state (the
        internal issued state) and carry the error so a C4 search shows why. card_state: the
        card's state after the failure, if it changes. relations: those to create even on
        failure (CreateObjectRelation=always, C9). details: the error's typed details
        (CardlineError.to_details()), kept as JSON. One transaction."""
        if not reason:
            raise InvalidArgument("a failed task needs an error reason")
        wanted = new_relations(relations)
        with self._db.write() as s:
            task = running_task_facts(s, task_id)
            now = utcnow()
            s.execute(update(Certificate).where(Certificate.task_id == task_id)
                      .values(task_error_reason=reason, task_error_message=message, updated_at=now))
            return self._end_task(s, task, TaskState.FAILED, card_state, wanted, now, error_reason=reason,
                                  error_message=message, error_details=dict(details) if details else None)

    def _end_task(self, s: Session, task: Any, state: TaskState, card_state: str | None,
                  relations: list[NewRelation], now: dt.datetime, **error: Any) -> TaskRecord:
        """The common end of a task (task: its running_task_facts): its card's state, its
        relations, its own final state (and error). The ended task."""
        conn = s.connection()
        if card_state is not None:
            if task.card_id is None:
                raise InvalidArgument(f"task {task.id} has no card to set to {card_state!r}", task_id=task.id)
            card = conn.execute(_CARD_TEMPLATE, {"card_id": task.card_id}).first()
            assert card is not None  # foreign key
            # A card object in a final state of its graph no longer holds its physical card.
            released = is_final(self.cards.final_states, card.template, card_state)
            conn.execute(_SET_CARD_STATE_RELEASED if released else _SET_CARD_STATE,
                         {"card_id": task.card_id, "state": card_state, "updated_at": now})
        # A relation that exists already (created earlier by relations.add, C9) is skipped;
        # the same relation listed twice is a caller's bug.
        seen: set[NewRelation] = set()
        for rel in relations:
            if rel in seen:
                raise StateConflict(f"task {task.id}: relation {astuple(rel)} is listed twice", task_id=task.id)
            seen.add(rel)
            check_relation_ends(s, rel)
            insert_relation(s, task.id, rel, now)
        ended = conn.execute(_END_TASK_WITH_ERROR if error else _END_TASK,
                             {"ended_task": task.id, "state": str(state), "finished_at": now, **error}).one()
        return record(TaskRecord, ended)
