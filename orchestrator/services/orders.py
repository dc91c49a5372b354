"""Production orders: N cards of one card_production process, spread over every matching
reader of the pool in parallel, kept in the store so that they outlive the replica that
runs them.

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

Persistence (store.orders, revision 0011_persisted_orders). The order and every card's
state, reader, process instance and error are written as they change; the changes of a
moment are merged into one transaction (`FLUSH_DELAY_S`); queue positions alone, which all
move whenever one waiter is served, at most every `POSITION_FLUSH_S`. A card's non-secret inputs are
stored as JSON, its secret ones (the order's `secret_inputs` and the inputs its process
declares secret) only sealed under the key-encryption key, bound to the order and the card.
Attempt n of card i runs under the client request id "order:<id>:<i>:<n>", so the process
instance of every attempt is found in the store even when its replica died before it could
write the instance's id down.

Ownership and takeover. An order is run by one replica, its owner (the orchestrator id).
Get, List and Watch read the store from any replica (Watch of an order run elsewhere polls
it, at most every `WATCH_POLL_MAX_S`); Cancel from any replica writes CANCELLED, which the
owner sees within one adoption interval. Every `interval_s` (and at start-up) each replica
adopts the unfinished orders whose owner's heartbeat is older than `stale_after` (the
reconciler's rule), and its own unfinished orders that no run in this process holds (a
restart), claiming each with one conditional UPDATE (owner and generation), so one replica
wins. The adopter opens each unended card's secrets and runs its current attempt again under
the same request id: an attempt whose process instance exists is followed to its end (the
reconciler ends an instance of a dead replica), so a card that was being produced ends with
that instance's final state; an attempt that never started is started. An attempt the
reconciler ended before it touched a card (no task of the instance) is retried as the next
attempt, at most `MAX_ATTEMPTS` in all. A replica that finds its order adopted by another
(its writes refused) stops running it.
"""
from __future__ import annotations

import asyncio
import builtins
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from orchestrator.domain.processes import CardProductionTask
from orchestrator.domain.processes.descriptor import CoreObjectDescriptor
from orchestrator.services.auditing import AuditTrail, acting
from orchestrator.services.key_archive import KeyEncryptionKey, open_json, seal_json
from orchestrator.services.pool import LEASE_SCOPE, LeaseScope, PooledReader, ReaderPool, ReaderSelector
from orchestrator.services.processes import ProcessProgress, ProcessService, selector_of
from orchestrator.store import orders as stored
from orchestrator.store.paging import Keyset
from orchestrator.store.records import (
    AUDIT_ORDER_CANCELLED,
    AUDIT_ORDER_CREATED,
    AUDIT_ORDER_FINISHED,
    ORDER,
    ProcessInstanceRecord,
    ProcessState,
)
from orchestrator.store.store import Store
from shared.cards import Reader, ReaderKind
from shared.errors import (
    Cancelled,
    CardlineError,
    ConfigurationError,
    InvalidArgument,
    OrchestratorRestarted,
    ReaderNotFound,
    quoted,
)
from shared.logging import get_logger

log = get_logger(__name__)

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
#: Card changes of this long are merged into one store transaction.
FLUSH_DELAY_S = 0.25
#: Queue positions alone (every waiter moves when one is served) are written at most this often.
POSITION_FLUSH_S = 1.0
#: Watching an order another replica runs: the store is read at most this far apart.
WATCH_POLL_MIN_S, WATCH_POLL_MAX_S = 0.1, 1.0
#: Attempts of one card in all: one, plus retries of attempts a takeover found untouched.
MAX_ATTEMPTS = 3
#: How long an adopted card waits for a matching reader to be linked (gateways fail over).
ADOPT_READER_WAIT_S = 300.0
#: Ended orders older than orders.retention_days are looked for this often (a few indexed deletes).
PURGE_INTERVAL_S = 600.0
#: What an adopted order had in a reader its attempt's task used, when the card itself was not
#: written down (its owner died first): the card found there next is taken for that card.
SOME_CARD = "*"
_SECRETS_CONTEXT = b"cardline/order-secrets/v1\x00"
_PROCESS_INSTANCE = "process_instance"       # the client request kind ProcessService.start records


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
    attempt: int = 0

    @property
    def finished(self) -> bool:
        return self.state in (SUCCEEDED, FAILED)

    def row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in stored.CARD_FIELDS}


