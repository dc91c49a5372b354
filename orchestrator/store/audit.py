"""The audit trail (C5): who did what to which object. Append only."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select

from orchestrator.store.models import AuditEvent, utcnow
from orchestrator.store.records import AuditRecord
from orchestrator.store.rows import add_audit, audit_record
from orchestrator.store.sessions import Sessions


class Audit:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions

    def record(self, action: str, object_type: str, object_id: str, actor: str,
               detail: Mapping[str, Any] | None = None) -> AuditRecord:
        """Audits a handling action that changes no state in the store (a CA revocation, a
        sweep's decision, a recovery...). Append only; one transaction. State changes are
        audited by the change itself (certificates.change_state, cards.change_state)."""
        with self._db.write() as s:
            row = add_audit(s, action, object_type, object_id, actor, detail, utcnow())
            s.flush()
            return audit_record(row)

    def list(self, object_id: str | None = None, action: str | None = None,
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
        with self._db.read() as s:
            return [audit_record(r) for r in s.scalars(q)]
