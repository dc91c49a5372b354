"""What the store hands out: frozen dataclasses, never ORM objects.

Callers (services, the gRPC layer, the reconciler) run in other threads and outside any
session; plain values cannot lazy-load, go stale or be changed behind the store's back.
All datetimes are timezone-aware UTC.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import NamedTuple

# Object types as they appear in object relations and CoreObjectDescriptors.
CARD = "Card"
CERTIFICATE = "Certificate"

# Task states. A task is RUNNING until one finish_task_* call ends it, exactly once.
TASK_RUNNING = "RUNNING"
TASK_SUCCEEDED = "SUCCEEDED"
TASK_FAILED = "FAILED"


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
    state: str                  # TASK_RUNNING / TASK_SUCCEEDED / TASK_FAILED
    gateway_id: str
    reader_id: str
    card_id: str | None
    error_reason: str | None
    error_message: str | None
    created_at: dt.datetime
    finished_at: dt.datetime | None


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
class RelationRecord:
    id: str
    source_type: str
    source_id: str
    target_type: str
    target_id: str
    relation_type: str
    task_id: str | None
    created_at: dt.datetime


class NewRelation(NamedTuple):
    """A relation to create; plain 5-tuples in this order are accepted as well."""

    source_type: str
    source_id: str
    target_type: str
    target_id: str
    relation_type: str
