"""SQLAlchemy 2 models of the store. Only store.py and the migrations use them.

The schema is owned by the Alembic migrations in migrations/versions; these classes must
describe the same tables (a test compares them with autogenerate).
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID = String(36)           # str(uuid.uuid4()); a string on every backend keeps ids identical in records
NAME = String(200)        # templates, states, types, reasons, gateway and reader ids


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UtcDateTime(TypeDecorator[dt.datetime]):
    """Stores UTC and returns aware UTC datetimes on every backend.

    SQLite has no time zones and gives naive values back; PostgreSQL's timestamptz gives
    aware ones in the session time zone. Naive input is refused: its zone is a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store needs timezone-aware datetimes")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Card(Base):
    __tablename__ = "cards"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    serial: Mapped[str] = mapped_column(NAME, index=True)
    template: Mapped[str] = mapped_column(NAME)
    state: Mapped[str] = mapped_column(NAME)
    gateway_id: Mapped[str] = mapped_column(NAME)
    reader_id: Mapped[str] = mapped_column(NAME)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    # Revision 0006: who the card was produced for (the card_production task's `holder`).
    holder: Mapped[str | None] = mapped_column(NAME, index=True)
    # The physical card (docs/lifecycle.md): `identity` for good, `live_identity` only while
    # the card object is live (not final, not taken over by a re-issue). Unique: one live
    # card object per physical card, enforced by the database.
    identity: Mapped[str | None] = mapped_column(NAME, nullable=True, index=True)
    live_identity: Mapped[str | None] = mapped_column(NAME, nullable=True, index=True, unique=True)


