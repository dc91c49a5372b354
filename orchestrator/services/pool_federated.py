"""One reader pool across orchestrator replicas on PostgreSQL (docs/replicas.md).

`FederatedPool` is the ReaderPool of a replica on PostgreSQL. The links of this replica's
gateways stay in memory (GatewaySession, as in the single-process pool) and are written to
the database (orchestrator/store/pool.py) as they change; what every client sees - gateways,
readers, holds, the queue and its positions - is the database's, the same from any replica.

Acquiring a reader puts a waiter row at the end of the one queue and serves it (one
transaction under an advisory lock, orchestrator/domain/pool_assignment.py). Any replica
serving the queue may grant a reader to another replica's waiter; the waiter's replica hears
it (NOTIFY on channel `cardline_pool`, or its slow poll) and hands its caller a lease. A
lease on a reader of a gateway linked to another replica runs its steps through that
replica's ReplicaService (`RemoteSession`), which runs them on its GatewaySession with the
same outcome-kind check.

What an order's LeaseScope.accepts decides (a callable, only in its own replica) becomes data:
the waiter's owner writes the cards it would take (`takes`) before each serve it starts, and
again whenever the inventory changes; the serve grants only those.

A replica whose heartbeat lapsed counts as gone: its gateways are offline, and the survivors
remove its waiters and holds (those of leases stay until they expire or are released).
"""
from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import functools
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from orchestrator.domain.pool_assignment import ANY_READER, ReaderSelector, card_key, has_card
from orchestrator.services.pool import (
    LEASE_SCOPE,
    TASK,
    GatewayInfo,
    GatewaySession,
    Lease,
    PooledReader,
    PoolObserver,
    ReaderPool,
    ReaderState,
    _Hold,
    _Waiter,
    reader_state,
)
from orchestrator.store.pool import FAILED, GRANTED, WAITING, PoolView, ReplicaPool, take_key
from shared import cards
from shared.errors import (
    CardlineError,
    GatewayNotConnected,
    NoCardPresent,
    ReaderBusy,
    ReaderNotFound,
)
from shared.logging import get_logger

log = get_logger(__name__)

#: RemoteStep(address, gateway_id, reader_id, hold_id, step, task_id, step_number, timeout_s):
#: runs a step through the replica at ADDRESS (orchestrator/api/replica.py ReplicaClient).
RemoteStep = Callable[[str, str, str, str, cards.Step, str, int, float], Awaitable[cards.StepValue]]
MAX_PENDING_WRITES = 10_000
STOP_WAIT_S = 5.0                 # how long stop() waits for its rounds and its listener to end


class RemoteSession(GatewaySession):
    """A gateway linked to another replica, reached through that replica's ReplicaService."""

    def __init__(self, gateway_id: str, site: str, labels: dict[str, str], readers: dict[str, cards.Reader],
                 address: str, remote: RemoteStep, hold_id: str = "") -> None:
        super().__init__(gateway_id=gateway_id, site=site, labels=labels, readers=readers)
        self.address = address
        self.remote = remote
        self.hold_id = hold_id

    async def run_step(self, reader_id: str, step: cards.Step, *, task_id: str, step_number: int,
                       timeout_s: float) -> cards.StepValue:
        if not self.address:
            raise GatewayNotConnected(f"gateway {self.gateway_id!r} is linked to a replica that gives no "
                                      "address", gateway_id=self.gateway_id)
        return await self.remote(self.address, self.gateway_id, reader_id, self.hold_id, step, task_id,
                                 step_number, timeout_s)


class FederatedLease(Lease):
    """A reader held in the database (its hold row's id: hold_id)."""

    def __init__(self, pool: FederatedPool, session: GatewaySession, reader: cards.Reader, hold: _Hold,
                 hold_id: str) -> None:
        super().__init__(pool, session, reader, hold)
        self.hold_id = hold_id

    async def run(self, step: cards.Step, *, task_id: str, step_number: int, timeout_s: float) -> cards.StepValue:
        pool = self._pool
        assert isinstance(pool, FederatedPool)
        if self._hold.kind == TASK and not self._hold.holder:
            self._hold.holder = task_id          # a card task learns its id after taking the reader
            pool._write(lambda: pool.db.set_holder(self.hold_id, task_id))
        # A link of this replica is this lease's for good (it ends with the link, as in one
        # process); another replica's link is looked up for every step: the gateway may have
        # moved to another replica, or to this one, meanwhile.
        session = self.session
        if isinstance(session, RemoteSession):
            session = pool._session_for(self.gateway_id, self.hold_id)
        return await session.run_step(self.reader.reader_id, step, task_id=task_id, step_number=step_number,
                                      timeout_s=timeout_s)


