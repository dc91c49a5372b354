"""The orchestrator's store: SQLAlchemy models, Alembic migrations, one repository class."""
from orchestrator.store.records import (CARD, CERTIFICATE, TASK_FAILED, TASK_RUNNING, TASK_SUCCEEDED,
                                        CardRecord, CertificateRecord, NewRelation, RelationRecord,
                                        TaskRecord, TaskStepRecord)
from orchestrator.store.store import DuplicateCertificate, StateConflict, Store

__all__ = ["CARD", "CERTIFICATE", "TASK_FAILED", "TASK_RUNNING", "TASK_SUCCEEDED", "CardRecord",
           "CertificateRecord", "NewRelation", "RelationRecord", "TaskRecord", "TaskStepRecord",
           "DuplicateCertificate", "StateConflict", "Store"]
