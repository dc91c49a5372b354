"""The reader pool shared by orchestrator replicas on one PostgreSQL database (revision
0010_replica_pool): gateways and readers as the replica holding each link reports them,
exclusive holds, the one FIFO queue of waiters, leases.

The queue is served in ONE transaction under an advisory lock (`serve`): the waiters in order,
the readers of connected gateways of live replicas and the holds are read, the pure assignment
(orchestrator/domain/pool_assignment.py) runs on them, holds are inserted and waiters marked
granted, failed or renumbered. Every change NOTIFYs channel `cardline_pool`, so the other
replicas look again (orchestrator/services/pool_federated.py). A replica is live while its
heartbeat in orchestrator_instances is younger than `stale_after_s`; the rows of a replica
that stopped beating count as offline and are cleaned by the survivors (`clean`).
"""
from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from orchestrator.domain.pool_assignment import Candidate, ReaderSelector, Want, assign, card_key
from orchestrator.store.models import (
    OrchestratorInstance,
    PoolGateway,
    PoolHold,
    PoolLease,
    PoolReader,
    PoolWaiter,
    utcnow,
)
from orchestrator.store.sessions import Sessions
from shared import cards
from shared.errors import InvalidArgument

CHANNEL = "cardline_pool"                 # NOTIFY/LISTEN channel of every change
_SERVE_LOCK = 0x63617264706f6f6c          # pg_advisory_xact_lock key of the serve ("cardpool")
WAITING, GRANTED, FAILED = "waiting", "granted", "failed"


def reader_to_data(r: cards.Reader) -> dict[str, Any]:
    return {"reader_id": r.reader_id, "kind": r.kind.value, "name": r.name, "card_present": r.card_present,
            "atr": r.atr.hex(), "token_label": r.token_label, "token_serial": r.token_serial,
            "token_model": r.token_model, "error": r.error}


def reader_from_data(d: Mapping[str, Any]) -> cards.Reader:
    return cards.Reader(reader_id=d["reader_id"], kind=cards.ReaderKind(d["kind"]), name=d.get("name", ""),
                        card_present=bool(d.get("card_present")), atr=bytes.fromhex(d.get("atr", "")),
                        token_label=d.get("token_label", ""), token_serial=d.get("token_serial", ""),
                        token_model=d.get("token_model", ""), error=d.get("error", ""))


def take_key(gateway_id: str, reader: cards.Reader, card: str) -> str:
    """One entry of a waiter's `takes`: this card in this reader."""
    return f"{gateway_id}\t{reader.reader_id}\t{card}"


@dataclass(frozen=True)
class GatewayRow:
    gateway_id: str
    replica_id: str
    link_id: str
    site: str
    labels: Mapping[str, str]
    version: str
    connected: bool               # linked, and its replica is live
    connected_since: dt.datetime
    last_seen: dt.datetime


@dataclass(frozen=True)
class HoldRow:
    gateway_id: str
    reader_id: str
    hold_id: str
    replica_id: str
    kind: str
    holder: str


@dataclass(frozen=True)
class WaiterRow:
    waiter_id: str
    replica_id: str
    kind: str
    holder: str
    request: Mapping[str, Any]
    takes: Sequence[str] | None
    state: str
    position: int
    gateway_id: str | None
    reader_id: str | None
    since: dt.datetime

    @property
    def selector(self) -> ReaderSelector:
        return ReaderSelector.from_data(self.request["selector"])

    @property
    def scope(self) -> ReaderSelector | None:
        scope = self.request.get("scope")
        return ReaderSelector.from_data(scope) if scope is not None else None

    def describe(self) -> str:
        scope = self.scope
        return self.selector.describe() + (f" within {scope.describe()}" if scope else "")


@dataclass(frozen=True)
class LeaseRow:
    lease_id: str
    hold_id: str
    gateway_id: str
    reader: cards.Reader
    owner: str
    holder: str
    ttl_s: float
    expires_at: dt.datetime
    acquired_at: dt.datetime
    auto_steps: int


