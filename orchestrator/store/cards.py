"""Cards: the card object of a production task (C8), its state (C5) and the physical card it
is bound to (one live card object per physical card, docs/lifecycle.md)."""
from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from orchestrator.store import paging
from orchestrator.store.models import Card, Certificate, ObjectRelation, Task, utcnow
from orchestrator.store.paging import Keyset
from orchestrator.store.records import CARD, CERTIFICATE, CardRecord
from orchestrator.store.rows import add_audit, card_row, change_state, new_id, record, running_task_facts
from orchestrator.store.sessions import Sessions
from shared.errors import AlreadyExists, StateConflict

#: Audit action of a re-issue that takes a physical card over from its previous card object.
AUDIT_CARD_TAKEN_OVER = "card_taken_over"


class Cards:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions
        #: card template -> the final states of its card state graph; a card object moved to
        #: one of them is no longer live and frees its physical card. Set where the store is
        #: wired (orchestrator/app.py); the store itself knows no state graphs.
        self.final_states: Mapping[str, frozenset[str]] = {}

    def create(self, task_id: str, serial: str, template: str, state: str, gateway_id: str,
               reader_id: str, *, holder: str | None = None, identity: str | None = None,
               take_over: bool = False, actor: str = "card_production", card_id: str | None = None) -> CardRecord:
        """The card object of a card production task (C8); becomes the task's card.
        card_id: chosen by the caller (a card task that commits the card with its next step's
        journal entry, Store.together), else a new id.

        identity: the physical card ("pkcs11:<token serial>"). A card that already holds a
        live card object is refused (AlreadyExists naming both) unless `take_over` (a process
        that re-issues or replaces the card): then, in the same transaction, the old card
        object stops being live (audited, `card_taken_over`) and the new one is."""
        with self._db.write() as s:
            # Core statements built once (no ORM unit of work): every card production runs this.
            task = running_task_facts(s, task_id)
            if task.card_id is not None:
                raise StateConflict(f"task {task_id} already has card {task.card_id}", task_id=task_id)
            conn = s.connection()
            now = utcnow()
            live = None
            if identity is not None:
                live = conn.execute(_LIVE_CARD_FOR_UPDATE, {"identity": identity}).first()
                if live is not None and not take_over:
                    raise card_in_use(identity, live)
                if live is not None:
                    conn.execute(_NOT_LIVE, {"card_id": live.id, "updated_at": now})
            values: dict[str, Any] = {
                "id": card_id or new_id(), "serial": serial, "template": template, "state": state,
                "gateway_id": gateway_id, "reader_id": reader_id, "created_at": now, "updated_at": now,
                "holder": holder or None, "identity": identity, "live_identity": identity}
            try:
                conn.execute(_INSERT_CARD, values)
            except IntegrityError:   # another writer made a live card object of it just now
                raise AlreadyExists(f"card {identity} already holds a live card object (made concurrently); "
                                    "one physical card holds one live card object", identity=identity) from None
            if live is not None:
                add_audit(s, AUDIT_CARD_TAKEN_OVER, CARD, live.id, actor,
                          {"identity": identity, "by_card": values["id"], "task_id": task_id, "state": live.state},
                          now)
            conn.execute(_SET_TASK_CARD, {"task_id": task_id, "card_id": values["id"]})
            return CardRecord(**values)

    def live(self, identity: str) -> CardRecord | None:
        """The live card object of a physical card, if any."""
        with self._db.read() as s:
            card = s.scalar(select(Card).where(Card.live_identity == identity))
            return record(CardRecord, card) if card is not None else None

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
            release_if_final(card, self.final_states)
            return record(CardRecord, card)

    def certificate_ids(self, card_id: str) -> list[str]:
        """Certificates related to the card (relations Card -> Certificate), oldest first
        (by when the store received them).
        Unlike certificates.list(card_id=...), certificates of the card's failed tasks
        without a relation are not included: they are probably not on the card."""
        with self._db.read() as s:
            card_row(s, card_id)                     # NotFound for an unknown card
        return self.certificate_ids_of([card_id])[card_id]

    def certificate_ids_of(self, card_ids: Collection[str]) -> dict[str, list[str]]:
        """certificate_ids for many cards in one query (a page of a listing): card id ->
        related certificate ids, oldest first; a card without any maps to []."""
        out: dict[str, list[str]] = {card_id: [] for card_id in card_ids}
        if not out:
            return out
        q = (select(ObjectRelation.source_id, Certificate.id)
             .join(Certificate, Certificate.id == ObjectRelation.target_id)
             .where(ObjectRelation.source_type == CARD, ObjectRelation.source_id.in_(out),
                    ObjectRelation.target_type == CERTIFICATE)
             .order_by(Certificate.created_at, Certificate.id))
        with self._db.read() as s:
            for card_id, certificate_id in s.execute(q):
                out[card_id].append(certificate_id)
        return out

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

def card_in_use(identity: str, live: Any) -> AlreadyExists:
    """live: the live card object (a Card, or a row with its id, template and state)."""
    return AlreadyExists(
        f"card {identity} already holds the live card object {live.id} (template {live.template}, state "
        f"{live.state}); a card is produced once: retire or replace that card object first, or run a process "
        "that re-issues the card (card_production with `reissue: true`)",
        identity=identity, card_id=live.id)


def release_if_final(card: Card, final_states: Mapping[str, frozenset[str]]) -> None:
    """A card object in a final state of its graph no longer holds its physical card."""
    if card.live_identity is not None and is_final(final_states, card.template, card.state):
        card.live_identity = None


def is_final(final_states: Mapping[str, frozenset[str]], template: str, state: str) -> bool:
    """Whether STATE is a final state of the card state graph of card template TEMPLATE."""
    return state in final_states.get(template, frozenset())


# The statements of Cards.create, built once (the values come with each execution).
_LIVE_CARD_FOR_UPDATE = select(Card.id, Card.template, Card.state).where(
    Card.live_identity == bindparam("identity")).with_for_update()
_NOT_LIVE = update(Card).where(Card.id == bindparam("card_id")).values(live_identity=None,
                                                                        updated_at=bindparam("updated_at"))
_INSERT_CARD = insert(Card)
_SET_TASK_CARD = update(Task).where(Task.id == bindparam("task_id")).values(card_id=bindparam("card_id"))
