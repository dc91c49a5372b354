"""The reader pool: every reader of every attached gateway, who holds which, the queue of
those waiting for one, and the way to run a step on a reader through its gateway's link.

States of a pooled reader: EMPTY, CARD_PRESENT, BUSY (a card task holds it), LEASED (another
service holds it) and OFFLINE (its gateway went away: it stays listed for
`offline_retention_s`, then disappears; when the gateway returns, its hello re-announces
the inventory and replaces what was known).

A PKCS#11 slot counts as holding a card only when its token reports a serial: SoftHSM2's
free slot and other uninitialised tokens are listed EMPTY and never handed out for work.

Acquiring a reader (`acquire`, `lease`): the request is refused at once when no connected
reader matches its selector (ReaderNotFound, GatewayNotConnected for an unknown gateway) or
when no matching reader holds a card and none is held by anyone (NoCardPresent: nothing would
change without a person). Otherwise it joins one FIFO queue; whenever a reader is freed, a
card is inserted or a gateway attaches, the queue is served in order: each waiter gets the
free, ready reader that matches it and was used least recently (so work spreads over every
reader), and a later waiter only goes first when no reader it could take suits those before
it. Each waiter's position (1-based) is reported to its observer. A queued request fails
when no connected reader matches it any more, or after `queue_timeout_s`. Cancelling a
waiting caller removes it from the queue; a reader handed to it at that very moment goes back
to the pool.

Callers further up (orders) narrow the selector and watch the position through the
`LEASE_SCOPE` context variable, without every layer in between passing them along.
"""
from __future__ import annotations

import asyncio
import builtins
import contextlib
import contextvars
import datetime as dt
import enum
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from orchestrator.domain.pool_assignment import (
    ANY_READER,
    Candidate,
    ReaderKey,
    ReaderSelector,
    Want,
    assign,
    has_card,
)
from shared import cards, convert
from shared.errors import (
    CardlineError,
    GatewayNotConnected,
    NoCardPresent,
    ReaderBusy,
    ReaderNotFound,
    StepOutcomeMismatch,
    StepTimeout,
)
from shared.limits import MAX_WATCH_BACKLOG
from shared.logging import get_logger

log = get_logger(__name__)

TASK, SERVICE = "task", "lease"          # kinds of holders: a card task (BUSY), a service lease (LEASED)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Command:
    command_id: str
    reader_id: str
    task_id: str
    step_number: int
    step: cards.Step


class ReaderState(enum.Enum):
    EMPTY = "EMPTY"
    CARD_PRESENT = "CARD_PRESENT"
    LEASED = "LEASED"
    BUSY = "BUSY"
    OFFLINE = "OFFLINE"
    ERROR = "ERROR"              # the gateway reports the reader unusable (reader.error)


@dataclass(frozen=True)
class PooledReader:
    gateway_id: str
    reader: cards.Reader
    busy: bool                                   # held by anyone (task or lease)
    state: ReaderState = ReaderState.EMPTY
    site: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    holder: str = ""                             # task id or lease id holding it


@dataclass(frozen=True)
class GatewayInfo:
    gateway_id: str
    site: str
    labels: Mapping[str, str]
    connected: bool
    readers: int
    connected_since: dt.datetime
    last_seen: dt.datetime
    version: str


_CLOSED = object()


