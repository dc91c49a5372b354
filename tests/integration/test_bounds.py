"""Bounds at the orchestrator's edge (docs/limits.md), over mutual TLS against the real
wiring (orchestrator/app.py): oversized hellos and lease holders are refused naming the field
while ListReaders keeps working for everyone else, List answers are cut by bytes, a slow
watcher is dropped with the reason while a fast one keeps receiving, huge durations are
INVALID_ARGUMENT, and an error about a 1 MB input carries a bounded message. The gateway's
fake is tests/support/fake_gateway.py (the link as production speaks it)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time

import grpc
import pytest

from orchestrator import app as orchestrator_app
from orchestrator.services.pool import ReaderSelector
from shared import cards, limits
from shared.errors import CardIoError, InvalidArgument, WatcherTooSlow
from shared.proto import card_service_pb2 as card_pb
from shared.proto import certificate_service_pb2 as certificate_pb
from shared.proto import lease_service_pb2 as lease_pb
from shared.proto import reader_pool_service_pb2 as pool_pb
from shared.rpc import error_from_rpc
from tests.rules.rig import settings_for, write_config
from tests.support.api import OrchestratorApi
from tests.support.fake_gateway import FakeGateway, FakeToken
from tests.support.netcut import TcpProxy
from tests.support.pki import default_pki

# The largest labels a gateway may announce: each reader of the pool carries them.
# The largest place a station can be enrolled at (shared/pki.py check_enrollment: the hello
# no longer says where a station stands).
FULL_SITE = "s" * 64
FULL_LABELS = {f"{i:02d}".ljust(limits.MAX_LABEL_KEY_CHARS, "k"): "v" * limits.MAX_ENROLLED_LABEL_VALUE_CHARS
               for i in range(limits.MAX_ENROLLED_LABELS)}


def own_channel(address: str) -> grpc.aio.Channel:
    """A client on a connection of its own (flow control is per connection and stream)."""
    return grpc.aio.secure_channel(address, default_pki().files().channel_credentials(),
                                   options=[("grpc.use_local_subchannel_pool", 1)])


def api_on(channel):
    """The orchestrator's stubs on an aio channel (typed as the blocking stubs they are not)."""
    return OrchestratorApi.on(channel)


def field_of(err: grpc.aio.AioRpcError) -> str | None:
    error = error_from_rpc(err)
    assert isinstance(error, InvalidArgument), error
    return error.field


@contextlib.asynccontextmanager
async def orchestrator(tmp_path):
    orch = await orchestrator_app.start(settings_for(tmp_path, write_config(tmp_path / "config")))
    gateways: list[FakeGateway] = []
    try:
        yield orch, gateways
    finally:
        for gw in gateways:
            await gw.close()
        await orch.stop()


async def all_readers(api, page_size: int = 0) -> tuple[list[str], int]:
    """Every reader id through ListReaders' pages, and how many pages it took."""
    ids, token, pages = [], "", 0
    while True:
        page = await api.pool.ListReaders(pool_pb.ListReadersRequest(page_size=page_size, page_token=token))
        ids += [r.reader.reader_id for r in page.readers]
        pages += 1
        token = page.next_page_token
        if not token:
            return ids, pages


