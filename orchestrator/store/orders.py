"""Production orders and their cards (revision 0011_persisted_orders).

An order belongs to one orchestrator replica at a time (`owner`); `generation` counts its
claims, so that only one replica wins an adoption (claim: one conditional UPDATE) and a
replica that lost its order cannot write over the adopter's (`save`: only rows of orders the
writer still owns at the generation it knows). Secret inputs arrive here sealed; sealing and
opening are orchestrator/services/orders.py's job.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from orchestrator.store import paging
from orchestrator.store.models import Order, OrderCard, utcnow
from orchestrator.store.paging import Keyset
from orchestrator.store.sessions import Sessions
from shared.errors import InvalidArgument, NotFound, quoted

RUNNING, DONE, CANCELLED = "RUNNING", "DONE", "CANCELLED"
#: The card fields an order's owner writes as the card goes (save()).
CARD_FIELDS = ("state", "attempt", "queue_position", "gateway_id", "reader_id", "process_instance_id",
               "error_reason", "error_message")


@dataclass(frozen=True)
class OrderCardRecord:
    index: int
    state: str
    attempt: int
    queue_position: int
    gateway_id: str
    reader_id: str
    process_instance_id: str
    error_reason: str
    error_message: str


@dataclass(frozen=True)
class OrderRecord:
    id: str
    process: str
    selector: Mapping[str, Any]
    state: str
    owner: str
    generation: int
    had: Mapping[str, str]
    created_at: dt.datetime
    updated_at: dt.datetime
    cards: tuple[OrderCardRecord, ...] = ()


@dataclass(frozen=True)
class OrderCardInputs:
    """What a card's process is started with: the non-secret inputs, and the secret ones
    sealed under the key-encryption key `kek_id` (None: the card has no secret input)."""
    index: int
    inputs: Mapping[str, Any]
    kek_id: str | None = None
    sealed_secrets: bytes | None = None


@dataclass(frozen=True)
class OrderChange:
    """What an owner writes about one order in one save(): card rows (index -> every one of
    the CARD_FIELDS), the readers' cards it had (None: unchanged), and DONE when every card ended."""
    order_id: str
    generation: int
    cards: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)
    had: Mapping[str, str] | None = None
    done: bool = False


def _card_record(row: OrderCard) -> OrderCardRecord:
    return OrderCardRecord(row.card_index, row.state, row.attempt, row.queue_position, row.gateway_id, row.reader_id,
                           row.process_instance_id, row.error_reason, row.error_message)


def _record(row: Order, cards: Sequence[OrderCard]) -> OrderRecord:
    return OrderRecord(row.id, row.process, dict(row.selector), row.state, row.owner, row.generation, dict(row.had),
                       row.created_at, row.updated_at, tuple(_card_record(c) for c in cards))


