"""Two FederatedPools (orchestrator/services/pool_federated.py), "replicas" a and b in one test
process, each with its own engine and its own LISTEN connection on one PostgreSQL database; the
gateway's session is made by hand and attached to b. Steps are not run here (the replica test
with real processes does): this is the queue, the holds and the leases as the services see them."""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator

import pytest

from orchestrator.services.leases import LeaseService
from orchestrator.services.pool import LEASE_SCOPE, GatewaySession, LeaseScope, ReaderSelector, ReaderState
from orchestrator.services.pool_federated import FederatedPool, listen_for_changes
from orchestrator.store.pool import ReplicaPool
from orchestrator.store.sessions import Sessions
from orchestrator.store.store import Store
from shared import cards
from shared.errors import GatewayNotConnected, NotFound, ReaderBusy, ReaderNotFound

pytestmark = pytest.mark.postgres


def _reader(reader_id: str, serial: str) -> cards.Reader:
    return cards.Reader(reader_id, cards.ReaderKind.PKCS11, reader_id, card_present=True, token_serial=serial)


async def _no_remote(*args):      # steps are not run in these tests
    raise AssertionError("no step expected")


@contextlib.asynccontextmanager
async def _replicas(store: Store) -> AsyncIterator[tuple[FederatedPool, FederatedPool, list[Sessions]]]:
    engines = [Sessions(store.database_url), Sessions(store.database_url)]
    pools = [FederatedPool(ReplicaPool(e), name, f"127.0.0.1:{i + 1}", stale_after_s=30, poll_interval_s=0.5,
                           heartbeat_interval_s=1, remote=_no_remote, queue_timeout_s=30,
                           listen=lambda wake: listen_for_changes(store.database_url, wake))
             for i, (e, name) in enumerate(zip(engines, ("replica-a", "replica-b"), strict=True))]
    for pool in pools:
        await pool.start()
    try:
        yield pools[0], pools[1], engines
    finally:
        for pool in pools:
            await pool.stop()
        for e in engines:
            e.close()


async def _until(predicate, what: str, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.05)


def test_two_replicas_acquiring_one_reader_one_gets_it_the_other_waits_first_in_the_one_queue_watched_from_both(
        postgres_store):
    async def body():
        async with _replicas(postgres_store) as (a, b, _):
            watched: list[tuple[str, str, ReaderState]] = []       # what a WatchReaders on a hears
            a.subscribe(lambda kind, p: watched.append((kind, p.reader.reader_id, p.state)))
            b.attach(GatewaySession(gateway_id="gw1", site="hq", readers={"r1": _reader("r1", "card-1")}))
            await _until(lambda: [p.state for p in a.list()] == [ReaderState.CARD_PRESENT], "a sees b's reader")
            assert watched == [("present", "r1", ReaderState.CARD_PRESENT)]
            first = await asyncio.gather(a.acquire(ReaderSelector(), kind="lease", holder="from-a", timeout_s=0.5),
                                         b.acquire(ReaderSelector(), kind="lease", holder="from-b", timeout_s=0.5),
                                         return_exceptions=True)
            leases = [x for x in first if not isinstance(x, BaseException)]
            refused = [x for x in first if isinstance(x, BaseException)]
            assert len(leases) == 1 and len(refused) == 1 and isinstance(refused[0], ReaderBusy), first
            holder = leases[0]
            await _until(lambda: a.queue() == [] and b.queue() == [], "the timed-out request gone from the queue")

            waiting = asyncio.create_task(a.acquire(ReaderSelector(), kind="lease", holder="next"))
            await _until(lambda: a.queue() == b.queue() == [(1, "lease", "{any reader}")],
                         "the one queue, position 1, from both")
            assert {p.state for p in b.list()} == {ReaderState.LEASED}
            holder.release()
            second = await asyncio.wait_for(waiting, 10)
            assert second.key == ("gw1", "r1")
            await _until(lambda: a.list()[0].holder == "next" == b.list()[0].holder, "the new holder seen by both")
            second.release()
            await _until(lambda: [p.state for p in b.list()] == [ReaderState.CARD_PRESENT], "free again")
            await _until(lambda: watched[-1] == ("changed", "r1", ReaderState.CARD_PRESENT), "a told it is free")
            assert ("changed", "r1", ReaderState.LEASED) in watched

    asyncio.run(body())


def test_a_cancelled_request_leaves_the_queue_one_refusing_the_card_is_passed_over_and_offline_is_refused(
        postgres_store):
    async def body():
        async with _replicas(postgres_store) as (a, b, _):
            b.attach(GatewaySession(gateway_id="gw1", site="hq", readers={"r1": _reader("r1", "card-1")}))
            await _until(lambda: len(a.list()) == 1, "a sees b's reader")

            async def picky():          # an order that already had card-1 (orders.py: accepts)
                LEASE_SCOPE.set(LeaseScope(accepts=lambda gid, r: r.token_serial != "card-1"))
                return await a.acquire(ReaderSelector())

            refusing = asyncio.create_task(picky())
            await _until(lambda: b.queue() == [(1, "task", "{any reader}")], "the picky request queued")
            taken = await b.acquire(ReaderSelector(), holder="anyone")           # goes first: card-1 suits it
            assert taken.key == ("gw1", "r1") and not refusing.done()
            refusing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refusing
            await _until(lambda: a.queue() == [] == b.queue(), "the cancelled request gone")
            taken.release()
            b.detach(b.session("gw1"))
            await _until(lambda: a.list()[0].state is ReaderState.OFFLINE, "the reader offline, seen by a")
            with pytest.raises(GatewayNotConnected):
                await a.acquire(ReaderSelector(gateway_id="gw1"))
            with pytest.raises(ReaderNotFound):
                await a.acquire(ReaderSelector(site="hq"))

    asyncio.run(body())


def test_a_lease_renewed_through_one_replica_is_kept_by_the_other_and_ended_by_another_once_expired(
        postgres_store):
    async def body():
        async with _replicas(postgres_store) as (a, b, _):
            leases_a = LeaseService(a, shared=a.db)
            leases_b = LeaseService(b, shared=b.db)
            b.attach(GatewaySession(gateway_id="gw1", site="hq", readers={"r1": _reader("r1", "card-1")}))
            await _until(lambda: len(a.list()) == 1, "a sees b's reader")
            lease = await leases_a.acquire(ReaderSelector(), ttl_s=1.0, holder="short")
            await asyncio.sleep(0.6)
            renewed = await leases_b.renew_shared(lease.lease_id)            # through the other replica
            await asyncio.sleep(0.6)                                         # past the first expiry
            assert (await leases_a.get_shared(lease.lease_id)).expires_at == renewed.expires_at
            assert [x.lease_id for x in await leases_b.list_shared()] == [lease.lease_id]
            leases_a.stop()                 # the granting replica's lease service gone: its timers with it
            await _until(lambda: dt.datetime.now(dt.UTC) > renewed.expires_at, "the renewed lease expired", 5)
            assert await leases_b.end_expired() == 1                         # another replica ends it
            with pytest.raises(NotFound):
                await leases_a.get_shared(lease.lease_id)
            await _until(lambda: [p.state for p in a.list()] == [ReaderState.CARD_PRESENT], "the reader free")
            leases_b.stop()

    asyncio.run(body())
