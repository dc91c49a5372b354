"""What the store hands out: frozen dataclasses, never ORM objects.

Callers (services, the gRPC layer, the reconciler) run in other threads and outside any
session; plain values cannot lazy-load, go stale or be changed behind the store's back.
All datetimes are timezone-aware UTC.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# Object types as they appear in object relations, CoreObjectDescriptors and audit events.
CARD = "Card"
CERTIFICATE = "Certificate"
TASK = "Task"
PROCESS_INSTANCE = "ProcessInstance"
TOKEN_SERIAL = "TokenSerial"         # audit events about a card's secrets, keyed by its token serial
LEASE = "Lease"                      # audit events about a lease of the reader pool
ORDER = "Order"                      # audit events about a production order
CONFIGURATION = "Configuration"      # audit events about the configuration directory


class TaskState(StrEnum):
    """A task is RUNNING until one finish_task_* call ends it, exactly once."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


class ProcessState(StrEnum):
    """A process instance is RUNNING until processes.finish ends it, exactly once."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def final(self) -> bool:
        return self is not ProcessState.RUNNING


class CaRequestState(StrEnum):
    """States of a CA request journal row (C16). Only PENDING is unsettled: the reconciler
    asks the CA about it. STORED: the certificate is in the store (moved there in the same
    transaction); WRITTEN: also on the card; NOT_ISSUED: the CA says it issued nothing."""

    PENDING = "pending"
    STORED = "stored"
    WRITTEN = "written"
    NOT_ISSUED = "not_issued"


# Audit actions the orchestrator writes (the store accepts any non-empty action).
AUDIT_CHANGE_STATE = "change_state"
AUDIT_CHANGE_STATE_IN_CA = "change_state_in_ca"
AUDIT_HANDLE_ISSUED = "handle_issued"
AUDIT_SWEEP = "sweep"
AUDIT_REVOKE_ON_ISSUE = "revoke_on_issue"
AUDIT_RECOVER = "recover"
AUDIT_CSR_IGNORED = "csr_request_ignored"     # a card's CSR asked for a subject, SANs or extensions: ignored
AUDIT_RECONCILE = "reconcile"
AUDIT_RECONCILE_REQUESTED = "reconcile_requested"
AUDIT_TASK_STARTED = "task_started"
AUDIT_TASK_FINISHED = "task_finished"
AUDIT_PROCESS_STARTED = "process_started"
AUDIT_PROCESS_TASK = "process_task"
AUDIT_PROCESS_FINISHED = "process_finished"
AUDIT_LEASE_ACQUIRED = "lease_acquired"
AUDIT_LEASE_RENEWED = "lease_renewed"
AUDIT_LEASE_ENDED = "lease_ended"             # released, expired, its gateway gone
AUDIT_RAW_STEP = "raw_step"                   # a step a client ran on a leased reader
AUDIT_ORDER_CREATED = "order_created"
AUDIT_ORDER_CANCELLED = "order_cancelled"
AUDIT_ORDER_FINISHED = "order_finished"
AUDIT_CONFIGURATION_LOADED = "configuration_loaded"
AUDIT_SET_CARD_PUK = "set_card_puk"


def _coerce(record: object, name: str, kind: type[StrEnum]) -> None:
    """Rows hold plain strings; records hand out the enum member (equal to the string)."""
    object.__setattr__(record, name, kind(getattr(record, name)))


@dataclass(frozen=True)
class CardRecord:
    id: str
    serial: str
    template: str
    state: str
    gateway_id: str
    reader_id: str
    created_at: dt.datetime
    updated_at: dt.datetime
    holder: str | None = None               # revision 0006: who the card was produced for
    identity: str | None = None         # the physical card: "pkcs11:<token serial>"; None: unknown
    live_identity: str | None = None    # = identity while the card object is live, else None

    @property
    def live(self) -> bool:
        return self.live_identity is not None


@dataclass(frozen=True)
class CardSecretRecord:
    """A card's PUK sealed under a key-encryption key (revision 0006); never the plain PUK."""
    token_serial: str
    kek_id: str
    algorithm: str
    sealed: bytes = field(repr=False)
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class CertificateRecord:
    id: str
    serial_hex: str             # lowercase hex of the serial number, no leading zeros: format(serial, "x")
    issuer: str                 # RFC 4514 string, as cryptography's Name.rfc4514_string() renders it
    subject: str                # RFC 4514
    not_before: dt.datetime
    not_after: dt.datetime
    der: bytes
    template: str
    ca_name: str
    state: str
    task_id: str | None
    task_error_reason: str | None   # copied from the task when it fails (C4: each hit carries the task's error)
    task_error_message: str | None
    created_at: dt.datetime         # when the store received it from the CA: the certificate's "age" (C4)
    updated_at: dt.datetime

    @property
    def serial(self) -> int:
        return int(self.serial_hex, 16)


