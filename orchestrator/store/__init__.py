"""The orchestrator's store: SQLAlchemy models, Alembic migrations, one repository class."""
from orchestrator.store.records import (CARD, CERTIFICATE, PROCESS_FAILED, PROCESS_RUNNING, PROCESS_SUCCEEDED,
                                        TASK_FAILED, TASK_RUNNING, TASK_SUCCEEDED, ArchivedKeyRecord,
                                        AuditRecord, CardRecord, CertificateRecord, NewRelation,
                                        ProcessInstanceRecord, RelationRecord, TaskRecord, TaskStepRecord)
from orchestrator.store.store import DuplicateCertificate, StateConflict, Store

__all__ = ["CARD", "CERTIFICATE", "PROCESS_FAILED", "PROCESS_RUNNING", "PROCESS_SUCCEEDED", "TASK_FAILED",
           "TASK_RUNNING", "TASK_SUCCEEDED", "ArchivedKeyRecord", "AuditRecord", "CardRecord",
           "CertificateRecord", "NewRelation", "ProcessInstanceRecord", "RelationRecord", "TaskRecord",
           "TaskStepRecord", "DuplicateCertificate", "StateConflict", "Store"]