class ProcessInstance(Base):
    """One run of a process definition and its process map (JSON text of a dict)."""

    __tablename__ = "process_instances"
    __table_args__ = (
        Index("ix_process_instances_state_created_at", "state", "created_at"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    definition: Mapped[str] = mapped_column(NAME, index=True)
    state: Mapped[str] = mapped_column(NAME)   # indexed with created_at, see __table_args__
    process_map: Mapped[str] = mapped_column(Text)
    error_reason: Mapped[str | None] = mapped_column(NAME)
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    # Revision 0003: the orchestrator instance running it (OrchestratorInstance.id).
    owner: Mapped[str | None] = mapped_column(NAME)


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    type: Mapped[str] = mapped_column(NAME)
    state: Mapped[str] = mapped_column(NAME, index=True)
    gateway_id: Mapped[str] = mapped_column(NAME, index=True)
    reader_id: Mapped[str] = mapped_column(NAME)
    card_id: Mapped[str | None] = mapped_column(ID, ForeignKey("cards.id"), index=True)
    error_reason: Mapped[str | None] = mapped_column(NAME)
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    # Revision 0002: the process instance the task belongs to and its position in it.
    process_instance_id: Mapped[str | None] = mapped_column(ID, ForeignKey("process_instances.id"), index=True)
    task_index: Mapped[int | None] = mapped_column(Integer)
    # Revision 0003: the orchestrator instance running the task (OrchestratorInstance.id).
    owner: Mapped[str | None] = mapped_column(NAME)
    # Revision 0004: the typed details of the error (CardlineError.to_details()).
    error_details: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class TaskStep(Base):
    """The step journal: one row per (task, step), rewritten as the step progresses."""

    __tablename__ = "task_steps"

    task_id: Mapped[str] = mapped_column(ID, ForeignKey("tasks.id"), primary_key=True)
    step_number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(NAME)
    state: Mapped[str] = mapped_column(NAME)
    detail: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class Certificate(Base):
    __tablename__ = "certificates"
    __table_args__ = (
        # One certificate per issuer and serial (RFC 5280 4.1.2.2): a second copy is a bug.
        UniqueConstraint("issuer", "serial_hex", name="uq_certificates_issuer_serial"),
        # C4: issued certificates are searched by state with template / task / age.
        Index("ix_certificates_state_created_at", "state", "created_at"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    serial_hex: Mapped[str] = mapped_column(String(64))
    issuer: Mapped[str] = mapped_column(String(1000))
    subject: Mapped[str] = mapped_column(String(1000))
    not_before: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    not_after: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    der: Mapped[bytes] = mapped_column(LargeBinary)
    template: Mapped[str] = mapped_column(NAME, index=True)
    ca_name: Mapped[str] = mapped_column(NAME)
    state: Mapped[str] = mapped_column(NAME)   # indexed with created_at, see __table_args__
    task_id: Mapped[str | None] = mapped_column(ID, ForeignKey("tasks.id"), index=True)
    task_error_reason: Mapped[str | None] = mapped_column(NAME)
    task_error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class ObjectRelation(Base):
    """A typed link between two stored objects (card -> certificate). Ids are not foreign
    keys: the two ends may be of any stored type."""

    __tablename__ = "object_relations"
    __table_args__ = (
        UniqueConstraint("source_type", "source_id", "target_type", "target_id", "relation_type",
                         name="uq_object_relations_link"),
        Index("ix_object_relations_target", "target_type", "target_id"),
    )

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    source_type: Mapped[str] = mapped_column(NAME)
    source_id: Mapped[str] = mapped_column(ID)
    target_type: Mapped[str] = mapped_column(NAME)
    target_id: Mapped[str] = mapped_column(ID)
    relation_type: Mapped[str] = mapped_column(NAME)
    task_id: Mapped[str | None] = mapped_column(ID, ForeignKey("tasks.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class AuditEvent(Base):
    """Who did what to which object (C5: every handling action is audited). Append only.
    The id is an integer sequence so that "oldest first" is the order of writing."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_object_id_id", "object_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(UtcDateTime, index=True)
    actor: Mapped[str] = mapped_column(NAME)
    action: Mapped[str] = mapped_column(NAME, index=True)
    object_type: Mapped[str] = mapped_column(NAME)
    object_id: Mapped[str] = mapped_column(NAME)   # indexed with id, see __table_args__
    detail: Mapped[str] = mapped_column(Text)       # JSON object
    # Revision 0008_audit_hash_chain (docs/audit.md): what the action touched, where it
    # applies, and the hash chain. certificates: JSON list of {"id", "ca", "serial_hex"}.
    card_id: Mapped[str | None] = mapped_column(NAME, nullable=True, index=True)
    task_id: Mapped[str | None] = mapped_column(NAME, nullable=True, index=True)
    gateway_id: Mapped[str | None] = mapped_column(NAME, nullable=True)
    reader_id: Mapped[str | None] = mapped_column(NAME, nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    certificates: Mapped[str | None] = mapped_column(Text, nullable=True)
    prev_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hash: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ArchivedKey(Base):
    """The private key of a certificate, wrapped (encrypted) under a key-encryption key
    the store never sees (C7 recovery). One per certificate."""

    __tablename__ = "archived_keys"

    certificate_id: Mapped[str] = mapped_column(ID, ForeignKey("certificates.id"), primary_key=True)
    kek_id: Mapped[str] = mapped_column(NAME)
    algorithm: Mapped[str] = mapped_column(NAME)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class CaRequest(Base):
    """The CA request journal (C16): one row per request sent to a CA, committed before the
    CA is called. request_id is the idempotency key the CA sees ("task:step:application").
    state: pending -> stored (certificate in the store, same transaction) -> written (on
    the card); pending -> not_issued when the reconciler learns the CA issued nothing."""

    __tablename__ = "ca_requests"
    __table_args__ = (
        Index("ix_ca_requests_state_created_at", "state", "created_at"),
    )

    request_id: Mapped[str] = mapped_column(String(500), primary_key=True)
    task_id: Mapped[str] = mapped_column(ID, ForeignKey("tasks.id"), index=True)
    ca_name: Mapped[str] = mapped_column(NAME)
    template: Mapped[str] = mapped_column(NAME)
    csr_der: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(NAME)   # indexed with created_at, see __table_args__
    serial_hex: Mapped[str | None] = mapped_column(String(64))
    certificate_id: Mapped[str | None] = mapped_column(ID, ForeignKey("certificates.id"))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class OrchestratorInstance(Base):
    """An orchestrator process (one per data directory) and when it was last seen alive:
    the reconciler ends the RUNNING tasks of an instance that stopped beating."""

    __tablename__ = "orchestrator_instances"

    id: Mapped[str] = mapped_column(NAME, primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    # Where the other replicas reach it (replica.advertise_address; revision 0010_replica_pool).
    address: Mapped[str | None] = mapped_column(NAME)


class ClientRequest(Base):
    """A client-chosen request id of an RPC that creates something (revision 0005): the id
    of what the first call created, so a retry with the same id returns it instead of
    creating a second one. kind: what was created ("process_instance", "task", ...);
    fingerprint: a digest of the first request, so the same id reused for a different
    request is refused instead of silently answered with the first result."""

    __tablename__ = "client_requests"

    kind: Mapped[str] = mapped_column(String(40), primary_key=True)
    request_id: Mapped[str] = mapped_column(NAME, primary_key=True)
    resource_id: Mapped[str] = mapped_column(NAME)
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, index=True)


class CardSecret(Base):
    """A card's own PUK (SO PIN), sealed under the key-encryption key (revision 0006), keyed
    by the card's token serial: what `unblock-pin` authenticates with. Never stored plain."""

    __tablename__ = "card_secrets"

    token_serial: Mapped[str] = mapped_column(NAME, primary_key=True)
    kek_id: Mapped[str] = mapped_column(NAME)
    algorithm: Mapped[str] = mapped_column(NAME)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class ProcessSecret(Base):
    """The secret inputs (PINs) of a RUNNING process instance, sealed under the key-encryption
    key (revision 0012), so that a replica taking the instance over (C16, takeover) can resend
    its card steps; deleted when the instance ends. Never stored plain."""

    __tablename__ = "process_secrets"

    process_instance_id: Mapped[str] = mapped_column(ID, ForeignKey("process_instances.id"), primary_key=True)
    kek_id: Mapped[str] = mapped_column(NAME)
    algorithm: Mapped[str] = mapped_column(NAME)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class DeploymentKey(Base):
    """The fingerprint of a key every replica on this database must share (revision
    0009_deployment_keys): kind "ca" (name: the CA's name; fingerprint of its signing
    certificate) or "kek" (name "kek"; the key-encryption key's key tag). The first
    orchestrator to start records it; one with another fingerprint is refused at start-up."""

    __tablename__ = "deployment_keys"

    kind: Mapped[str] = mapped_column(String(20), primary_key=True)
    name: Mapped[str] = mapped_column(NAME, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(200))
    first_seen: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    first_seen_by: Mapped[str] = mapped_column(NAME)


class Order(Base):
    """A production order (revision 0011_persisted_orders): N cards of one process, run by the
    replica `owner` (its orchestrator id); another replica adopts a RUNNING order whose owner
    stopped beating (orchestrator/services/orders.py). `generation` grows with every claim, so
    only one replica wins one. `had`: the card each reader gave the order ("gateway\\nreader"
    -> card key), so the order never puts two people on one card, across a takeover too."""

    __tablename__ = "orders"
    __table_args__ = (Index("ix_orders_state_owner", "state", "owner"),)

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    process: Mapped[str] = mapped_column(NAME)
    selector: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20))
    owner: Mapped[str] = mapped_column(NAME)
    generation: Mapped[int] = mapped_column(Integer)
    had: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime, index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class OrderCard(Base):
    """One card of an order: where it stands, the process instance that produces it (attempt
    n runs under the client request id "order:<id>:<index>:<n>"), its outcome, and its inputs:
    the non-secret ones as JSON, the secret ones (PINs) only sealed under the key-encryption
    key (`sealed_secrets`, bound to the order and the card's index; never stored plain)."""

    __tablename__ = "order_cards"
    __table_args__ = (Index("ix_order_cards_state", "state"),)    # the few cards not yet ended

    order_id: Mapped[str] = mapped_column(ID, ForeignKey("orders.id", ondelete="CASCADE"), primary_key=True)
    card_index: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    state: Mapped[str] = mapped_column(String(20))
    attempt: Mapped[int] = mapped_column(Integer)
    queue_position: Mapped[int] = mapped_column(Integer)
    gateway_id: Mapped[str] = mapped_column(NAME)
    reader_id: Mapped[str] = mapped_column(NAME)
    process_instance_id: Mapped[str] = mapped_column(ID)
    error_reason: Mapped[str] = mapped_column(NAME)
    error_message: Mapped[str] = mapped_column(Text)
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON)
    kek_id: Mapped[str | None] = mapped_column(NAME, nullable=True)
    sealed_secrets: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
# -- one reader pool across replicas (revision 0010_replica_pool; PostgreSQL only) -----------

class PoolGateway(Base):
    """A gateway linked to a replica (replica_id; link_id: which of its links, so that a link
    that ended after the gateway dialled again does not mark the new one disconnected)."""

    __tablename__ = "pool_gateways"

    gateway_id: Mapped[str] = mapped_column(NAME, primary_key=True)
    replica_id: Mapped[str] = mapped_column(NAME)
    link_id: Mapped[str] = mapped_column(ID)
    site: Mapped[str] = mapped_column(NAME)
    labels: Mapped[dict[str, str]] = mapped_column(JSON)
    version: Mapped[str] = mapped_column(NAME)
    connected: Mapped[bool] = mapped_column(Boolean)
    connected_since: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    last_seen: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class PoolReader(Base):
    """A reader of a pooled gateway as the gateway reports it (reader: its fields as JSON);
    last_used: when it was last given back (epoch seconds), for spreading work."""

    __tablename__ = "pool_readers"

    gateway_id: Mapped[str] = mapped_column(NAME, primary_key=True)
    reader_id: Mapped[str] = mapped_column(NAME, primary_key=True)
    reader: Mapped[dict[str, Any]] = mapped_column(JSON)
    last_used: Mapped[float] = mapped_column(Float)


class PoolHold(Base):
    """A reader held (kind "task" or "lease") by one replica's caller: at most one per reader."""

    __tablename__ = "pool_holds"

    gateway_id: Mapped[str] = mapped_column(NAME, primary_key=True)
    reader_id: Mapped[str] = mapped_column(NAME, primary_key=True)
    hold_id: Mapped[str] = mapped_column(ID, unique=True)
    replica_id: Mapped[str] = mapped_column(NAME)
    kind: Mapped[str] = mapped_column(String(20))
    holder: Mapped[str] = mapped_column(NAME)
    since: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class PoolWaiter(Base):
    """A request waiting for a reader, in the one queue (seq: its order). request: its
    selectors and whether it needs a card; takes: the cards it would take (None: any);
    state "waiting", "granted" (gateway_id/reader_id, held as hold_id = waiter_id) or "failed"."""

    __tablename__ = "pool_waiters"

    waiter_id: Mapped[str] = mapped_column(ID, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(), index=True)
    replica_id: Mapped[str] = mapped_column(NAME)
    kind: Mapped[str] = mapped_column(String(20))
    holder: Mapped[str] = mapped_column(NAME)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    takes: Mapped[list[str] | None] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20))
    position: Mapped[int] = mapped_column(Integer)
    gateway_id: Mapped[str | None] = mapped_column(NAME)
    reader_id: Mapped[str | None] = mapped_column(NAME)
    since: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class PoolLease(Base):
    """A lease of another service (orchestrator/services/leases.py), on its hold."""

    __tablename__ = "pool_leases"

    lease_id: Mapped[str] = mapped_column(NAME, primary_key=True)
    hold_id: Mapped[str] = mapped_column(ID)
    gateway_id: Mapped[str] = mapped_column(NAME)
    reader_id: Mapped[str] = mapped_column(NAME)
    reader: Mapped[dict[str, Any]] = mapped_column(JSON)
    owner: Mapped[str] = mapped_column(NAME)
    holder: Mapped[str] = mapped_column(NAME)
    ttl_s: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    acquired_at: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    auto_steps: Mapped[int] = mapped_column(Integer)