@dataclass(frozen=True)
class TaskRecord:
    id: str
    type: str
    state: TaskState
    gateway_id: str
    reader_id: str
    card_id: str | None
    error_reason: str | None
    error_message: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None
    # Added with revision 0002; defaults keep older constructors working.
    process_instance_id: str | None = None
    task_index: int | None = None           # position of the task in its process definition
    owner: str | None = None                # revision 0003: the orchestrator instance running it
    error_details: dict[str, Any] | None = None   # revision 0004: CardlineError.to_details() of the error

    def __post_init__(self) -> None:
        _coerce(self, "state", TaskState)


@dataclass(frozen=True)
class ProcessInstanceRecord:
    id: str
    definition: str                         # the process's name
    state: ProcessState
    process_map: dict[str, Any]             # a fresh dict of JSON values on every read
    error_reason: str | None
    error_message: str | None
    created_at: dt.datetime
    updated_at: dt.datetime                 # last change of the map or the state
    finished_at: dt.datetime | None
    owner: str | None = None                # revision 0003: the orchestrator instance running it

    def __post_init__(self) -> None:
        _coerce(self, "state", ProcessState)


@dataclass(frozen=True)
class AuditRecord:
    id: int                                 # increasing in the order of writing
    at: dt.datetime
    actor: str
    action: str                             # AUDIT_* above, or another non-empty name
    object_type: str                        # CERTIFICATE, CARD, ...
    object_id: str
    detail: dict[str, Any]                  # state changes: {"from", "to", "reason", ...}
    # Revision 0008_audit_hash_chain: where the action applies (AuditSubjects) and its link.
    card_id: str | None = None
    task_id: str | None = None
    gateway_id: str | None = None
    reader_id: str | None = None
    step: int | None = None
    certificates: tuple[dict[str, str], ...] = ()    # {"id", "ca", "serial_hex"}
    prev_hash: str | None = None
    hash: str | None = None


@dataclass(frozen=True)
class AuditSubjects:
    """What an audited action touched and where (docs/audit.md); every part optional.
    certificates: {"id", "ca", "serial_hex"} each (certificate_subject() builds one)."""
    card_id: str | None = None
    task_id: str | None = None
    gateway_id: str | None = None
    reader_id: str | None = None
    step: int | None = None
    certificates: tuple[dict[str, str], ...] = ()


def certificate_subject(certificate_id: str, ca: str, serial_hex: str) -> dict[str, str]:
    return {"id": certificate_id, "ca": ca, "serial_hex": serial_hex}


@dataclass(frozen=True)
class ArchivedKeyRecord:
    certificate_id: str
    kek_id: str                             # which key-encryption key wrapped it
    algorithm: str                          # e.g. "AES-256-GCM"
    wrapped_key: bytes = field(repr=False)  # encrypted; the store never sees a plain key
    created_at: dt.datetime


@dataclass(frozen=True)
class TaskStepRecord:
    task_id: str
    step_number: int
    name: str
    state: str
    detail: str
    created_at: dt.datetime     # first journaled
    updated_at: dt.datetime     # last journaled (the journal is an upsert per step)


@dataclass(frozen=True)
class CaRequestRecord:
    request_id: str             # the idempotency key the CA sees: "task:step:application"
    task_id: str
    ca_name: str
    template: str               # certificate template
    csr_der: bytes = field(repr=False)
    state: CaRequestState
    serial_hex: str | None      # once stored
    certificate_id: str | None  # once stored
    error: str | None           # why it is not_issued, or the last reconciliation problem
    created_at: dt.datetime     # journaled (before the CA was called)
    updated_at: dt.datetime

    def __post_init__(self) -> None:
        _coerce(self, "state", CaRequestState)


@dataclass(frozen=True)
class RelationRecord:
    id: str
    source_type: str
    source_id: str
    target_type: str
    target_id: str
    relation_type: str
    task_id: str | None
    created_at: dt.datetime


@dataclass(frozen=True)
class NewRelation:
    """A relation to create: source -> target of relation_type."""

    source_type: str
    source_id: str
    target_type: str
    target_id: str
    relation_type: str


@dataclass(frozen=True)
class WrappedKey:
    """A private key wrapped (encrypted) under a key-encryption key, to archive beside its
    certificate (C7): the three values KeyArchive.seal returns."""

    kek_id: str                             # which key-encryption key wrapped it
    algorithm: str                          # e.g. "AES-256-GCM"
    wrapped_key: bytes = field(repr=False)


@dataclass(frozen=True)
class DeploymentKeyRecord:
    """A key fingerprint recorded by the first orchestrator on this database (deployment_keys)."""
    kind: str
    name: str
    fingerprint: str
    first_seen: dt.datetime
    first_seen_by: str