@dataclass(frozen=True)
class PoolView:
    """The pool as every replica sees it, read in one transaction."""
    gateways: list[GatewayRow]
    readers: list[tuple[str, cards.Reader]]              # (gateway id, reader), sorted
    holds: dict[tuple[str, str], HoldRow]
    waiters: list[WaiterRow]                             # in queue order
    addresses: dict[str, str]                            # live replica id -> address
    last_used: dict[tuple[str, str], float] = field(default_factory=dict)

    def gateway(self, gateway_id: str) -> GatewayRow | None:
        return next((g for g in self.gateways if g.gateway_id == gateway_id), None)


@dataclass(frozen=True)
class Served:
    granted: list[tuple[str, str, str]]      # (waiter id, gateway id, reader id)
    failed: list[str]                        # waiter ids


class ReplicaPool:
    """The store part of the federated pool (PostgreSQL only)."""

    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions

    # --- replicas ------------------------------------------------------------------------

    def advertise(self, replica_id: str, address: str) -> None:
        """Replica REPLICA_ID is alive now and reached at ADDRESS."""
        if not replica_id:
            raise InvalidArgument("a replica needs an id")
        with self._db.write() as s:
            now = utcnow()
            s.execute(self._db.insert(OrchestratorInstance)
                      .values(id=replica_id, started_at=now, heartbeat_at=now, address=address)
                      .on_conflict_do_update(index_elements=[OrchestratorInstance.id],
                                             set_={"heartbeat_at": now, "address": address}))

    @staticmethod
    def _live(s: Session, stale_after_s: float, own: str = "") -> dict[str, str]:
        """Live replica id -> address. OWN, the replica asking, is live whatever its row says:
        a replica whose beat is late (a busy event loop) must not take itself for gone and
        fail its own queue."""
        since = utcnow() - dt.timedelta(seconds=stale_after_s)
        live = {r.id: r.address or "" for r in s.scalars(select(OrchestratorInstance)
                                                         .where(OrchestratorInstance.heartbeat_at >= since))}
        if own and own not in live:
            live[own] = s.scalar(select(OrchestratorInstance.address).where(OrchestratorInstance.id == own)) or ""
        return live

    # --- gateways and readers (written by the replica holding the link) --------------------

    def link_up(self, replica_id: str, link_id: str, gateway_id: str, site: str, labels: Mapping[str, str],
                version: str, readers: Iterable[cards.Reader]) -> None:
        """A gateway linked to REPLICA_ID on LINK_ID, with its whole inventory."""
        with self._db.write() as s:
            now = utcnow()
            values = dict(replica_id=replica_id, link_id=link_id, site=site, labels=dict(labels), version=version,
                          connected=True, connected_since=now, last_seen=now)
            s.execute(self._db.insert(PoolGateway).values(gateway_id=gateway_id, **values)
                      .on_conflict_do_update(index_elements=[PoolGateway.gateway_id], set_=values))
            wanted = {r.reader_id: r for r in readers}
            s.execute(delete(PoolReader).where(PoolReader.gateway_id == gateway_id,
                                               PoolReader.reader_id.not_in(list(wanted))))
            for reader in wanted.values():
                self._put_reader(s, gateway_id, reader)
            _notify(s)

    def _put_reader(self, s: Session, gateway_id: str, reader: cards.Reader) -> None:
        data = reader_to_data(reader)
        s.execute(self._db.insert(PoolReader).values(gateway_id=gateway_id, reader_id=reader.reader_id, reader=data,
                                                     last_used=0.0)
                  .on_conflict_do_update(index_elements=[PoolReader.gateway_id, PoolReader.reader_id],
                                         set_={"reader": data}))

    def link_down(self, link_id: str, gateway_id: str) -> None:
        """The link LINK_ID of the gateway ended (nothing when the gateway linked again since)."""
        with self._db.write() as s:
            done = s.execute(update(PoolGateway).where(PoolGateway.gateway_id == gateway_id,
                                                       PoolGateway.link_id == link_id)
                             .values(connected=False, last_seen=utcnow()))
            if done.rowcount:        # type: ignore[attr-defined]
                _notify(s)

    def reader_changed(self, link_id: str, gateway_id: str, reader: cards.Reader, removed: bool) -> None:
        with self._db.write() as s:
            if s.scalar(select(PoolGateway.link_id).where(PoolGateway.gateway_id == gateway_id)) != link_id:
                return
            if removed:
                s.execute(delete(PoolReader).where(PoolReader.gateway_id == gateway_id,
                                                   PoolReader.reader_id == reader.reader_id))
            else:
                self._put_reader(s, gateway_id, reader)
            _notify(s)

    def seen(self, replica_id: str, gateway_ids: Iterable[str]) -> None:
        """The gateways linked to REPLICA_ID were heard from just now."""
        ids = list(gateway_ids)
        if not ids:
            return
        with self._db.write() as s:
            s.execute(update(PoolGateway).where(PoolGateway.replica_id == replica_id,
                                                PoolGateway.gateway_id.in_(ids), PoolGateway.connected)
                      .values(last_seen=utcnow()))

    # --- what every replica sees -----------------------------------------------------------

    def view(self, stale_after_s: float, own: str = "") -> PoolView:
        with self._db.read() as s:
            live = self._live(s, stale_after_s, own)
            gateways = [GatewayRow(g.gateway_id, g.replica_id, g.link_id, g.site, dict(g.labels), g.version,
                                   g.connected and g.replica_id in live, g.connected_since, g.last_seen)
                        for g in s.scalars(select(PoolGateway).order_by(PoolGateway.gateway_id))]
            rows = s.scalars(select(PoolReader).order_by(PoolReader.gateway_id, PoolReader.reader_id)).all()
            holds = {(h.gateway_id, h.reader_id): _hold(h) for h in s.scalars(select(PoolHold))}
            waiters = [_waiter(w) for w in s.scalars(select(PoolWaiter).order_by(PoolWaiter.seq))]
        return PoolView(gateways, [(r.gateway_id, reader_from_data(r.reader)) for r in rows], holds, waiters, live,
                        {(r.gateway_id, r.reader_id): r.last_used for r in rows})

    # --- the queue ---------------------------------------------------------------------------

    def enqueue(self, waiter_id: str, replica_id: str, kind: str, holder: str, selector: ReaderSelector,
                scope: ReaderSelector | None, need_card: bool, takes: Sequence[str] | None) -> None:
        """A request joins the end of the queue (served by the next `serve`)."""
        request = {"selector": selector.to_data(), "scope": scope.to_data() if scope else None, "need_card": need_card}
        with self._db.write() as s:
            s.add(PoolWaiter(waiter_id=waiter_id, replica_id=replica_id, kind=kind, holder=holder[:200],
                             request=request, takes=list(takes) if takes is not None else None, state=WAITING,
                             position=0, since=utcnow()))

    def set_takes(self, takes: Mapping[str, Sequence[str]]) -> None:
        """The cards each waiter (id -> takes) would take now, as its owner sees them."""
        if not takes:
            return
        with self._db.write() as s:
            for waiter_id, keys in takes.items():
                s.execute(update(PoolWaiter).where(PoolWaiter.waiter_id == waiter_id, PoolWaiter.state == WAITING)
                          .values(takes=list(keys)))

    def withdraw(self, waiter_id: str) -> WaiterRow | None:
        """Removes the waiter (its owner took the answer, or gave up): its row as it was, None
        when there was none. A reader granted to it stays held (the owner releases it)."""
        with self._db.write() as s:
            row = s.get(PoolWaiter, waiter_id, with_for_update=True)
            if row is None:
                return None
            gone = _waiter(row)
            s.delete(row)
            if gone.state == WAITING:
                _notify(s)            # the queue's positions change
            return gone

    def serve(self, stale_after_s: float, own: str = "") -> Served:
        """Serves the queue in one transaction under the serve lock (see the module doc); OWN:
        the serving replica (live in its own serve)."""
        with self._db.write() as s:
            s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SERVE_LOCK})
            waiters = [w for w in s.scalars(select(PoolWaiter).where(PoolWaiter.state == WAITING)
                                            .order_by(PoolWaiter.seq).with_for_update())]
            if not waiters:
                return Served([], [])
            live = self._live(s, stale_after_s, own)
            connected = {g.gateway_id: g for g in s.scalars(select(PoolGateway).where(PoolGateway.connected))
                         if g.replica_id in live}
            rows = [r for r in s.scalars(select(PoolReader)) if r.gateway_id in connected]
            candidates = [Candidate(r.gateway_id, connected[r.gateway_id].site, connected[r.gateway_id].labels,
                                    reader_from_data(r.reader)) for r in rows]
            last_used = {(r.gateway_id, r.reader_id): r.last_used for r in rows}
            held = {(h.gateway_id, h.reader_id) for h in s.scalars(select(PoolHold))}
            wants = [_want(w) for w in waiters]
            result = assign(wants, candidates, held.__contains__, lambda key: last_used.get(key, 0.0))
            now, served = utcnow(), Served([], [])
            for want, chosen in result.granted:
                row = want.waiter
                assert isinstance(row, PoolWaiter)
                s.add(PoolHold(gateway_id=chosen.gateway_id, reader_id=chosen.reader.reader_id,
                               hold_id=row.waiter_id, replica_id=row.replica_id, kind=row.kind, holder=row.holder,
                               since=now))
                row.state, row.gateway_id, row.reader_id, row.position = GRANTED, *chosen.key, 0
                served.granted.append((row.waiter_id, *chosen.key))
            for want in result.hopeless:
                row = want.waiter
                assert isinstance(row, PoolWaiter)
                row.state, row.position = FAILED, 0
                served.failed.append(row.waiter_id)
            moved = False
            for want, position in result.positions:
                row = want.waiter
                assert isinstance(row, PoolWaiter)
                if row.position != position:
                    row.position, moved = position, True
            s.flush()
            if served.granted or served.failed or moved:
                _notify(s)
            return served

    # --- holds -------------------------------------------------------------------------------

    def release(self, hold_id: str) -> bool:
        """Gives the reader held as HOLD_ID back; False when it was not held so (any more)."""
        with self._db.write() as s:
            hold = s.scalar(select(PoolHold).where(PoolHold.hold_id == hold_id).with_for_update())
            if hold is None:
                return False
            s.execute(update(PoolReader).where(PoolReader.gateway_id == hold.gateway_id,
                                               PoolReader.reader_id == hold.reader_id).values(last_used=time.time()))
            s.delete(hold)
            _notify(s)
            return True

    def set_holder(self, hold_id: str, holder: str) -> None:
        with self._db.write() as s:
            s.execute(update(PoolHold).where(PoolHold.hold_id == hold_id).values(holder=holder[:200]))
            _notify(s)

    def hold(self, hold_id: str) -> HoldRow | None:
        with self._db.read() as s:
            row = s.scalar(select(PoolHold).where(PoolHold.hold_id == hold_id))
            return _hold(row) if row is not None else None

    # --- the rows of replicas that stopped -------------------------------------------------

    def clean(self, stale_after_s: float, retention_s: float, own: str = "") -> int:
        """What replicas whose heartbeat lapsed left: their waiters and their holds (except
        those of leases, which stay until they expire or are released) go, their gateways are
        disconnected; gateways disconnected for longer than RETENTION_S are forgotten with
        their readers. How many rows changed."""
        with self._db.write() as s:
            live = set(self._live(s, stale_after_s, own))
            leased = select(PoolLease.hold_id)
            changed = 0
            for statement in (
                    delete(PoolWaiter).where(PoolWaiter.replica_id.not_in(live)),
                    delete(PoolHold).where(PoolHold.replica_id.not_in(live), PoolHold.hold_id.not_in(leased)),
                    update(PoolGateway).where(PoolGateway.replica_id.not_in(live), PoolGateway.connected)
                    .values(connected=False)):
                changed += s.execute(statement).rowcount      # type: ignore[attr-defined]
            cutoff = utcnow() - dt.timedelta(seconds=retention_s)
            forgotten = list(s.scalars(select(PoolGateway.gateway_id).where(~PoolGateway.connected,
                                                                             PoolGateway.last_seen < cutoff)))
            if forgotten:
                s.execute(delete(PoolReader).where(PoolReader.gateway_id.in_(forgotten)))
                s.execute(delete(PoolGateway).where(PoolGateway.gateway_id.in_(forgotten)))
                changed += len(forgotten)
            if changed:
                _notify(s)
            return changed

    def forget(self, replica_id: str) -> None:
        """What a run of REPLICA_ID left that nothing uses once it stopped (at its start and
        stop): its queued requests, its holds but those of leases, its gateways' links."""
        with self._db.write() as s:
            s.execute(delete(PoolWaiter).where(PoolWaiter.replica_id == replica_id))
            s.execute(delete(PoolHold).where(PoolHold.replica_id == replica_id,
                                             PoolHold.hold_id.not_in(select(PoolLease.hold_id))))
            s.execute(update(PoolGateway).where(PoolGateway.replica_id == replica_id, PoolGateway.connected)
                      .values(connected=False, last_seen=utcnow()))
            _notify(s)

    # --- leases ------------------------------------------------------------------------------

    def add_lease(self, lease: LeaseRow) -> None:
        with self._db.write() as s:
            s.add(PoolLease(lease_id=lease.lease_id, hold_id=lease.hold_id, gateway_id=lease.gateway_id,
                            reader_id=lease.reader.reader_id, reader=reader_to_data(lease.reader), owner=lease.owner,
                            holder=lease.holder[:200], ttl_s=lease.ttl_s, expires_at=lease.expires_at,
                            acquired_at=lease.acquired_at, auto_steps=lease.auto_steps))
            _notify(s)

    def lease(self, lease_id: str) -> LeaseRow | None:
        with self._db.read() as s:
            row = s.get(PoolLease, lease_id)
            return _lease(row) if row is not None else None

    def leases(self) -> list[LeaseRow]:
        with self._db.read() as s:
            return [_lease(r) for r in s.scalars(select(PoolLease).order_by(PoolLease.lease_id))]

    def renew_lease(self, lease_id: str, expires_at: dt.datetime) -> LeaseRow | None:
        with self._db.write() as s:
            row = s.get(PoolLease, lease_id, with_for_update=True)
            if row is None:
                return None
            row.expires_at = expires_at
            return _lease(row)

    def next_auto_step(self, lease_id: str) -> int:
        """The next automatic step number of the lease (counted in the row: any replica may run it)."""
        with self._db.write() as s:
            row = s.get(PoolLease, lease_id, with_for_update=True)
            if row is None:
                return 0
            row.auto_steps += 1
            return row.auto_steps

    def end_lease(self, lease_id: str) -> LeaseRow | None:
        """Removes the lease and gives its reader back; the lease as it was (None: not held)."""
        with self._db.write() as s:
            row = s.get(PoolLease, lease_id, with_for_update=True)
            if row is None:
                return None
            gone = _lease(row)
            s.delete(row)
            hold = s.scalar(select(PoolHold).where(PoolHold.hold_id == gone.hold_id).with_for_update())
            if hold is not None:
                s.execute(update(PoolReader).where(PoolReader.gateway_id == hold.gateway_id,
                                                   PoolReader.reader_id == hold.reader_id)
                          .values(last_used=time.time()))
                s.delete(hold)
            _notify(s)
            return gone

    def expired_leases(self) -> list[LeaseRow]:
        with self._db.read() as s:
            return [_lease(r) for r in s.scalars(select(PoolLease).where(PoolLease.expires_at < utcnow()))]


