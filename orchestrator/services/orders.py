"""Production orders: N cards of one card_production process, spread over every matching
reader of the pool in parallel.

Each card of an order is one process instance (`ProcessService.start`), all started at once:
each waits in the pool's FIFO queue for a free reader that holds a card and matches both
the order's selector and its task's own `reader:` selector; readers without a card are
skipped, and the least recently used reader goes first, so every ready reader gets work.
An order never puts two people on one card: a card it has had (produced, or tried to) is not
taken again by the same order until the card in that reader changes (removed, or another card
inserted); until then the order's next cards wait for another reader's card.
A card's state is queued (with its position in the pool's queue), running (gateway and
reader known), then succeeded or failed (with the process's error). The order is DONE when
every card has been attempted, CANCELLED when cancelled (cards still queued then fail with
CANCELLED; running ones finish).

Orders are kept in memory only, like the queue they wait in: after a restart the orders are
gone, while their process instances, tasks, cards and certificates are in the store like any
other. Secret inputs (PINs) pass through to the processes and are not kept in the order.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from orchestrator.domain.processes import CardProductionTask
from orchestrator.services.auditing import AuditTrail, acting
from orchestrator.services.pool import LEASE_SCOPE, LeaseScope, PooledReader, ReaderPool, ReaderSelector
from orchestrator.services.processes import ProcessProgress, ProcessService, selector_of
from orchestrator.store.records import (
    AUDIT_ORDER_CANCELLED,
    AUDIT_ORDER_CREATED,
    AUDIT_ORDER_FINISHED,
    ORDER,
    ProcessState,
)
from shared.cards import Reader
from shared.errors import Cancelled, CardlineError, InvalidArgument, NotFound, ReaderNotFound, quoted
from shared.logging import get_logger

log = get_logger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"


@dataclass
class OrderCard:
    index: int
    state: str = QUEUED
    queue_position: int = 0
    gateway_id: str = ""
    reader_id: str = ""
    process_instance_id: str = ""
    error_reason: str = ""
    error_message: str = ""

    @property
    def finished(self) -> bool:
        return self.state in (SUCCEEDED, FAILED)


@dataclass(eq=False)
class Order:
    id: str
    process: str
    selector: ReaderSelector
    cards: list[OrderCard]
    state: str = "RUNNING"                       # RUNNING, DONE, CANCELLED
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _tasks: list[asyncio.Task] = field(default_factory=list, repr=False)
    # (gateway, reader) -> the card the order had there; released when that reader's card changes.
    _had: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)

    def accepts(self, gateway_id: str, reader: Reader) -> bool:
        return self._had.get((gateway_id, reader.reader_id)) != card_key(reader)

    def reader_changed(self, gateway_id: str, reader: Reader, *, gone: bool = False) -> None:
        """The pool saw this reader change: no card, another card, or the reader gone frees it."""
        key = (gateway_id, reader.reader_id)
        if key in self._had and (gone or not reader.card_present or self._had[key] != card_key(reader)):
            del self._had[key]

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.cards)

    def counts(self) -> dict[str, int]:
        out = {QUEUED: 0, RUNNING: 0, SUCCEEDED: 0, FAILED: 0}
        for c in self.cards:
            out[c.state] += 1
        return out

    def touch(self) -> None:
        old, self._changed = self._changed, asyncio.Event()
        old.set()


def card_key(reader: Reader) -> str:
    """What tells one card from another in a reader: the token serial, else the ATR."""
    return reader.token_serial or reader.atr.hex()


class _CardObserver:
    """Hears from the pool where one card of an order waits and which reader it got."""

    def __init__(self, order: Order, card: OrderCard, pool: ReaderPool) -> None:
        self.order, self.card, self.pool = order, card, pool

    def queued(self, position: int) -> None:
        self.card.state, self.card.queue_position = QUEUED, position
        self.order.touch()

    def acquired(self, gateway_id: str, reader_id: str) -> None:
        self.card.state, self.card.queue_position = RUNNING, 0
        self.card.gateway_id, self.card.reader_id = gateway_id, reader_id
        for pooled in self.pool.list(ReaderSelector(gateway_id=gateway_id, reader_id=reader_id)):
            self.order._had[(gateway_id, reader_id)] = card_key(pooled.reader)   # one person per card
        self.order.touch()


class OrderService:
    def __init__(self, processes: ProcessService, pool: ReaderPool, *, keep: int = 1000,
                 audit: AuditTrail | None = None) -> None:
        self.processes = processes
        self.audit = audit                  # creation, cancellation and end of each order (docs/audit.md)
        self.pool = pool
        self._orders: dict[str, Order] = {}
        self._keep = keep
        pool.subscribe(self._reader_changed)

    def _reader_changed(self, kind: str, pooled: PooledReader) -> None:
        for order in self._orders.values():
            if order.state == "RUNNING":
                order.reader_changed(pooled.gateway_id, pooled.reader, gone=kind == "removed")

    def create(self, process: str, selector: ReaderSelector, items: Sequence[Mapping[str, object]],
               secrets: Mapping[str, str] | None = None, *, order_id: str | None = None) -> Order:
        """Checks the whole order, then starts every card; returns at once. order_id: chosen
        by the caller (recorded with a client's request id first), else new."""
        definition = self.processes.definition(process)
        productions = [t for t in definition.tasks if isinstance(t, CardProductionTask)]
        if not productions:
            raise InvalidArgument(f"process {quoted(process)} has no card_production task: an order produces cards",
                                  field="process")
        if not items:
            raise InvalidArgument("the order has no card", field="items")
        secrets = dict(secrets or {})
        problems = []
        for i, inputs in enumerate(items):
            overlap = set(inputs) & set(secrets)
            if overlap:
                problems.append(f"card {i}: {', '.join(sorted(overlap))} given per card and for the whole order")
            try:
                definition.split_inputs({**inputs, **secrets})
            except ValueError as exc:
                problems.append(f"card {i}: {exc}")
        if problems:
            raise InvalidArgument("; ".join(problems[:10]) + (f" (and {len(problems) - 10} more)"
                                                              if len(problems) > 10 else ""), field="items")
        own = selector_of(productions[0].reader)
        if not any(own.matches_pooled(p) for p in self.pool.list(selector) if p.state.value != "OFFLINE"):
            raise ReaderNotFound(f"no reader of an attached gateway matches the order's {selector.describe()} "
                                 f"and the process's {own.describe()}")
        order = Order(order_id or uuid.uuid4().hex[:12], process, selector, [OrderCard(i) for i in range(len(items))])
        self._orders[order.id] = order
        self._forget_old()
        for card, inputs in zip(order.cards, items, strict=False):
            task = asyncio.create_task(self._run_card(order, card, {**inputs, **secrets}))
            order._tasks.append(task)
        log.info("order created", order_id=order.id, process=process, cards=len(items), selector=selector.describe())
        self._audit(AUDIT_ORDER_CREATED, order, {"process": process, "cards": len(items),
                                                 "selector": selector.describe()})
        return order

    def _audit(self, action: str, order: Order, detail: Mapping[str, object]) -> None:
        if self.audit is not None:
            self.audit.later(action, ORDER, order.id, acting(), detail)

    def get(self, order_id: str) -> Order:
        order = self._orders.get(order_id)
        if order is None:
            raise NotFound(f"no order {quoted(order_id)} (orders are kept in memory until the orchestrator stops)",
                           order_id=order_id)
        return order

    def list(self) -> list[Order]:
        return sorted(self._orders.values(), key=lambda o: o.created_at)

    def cancel(self, order_id: str) -> Order:
        """Cards still queued fail with CANCELLED; running ones finish."""
        order = self.get(order_id)
        if order.state == "RUNNING":
            order.state = "CANCELLED"
            self.pool.cancel_waiters(order, Cancelled(f"order {order.id} was cancelled", order_id=order.id))
            order.touch()
            self._audit(AUDIT_ORDER_CANCELLED, order, order.counts())
        return order

    async def watch(self, order_id: str) -> AsyncIterator[Order]:
        """The order now, then after every change, until every card was attempted."""
        order = self.get(order_id)
        while True:
            changed = order._changed
            yield order
            if order.finished:
                return
            await changed.wait()

    async def stop(self) -> None:
        tasks = [t for o in self._orders.values() for t in o._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_card(self, order: Order, card: OrderCard, inputs: dict[str, object]) -> None:
        LEASE_SCOPE.set(LeaseScope(selector=order.selector, observer=_CardObserver(order, card, self.pool), tag=order,
                                   accepts=order.accepts,
                                   refuse=lambda: Cancelled(f"order {order.id} was cancelled", order_id=order.id)
                                   if order.state == "CANCELLED" else None))

        def progress(p: ProcessProgress) -> None:
            if not card.process_instance_id:
                card.process_instance_id = p.instance_id
                order.touch()

        try:
            if order.state == "CANCELLED":
                raise Cancelled(f"order {order.id} was cancelled", order_id=order.id)
            instance = await self.processes.start(order.process, inputs, progress)
            card.process_instance_id = instance.id
            if instance.state == ProcessState.SUCCEEDED:
                card.state = SUCCEEDED
            else:
                card.state = FAILED
                card.error_reason = instance.error_reason or "INTERNAL"
                card.error_message = instance.error_message or "the process failed"
        except CardlineError as exc:
            card.state, card.error_reason, card.error_message = FAILED, exc.reason, exc.message
        except asyncio.CancelledError:
            card.state, card.error_reason, card.error_message = FAILED, "CANCELLED", "the orchestrator stopped"
            raise
        except Exception as exc:  # every card ends with an outcome
            log.exception("order card crashed", order_id=order.id, index=card.index)
            card.state, card.error_reason, card.error_message = FAILED, "INTERNAL", f"{type(exc).__name__}: {exc}"
        finally:
            card.queue_position = 0
            if order.finished and order.state == "RUNNING":
                order.state = "DONE"
                log.info("order done", order_id=order.id, **order.counts())
                self._audit(AUDIT_ORDER_FINISHED, order, order.counts())
            order.touch()

    def _forget_old(self) -> None:
        finished = [o for o in self.list() if o.finished]
        for o in finished[:max(0, len(self._orders) - self._keep)]:
            del self._orders[o.id]
