"""The reader pool's queue and leases without gateways: sessions are made by hand and steps
are answered by the test (no gRPC, no hardware)."""
from __future__ import annotations

import asyncio

import pytest

from orchestrator.services.leases import LeaseService
from orchestrator.services.pool import LEASE_SCOPE, GatewaySession, LeaseScope, ReaderPool, ReaderSelector, ReaderState
from shared import cards
from shared.errors import Cancelled, GatewayNotConnected, NoCardPresent, NotFound, ReaderBusy, ReaderNotFound


def reader(rid: str, card: bool = True) -> cards.Reader:
    return cards.Reader(rid, cards.ReaderKind.PCSC, rid, card)


def session(gid: str, *readers: cards.Reader, site: str = "hq", labels=None) -> GatewaySession:
    return GatewaySession(gateway_id=gid, site=site, labels=dict(labels or {}),
                          readers={r.reader_id: r for r in readers})


class Positions:
    def __init__(self) -> None:
        self.seen: list[int] = []
        self.reader: tuple[str, str] | None = None

    def queued(self, position: int) -> None:
        self.seen.append(position)

    def acquired(self, gateway_id: str, reader_id: str) -> None:
        self.reader = (gateway_id, reader_id)


def run(coro):
    return asyncio.run(coro)


def test_requests_queue_in_fifo_order_with_positions_and_spread_over_readers():
    async def body():
        pool = ReaderPool()
        pool.attach(session("g1", reader("r1"), reader("r2")))
        a = await pool.acquire(ReaderSelector())
        b = await pool.acquire(ReaderSelector())
        assert {a.reader.reader_id, b.reader.reader_id} == {"r1", "r2"}       # spread, not the same reader twice
        observers = [Positions() for _ in range(3)]

        async def wait(obs):
            LEASE_SCOPE.set(LeaseScope(observer=obs))
            return await pool.acquire(ReaderSelector())

        waiters = [asyncio.create_task(wait(o)) for o in observers]
        await asyncio.sleep(0)
        assert [o.seen for o in observers] == [[1], [2], [3]]
        assert [p.state for p in pool.list()] == [ReaderState.BUSY, ReaderState.BUSY]
        a.release()
        first = await waiters[0]
        assert observers[1].seen == [2, 1] and observers[2].seen == [3, 2]
        waiters[1].cancel()                                                   # cancellation-safe
        await asyncio.gather(waiters[1], return_exceptions=True)
        assert observers[2].seen == [3, 2, 1] and len(pool.queue()) == 1
        b.release()
        third = await waiters[2]
        first.release()
        third.release()
        assert pool.queue() == [] and not any(p.busy for p in pool.list())

    run(body())


def test_refused_at_once_when_nothing_could_serve():
    async def body():
        pool = ReaderPool()
        with pytest.raises(ReaderNotFound):
            await pool.acquire(ReaderSelector(site="hq"))
        pool.attach(session("g1", reader("r1", card=False)))
        with pytest.raises(GatewayNotConnected):
            await pool.acquire(ReaderSelector(gateway_id="nope"))
        with pytest.raises(ReaderNotFound):
            await pool.acquire(ReaderSelector(site="elsewhere"))
        with pytest.raises(ReaderNotFound):
            await pool.acquire(ReaderSelector(labels={"line": "2"}))
        with pytest.raises(NoCardPresent):                    # nobody holds it: a card would not come by itself
            await pool.acquire(ReaderSelector())
        lease = await pool.acquire(ReaderSelector(), need_card=False)
        with pytest.raises(ReaderBusy):
            await pool.acquire(ReaderSelector(), need_card=False, wait=False)
        lease.release()

    run(body())


def test_waiter_handed_a_reader_as_it_is_cancelled_gives_it_back():
    async def body():
        pool = ReaderPool()
        pool.attach(session("g1", reader("r1")))
        held = await pool.acquire(ReaderSelector())
        waiter = asyncio.create_task(pool.acquire(ReaderSelector()))
        await asyncio.sleep(0)
        held.release()                 # hands r1 to the waiter ...
        waiter.cancel()                # ... which is cancelled before it runs again
        await asyncio.gather(waiter, return_exceptions=True)
        assert waiter.cancelled()
        assert [p.state for p in pool.list()] == [ReaderState.CARD_PRESENT]
        (await pool.acquire(ReaderSelector())).release()

    run(body())