@dataclass(eq=False)
class _FedWaiter(_Waiter):
    """A request of this replica's callers, queued in the database as row WAITER_ID."""
    waiter_id: str = ""


class FederatedPool(ReaderPool):
    def __init__(self, db: ReplicaPool, replica_id: str, address: str, *, stale_after_s: float,
                 poll_interval_s: float, heartbeat_interval_s: float, remote: RemoteStep,
                 max_step_timeout_s: float = 120.0,
                 listen: Callable[[Callable[[], None]], Coroutine[Any, Any, None]] | None = None,
                 queue_timeout_s: float | None = None, offline_retention_s: float = 600.0,
                 observer: PoolObserver | None = None) -> None:
        super().__init__(queue_timeout_s=queue_timeout_s, offline_retention_s=offline_retention_s, observer=observer)
        self.db = db
        self.replica_id = replica_id
        self.address = address
        self.stale_after_s = stale_after_s
        self.poll_interval_s = poll_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.remote = remote
        self.max_step_timeout_s = max_step_timeout_s
        self._listen = listen
        self._view = PoolView([], [], {}, [], {})
        self._mine: dict[str, _FedWaiter] = {}
        self._links: dict[GatewaySession, str] = {}            # this replica's sessions -> link id
        self._writes: asyncio.Queue[Callable[[], object]] = asyncio.Queue(MAX_PENDING_WRITES)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._cycle = asyncio.Lock()
        # Refreshes asked for (a count) and the count the last finished one covered: callers
        # that queued behind a refresh which started after they asked take its result.
        self._asked = self._covered = 0
        self._serve_asked = False
        self._rounds: list[Callable[[], Awaitable[object]]] = []
        self._stopping = False

    def every_round(self, call: Callable[[], Awaitable[object]]) -> None:
        """CALL runs after each heartbeat round (e.g. the leases ending expired ones)."""
        self._rounds.append(call)

    # --- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self.db.forget, self.replica_id)        # what its previous run left
        await asyncio.to_thread(self.db.advertise, self.replica_id, self.address)
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._run()))
        self._tasks.append(asyncio.create_task(self._beat()))
        if self._listen is not None:
            self._tasks.append(asyncio.create_task(self._listen(self._wake.set)))

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_WAIT_S)
        with contextlib.suppress(Exception):        # its links, queued requests and holds end with it
            await self._flush()
            await asyncio.to_thread(self.db.forget, self.replica_id)
        self._links.clear()

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.refresh(serve=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database away for a moment: the next round
                log.warning("reader pool round failed; trying again", error=str(exc)[:500],
                            retry_s=self.poll_interval_s)

    async def _beat(self) -> None:
        """The heartbeat, on a task of its own: rounds that wait for the pool's lock (many
        requests at once) must not delay it past replica.stale_after_s, or the others would
        take this replica for gone while it works."""
        while not self._stopping:
            try:
                await asyncio.to_thread(self.db.advertise, self.replica_id, self.address)
                await asyncio.to_thread(self.db.seen, self.replica_id,
                                        [s.gateway_id for s in self._links if not s.closed])
                if await asyncio.to_thread(self.db.clean, self.stale_after_s, self.offline_retention_s,
                                           self.replica_id):
                    self._kick()
                for call in self._rounds:
                    await call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database away for a moment: the next beat
                log.warning("replica heartbeat failed; trying again", error=str(exc)[:500],
                            retry_s=self.heartbeat_interval_s)
            await asyncio.sleep(self.heartbeat_interval_s)

    def _kick(self) -> None:
        self._wake.set()

    def _write(self, call: Callable[[], object]) -> None:
        """A write to the database, in order with the others, by the next round."""
        try:
            self._writes.put_nowait(call)
        except asyncio.QueueFull:
            log.error("reader pool writes pile up; one dropped", pending=self._writes.qsize())
        self._kick()

    async def _flush(self) -> None:
        while not self._writes.empty():
            call = self._writes.get_nowait()
            try:
                await asyncio.to_thread(call)
            except Exception:
                log.exception("reader pool write failed")

    async def refresh(self, serve: bool = False) -> None:
        """One round: pending writes, the cards this replica's waiters take, the serve, a
        fresh view, this replica's waiters answered, changes published. Callers that ask while
        a round runs share the next one (a hundred requests at once cost two rounds, not a
        hundred): a round that started after a caller asked covers it."""
        self._asked += 1
        ticket = self._asked
        self._serve_asked |= serve
        async with self._cycle:
            if self._covered >= ticket:
                return
            covers, serve, self._serve_asked = self._asked, self._serve_asked, False
            try:
                await self._round(serve)
            except BaseException:
                self._serve_asked |= serve          # the next round serves for the callers of this one
                raise
            self._covered = covers

    async def _round(self, serve: bool) -> None:
        await self._flush()
        takes = {w.waiter_id: keys for w in self._mine.values() if (keys := self._takes(w)) is not None}
        if takes:
            await asyncio.to_thread(self.db.set_takes, takes)
        if serve and (self._mine or any(w.state == WAITING for w in self._view.waiters)):
            await asyncio.to_thread(self.db.serve, self.stale_after_s, self.replica_id)
        self._view = await asyncio.to_thread(self.db.view, self.stale_after_s, self.replica_id)
        await self._answer()
        self._publish()

    def _takes(self, waiter: _FedWaiter) -> list[str] | None:
        accepts = waiter.scope.accepts if waiter.scope is not None else None
        if accepts is None:
            return None
        connected = {g.gateway_id for g in self._view.gateways if g.connected}
        return [take_key(gid, r, card_key(r)) for gid, r in self._view.readers
                if gid in connected and _accepted(accepts, gid, r)]

    async def _answer(self) -> None:
        rows = {w.waiter_id: w for w in self._view.waiters}
        for waiter_id, waiter in list(self._mine.items()):
            row = rows.get(waiter_id)
            if waiter.future.done():
                continue
            if row is None:
                waiter.future.set_exception(ReaderBusy(
                    f"the request for a reader matching {waiter.describe()} left the queue (its replica was "
                    "taken for gone)"))
                self._mine.pop(waiter_id, None)
            elif row.state == GRANTED and row.gateway_id and row.reader_id:
                self._mine.pop(waiter_id, None)
                await asyncio.to_thread(self.db.withdraw, waiter_id)
                if waiter.future.done():            # the caller gave up meanwhile: the reader goes back
                    await asyncio.to_thread(self.db.release, waiter_id)
                    continue
                readers = {r.reader_id: r for gid, r in self._view.readers if gid == row.gateway_id}
                reader = readers.get(row.reader_id)
                try:
                    if reader is None:
                        raise ReaderNotFound(f"reader {row.reader_id!r} of gateway {row.gateway_id!r} went away",
                                             reader_id=row.reader_id)
                    session = self._session_for(row.gateway_id, waiter_id)
                except CardlineError as exc:
                    await asyncio.to_thread(self.db.release, waiter_id)
                    if not waiter.future.done():
                        waiter.future.set_exception(exc)
                    continue
                waiter.future.set_result(FederatedLease(self, session, reader, _Hold(waiter.kind, waiter.holder),
                                                        waiter_id))
                if waiter.scope is not None and waiter.scope.observer is not None:
                    waiter.scope.observer.acquired(row.gateway_id, row.reader_id)
            elif row.state == FAILED:
                self._mine.pop(waiter_id, None)
                await asyncio.to_thread(self.db.withdraw, waiter_id)
                if not waiter.future.done():
                    waiter.future.set_exception(ReaderNotFound(
                        f"no reader of an attached gateway matches {waiter.describe()} any more",
                        reader_id=waiter.selector.reader_id))
            elif row.position and row.position != waiter.position:
                waiter.position = row.position
                if waiter.scope is not None and waiter.scope.observer is not None:
                    waiter.scope.observer.queued(row.position)

    # --- gateways linked here ------------------------------------------------------------

    def attach(self, session: GatewaySession) -> None:
        old = self._gateways.get(session.gateway_id)
        if old is not None:
            self._links.pop(old, None)             # the new link's row replaces the old one's
        link_id = str(uuid.uuid4())
        self._links[session] = link_id
        readers = list(session.readers.values())
        self._write(lambda: self.db.link_up(self.replica_id, link_id, session.gateway_id, session.site,
                                            session.labels, session.version, readers))
        super().attach(session)

    def detach(self, session: GatewaySession) -> None:
        link_id = self._links.pop(session, None)
        if link_id is not None:
            self._write(lambda: self.db.link_down(link_id, session.gateway_id))
        super().detach(session)

    def reader_event(self, session: GatewaySession, kind: str, reader: cards.Reader) -> None:
        link_id = self._links.get(session)
        if link_id is not None and not session.closed:
            removed = kind == "reader_removed"
            self._write(lambda: self.db.reader_changed(link_id, session.gateway_id, reader, removed))
        super().reader_event(session, kind, reader)

    def _serve(self) -> None:            # the queue is the database's: served by the next round
        self._kick()

    def session(self, gateway_id: str) -> GatewaySession:
        return self._session_for(gateway_id)

    async def run_relayed(self, gateway_id: str, reader_id: str, hold_id: str, step: cards.Step, *, task_id: str,
                          step_number: int, timeout_s: float) -> cards.StepValue:
        """A step another replica sends (ReplicaService): run on THIS replica's link to the
        gateway only - never relayed on, so that two replicas with stale views of where a
        gateway is linked cannot hand it back and forth - and only while the reader is held
        under HOLD_ID. TIMEOUT_S: at most `max_step_timeout_s` (0: that)."""
        hold = await asyncio.to_thread(self.db.hold, hold_id) if hold_id else None
        if hold is None or (hold.gateway_id, hold.reader_id) != (gateway_id, reader_id):
            raise ReaderBusy(f"reader {reader_id!r} of gateway {gateway_id!r} is not held under hold {hold_id!r}",
                             reader_id=reader_id, gateway_id=gateway_id)
        local = self._gateways.get(gateway_id)
        if local is None or local.closed:
            raise GatewayNotConnected(f"gateway {gateway_id!r} is not linked to replica {self.replica_id}",
                                      gateway_id=gateway_id)
        timeout_s = min(timeout_s or self.max_step_timeout_s, self.max_step_timeout_s)
        return await local.run_step(reader_id, step, task_id=task_id, step_number=step_number, timeout_s=timeout_s)

    def _session_for(self, gateway_id: str, hold_id: str = "") -> GatewaySession:
        local = self._gateways.get(gateway_id)
        if local is not None and not local.closed:
            return local
        row = self._view.gateway(gateway_id)
        if row is None or not row.connected:
            raise GatewayNotConnected(f"gateway {gateway_id!r} is not attached", gateway_id=gateway_id)
        readers = {r.reader_id: r for gid, r in self._view.readers if gid == gateway_id}
        return RemoteSession(gateway_id, row.site, dict(row.labels), readers,
                             self._view.addresses.get(row.replica_id, ""), self.remote, hold_id)

    # --- what every replica sees ---------------------------------------------------------

    def _pooled_rows(self) -> builtins.list[PooledReader]:
        view = self._view
        gateways = {g.gateway_id: g for g in view.gateways}
        out = []
        for gid, reader in view.readers:
            g = gateways.get(gid)
            if g is None:
                continue
            hold = view.holds.get((gid, reader.reader_id))
            state = reader_state(g.connected, hold.kind if hold else None, reader)
            out.append(PooledReader(gid, reader, hold is not None, state, g.site, dict(g.labels),
                                    hold.holder if hold else ""))
        return out

    def list(self, selector: ReaderSelector = ANY_READER) -> builtins.list[PooledReader]:
        return [p for p in self._pooled_rows() if selector.matches_pooled(p)]

    def gateways(self) -> builtins.list[GatewayInfo]:
        counts: dict[str, int] = {}
        for gid, _ in self._view.readers:
            counts[gid] = counts.get(gid, 0) + 1
        return [GatewayInfo(g.gateway_id, g.site, dict(g.labels), g.connected, counts.get(g.gateway_id, 0),
                            g.connected_since, g.last_seen, g.version) for g in self._view.gateways]

    def _waits(self) -> builtins.list[float]:
        now = dt.datetime.now(dt.UTC)
        return [(now - w.since).total_seconds() for w in self._view.waiters if w.state == WAITING]

    def _link_states(self) -> dict[str, bool]:
        return {g.gateway_id: g.connected for g in self._view.gateways}

    def queue(self) -> builtins.list[tuple[int, str, str]]:
        return [(w.position, w.kind, w.describe()) for w in self._view.waiters if w.state == WAITING]

    def position(self, holder: str) -> int:
        """The queue position of the first waiting request of HOLDER (0: none waits)."""
        return next((w.position for w in self._view.waiters if w.state == WAITING and w.holder == holder), 0)

    # --- holding readers -------------------------------------------------------------------

    async def acquire(self, selector: ReaderSelector, *, need_card: bool = True, wait: bool = True,
                      kind: str = TASK, holder: str = "", timeout_s: float | None = None) -> Lease:
        scope = LEASE_SCOPE.get()
        refusal = scope.refuse() if scope is not None and scope.refuse is not None else None
        if refusal is not None:
            raise refusal
        await self.refresh()
        waiter = _FedWaiter(selector, scope, need_card or selector.card_present, kind, holder,
                            asyncio.get_running_loop().create_future(), waiter_id=str(uuid.uuid4()))
        self._refuse_unmatchable_view(waiter)
        try:
            async with self._cycle:         # no round between the row and the waiter known here
                await asyncio.to_thread(self.db.enqueue, waiter.waiter_id, self.replica_id, kind, holder, selector,
                                        scope.selector if scope else None, waiter.need_card, self._takes(waiter))
                self._mine[waiter.waiter_id] = waiter
            await self.refresh(serve=True)
            if not waiter.future.done():
                refusal = self._refusal_view(waiter, wait)
                if refusal is not None:
                    await self._give_up(waiter)
                    raise refusal
                log.info("request queued", kind=kind, holder=holder, position=waiter.position,
                         wants=waiter.describe())
            timeout_s = self.queue_timeout_s if timeout_s is None else timeout_s
            async with asyncio.timeout(timeout_s):
                lease = await asyncio.shield(waiter.future)
            self.observer.waited(kind, time.monotonic() - waiter.since)
            return lease
        except TimeoutError:
            await self._give_up(waiter)
            raise ReaderBusy(f"no reader matching {waiter.describe()} became free within {timeout_s:g} s in the "
                             "queue") from None
        except asyncio.CancelledError:
            await asyncio.shield(self._give_up(waiter))
            raise

    async def _give_up(self, waiter: _FedWaiter) -> None:
        """The caller stops waiting: its row leaves the queue; a reader granted meanwhile goes back."""
        self._mine.pop(waiter.waiter_id, None)
        row = await asyncio.to_thread(self.db.withdraw, waiter.waiter_id)
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            future.result().release()
        elif row is not None and row.state == GRANTED:
            await asyncio.to_thread(self.db.release, waiter.waiter_id)
        if not future.done():
            future.cancel()
        self._kick()

    def cancel_waiters(self, tag: object, error: CardlineError) -> int:
        hit = [w for w in self._mine.values() if w.scope is not None and w.scope.tag is tag and not w.future.done()]
        for w in hit:
            w.future.set_exception(error)
            self._mine.pop(w.waiter_id, None)
            self._write(functools.partial(self.db.withdraw, w.waiter_id))
        return len(hit)

    def _release(self, lease: Lease) -> None:
        if isinstance(lease, FederatedLease):
            self._write(lambda: self.db.release(lease.hold_id))

    def _refuse_unmatchable_view(self, waiter: _FedWaiter) -> None:
        if self._matching(waiter):
            return
        gid = waiter.selector.gateway_id
        row = self._view.gateway(gid) if gid else None
        if gid and (row is None or not row.connected):
            raise GatewayNotConnected(f"gateway {gid!r} is not attached", gateway_id=gid)
        raise ReaderNotFound(f"no reader of an attached gateway matches {waiter.describe()}",
                             reader_id=waiter.selector.reader_id)

    def _matching(self, waiter: _FedWaiter) -> builtins.list[PooledReader]:
        scope = waiter.scope.selector if waiter.scope else None
        return [p for p in self._pooled_rows() if p.state is not ReaderState.OFFLINE
                and waiter.selector.matches_place(p.gateway_id, p.site, p.labels, p.reader)
                and (scope is None or scope.matches_place(p.gateway_id, p.site, p.labels, p.reader))]

    def _refusal_view(self, waiter: _FedWaiter, wait: bool) -> CardlineError | None:
        matching = self._matching(waiter)
        held = [p for p in matching if p.busy]
        if waiter.need_card and not held and not any(has_card(p.reader) for p in matching):
            return NoCardPresent(f"no card in any reader matching {waiter.describe()}",
                                 reader_id=matching[0].reader.reader_id if matching else "")
        if not wait:
            return ReaderBusy(f"every reader matching {waiter.describe()} is busy or leased")
        return None


def _accepted(accepts: Callable[[str, cards.Reader], bool], gateway_id: str, reader: cards.Reader) -> bool:
    try:
        return accepts(gateway_id, reader)
    except CardlineError:                # e.g. its gateway went away meanwhile: not now
        return False


async def listen_for_changes(database_url: str, wake: Callable[[], None], *, retry_s: float = 2.0) -> None:
    """LISTEN on the pool's channel (one psycopg 3 async connection per replica); calls WAKE
    on every notification. Reconnects after RETRY_S when the connection breaks."""
    import psycopg
    from sqlalchemy.engine import make_url

    from orchestrator.store.pool import CHANNEL

    url = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                wake()                  # what changed while not listening
                async for _ in conn.notifies():
                    wake()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database away: listen again soon; the poll covers the gap
            log.warning("pool notifications lost; listening again", error=str(exc), retry_s=retry_s)
            await asyncio.sleep(retry_s)