@dataclass(eq=False)
class Order:
    id: str
    process: str
    selector: ReaderSelector
    cards: list[OrderCard]
    state: str = "RUNNING"                       # RUNNING, DONE, CANCELLED
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    generation: int = 1                          # the claim this replica runs it under
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _tasks: list[asyncio.Task] = field(default_factory=list, repr=False)
    # (gateway, reader) -> the card the order had there; released when that reader's card changes.
    _had: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    _audited_end: bool = field(default=False, repr=False)

    def accepts(self, gateway_id: str, reader: Reader) -> bool:
        key = (gateway_id, reader.reader_id)
        if self._had.get(key) == SOME_CARD:          # first sight since a takeover: this card is the one
            self._had[key] = card_key(reader)
        return self._had.get(key) != card_key(reader)

    def reader_changed(self, gateway_id: str, reader: Reader, *, gone: bool = False) -> bool:
        """The pool saw this reader change: no card, another card, or the reader gone frees it.
        Whether that released a card the order had."""
        key = (gateway_id, reader.reader_id)
        if key not in self._had:
            return False
        if gone or not reader.card_present:
            del self._had[key]
            return True
        if self._had[key] == SOME_CARD:              # first sight since a takeover: this card is the one
            self._had[key] = card_key(reader)
        elif self._had[key] != card_key(reader):
            del self._had[key]
            return True
        return False

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

    def had_json(self) -> dict[str, str]:
        return {f"{g}\n{r}": key for (g, r), key in self._had.items()}


def card_key(reader: Reader) -> str:
    """What tells one card from another in a reader: the token serial, else the ATR."""
    return reader.token_serial or reader.atr.hex()


# --- what is stored: the selector, the inputs, the sealed secrets -----------------------------

def selector_to_json(selector: ReaderSelector) -> dict[str, Any]:
    return {"gateway_id": selector.gateway_id, "reader_id": selector.reader_id,
            "kind": selector.kind.value if selector.kind is not None else None, "site": selector.site,
            "labels": dict(selector.labels), "card_present": selector.card_present}


def selector_from_json(data: Mapping[str, Any]) -> ReaderSelector:
    kind = data.get("kind")
    return ReaderSelector(gateway_id=data.get("gateway_id", ""), reader_id=data.get("reader_id", ""),
                          kind=ReaderKind(kind) if kind else None, site=data.get("site", ""),
                          labels=dict(data.get("labels") or {}), card_present=bool(data.get("card_present")))


