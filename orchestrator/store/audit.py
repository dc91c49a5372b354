"""The audit trail (C5, docs/audit.md): who did what to which object, where. Append only and
hash-chained: rows.append_audit links every new row to the newest one; verify() finds an
edited, deleted, inserted or reordered row."""
from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, or_, select

from orchestrator.domain.audit_chain import ChainedRow, ChainReport, chained_row, verify_chain
from orchestrator.store.models import AuditEvent, utcnow
from orchestrator.store.records import CERTIFICATE, AuditRecord, AuditSubjects
from orchestrator.store.rows import add_audit, append_audit, audit_record, chained_fields
from orchestrator.store.sessions import Sessions

#: Rows read per round trip while verifying (the chain is checked as it streams).
VERIFY_BATCH = 1000


@dataclass(frozen=True)
class AuditFilter:
    """What `list` returns: every given part must match (docs/audit.md)."""
    object_id: str | None = None
    action: str | None = None
    actor: str | None = None
    since: dt.datetime | None = None        # at or after
    until: dt.datetime | None = None        # before
    card_id: str | None = None
    certificate_id: str | None = None       # the object, or one of the certificates it names
    task_id: str | None = None


class Audit:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions

    def record(self, action: str, object_type: str, object_id: str, actor: str,
               detail: Mapping[str, Any] | None = None, *,
               subjects: AuditSubjects | None = None) -> AuditRecord:
        """Audits an action in its own transaction (a CA revocation, a sweep's decision, a
        task's start and end, a lease...). State changes are audited by the change itself
        (certificates.change_state, cards.change_state), in its transaction."""
        with self._db.write() as s:
            row = add_audit(s, action, object_type, object_id, actor, detail, utcnow(), subjects)
            append_audit(s)
            return audit_record(row)

    def list(self, object_id: str | None = None, action: str | None = None,
             limit: int | None = None, *, where: AuditFilter | None = None,
             after_id: int | None = None) -> list[AuditRecord]:
        """Oldest first (in the order written); after_id: the id of the last row of the
        previous page."""
        q = _filtered(select(AuditEvent), where or AuditFilter())
        if object_id is not None:
            q = q.where(AuditEvent.object_id == object_id)
        if action is not None:
            q = q.where(AuditEvent.action == action)
        if after_id is not None:
            q = q.where(AuditEvent.id > after_id)
        q = q.order_by(AuditEvent.id)
        if limit is not None:
            q = q.limit(limit)
        with self._db.read() as s:
            return [audit_record(r) for r in s.scalars(q)]

    def verify(self, expected_head: str | None = None) -> ChainReport:
        """Checks the whole chain (domain/audit_chain.py), reading it in batches by id."""
        rows, last = [], 0
        with self._db.read() as s:
            while True:
                batch = s.scalars(select(AuditEvent).where(AuditEvent.id > last)
                                  .order_by(AuditEvent.id).limit(VERIFY_BATCH)).all()
                if not batch:
                    break
                rows += [_chained(r) for r in batch]
                last = batch[-1].id
                s.expunge_all()
        return verify_chain(rows, expected_head=expected_head)


def _chained(row: AuditEvent) -> ChainedRow:
    try:
        return chained_row(row.id, row.prev_hash, row.hash, chained_fields(row))
    except (ValueError, TypeError):      # a JSON column or the time edited into nonsense
        return ChainedRow(row.id, row.prev_hash, row.hash, content_matches=False)


def _filtered(q: Select, where: AuditFilter) -> Select:
    if where.object_id is not None:
        q = q.where(AuditEvent.object_id == where.object_id)
    if where.action is not None:
        q = q.where(AuditEvent.action == where.action)
    if where.actor is not None:
        q = q.where(AuditEvent.actor == where.actor)
    if where.since is not None:
        q = q.where(AuditEvent.at >= where.since)
    if where.until is not None:
        q = q.where(AuditEvent.at < where.until)
    if where.card_id is not None:
        q = q.where(AuditEvent.card_id == where.card_id)
    if where.task_id is not None:
        q = q.where(AuditEvent.task_id == where.task_id)
    if where.certificate_id is not None:
        # Quoted, so that one id is not found inside another.
        q = q.where(or_((AuditEvent.object_type == CERTIFICATE) & (AuditEvent.object_id == where.certificate_id),
                        AuditEvent.certificates.contains(f'"{where.certificate_id}"', autoescape=True)))
    return q
