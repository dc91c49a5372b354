"""Object relations (card -> certificate), created on their own (C9) or with a task's end."""
from __future__ import annotations

from collections.abc import Collection, Iterable

from sqlalchemy import select

from orchestrator.store.models import ObjectRelation, utcnow
from orchestrator.store.records import CARD, NewRelation, RelationRecord
from orchestrator.store.rows import check_relation_ends, insert_relation, new_relations, record, relation_key, task_row
from orchestrator.store.sessions import Sessions


class Relations:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions

    def add(self, task_id: str | None, relations: Iterable[NewRelation]) -> list[RelationRecord]:
        """C9: creates relations on their own, in one transaction - e.g. the card->certificate
        relation of CreateObjectRelation=always right after the certificate is stored, so it
        survives a failure of the task. Idempotent: a relation that exists already (same
        source, target and type) is not an error; its stored record is returned (with the
        task that created it). Returns one record per given relation, in the given order.
        NotFound if the task or a Card/Certificate end does not exist."""
        wanted = new_relations(relations)
        with self._db.write() as s:
            if task_id is not None:
                task_row(s, task_id)
            now = utcnow()
            out = []
            for rel in wanted:
                check_relation_ends(s, rel)
                insert_relation(s, task_id, rel, now)
                row = s.scalar(select(ObjectRelation).where(*relation_key(rel)))
                assert row is not None
                out.append(record(RelationRecord, row))
            return out

    def cards_of(self, certificate_ids: Collection[str]) -> dict[str, str]:
        """The card each certificate is related to, in one query: certificate id -> card id
        (the oldest relation wins); certificates without a card are left out."""
        if not certificate_ids:
            return {}
        q = (select(ObjectRelation.target_id, ObjectRelation.source_id)
             .where(ObjectRelation.source_type == CARD, ObjectRelation.target_id.in_(list(certificate_ids)))
             .order_by(ObjectRelation.created_at, ObjectRelation.id))
        out: dict[str, str] = {}
        with self._db.read() as s:
            for certificate_id, card_id in s.execute(q):
                out.setdefault(certificate_id, card_id)
        return out

    def list(self, source_id: str | None = None, target_id: str | None = None) -> list[RelationRecord]:
        q = select(ObjectRelation)
        if source_id is not None:
            q = q.where(ObjectRelation.source_id == source_id)
        if target_id is not None:
            q = q.where(ObjectRelation.target_id == target_id)
        with self._db.read() as s:
            return [record(RelationRecord, r)
                    for r in s.scalars(q.order_by(ObjectRelation.created_at, ObjectRelation.id))]