@dataclass(eq=False)
class GatewaySession:
    """One attached gateway: its readers and the commands in flight on its stream. Its site
    and labels are the ones enrolled in its certificate (the link servicer reads them there;
    only a plaintext development link takes them from the hello)."""
    gateway_id: str
    site: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    readers: dict[str, cards.Reader] = field(default_factory=dict)
    version: str = ""
    # Commands not yet sent on the stream; bounded (shared/limits.py): a gateway that stops
    # reading makes new steps fail with ReaderBusy instead of piling up.
    outbox: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(maxsize=MAX_WATCH_BACKLOG))
    _pending: dict[str, asyncio.Future] = field(default_factory=dict)
    closed: bool = False
    connected_since: dt.datetime = field(default_factory=_now)
    last_seen: dt.datetime = field(default_factory=_now)

    def touch(self) -> None:
        self.last_seen = _now()

    async def run_step(self, reader_id: str, step: cards.Step, *, task_id: str, step_number: int,
                       timeout_s: float) -> cards.StepValue:
        if self.closed:
            raise GatewayNotConnected(f"gateway {self.gateway_id!r} is not attached", gateway_id=self.gateway_id)
        if self.outbox.full():
            raise ReaderBusy(f"gateway {self.gateway_id!r} has {self.outbox.qsize()} steps waiting to be sent "
                             "and reads none", reader_id=reader_id, gateway_id=self.gateway_id)
        command = Command(uuid.uuid4().hex, reader_id, task_id, step_number, step)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[command.command_id] = future
        self.outbox.put_nowait(command)
        try:
            value = await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise StepTimeout(f"gateway {self.gateway_id!r} did not answer step {step_number} within {timeout_s:g} s",
                              gateway_id=self.gateway_id, step=str(step_number)) from None
        finally:
            self._pending.pop(command.command_id, None)
        # A gateway that answers with another step's outcome (a replayed older one, or a lie)
        # must not have it taken for this step's: card tasks and leases both come through here.
        expected, received = convert.expected_result(step.operation), convert.result_of(value)
        if received != expected:
            log.warning("step answered with another kind of outcome; refused", gateway_id=self.gateway_id,
                        reader_id=reader_id, task_id=task_id, step=step_number, expected=expected, received=received)
            raise StepOutcomeMismatch(
                f"gateway {self.gateway_id!r} answered step {step_number} ({type(step.operation).__name__}) of "
                f"{task_id} with {received}, not {expected}", gateway_id=self.gateway_id,
                step=str(step_number), expected=expected, received=received, task_id=task_id, reader_id=reader_id)
        return value

    def resolve(self, command_id: str, result: cards.StepValue | CardlineError) -> None:
        future = self._pending.get(command_id)
        if future is None or future.done():
            log.warning("step result for no pending command", gateway_id=self.gateway_id, command_id=command_id)
            return
        if isinstance(result, CardlineError):
            future.set_exception(result)
        else:
            future.set_result(result)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(GatewayNotConnected(
                    f"gateway {self.gateway_id!r} went away during the step", gateway_id=self.gateway_id))
        if not self.outbox.full():          # a full outbox: the link sees `closed` after its next command
            self.outbox.put_nowait(_CLOSED)

    @staticmethod
    def is_close_marker(item: object) -> bool:
        return item is _CLOSED


def reader_state(connected: bool, held_by: str | None, reader: cards.Reader) -> ReaderState:
    """A pooled reader's state: its gateway's link, who holds it (TASK, SERVICE, None), its card."""
    if not connected:
        return ReaderState.OFFLINE
    if held_by is not None:
        return ReaderState.BUSY if held_by == TASK else ReaderState.LEASED
    if reader.error:
        return ReaderState.ERROR
    return ReaderState.CARD_PRESENT if has_card(reader) else ReaderState.EMPTY


class PoolObserver(Protocol):
    """What the pool tells the metrics (orchestrator/metrics.py); the default does nothing."""
    def waited(self, kind: str, seconds: float) -> None: ...
    def heartbeats_missed(self, gateway_id: str) -> None: ...


class _Unobserved:
    def waited(self, kind: str, seconds: float) -> None:
        pass

    def heartbeats_missed(self, gateway_id: str) -> None:
        pass


@dataclass(frozen=True)
class PoolCensus:
    """The pool at one moment, for the metrics: readers by state, the queue, the gateways."""
    readers: Mapping[ReaderState, int]
    queue_depth: int
    oldest_wait_s: float
    gateways: Mapping[str, bool]                 # gateway id -> connected


class LeaseObserver(Protocol):
    def queued(self, position: int) -> None: ...
    def acquired(self, gateway_id: str, reader_id: str) -> None: ...


@dataclass(frozen=True)
class LeaseScope:
    """Set by a caller above the card task engine (an order): every reader acquired below it
    must also match `selector`, and `observer` hears the queue position and the reader."""
    selector: ReaderSelector | None = None
    observer: LeaseObserver | None = None
    tag: object = None                           # lets the owner find its waiters (cancel_waiters)
    refuse: Callable[[], CardlineError | None] | None = None   # a reason not to queue any more (cancelled)
    # Which cards the owner takes: accepts(gateway_id, reader) false leaves that reader's card
    # to others (an order never takes a card it already had: orders.py).
    accepts: Callable[[str, cards.Reader], bool] | None = None


LEASE_SCOPE: contextvars.ContextVar[LeaseScope | None] = contextvars.ContextVar("cardline_lease_scope", default=None)


@dataclass(eq=False)
class _Hold:
    kind: str
    holder: str