def _value_to_json(value: object) -> object:
    if isinstance(value, CoreObjectDescriptor):
        return {"$descriptor": value.to_dict()}
    if isinstance(value, (list, tuple)):
        return [_value_to_json(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise InvalidArgument(f"an order input cannot be {type(value).__name__}", field="items")


def _value_from_json(value: object) -> object:
    if isinstance(value, dict) and set(value) == {"$descriptor"}:
        return CoreObjectDescriptor.from_dict(value["$descriptor"])
    if isinstance(value, list):
        return [_value_from_json(v) for v in value]
    return value


def _binding(order_id: str, index: int) -> bytes:
    return _SECRETS_CONTEXT + f"order:{order_id}:card:{index}".encode()


def request_id(order_id: str, index: int, attempt: int) -> str:
    """The client request id the process instance of a card's attempt is started under."""
    return f"order:{order_id}:{index}:{attempt}"


class _CardObserver:
    """Hears from the pool where one card of an order waits and which reader it got."""

    def __init__(self, service: OrderService, order: Order, card: OrderCard) -> None:
        self.service, self.order, self.card = service, order, card

    def queued(self, position: int) -> None:
        moved_only = self.card.state == QUEUED
        self.card.state, self.card.queue_position = QUEUED, position
        self.service._changed(self.order, self.card, moved_only=moved_only)

    def acquired(self, gateway_id: str, reader_id: str) -> None:
        self.card.state, self.card.queue_position = RUNNING, 0
        self.card.gateway_id, self.card.reader_id = gateway_id, reader_id
        for pooled in self.service.pool.list(ReaderSelector(gateway_id=gateway_id, reader_id=reader_id)):
            self.order._had[(gateway_id, reader_id)] = card_key(pooled.reader)   # one person per card
        self.service._changed(self.order, self.card, had=True)


class OrderService:
    def __init__(self, processes: ProcessService, pool: ReaderPool, store: Store, *, owner_id: str,
                 kek: KeyEncryptionKey | None = None, keep: int = 1000, audit: AuditTrail | None = None,
                 stale_after: dt.timedelta = dt.timedelta(minutes=3), interval_s: float = 10.0,
                 retention: dt.timedelta | None = None) -> None:
        """owner_id: this replica's orchestrator id; kek: seals the orders' secret inputs
        (None: orders with secret inputs are refused); keep: how many ended orders stay in
        memory (for their watchers); stale_after: how old another
        replica's heartbeat must be before its orders are adopted; interval_s: how often
        orders to adopt and cancellations from other replicas are looked for; retention: how
        long an ended order stays in the store (None: for good)."""
        self.processes = processes
        self.audit = audit                  # creation, cancellation and end of each order (docs/audit.md)
        self.pool = pool
        self.store = store
        self.owner_id = owner_id
        self.kek = kek
        self.stale_after = stale_after
        self.interval_s = interval_s
        self.retention = retention
        self._next_purge = 0.0
        self._orders: dict[str, Order] = {}          # the orders this replica runs (and recent ended ones)
        self._keep = keep
        self._dirty: dict[str, set[int]] = {}        # order id -> cards changed since the last save
        self._moved: dict[str, set[int]] = {}        # order id -> cards whose queue position alone changed
        self._dirty_had: set[str] = set()
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task | None = None
        self._adopting = asyncio.Lock()
        self._adopter: asyncio.Task | None = None
        self._position_timer: asyncio.TimerHandle | None = None
        pool.subscribe(self._reader_changed)

    # --- the API's calls -------------------------------------------------------------------

    async def create(self, process: str, selector: ReaderSelector, items: Sequence[Mapping[str, object]],
                     secrets: Mapping[str, str] | None = None, *, order_id: str | None = None) -> Order:
        """Checks the whole order, stores it, then starts every card; returns at once.
        order_id: chosen by the caller (recorded with a client's request id first), else new."""
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
        secret_names = set(secrets) | set(definition.secret_inputs)
        rows = [self._sealed(order.id, i, {**inputs, **secrets}, secret_names) for i, inputs in enumerate(items)]
        self._orders[order.id] = order           # before it is stored: not one to adopt (adopt_once)
        try:
            record = await asyncio.to_thread(self.store.orders.create, order.id, process,
                                             selector_to_json(selector), self.owner_id, rows)
        except BaseException:       # not stored; or stored after all (the call was cancelled): adopted then
            self._orders.pop(order.id, None)
            raise
        order.created_at, order.generation = record.created_at, record.generation
        self._run(order, [{**inputs, **secrets} for inputs in items])
        log.info("order created", order_id=order.id, process=process, cards=len(items), selector=selector.describe())
        self._audit(AUDIT_ORDER_CREATED, order, {"process": process, "cards": len(items),
                                                 "selector": selector.describe()})
        return order

    async def get(self, order_id: str) -> Order:
        order = self._orders.get(order_id)
        if order is not None:
            return order
        return _view(await asyncio.to_thread(self.store.orders.get, order_id))

    async def list(self, limit: int, after: Keyset | None = None) -> builtins.list[Order]:
        """Up to `limit` orders of every replica, oldest first, past `after` ((created_at, id)
        of the last one of the previous page); those run here as this replica sees them now."""
        records = await asyncio.to_thread(self.store.orders.page, limit, after)
        return [self._orders.get(r.id) or _view(r) for r in records]

    async def cancel(self, order_id: str) -> Order:
        """Cards still queued fail with CANCELLED; running ones finish. From any replica:
        the order's owner sees the cancellation in the store."""
        record, cancelled = await asyncio.to_thread(self.store.orders.cancel, order_id)
        order = self._orders.get(order_id)
        if order is not None and order.state == "RUNNING" and record.state == stored.CANCELLED:
            self._cancel_here(order)
        if cancelled:
            counts = order.counts() if order is not None else _view(record).counts()
            self.audit_later(AUDIT_ORDER_CANCELLED, order_id, counts)
        return order if order is not None else _view(record)

    async def watch(self, order_id: str) -> AsyncIterator[Order]:
        """The order now, then after every change, until every card was attempted."""
        order = await self.get(order_id)
        delay = WATCH_POLL_MIN_S
        while True:
            if order_id in self._orders:             # run here (or adopted meanwhile): its own events
                order = self._orders[order_id]
                # Read before the yield, as the caller sees it: the order may end while the
                # caller sends this snapshot, and the watch must not end without the last one.
                changed, finished = order._changed, order.finished
                yield order
                if finished:
                    return
                await changed.wait()
                continue
            yield order                              # run by another replica: read the store
            if order.finished:
                return
            while True:
                await asyncio.sleep(delay)
                if order_id in self._orders:
                    break
                fresh = _view(await asyncio.to_thread(self.store.orders.get, order_id))
                if _snapshot(fresh) != _snapshot(order):
                    order, delay = fresh, WATCH_POLL_MIN_S
                    break
                delay = min(delay * 2, WATCH_POLL_MAX_S)

    # --- running the cards ---------------------------------------------------------------

    def _run(self, order: Order, inputs: Sequence[dict[str, object]]) -> None:
        self._orders[order.id] = order
        self._forget_old()
        self._start_flusher()
        for card, card_inputs in zip(order.cards, inputs, strict=True):
            if not card.finished:
                order._tasks.append(asyncio.create_task(self._run_card(order, card, card_inputs)))
        if order.finished:
            self._finish(order)

    async def _run_card(self, order: Order, card: OrderCard, inputs: dict[str, object], *,
                        adopted: bool = False) -> None:
        LEASE_SCOPE.set(LeaseScope(selector=order.selector, observer=_CardObserver(self, order, card), tag=order,
                                   accepts=order.accepts,
                                   refuse=lambda: Cancelled(f"order {order.id} was cancelled", order_id=order.id)
                                   if order.state == "CANCELLED" else None))

        def progress(p: ProcessProgress) -> None:
            if card.process_instance_id != p.instance_id:
                card.process_instance_id = p.instance_id
                self._changed(order, card)

        try:
            while True:
                instance = await self._attempt(order, card, inputs, progress, adopted=adopted)
                if (card.attempt + 1 < MAX_ATTEMPTS and order.state == "RUNNING"
                        and await self._untouched_by_restart(instance)):
                    log.info("order card retried: its attempt ended with its replica before it reached a card",
                             order_id=order.id, index=card.index, attempt=card.attempt)
                    card.attempt += 1
                    card.state, card.process_instance_id, card.gateway_id, card.reader_id = QUEUED, "", "", ""
                    self._changed(order, card)
                    continue
                break
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
            # The orchestrator stops: the card stays as stored; the next start (or another
            # replica) resumes it.
            raise
        except Exception as exc:  # every card ends with an outcome
            log.exception("order card crashed", order_id=order.id, index=card.index)
            card.state, card.error_reason, card.error_message = FAILED, "INTERNAL", f"{type(exc).__name__}: {exc}"
        card.queue_position = 0
        self._changed(order, card)
        if order.finished:
            self._finish(order)

    async def _attempt(self, order: Order, card: OrderCard, inputs: dict[str, object], progress, *,
                       adopted: bool) -> ProcessInstanceRecord:
        rid = request_id(order.id, card.index, card.attempt)
        started = None
        if adopted:
            started = await asyncio.to_thread(self.store.client_requests.find, _PROCESS_INSTANCE, rid)
        if started is None:
            if order.state == "CANCELLED":
                raise Cancelled(f"order {order.id} was cancelled", order_id=order.id)
            if adopted:
                await self._readers_for(order)
        return await self.processes.start(order.process, inputs, progress, request_id=rid)

    async def _untouched_by_restart(self, instance: ProcessInstanceRecord) -> bool:
        """The reconciler ended this instance with its replica before any task of it began."""
        if instance.state != ProcessState.FAILED or instance.error_reason != OrchestratorRestarted.reason:
            return False
        tasks = await asyncio.to_thread(self.store.tasks.ids_by_process, [instance.id])
        return not tasks.get(instance.id)

    async def _readers_for(self, order: Order) -> None:
        """Waits (at most ADOPT_READER_WAIT_S) until a reader the order can use is linked here:
        after a takeover the gateways are still failing over. Without one, the card's
        process fails as any would (ReaderNotFound)."""
        definition = self.processes.definition(order.process)
        own = selector_of(next(t for t in definition.tasks if isinstance(t, CardProductionTask)).reader)

        def ready() -> bool:
            return any(own.matches_pooled(p) for p in self.pool.list(order.selector) if p.state.value != "OFFLINE")

        loop = asyncio.get_running_loop()
        deadline = loop.time() + ADOPT_READER_WAIT_S
        while not ready() and loop.time() < deadline:
            seen = asyncio.Event()
            unsubscribe = self.pool.subscribe(partial(_set, seen))
            try:
                await asyncio.wait_for(seen.wait(), deadline - loop.time())
            except TimeoutError:
                return
            finally:
                unsubscribe()

    def _finish(self, order: Order) -> None:
        if order.state == "RUNNING":
            order.state = "DONE"
        if not order._audited_end:
            order._audited_end = True
            log.info("order done", order_id=order.id, state=order.state, **order.counts())
            self._audit(AUDIT_ORDER_FINISHED, order, order.counts())
        self._dirty.setdefault(order.id, set())
        self._wake.set()
        order.touch()

    def _cancel_here(self, order: Order) -> None:
        order.state = "CANCELLED"
        self.pool.cancel_waiters(order, Cancelled(f"order {order.id} was cancelled", order_id=order.id))
        order.touch()

    def _reader_changed(self, kind: str, pooled: PooledReader) -> None:
        for order in self._orders.values():
            if order.state == "RUNNING" and order.reader_changed(pooled.gateway_id, pooled.reader,
                                                                 gone=kind == "removed"):
                log.info("the card an order had in a reader changed; the reader takes its next card",
                         order_id=order.id, gateway_id=pooled.gateway_id, reader_id=pooled.reader.reader_id,
                         change=kind, card_present=pooled.reader.card_present)
                self._dirty_had.add(order.id)
                self._dirty.setdefault(order.id, set())
                self._wake.set()

    # --- writing it down ------------------------------------------------------------------

    def _changed(self, order: Order, card: OrderCard, *, had: bool = False, moved_only: bool = False) -> None:
        """moved_only: only the card's queue position changed. Every waiter moves whenever
        one is served, so cards that only moved are written at most every POSITION_FLUSH_S."""
        if moved_only:
            self._moved.setdefault(order.id, set()).add(card.index)
            if self._position_timer is None:
                self._position_timer = asyncio.get_running_loop().call_later(POSITION_FLUSH_S, self._positions_due)
        else:
            self._dirty.setdefault(order.id, set()).add(card.index)
            if had:
                self._dirty_had.add(order.id)
            self._wake.set()
        order.touch()

    def _positions_due(self) -> None:
        self._position_timer = None
        for order_id, indices in self._moved.items():
            self._dirty.setdefault(order_id, set()).update(indices)
        self._moved = {}
        self._wake.set()

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(FLUSH_DELAY_S)        # the changes of this moment go together
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:   # the database away for a moment: kept, written with the next save
                log.exception("saving order changes failed")
                await asyncio.sleep(min(1.0, self.interval_s))
                self._wake.set()

    async def flush(self) -> None:
        """Writes every change not yet written, in one transaction."""
        self._wake.clear()
        dirty, had = self._dirty, self._dirty_had
        self._dirty, self._dirty_had = {}, set()
        changes = []
        for order_id, indices in dirty.items():
            order = self._orders.get(order_id)
            if order is None:
                continue
            changes.append(stored.OrderChange(
                order_id, order.generation, {i: order.cards[i].row() for i in indices},
                had=order.had_json() if order_id in had else None,
                done=order.finished and order.state == "DONE"))
        try:
            lost = await asyncio.to_thread(self.store.orders.save, self.owner_id, changes)
        except BaseException:
            for order_id, indices in dirty.items():        # written with the next save
                self._dirty.setdefault(order_id, set()).update(indices)
            self._dirty_had |= had
            raise
        log.debug("order changes saved", orders=len(changes), cards=sum(len(c.cards) for c in changes))
        for order_id in lost:
            self._lose(order_id)

    def _lose(self, order_id: str) -> None:
        """Another replica adopted this order (this one was taken for dead): stop running it."""
        order = self._orders.pop(order_id, None)
        if order is None:
            return
        log.warning("order adopted by another replica; no longer run here", order_id=order_id)
        for task in order._tasks:
            task.cancel()
        order.touch()

    # --- takeover -------------------------------------------------------------------------

    async def adopt_once(self) -> builtins.list[str]:
        """Adopts the unfinished orders of replicas whose heartbeat lapsed, and this
        replica's own that no run here holds (a restart); sees cancellations and adoptions
        made elsewhere of the orders run here. The ids adopted."""
        async with self._adopting:
            unfinished = await asyncio.to_thread(self.store.orders.unfinished)
            beats = await asyncio.to_thread(self.store.instances.heartbeats)
            now = dt.datetime.now(dt.UTC)
            adopted = []
            for order_id, owner, generation, _state in unfinished:
                if order_id in self._orders:
                    continue
                beat = beats.get(owner)
                if owner != self.owner_id and beat is not None and now - beat <= self.stale_after:
                    continue
                new = await asyncio.to_thread(self.store.orders.claim, order_id, owner, generation, self.owner_id)
                if new is None:                         # another replica was quicker
                    continue
                try:
                    await self._adopt(order_id, new, owner)
                    adopted.append(order_id)
                except Exception:
                    log.exception("adopting an order failed", order_id=order_id)
            await self._follow_elsewhere()
            return adopted

    async def _adopt(self, order_id: str, generation: int, previous_owner: str) -> None:
        record = await asyncio.to_thread(self.store.orders.get, order_id)
        rows = await asyncio.to_thread(self.store.orders.card_inputs, order_id)
        order = _view(record)
        order.generation = generation
        order._had = await asyncio.to_thread(self._had_of, order, record.had)
        inputs: list[dict[str, object]] = []
        for card, row in zip(order.cards, rows, strict=True):
            try:
                inputs.append(self._opened(order_id, row))
            except CardlineError as exc:            # e.g. sealed under a KEK this replica lacks
                inputs.append({})
                if not card.finished:
                    card.state, card.error_reason, card.error_message = FAILED, exc.reason, exc.message
                    self._dirty.setdefault(order_id, set()).add(card.index)
        log.info("order adopted", order_id=order_id, from_owner=previous_owner, open_cards=sum(
            not c.finished for c in order.cards))
        self._orders[order.id] = order
        self._forget_old()
        self._start_flusher()
        for card, card_inputs in zip(order.cards, inputs, strict=True):
            if not card.finished:
                order._tasks.append(asyncio.create_task(self._run_card(order, card, card_inputs, adopted=True)))
        if order.finished:
            self._finish(order)

    def _had_of(self, order: Order, written: Mapping[str, str]) -> dict[tuple[str, str], str]:
        """The cards an adopted order had, per reader: as its owner wrote them down, and every
        reader a task of a card's current attempt used (the owner may have died before writing
        that down), whose card is then the one found there next (SOME_CARD). Blocking."""
        had: dict[tuple[str, str], str] = {}
        for key, what in written.items():
            gateway_id, _, reader_id = key.partition("\n")
            had[(gateway_id, reader_id)] = what
        for card in order.cards:
            instance_id = card.process_instance_id or self.store.client_requests.find(
                _PROCESS_INSTANCE, request_id(order.id, card.index, card.attempt))
            if instance_id:
                for task in self.store.tasks.list(process_instance_id=instance_id):
                    had.setdefault((task.gateway_id, task.reader_id), SOME_CARD)
        return had

    async def _follow_elsewhere(self) -> None:
        """Cancellations written by another replica, and orders another replica adopted."""
        mine = [o.id for o in self._orders.values() if not o.finished]
        if not mine:
            return
        for order_id, (state, owner, generation) in (
                await asyncio.to_thread(self.store.orders.states, mine)).items():
            order = self._orders.get(order_id)
            if order is None:
                continue
            if owner != self.owner_id or generation != order.generation:
                self._lose(order_id)
            elif state == stored.CANCELLED and order.state == "RUNNING":
                self._cancel_here(order)

    def start_adopting(self) -> None:
        """Adopts now (start-up: this replica's own unfinished orders, and those of replicas
        gone), then every interval_s, until stop()."""
        self._adopter = asyncio.create_task(self._adopt_forever())

    async def _adopt_forever(self) -> None:
        while True:
            try:
                await self.adopt_once()
                await self._purge_when_due()
            except asyncio.CancelledError:
                raise
            except Exception:  # e.g. the database away for a moment: next round
                log.exception("order adoption round failed")
            await asyncio.sleep(self.interval_s)

    async def purge_once(self) -> int:
        """Deletes the ended orders older than the retention from the store (any replica may:
        each order goes once). How many went."""
        if self.retention is None:
            return 0
        before = dt.datetime.now(dt.UTC) - self.retention
        purged = 0
        while (batch := await asyncio.to_thread(self.store.orders.purge_ended, before)):
            purged += batch
        if purged:
            log.info("ended orders purged", orders=purged, retention_days=self.retention.total_seconds() / 86400)
        return purged

    async def _purge_when_due(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_purge:
            self._next_purge = loop.time() + PURGE_INTERVAL_S
            await self.purge_once()

    async def stop(self) -> None:
        """Stops the cards run here (they stay as stored: the next start resumes them) and
        writes what is not written yet."""
        if self._adopter is not None:
            self._adopter.cancel()
            await asyncio.gather(self._adopter, return_exceptions=True)
        tasks = [t for o in self._orders.values() for t in o._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._position_timer is not None:
            self._position_timer.cancel()
        self._positions_due()
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        try:
            await self.flush()
        except Exception:
            log.exception("saving order changes at stop failed")

    # --- helpers --------------------------------------------------------------------------

    def _sealed(self, order_id: str, index: int, inputs: Mapping[str, object],
                secret_names: set[str]) -> stored.OrderCardInputs:
        plain = {k: _value_to_json(v) for k, v in inputs.items() if k not in secret_names}
        secret = {k: v for k, v in inputs.items() if k in secret_names}
        if not secret:
            return stored.OrderCardInputs(index, plain)
        if self.kek is None:
            raise ConfigurationError("orders with secret inputs need the key-encryption key")
        blob = seal_json(self.kek, secret, _binding(order_id, index))
        return stored.OrderCardInputs(index, plain, self.kek.kek_id, blob)

    def _opened(self, order_id: str, row: stored.OrderCardInputs) -> dict[str, object]:
        inputs = {k: _value_from_json(v) for k, v in row.inputs.items()}
        if row.sealed_secrets is None:
            return inputs
        secret = open_json(self.kek, row.sealed_secrets, _binding(order_id, row.index), kek_id=row.kek_id,
                           what=f"the secret inputs of order {order_id}", order_id=order_id)
        return {**inputs, **secret}

    def _audit(self, action: str, order: Order, detail: Mapping[str, object]) -> None:
        self.audit_later(action, order.id, detail)

    def audit_later(self, action: str, order_id: str, detail: Mapping[str, object]) -> None:
        if self.audit is not None:
            self.audit.later(action, ORDER, order_id, acting(), detail)

    def _forget_old(self) -> None:
        finished = sorted((o for o in self._orders.values() if o.finished and o.id not in self._dirty),
                          key=lambda o: o.created_at)
        for o in finished[:max(0, len(self._orders) - self._keep)]:
            del self._orders[o.id]


def _view(record: stored.OrderRecord) -> Order:
    """An order as stored (one run by another replica, or one this replica adopts)."""
    return Order(record.id, record.process, selector_from_json(record.selector),
                 [OrderCard(c.index, c.state, c.queue_position, c.gateway_id, c.reader_id, c.process_instance_id,
                            c.error_reason, c.error_message, c.attempt) for c in record.cards],
                 state=record.state, created_at=record.created_at, generation=record.generation)


def _set(event: asyncio.Event, kind: str, pooled: PooledReader) -> None:
    event.set()


def _snapshot(order: Order) -> tuple:
    return order.state, tuple((c.state, c.queue_position, c.gateway_id, c.reader_id, c.process_instance_id,
                               c.error_reason) for c in order.cards)