class Orders:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions

    def create(self, order_id: str, process: str, selector: Mapping[str, Any], owner: str,
               cards: Sequence[OrderCardInputs]) -> OrderRecord:
        """A new RUNNING order owned by `owner`, with every card queued, in one transaction."""
        if not order_id or not process or not owner or not cards:
            raise InvalidArgument("an order needs an id, a process, an owner and at least one card")
        now = utcnow()
        with self._db.write() as s:
            row = Order(id=order_id, process=process, selector=dict(selector), state=RUNNING, owner=owner,
                        generation=1, had={}, created_at=now, updated_at=now)
            s.add(row)
            s.flush()
            rows = [OrderCard(order_id=order_id, card_index=c.index, state="queued", attempt=0, queue_position=0,
                              gateway_id="", reader_id="", process_instance_id="", error_reason="",
                              error_message="", inputs=dict(c.inputs), kek_id=c.kek_id,
                              sealed_secrets=c.sealed_secrets, updated_at=now) for c in cards]
            s.add_all(rows)
            s.flush()
            return _record(row, rows)

    def get(self, order_id: str) -> OrderRecord:
        with self._db.read() as s:
            row = s.get(Order, order_id)
            if row is None:
                raise NotFound(f"no order {quoted(order_id)}", order_id=order_id)
            return _record(row, self._cards(s, [order_id])[order_id])

    def page(self, limit: int, after: Keyset | None = None) -> list[OrderRecord]:
        """Up to `limit` orders with their cards, oldest first, past `after` (the (created_at,
        id) of the last order of the previous page)."""
        with self._db.read() as s:
            rows = list(s.scalars(paging.after(select(Order), Order.created_at, Order.id, after).limit(limit)))
            cards = self._cards(s, [r.id for r in rows])
            return [_record(r, cards[r.id]) for r in rows]

    @staticmethod
    def _cards(s: Session, order_ids: Collection[str]) -> dict[str, list[OrderCard]]:
        out: dict[str, list[OrderCard]] = {i: [] for i in order_ids}
        ids = list(order_ids)
        for start in range(0, len(ids), 500):          # bounded IN lists
            for c in s.scalars(select(OrderCard).where(OrderCard.order_id.in_(ids[start:start + 500]))
                               .order_by(OrderCard.order_id, OrderCard.card_index)):
                out[c.order_id].append(c)
        return out

    def card_inputs(self, order_id: str) -> list[OrderCardInputs]:
        with self._db.read() as s:
            return [OrderCardInputs(c.card_index, dict(c.inputs), c.kek_id, c.sealed_secrets)
                    for c in s.scalars(select(OrderCard).where(OrderCard.order_id == order_id)
                                       .order_by(OrderCard.card_index))]

    def save(self, owner: str, changes: Sequence[OrderChange]) -> set[str]:
        """Writes what `owner` saw happen to its orders, all in ONE transaction (the card
        changes of a moment are merged into one write). An order that `owner` no longer owns
        at the change's generation (another replica adopted it) is left alone: its id is
        returned, so the caller stops running it."""
        lost: set[str] = set()
        rows: list[dict[str, Any]] = []
        if not changes:
            return lost
        now = utcnow()
        with self._db.write() as s:
            owned = {r.id: r for r in s.scalars(select(Order).where(
                Order.id.in_([c.order_id for c in changes]), Order.owner == owner).with_for_update())}
            for change in changes:
                row = owned.get(change.order_id)
                if row is None or row.generation != change.generation:
                    lost.add(change.order_id)
                    continue
                for index, values in change.cards.items():
                    if set(values) != set(CARD_FIELDS):
                        raise InvalidArgument(f"an order card is saved with exactly {CARD_FIELDS}, "
                                              f"not {sorted(values)}")
                    rows.append({"order_id": change.order_id, "card_index": index, **values, "updated_at": now})
                if change.had is not None:
                    row.had = dict(change.had)
                if change.done and row.state == RUNNING:
                    row.state = DONE
                row.updated_at = now
            if rows:
                s.execute(update(OrderCard), rows)      # by primary key, one executemany
            s.flush()
        return lost

    def cancel(self, order_id: str) -> tuple[OrderRecord, bool]:
        """A RUNNING order becomes CANCELLED (from any replica: its owner sees the state and
        fails the cards still queued). Returns the order and whether this call cancelled it."""
        with self._db.write() as s:
            row = s.get(Order, order_id, with_for_update=True)
            if row is None:
                raise NotFound(f"no order {quoted(order_id)}", order_id=order_id)
            cancelled = row.state == RUNNING
            if cancelled:
                row.state, row.updated_at = CANCELLED, utcnow()
                s.flush()
            return _record(row, self._cards(s, [order_id])[order_id]), cancelled

    def unfinished(self) -> list[tuple[str, str, int, str]]:
        """(id, owner, generation, state) of every order with a card not yet ended (RUNNING,
        or CANCELLED with cards still running): what a replica may have to adopt."""
        with self._db.read() as s:
            open_ids = select(OrderCard.order_id).where(OrderCard.state.in_(("queued", "running")))
            return [(r.id, r.owner, r.generation, r.state) for r in s.scalars(
                select(Order).where(or_(Order.state == RUNNING, Order.id.in_(open_ids))).order_by(Order.created_at))]

    def purge_ended(self, before: dt.datetime, limit: int = 500) -> int:
        """Deletes, with their cards, up to LIMIT orders that ended (DONE, or CANCELLED with no
        card still queued or running) and last changed before BEFORE, oldest first. How many
        went. What each card produced stays: the process instances, tasks, certificates and
        the audit trail of the order are not the order's rows."""
        with self._db.write() as s:
            open_ids = select(OrderCard.order_id).where(OrderCard.state.in_(("queued", "running")))
            ids = list(s.scalars(select(Order.id).where(Order.state.in_((DONE, CANCELLED)), Order.updated_at < before,
                                                        Order.id.not_in(open_ids))
                                 .order_by(Order.updated_at).limit(limit).with_for_update(skip_locked=True)))
            if ids:
                s.execute(delete(OrderCard).where(OrderCard.order_id.in_(ids)))
                s.execute(delete(Order).where(Order.id.in_(ids)))
            return len(ids)

    def states(self, order_ids: Collection[str]) -> dict[str, tuple[str, str, int]]:
        """Order id -> (state, owner, generation)."""
        if not order_ids:
            return {}
        with self._db.read() as s:
            return {r.id: (r.state, r.owner, r.generation)
                    for r in s.scalars(select(Order).where(Order.id.in_(list(order_ids))))}

    def claim(self, order_id: str, owner: str, generation: int, new_owner: str) -> int | None:
        """Takes the order over from `owner` at `generation` (one conditional UPDATE: of two
        replicas adopting it at once, one wins). The new generation, None if lost."""
        with self._db.write() as s:
            done = s.execute(update(Order).where(Order.id == order_id, Order.owner == owner,
                                                 Order.generation == generation)
                             .values(owner=new_owner, generation=generation + 1, updated_at=utcnow()))
            return generation + 1 if done.rowcount == 1 else None  # type: ignore[attr-defined]