@dataclass(eq=False)
class _Waiter:
    selector: ReaderSelector
    scope: LeaseScope | None
    need_card: bool
    kind: str
    holder: str
    future: asyncio.Future
    position: int = 0
    since: float = field(default_factory=time.monotonic)
    _want: Want | None = field(default=None, init=False, repr=False)

    def wants(self, session: GatewaySession, reader: cards.Reader) -> bool:
        """Matches the reader, card aside."""
        if not self.selector.matches_place(session.gateway_id, session.site, session.labels, reader):
            return False
        s = self.scope.selector if self.scope else None
        return s is None or s.matches_place(session.gateway_id, session.site, session.labels, reader)

    def describe(self) -> str:
        s = self.scope.selector if self.scope else None
        return self.selector.describe() + (f" within {s.describe()}" if s else "")

    def want(self) -> Want:
        if self._want is None:                   # made once: every serve asks again
            self._want = Want(self, self.selector, self.need_card, self.scope.selector if self.scope else None,
                              self.scope.accepts if self.scope else None)
        return self._want


class Lease:
    """A reader held for one holder until `release()` (or the end of `pool.lease()`)."""

    def __init__(self, pool: ReaderPool, session: GatewaySession, reader: cards.Reader, hold: _Hold) -> None:
        self._pool = pool
        self.session = session
        self.reader = reader
        self._hold = hold
        self.released = False

    @property
    def gateway_id(self) -> str:
        return self.session.gateway_id

    @property
    def key(self) -> tuple[str, str]:
        return self.session.gateway_id, self.reader.reader_id

    @property
    def holder(self) -> str:
        return self._hold.holder

    async def run(self, step: cards.Step, *, task_id: str, step_number: int, timeout_s: float) -> cards.StepValue:
        if self._hold.kind == TASK and not self._hold.holder:
            self._hold.holder = task_id          # a card task learns its id after taking the reader
            self._pool._touch(self.key)
            self._pool._publish_touched()
        return await self.session.run_step(self.reader.reader_id, step, task_id=task_id, step_number=step_number,
                                           timeout_s=timeout_s)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._pool._release(self)