def test_gateway_gone_leaves_offline_readers_fails_its_waiters_and_is_forgotten_later():
    async def body():
        pool = ReaderPool(offline_retention_s=0.2)
        s = session("g1", reader("r1"), labels={"line": "1"})
        pool.attach(s)
        held = await pool.acquire(ReaderSelector())
        waiter = asyncio.create_task(pool.acquire(ReaderSelector(labels={"line": "1"})))
        await asyncio.sleep(0)
        pool.detach(s)
        with pytest.raises(ReaderNotFound):
            await waiter
        assert [(p.state, p.busy) for p in pool.list()] == [(ReaderState.OFFLINE, True)]
        with pytest.raises(GatewayNotConnected):
            await held.run(cards.Step(cards.ReadCardInfo()), task_id="t", step_number=1, timeout_s=1)
        held.release()
        assert [g.connected for g in pool.gateways()] == [False]
        await asyncio.sleep(0.3)
        assert pool.list() == [] and pool.gateways() == []

    run(body())


def test_order_scope_narrows_the_selector_and_cancel_fails_its_waiters():
    async def body():
        pool = ReaderPool()
        pool.attach(session("g1", reader("r1"), site="hq"))
        pool.attach(session("g2", reader("r2"), site="branch"))
        tag = object()
        LEASE_SCOPE.set(LeaseScope(selector=ReaderSelector(site="branch"), tag=tag))
        first = await pool.acquire(ReaderSelector())
        assert first.gateway_id == "g2"
        waiter = asyncio.create_task(pool.acquire(ReaderSelector()))
        await asyncio.sleep(0)
        assert pool.cancel_waiters(tag, Cancelled("order cancelled")) == 1
        with pytest.raises(Cancelled):
            await waiter
        first.release()

    run(body())


def test_watch_events_follow_every_change():
    async def body():
        pool = ReaderPool()
        events = []
        pool.subscribe(lambda kind, p: events.append((kind, p.reader.reader_id, p.state)))
        s = session("g1", reader("r1", card=False))
        pool.attach(s)
        pool.reader_event(s, "inserted", reader("r1"))
        lease = await pool.acquire(ReaderSelector())
        lease.release()
        pool.detach(s)
        assert events == [("present", "r1", ReaderState.EMPTY), ("changed", "r1", ReaderState.CARD_PRESENT),
                          ("changed", "r1", ReaderState.BUSY), ("changed", "r1", ReaderState.CARD_PRESENT),
                          ("changed", "r1", ReaderState.OFFLINE)]

    run(body())


def test_service_lease_expires_unless_renewed_and_ends_with_its_gateway():
    async def body():
        pool = ReaderPool()
        s = session("g1", reader("r1"), reader("r2"))
        pool.attach(s)
        leases = LeaseService(pool, default_ttl_s=0.2)
        a = await leases.acquire(ReaderSelector(reader_id="r1"), holder="svc")
        b = await leases.acquire(ReaderSelector(reader_id="r2"), ttl_s=5)
        assert {p.reader.reader_id: (p.state, p.holder) for p in pool.list()}["r1"] == \
            (ReaderState.LEASED, f"svc (lease {a.lease_id})")
        await asyncio.sleep(0.12)
        leases.renew(a.lease_id)
        await asyncio.sleep(0.12)
        assert leases.get(a.lease_id) is a                      # renewed in time
        await asyncio.sleep(0.2)
        with pytest.raises(NotFound, match="expired"):
            leases.renew(a.lease_id)
        pool.detach(s)
        with pytest.raises(NotFound, match="went away"):
            leases.get(b.lease_id)
        assert not any(p.busy for p in pool.list())

    run(body())
