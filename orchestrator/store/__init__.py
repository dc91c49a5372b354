"""The orchestrator's store: SQLAlchemy models, Alembic migrations, one repository class."""
from orchestrator.store.records import (CA_REQUEST_NOT_ISSUED, CA_REQUEST_PENDING, CA_REQUEST_STORED,
                                        CA_REQUEST_WRITTEN, CARD, CERTIFICATE, PROCESS_FAILED, PROCESS_RUNNING,
                                        PROCESS_SUCCEEDED, TASK_FAILED, TASK_RUNNING, TASK_SUCCEEDED,
                                        ArchivedKeyRecord, AuditRecord, CaRequestRecord, CardRecord,
                                        CertificateRecord, NewRelation, ProcessInstanceRecord, RelationRecord,
                                        TaskRecord, TaskStepRecord)
from orchestrator.store.store import DuplicateCertificate, StateConflict, Store

__all__ = ["CA_REQUEST_NOT_ISSUED", "CA_REQUEST_PENDING", "CA_REQUEST_STORED", "CA_REQUEST_WRITTEN", "CARD",
           "CERTIFICATE", "PROCESS_FAILED", "PROCESS_RUNNING", "PROCESS_SUCCEEDED", "TASK_FAILED",
           "TASK_RUNNING", "TASK_SUCCEEDED", "ArchivedKeyRecord", "AuditRecord", "CaRequestRecord", "CardRecord",
           "CertificateRecord", "NewRelation", "ProcessInstanceRecord", "RelationRecord", "TaskRecord",
           "TaskStepRecord", "DuplicateCertificate", "StateConflict", "Store"]