class ReaderPool:
    def __init__(self, *, queue_timeout_s: float | None = None, offline_retention_s: float = 600.0,
                 observer: PoolObserver | None = None) -> None:
        self.queue_timeout_s = queue_timeout_s
        self.observer: PoolObserver = observer or _Unobserved()
        self.offline_retention_s = offline_retention_s
        self._gateways: dict[str, GatewaySession] = {}        # the latest session of each gateway, closed or not
        self._offline_since: dict[str, float] = {}
        self._holds: dict[tuple[str, str], _Hold] = {}
        self._last_used: dict[tuple[str, str], float] = {}
        self._waiters: list[_Waiter] = []
        self._sinks: list[Callable[[str, PooledReader], None]] = []
        self._gone_listeners: list[Callable[[GatewaySession], None]] = []
        self._snapshot: dict[ReaderKey, PooledReader] = {}     # what the sinks were last told
        # What changed since the last publish: readers, and gateways whose every reader may have.
        self._touched: set[ReaderKey] = set()
        self._touched_gateways: set[str] = set()
        self._candidates: builtins.list[Candidate] | None = None   # the readers of connected gateways
        self._matching_readers: dict[tuple[object, ...], builtins.list[Candidate]] = {}   # of _candidates, by request
        # One object per selector among the queued: the serve groups waiters alike, and the
        # same object compares at once (many card tasks ask with equal selectors of their own).
        self._selectors: dict[ReaderSelector, ReaderSelector] = {}

    # --- gateways ----------------------------------------------------------------------

    def attach(self, session: GatewaySession) -> None:
        old = self._gateways.get(session.gateway_id)
        if old is not None and not old.closed:
            log.info("gateway reattached, closing its previous stream", gateway_id=session.gateway_id)
            old.close()
            self._gone(old)
        self._gateways[session.gateway_id] = session
        self._offline_since.pop(session.gateway_id, None)
        self._gateway_changed(session.gateway_id)
        log.info("gateway attached", gateway_id=session.gateway_id, readers=len(session.readers),
                 version=session.version)
        self._changed()

    def detach(self, session: GatewaySession) -> None:
        session.close()
        gid = session.gateway_id
        if self._gateways.get(gid) is not session or gid in self._offline_since:
            return
        self._offline_since[gid] = time.monotonic()
        self._gateway_changed(gid)
        log.info("gateway detached; its readers are offline", gateway_id=gid, readers=len(session.readers))
        with contextlib.suppress(RuntimeError):          # no loop: nothing to purge later
            asyncio.get_running_loop().call_later(self.offline_retention_s + 0.01, self._changed)
        self._gone(session)
        self._changed()

    def _gone(self, session: GatewaySession) -> None:
        for listener in list(self._gone_listeners):
            try:
                listener(session)
            except Exception:  # one listener must not stop the others
                log.exception("gateway-gone listener failed", gateway_id=session.gateway_id)

    def on_gateway_gone(self, listener: Callable[[GatewaySession], None]) -> Callable[[], None]:
        self._gone_listeners.append(listener)
        return lambda: self._gone_listeners.remove(listener)

    def reader_event(self, session: GatewaySession, kind: str, reader: cards.Reader) -> None:
        if session.closed:
            return
        if kind == "reader_removed":
            session.readers.pop(reader.reader_id, None)
        else:
            session.readers[reader.reader_id] = reader
        self._candidates = None
        self._touch((session.gateway_id, reader.reader_id))
        self._changed()

    def seen(self, session: GatewaySession) -> None:
        session.touch()

    def fell_silent(self, session: GatewaySession) -> None:
        """The gateway's heartbeats stopped coming (the link servicer detaches it next)."""
        self.observer.heartbeats_missed(session.gateway_id)

    def session(self, gateway_id: str) -> GatewaySession:
        session = self._gateways.get(gateway_id)
        if session is None or session.closed:
            raise GatewayNotConnected(f"gateway {gateway_id!r} is not attached", gateway_id=gateway_id)
        return session

    def gateways(self) -> list[GatewayInfo]:
        self._purge()
        return [GatewayInfo(gid, s.site, dict(s.labels), not s.closed, len(s.readers), s.connected_since,
                            s.last_seen, s.version) for gid, s in sorted(self._gateways.items())]

    def _purge(self) -> bool:
        now = time.monotonic()
        expired = [gid for gid, since in self._offline_since.items() if now - since >= self.offline_retention_s]
        for gid in expired:
            del self._offline_since[gid]
            self._gateways.pop(gid, None)
            self._gateway_changed(gid)
            log.info("offline gateway forgotten", gateway_id=gid)
        return bool(expired)

    def _connected(self) -> list[GatewaySession]:
        return [s for _, s in sorted(self._gateways.items()) if not s.closed]

    def _gateway_changed(self, gateway_id: str) -> None:
        """The gateway came, went or was forgotten: its readers are published again."""
        self._candidates = None
        self._touched_gateways.add(gateway_id)

    def _touch(self, key: ReaderKey) -> None:
        """The reader's hold or inventory changed: published next time."""
        self._touched.add(key)

    # --- readers -----------------------------------------------------------------------

    def _pooled(self, session: GatewaySession, reader: cards.Reader) -> PooledReader:
        hold = self._holds.get((session.gateway_id, reader.reader_id))
        state = reader_state(not session.closed, hold.kind if hold else None, reader)
        return PooledReader(session.gateway_id, reader, hold is not None, state, session.site, dict(session.labels),
                            hold.holder if hold else "")

    def list(self, selector: ReaderSelector = ANY_READER) -> list[PooledReader]:
        self._purge()
        return [p for gid, s in sorted(self._gateways.items())
                for r in sorted(s.readers.values(), key=lambda r: r.reader_id)
                if selector.matches(s, r) for p in [self._pooled(s, r)]]

    def census(self) -> PoolCensus:
        readers = dict.fromkeys(ReaderState, 0)
        for p in self.list():
            readers[p.state] += 1
        waits = self._waits()
        return PoolCensus(readers, len(waits), max(waits, default=0.0), self._link_states())

    def _waits(self) -> builtins.list[float]:
        """How long each queued request has waited, in seconds."""
        now = time.monotonic()
        return [now - w.since for w in self._waiters]

    def _link_states(self) -> dict[str, bool]:
        """Gateway id -> connected."""
        return {gid: not s.closed for gid, s in self._gateways.items()}

    def queue(self) -> builtins.list[tuple[int, str, str]]:  # list: the method above
        """The waiting requests: (position, holder kind, what they wait for)."""
        return [(w.position, w.kind, w.describe()) for w in self._waiters]

    async def refresh(self, serve: bool = False) -> None:
        """Brings what list() shows up to now. The in-memory pool always is; a pool shared by
        replicas (pool_federated.py) reads the database."""

    def subscribe(self, sink: Callable[[str, PooledReader], None]) -> Callable[[], None]:
        """sink(kind, reader) on every change: kind "present" (appeared), "changed", "removed"."""
        self._sinks.append(sink)
        return lambda: self._sinks.remove(sink)

    def _publish(self) -> None:
        """Tells the sinks every difference between `list()` and what they were last told:
        first the readers that appeared or changed, in `list()`'s order, then those removed,
        in the order they were listed."""
        self._purge()
        self._touched.clear()
        self._touched_gateways.clear()
        now = {(p.gateway_id, p.reader.reader_id): p for p in self.list()}
        before, self._snapshot = self._snapshot, now
        self._tell(self._differences(before, now.items(), [key for key in before if key not in now]))

    def _publish_touched(self) -> None:
        """What `_publish` would tell, found among the readers touched since the last publish
        only: a serve changes a reader or two, not the whole listing."""
        if type(self).list is not ReaderPool.list:
            self._publish()                      # a listing kept elsewhere: only the whole diff sees it
            return
        self._purge()
        keys = set(self._touched)
        if self._touched_gateways:
            gateways = self._touched_gateways     # every reader they had and have
            keys.update(key for key in self._snapshot if key[0] in gateways)
            keys.update((gid, rid) for gid in gateways if (s := self._gateways.get(gid)) is not None
                        for rid in s.readers)
        self._touched.clear()
        self._touched_gateways.clear()
        if not keys:
            return
        now: dict[ReaderKey, PooledReader] = {}
        removed: builtins.list[ReaderKey] = []
        for key in sorted(keys):                 # list()'s order
            session = self._gateways.get(key[0])
            reader = session.readers.get(key[1]) if session is not None else None
            if session is not None and reader is not None:
                now[key] = self._pooled(session, reader)
            elif key in self._snapshot:
                removed.append(key)
        events = self._differences(self._snapshot, now.items(), removed)
        self._snapshot.update(now)
        for key in removed:
            del self._snapshot[key]
        self._tell(events)

    @staticmethod
    def _differences(before: Mapping[ReaderKey, PooledReader], now: Iterable[tuple[ReaderKey, PooledReader]],
                     removed: Iterable[ReaderKey]) -> builtins.list[tuple[str, PooledReader]]:
        events = [("present" if key not in before else "changed", p) for key, p in now if before.get(key) != p]
        return events + [("removed", before[key]) for key in removed]

    def _tell(self, events: builtins.list[tuple[str, PooledReader]]) -> None:
        for kind, p in events:
            for sink in list(self._sinks):
                sink(kind, p)

    # --- holding readers ---------------------------------------------------------------

    async def acquire(self, selector: ReaderSelector, *, need_card: bool = True, wait: bool = True,
                      kind: str = TASK, holder: str = "", timeout_s: float | None = None) -> Lease:
        """Holds a matching reader for the caller (see the module doc for the queue)."""
        scope = LEASE_SCOPE.get()
        refusal = scope.refuse() if scope is not None and scope.refuse is not None else None
        if refusal is not None:
            raise refusal
        selector = self._selectors.setdefault(selector, selector)
        waiter = _Waiter(selector, scope, need_card or selector.card_present, kind, holder,
                         asyncio.get_running_loop().create_future())
        self._refuse_unmatchable(waiter)
        self._waiters.append(waiter)
        self._serve()
        if not waiter.future.done():
            refusal = self._refusal(waiter, wait)
            if refusal is not None:
                self._drop(waiter)
                raise refusal
            log.info("request queued", kind=kind, holder=holder, position=waiter.position, wants=waiter.describe())
        timeout_s = self.queue_timeout_s if timeout_s is None else timeout_s
        timer = None
        if timeout_s is not None and not waiter.future.done():
            timer = asyncio.get_running_loop().call_later(timeout_s, self._time_out, waiter, timeout_s)
        try:
            lease = await waiter.future
            self.observer.waited(kind, time.monotonic() - waiter.since)
            return lease
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()        # handed over just as the caller gave up
            self._drop(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    @contextlib.asynccontextmanager
    async def lease(self, selector: ReaderSelector, *, need_card: bool = True, wait: bool = True,
                    kind: str = TASK, holder: str = "") -> AsyncIterator[Lease]:
        """Holds a matching reader for the caller until the block ends."""
        lease = await self.acquire(selector, need_card=need_card, wait=wait, kind=kind, holder=holder)
        try:
            yield lease
        finally:
            lease.release()

    def cancel_waiters(self, tag: object, error: CardlineError) -> int:
        """Fails every queued request made under a LeaseScope with this tag."""
        hit = [w for w in self._waiters if w.scope is not None and w.scope.tag is tag and not w.future.done()]
        for w in hit:
            w.future.set_exception(error)
            self._drop(w)
        return len(hit)

    def _refuse_unmatchable(self, waiter: _Waiter) -> None:
        if any(waiter.wants(s, r) for s in self._connected() for r in s.readers.values()):
            return
        gid = waiter.selector.gateway_id
        if gid and gid not in {s.gateway_id for s in self._connected()}:
            raise GatewayNotConnected(f"gateway {gid!r} is not attached", gateway_id=gid)
        raise ReaderNotFound(f"no reader of an attached gateway matches {waiter.describe()}",
                             reader_id=waiter.selector.reader_id)

    def _refusal(self, waiter: _Waiter, wait: bool) -> CardlineError | None:
        """Why a request that found no reader at once must not wait (None: it may)."""
        matching = [(s, r) for s in self._connected() for r in s.readers.values() if waiter.wants(s, r)]
        held = [(s, r) for s, r in matching if (s.gateway_id, r.reader_id) in self._holds]
        if waiter.need_card and not held and not any(has_card(r) for _, r in matching):
            return NoCardPresent(f"no card in any reader matching {waiter.describe()}",
                                 reader_id=matching[0][1].reader_id if matching else "")
        if not wait:
            return ReaderBusy(f"every reader matching {waiter.describe()} is busy or leased")
        return None

    def _time_out(self, waiter: _Waiter, timeout_s: float) -> None:
        if not waiter.future.done():
            waiter.future.set_exception(ReaderBusy(
                f"no reader matching {waiter.describe()} became free within {timeout_s:g} s in the queue"))
            self._drop(waiter)

    def _drop(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            self._serve()

    def _release(self, lease: Lease) -> None:
        if self._holds.get(lease.key) is lease._hold:
            del self._holds[lease.key]
            self._last_used[lease.key] = time.monotonic()
            self._touch(lease.key)
        self._changed()

    def _changed(self) -> None:
        self._purge()
        self._serve()

    def _serve(self) -> None:
        """Hands free readers to the queue in order (orchestrator/domain/pool_assignment.py),
        fails hopeless waiters, renumbers the rest and tells everyone."""
        self._waiters = [w for w in self._waiters if not w.future.done()]
        if len(self._selectors) > 2 * len(self._waiters) + 16:     # only those still queued
            self._selectors = {w.selector: w.selector for w in self._waiters}
        if self._candidates is None or len(self._matching_readers) > 2 * len(self._waiters) + 16:
            # Kept until a gateway or a reader changes (and the kinds of request pile up).
            self._candidates = [Candidate(s.gateway_id, s.site, s.labels, r) for s in self._connected()
                                for r in s.readers.values()]
            self._matching_readers = {}
        result = assign([w.want() for w in self._waiters], self._candidates, self._holds.__contains__,
                        lambda key: self._last_used.get(key, 0.0), self._matching_readers)
        for want in result.hopeless:
            waiter = _waiter_of(want)
            waiter.future.set_exception(ReaderNotFound(
                f"no reader of an attached gateway matches {waiter.describe()} any more",
                reader_id=waiter.selector.reader_id))
            self._waiters.remove(waiter)
        for want, chosen in result.granted:
            waiter = _waiter_of(want)
            session = self._gateways[chosen.gateway_id]
            hold = _Hold(waiter.kind, waiter.holder)
            self._holds[chosen.key] = hold
            self._touch(chosen.key)
            self._last_used[chosen.key] = time.monotonic()
            self._waiters.remove(waiter)
            waiter.future.set_result(Lease(self, session, chosen.reader, hold))
            if waiter.scope is not None and waiter.scope.observer is not None:
                waiter.scope.observer.acquired(*chosen.key)
        for want, position in result.positions:
            waiter = _waiter_of(want)
            if waiter.position != position:
                waiter.position = position
                if waiter.scope is not None and waiter.scope.observer is not None:
                    waiter.scope.observer.queued(position)
        self._publish_touched()


def _waiter_of(want: Want) -> _Waiter:
    assert isinstance(want.waiter, _Waiter)
    return want.waiter
