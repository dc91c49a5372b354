"""Cards: the card object of a production task (C8) and its state (C5)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select

from orchestrator.store import paging
from orchestrator.store.models import Card, Certificate, ObjectRelation, utcnow
from orchestrator.store.paging import Keyset
from orchestrator.store.records import CARD, CERTIFICATE, CardRecord
from orchestrator.store.rows import card_row, change_state, new_id, record, running_task_row
from orchestrator.store.sessions import Sessions
from shared.errors import StateConflict


class Cards:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions

    def create(self, task_id: str, serial: str, template: str, state: str, gateway_id: str,
               reader_id: str, holder: str | None = None) -> CardRecord:
        """The card object of a card production task (C8); becomes the task's card."""
        with self._db.write() as s:
            task = running_task_row(s, task_id)
            if task.card_id is not None:
                raise StateConflict(f"task {task_id} already has card {task.card_id}", task_id=task_id)
            now = utcnow()
            card = Card(id=new_id(), serial=serial, template=template, state=state, gateway_id=gateway_id,
                        reader_id=reader_id, created_at=now, updated_at=now, holder=holder or None)
            s.add(card)
            s.flush()
            task.card_id = card.id
            return record(CardRecord, card)

    def get(self, card_id: str) -> CardRecord:
        with self._db.read() as s:
            return record(CardRecord, card_row(s, card_id))

    def change_state(self, card_id: str, to_state: str, *, from_state: str | None, actor: str,
                     action: str, reason: str | None = None,
                     detail: Mapping[str, Any] | None = None) -> CardRecord:
        """Like certificates.change_state, for a card: state change and audit event in ONE
        transaction; StateConflict (and nothing written) if the card is not in from_state."""
        with self._db.write() as s:
            card = card_row(s, card_id, lock=True)
            change_state(s, card, CARD, to_state, from_state, actor, action, reason, detail)
            return record(CardRecord, card)

    def certificate_ids(self, card_id: str) -> list[str]:
        """Certificates related to the card (relations Card -> Certificate), oldest first
        (by when the store received them).
        Unlike certificates.list(card_id=...), certificates of the card's failed tasks
        without a relation are not included: they are probably not on the card."""
        with self._db.read() as s:
            card_row(s, card_id)
            related = select(ObjectRelation.target_id).where(
                ObjectRelation.source_type == CARD, ObjectRelation.source_id == card_id,
                ObjectRelation.target_type == CERTIFICATE)
            return list(s.scalars(select(Certificate.id).where(Certificate.id.in_(related))
                                  .order_by(Certificate.created_at, Certificate.id)))

    def list(self, *, holder: str | None = None, state: str | None = None, template: str | None = None,
             token_serial: str | None = None, after: Keyset | None = None,
             limit: int | None = None) -> list[CardRecord]:
        """Cards by holder, state, template and token serial (all combine with AND), oldest
        first (created_at, then id); `after` (the last card of the previous page) / `limit`
        page through them."""
        q = select(Card)
        for column, value in ((Card.holder, holder), (Card.state, state), (Card.template, template),
                              (Card.serial, token_serial)):
            if value is not None:
                q = q.where(column == value)
        q = paging.after(q, Card.created_at, Card.id, after)
        if limit is not None:
            q = q.limit(limit)
        with self._db.read() as s:
            return [record(CardRecord, c) for c in s.scalars(q)]