def _notify(s: Session) -> None:
    s.execute(text("SELECT pg_notify(:c, '')"), {"c": CHANNEL})


def _hold(h: PoolHold) -> HoldRow:
    return HoldRow(h.gateway_id, h.reader_id, h.hold_id, h.replica_id, h.kind, h.holder)


def _waiter(w: PoolWaiter) -> WaiterRow:
    return WaiterRow(w.waiter_id, w.replica_id, w.kind, w.holder, dict(w.request),
                     list(w.takes) if w.takes is not None else None, w.state, w.position, w.gateway_id, w.reader_id,
                     w.since)


def _lease(r: PoolLease) -> LeaseRow:
    return LeaseRow(r.lease_id, r.hold_id, r.gateway_id, reader_from_data(r.reader), r.owner, r.holder, r.ttl_s,
                    r.expires_at, r.acquired_at, r.auto_steps)


def _want(row: PoolWaiter) -> Want:
    """A waiter's row as the assignment sees it: its `takes` (when given) are the only cards it takes."""
    w = _waiter(row)
    takes = frozenset(w.takes) if w.takes is not None else None

    def accepts(gateway_id: str, reader: cards.Reader) -> bool:
        return takes is None or take_key(gateway_id, reader, card_key(reader)) in takes

    return Want(row, w.selector, bool(w.request.get("need_card")), w.scope, accepts if takes is not None else None)
