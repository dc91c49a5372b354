"""The orchestrator's store: SQLAlchemy models, Alembic migrations, the Store facade and its
per-aggregate parts."""
from orchestrator.store.records import (
    CARD,
    CERTIFICATE,
    ArchivedKeyRecord,
    AuditRecord,
    CardRecord,
    CaRequestRecord,
    CaRequestState,
    CertificateRecord,
    NewRelation,
    ProcessInstanceRecord,
    ProcessState,
    RelationRecord,
    TaskRecord,
    TaskState,
    TaskStepRecord,
    WrappedKey,
)
from orchestrator.store.store import DuplicateCertificate, StateConflict, Store

__all__ = ["CARD", "CERTIFICATE", "ArchivedKeyRecord", "AuditRecord", "CaRequestRecord", "CaRequestState",
           "CardRecord", "CertificateRecord", "DuplicateCertificate", "NewRelation", "ProcessInstanceRecord",
           "ProcessState", "RelationRecord", "StateConflict", "Store", "TaskRecord", "TaskState", "TaskStepRecord",
           "WrappedKey"]