def test_bounds_a_45_kb_hello_and_a_2_5_mb_holder_are_refused_and_list_readers_keeps_working(tmp_path):
    async def body():
        async with orchestrator(tmp_path) as (orch, gateways):
            honest = FakeGateway("station-1", (FakeToken(serial="honest-1"),))
            await honest.connect(orch.address)
            gateways.append(honest)
            hostile = FakeGateway("station-2", (FakeToken(serial="hostile-1"),),
                                  hello_labels={"room": "x" * 45_000})
            with pytest.raises(grpc.aio.AioRpcError) as hello:
                await hostile.connect(orch.address)
            await hostile.close()
            async with own_channel(orch.address) as attacker, own_channel(orch.address) as other:
                with pytest.raises(grpc.aio.AioRpcError) as holder:
                    await api_on(attacker).leases.AcquireLease(lease_pb.AcquireLeaseRequest(
                        selector=pool_pb.ReaderSelector(card_present=True), holder="h" * 2_500_000))
                readers, _ = await all_readers(api_on(other))
                gateways_seen = await api_on(other).pool.ListGateways(pool_pb.ListGatewaysRequest())
            return hello.value, holder.value, readers, gateways_seen, orch.leases.list()

    hello, holder, readers, gateways_seen, leases = asyncio.run(body())
    assert hello.code() == grpc.StatusCode.INVALID_ARGUMENT
    hello_error = error_from_rpc(hello)
    assert isinstance(hello_error, InvalidArgument) and hello_error.field == "hello.labels['room']"
    assert hello_error.limit == limits.MAX_NAME_CHARS and len(hello.details()) < 200
    assert holder.code() == grpc.StatusCode.INVALID_ARGUMENT
    holder_error = error_from_rpc(holder)
    assert isinstance(holder_error, InvalidArgument) and holder_error.field == "holder"
    assert holder_error.limit == limits.MAX_NAME_CHARS and len(holder.details()) < 200
    assert leases == []                                                  # nothing granted to the liar
    assert readers == [FakeToken(serial="honest-1").reader_id]           # the others are not disturbed
    assert [g.gateway_id for g in gateways_seen.gateways] == ["station-1"]


def test_bounds_list_readers_pages_by_bytes_so_the_largest_allowed_gateways_fit(tmp_path):
    readers_per_gateway, stations = limits.MAX_READERS_PER_GATEWAY, 4

    async def body():
        async with orchestrator(tmp_path) as (orch, gateways):
            for g in range(stations):
                tokens = tuple(FakeToken(serial=f"g{g}-{i:03d}", label="l" * 32) for i in range(readers_per_gateway))
                gw = FakeGateway(f"station-{g}", tokens, site=FULL_SITE, labels=FULL_LABELS)
                await gw.connect(orch.address)
                gateways.append(gw)
            async with own_channel(orch.address) as channel:
                api = api_on(channel)
                first = await api.pool.ListReaders(pool_pb.ListReadersRequest(page_size=limits.MAX_ITEMS))
                ids, pages = await all_readers(api, limits.MAX_ITEMS)
            return first, ids, pages

    first, ids, pages = asyncio.run(body())
    assert 0 < first.ByteSize() <= limits.MAX_PAGE_BYTES + 1024       # cut by bytes, not only by count
    assert len(first.readers) < stations * readers_per_gateway and first.next_page_token
    assert len(ids) == len(set(ids)) == stations * readers_per_gateway and pages >= 2


def test_bounds_a_slow_watcher_is_dropped_with_the_reason_while_a_fast_one_keeps_receiving(tmp_path):
    # The slow watcher reads nothing (its connection stalls in a proxy): once TCP's buffers are
    # full, the orchestrator's writes wait, and its backlog of MAX_WATCH_BACKLOG events fills.
    events = limits.MAX_WATCH_BACKLOG + 5000

    async def body():
        async with orchestrator(tmp_path) as (orch, gateways):
            gw = FakeGateway("station-1", (FakeToken(serial="watched"),), labels=FULL_LABELS)   # ~3 KB an event
            await gw.connect(orch.address)
            gateways.append(gw)
            session = orch.pool.session("station-1")
            reader = gw.token.reader()
            host, _, port = orch.address.rpartition(":")
            proxy = await TcpProxy(host, int(port)).start()
            async with own_channel(proxy.address) as slow_channel, own_channel(orch.address) as fast_channel:
                slow = api_on(slow_channel).pool.WatchReaders(pool_pb.WatchReadersRequest())
                fast = api_on(fast_channel).pool.WatchReaders(pool_pb.WatchReadersRequest())
                await slow.read()                           # both subscribed: the reader as it is now
                await fast.read()
                proxy.stall()
                received = 0
                got_one = asyncio.Event()

                async def read_fast():
                    nonlocal received
                    while await fast.read() is not grpc.aio.EOF:
                        received += 1
                        got_one.set()

                fast_reader = asyncio.create_task(read_fast())
                started = time.monotonic()
                for i in range(events):                     # the card goes out and in; the fast one keeps up
                    orch.pool.reader_event(session, "changed", dataclasses.replace(reader, card_present=i % 2 == 1))
                    while received <= i:
                        got_one.clear()
                        await asyncio.wait_for(got_one.wait(), 10)
                took = time.monotonic() - started
                proxy.flow()
                slow_got = 0
                with pytest.raises(grpc.aio.AioRpcError) as dropped:
                    while await asyncio.wait_for(slow.read(), 10) is not grpc.aio.EOF:   # what was buffered,
                        slow_got += 1                                                   # then why it ended
                fast_reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await fast_reader
            await proxy.close()
            return received, slow_got, dropped.value, took

    received, slow_got, dropped, took = asyncio.run(body())
    assert received == events
    assert dropped.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, dropped.details()
    error = error_from_rpc(dropped)
    assert isinstance(error, WatcherTooSlow) and "watcher too slow" in error.message
    assert error.behind is not None and error.behind > limits.MAX_WATCH_BACKLOG
    assert slow_got < events                                # it never got everything: it was dropped
    print(f"bounds: {events} events to a fast watcher in {took:.2f} s; the slow one read {slow_got} "
          f"and was dropped {error.behind} events behind")


def test_bounds_a_step_result_over_the_limits_fails_that_step_and_the_link_stays(tmp_path):
    async def body():
        async with orchestrator(tmp_path) as (orch, gateways):
            gw = FakeGateway("station-1", (FakeToken(serial="s1", user_pin="1234"),))
            await gw.connect(orch.address)
            gateways.append(gw)
            gw.fail(CardIoError("x" * 10_000), operation=cards.ListObjects)       # a lying, oversized answer
            lease = await orch.leases.acquire(ReaderSelector(card_present=True))
            with pytest.raises(InvalidArgument) as refused:
                await orch.leases.run_step(lease.lease_id, cards.Step(cards.ListObjects(), user_pin="1234"))
            again = await orch.leases.run_step(lease.lease_id, cards.Step(cards.ListObjects(), user_pin="1234"))
            return refused.value, again

    refused, again = asyncio.run(body())
    assert refused.field == "step_result.outcome.error.message" and refused.limit == limits.MAX_TEXT_CHARS
    assert len(refused.message) < 200
    assert again == cards.ObjectListing(())                                # the same link answers the next step


def test_bounds_huge_durations_are_invalid_argument_not_internal(tmp_path):
    async def body():
        async with orchestrator(tmp_path) as (orch, _), own_channel(orch.address) as channel:
            api = api_on(channel)
            search = certificate_pb.SearchIssuedCertificatesRequest()
            search.older_than.seconds = 315_576_000_000
            refused = []
            for call in (api.certificates.SearchIssuedCertificates(search),
                         api.certificates.ListExpiringCertificates(
                             certificate_pb.ListExpiringCertificatesRequest(days=4_000_000_000)),
                         api.leases.AcquireLease(lease_pb.AcquireLeaseRequest(ttl_s=4_000_000_000))):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                refused.append(err.value)
            return refused

    refused = asyncio.run(body())
    assert [e.code() for e in refused] == [grpc.StatusCode.INVALID_ARGUMENT] * 3, [e.details() for e in refused]
    assert [field_of(e) for e in refused] == ["older_than", "days", "ttl_s"]


def test_bounds_an_error_for_a_1_mb_input_carries_a_bounded_message(tmp_path):
    async def body():
        async with orchestrator(tmp_path) as (orch, _), own_channel(orch.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await api_on(channel).cards.GetCard(card_pb.GetCardRequest(card_id="c" * 1_000_000))
            return err.value

    err = asyncio.run(body())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(err) == "card_id" and len(err.details()) < 200
    assert len(str(err.trailing_metadata())) < 2000                     # nor do the details echo it
