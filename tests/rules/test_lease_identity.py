"""Leases are bound to the identity that acquired them (issue 10; docs/pool.md, "Leases for
other services"): the owner runs steps on, renews and releases its lease; another identity
with a valid certificate that learnt the lease id (ListLeases shows it) is PERMISSION_DENIED
for each; one identity holds at most `pool.max_leases_per_caller` leases; a `service`
identity leases only readers matching its `pool.service_readers` selectors.

Clients are distinct `service` certificates of the session's PKI with different NAMES over
mutual TLS to an in-process orchestrator with fake gateways, each allowed the readers at site
hq (SERVICES_AT_HQ). The service rules run in-process: `as_caller` stands in for the authorising
interceptor (shared/tls.py), which sets the caller before a servicer runs."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from orchestrator.services.leases import LeaseService
from orchestrator.services.pool import ReaderSelector
from shared import cards
from shared.errors import PermissionDenied, ReaderBusy
from shared.proto import lease_service_pb2 as lease_pb
from shared.proto import reader_pool_service_pb2 as pool_pb
from shared.proto import steps_pb2
from shared.rpc import error_from_rpc
from shared.tls import PeerIdentity, calling_as
from tests.rules.rig import PIN, fake_token, rule_orchestrator
from tests.support.api import OrchestratorApi
from tests.support.fake_gateway import FakeGateway
from tests.support.pki import default_pki

#: The services of these tests may lease the readers at site hq (the fake station's).
#: Service identities of these tests (names of their own: the session's PKI issues one role a name).
ALICE, BOB, MALLORY = "svc-alice", "svc-bob", "svc-mallory"
SERVICES_AT_HQ = {"service_readers": {name: {"site": "hq"} for name in (ALICE, BOB, MALLORY)}}
LIST_OBJECTS = steps_pb2.Step(list_objects=steps_pb2.ListObjects(), credentials=steps_pb2.Credentials(user_pin=PIN))


@contextlib.asynccontextmanager
async def clients(address: str, *names: str) -> AsyncIterator[list[Any]]:
    """The client API as each of NAMES (a `service` certificate each, issued on first use)."""
    async with contextlib.AsyncExitStack() as stack:
        apis = []
        for name in names:
            default_pki().client(name, "service")
            channel = await stack.enter_async_context(default_pki().aio_channel(address, name))
            apis.append(OrchestratorApi.on(channel))
        yield apis


def leases_of(rig: Any) -> LeaseService:
    assert rig.orch.leases is not None
    return rig.orch.leases


async def refusal(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    return refused.value


def acquire(reader_id: str = "", **kw) -> lease_pb.AcquireLeaseRequest:
    return lease_pb.AcquireLeaseRequest(selector=pool_pb.ReaderSelector(reader_id=reader_id), ttl_s=30, **kw)


# --- bound to its owner -------------------------------------------------------------------------

def test_lease_owner_runs_steps_renews_and_releases_its_lease(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path, pool=SERVICES_AT_HQ) as rig, \
                clients(rig.orch.address, ALICE) as [alice]:
            lease = (await alice.leases.AcquireLease(acquire(rig.token.reader_id, holder="alice"))).lease
            outcome = (await alice.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(
                lease_id=lease.lease_id, step=LIST_OBJECTS))).outcome
            renewed = (await alice.leases.RenewLease(lease_pb.RenewLeaseRequest(lease_id=lease.lease_id))).lease
            await alice.leases.ReleaseLease(lease_pb.ReleaseLeaseRequest(lease_id=lease.lease_id))
            return outcome, renewed, lease, leases_of(rig).list()

    outcome, renewed, lease, left = asyncio.run(body())
    assert outcome.WhichOneof("result") == "object_list"
    assert renewed.lease_id == lease.lease_id and renewed.expires_at.ToDatetime() >= lease.expires_at.ToDatetime()
    assert left == []


def test_lease_used_by_another_identity_is_refused_for_steps_renewal_and_release(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path, pool=SERVICES_AT_HQ) as rig, \
                clients(rig.orch.address, ALICE, MALLORY) as [alice, mallory]:
            lease = (await alice.leases.AcquireLease(acquire(rig.token.reader_id, holder="alice"))).lease
            # Mallory learns the id as anyone can, then tries each use of it.
            listed = [x.lease_id for x in (await mallory.leases.ListLeases(lease_pb.ListLeasesRequest())).leases]
            steps_before = len(rig.gateway.commands)
            refused = [
                await refusal(mallory.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(
                    lease_id=lease.lease_id, step=LIST_OBJECTS, step_number=1))),
                await refusal(mallory.leases.RenewLease(lease_pb.RenewLeaseRequest(lease_id=lease.lease_id))),
                await refusal(mallory.leases.ReleaseLease(lease_pb.ReleaseLeaseRequest(lease_id=lease.lease_id))),
            ]
            steps_after = len(rig.gateway.commands)
            # Still alice's, and still hers to use.
            held = [x.lease_id for x in leases_of(rig).list()]
            outcome = (await alice.leases.RunLeasedStep(lease_pb.RunLeasedStepRequest(
                lease_id=lease.lease_id, step=LIST_OBJECTS, step_number=1))).outcome
            await alice.leases.ReleaseLease(lease_pb.ReleaseLeaseRequest(lease_id=lease.lease_id))
            return lease, listed, refused, steps_before, steps_after, held, outcome

    lease, listed, refused, steps_before, steps_after, held, outcome = asyncio.run(body())
    assert lease.lease_id in listed
    for err in refused:
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
        assert isinstance(error_from_rpc(err), PermissionDenied)
        assert f"service:{ALICE}" in (err.details() or "") and f"service:{MALLORY}" in (err.details() or "")
    assert steps_after == steps_before                     # nothing reached the card
    assert held == [lease.lease_id]
    assert outcome.WhichOneof("result") == "object_list"   # alice's step 1 ran: mallory seeded nothing


def test_repeated_acquire_request_id_by_another_identity_does_not_hand_over_the_lease(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path, pool=SERVICES_AT_HQ) as rig, \
                clients(rig.orch.address, ALICE, MALLORY) as [alice, mallory]:
            first = (await alice.leases.AcquireLease(acquire(rig.token.reader_id, request_id="req-1"))).lease
            again = (await alice.leases.AcquireLease(acquire(rig.token.reader_id, request_id="req-1"))).lease
            stolen = await refusal(mallory.leases.AcquireLease(acquire(rig.token.reader_id, request_id="req-1")))
            return first, again, stolen

    first, again, stolen = asyncio.run(body())
    assert again.lease_id == first.lease_id                 # the owner's retry is answered with its lease
    assert stolen.code() == grpc.StatusCode.PERMISSION_DENIED


# --- quota --------------------------------------------------------------------------------------

def test_lease_quota_exceeded_is_resource_exhausted_naming_the_quota(tmp_path):
    tokens = tuple(fake_token() for _ in range(3))

    async def body():
        async with rule_orchestrator(tmp_path, tokens=tokens,
                                     pool={**SERVICES_AT_HQ, "max_leases_per_caller": 2}) as rig, \
                clients(rig.orch.address, ALICE, BOB) as [alice, bob]:
            mine = [(await alice.leases.AcquireLease(acquire(t.reader_id))).lease for t in tokens[:2]]
            over = await refusal(alice.leases.AcquireLease(acquire(tokens[2].reader_id)))
            bobs = (await bob.leases.AcquireLease(acquire(tokens[2].reader_id))).lease     # per identity
            await alice.leases.ReleaseLease(lease_pb.ReleaseLeaseRequest(lease_id=mine[0].lease_id))
            again = (await alice.leases.AcquireLease(acquire(tokens[0].reader_id))).lease
            return over, bobs, again

    over, bobs, again = asyncio.run(body())
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "pool.max_leases_per_caller (2)" in (over.details() or "")
    error = error_from_rpc(over)
    assert error.reason == "LEASE_QUOTA_EXCEEDED" and error.quota == 2     # type: ignore[attr-defined]
    assert bobs.lease_id and again.lease_id


def test_lease_quota_counts_requests_still_waiting_for_a_reader(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path, pool={**SERVICES_AT_HQ, "max_leases_per_caller": 1}) as rig, \
                clients(rig.orch.address, ALICE, BOB) as [alice, bob]:
            bobs = (await bob.leases.AcquireLease(acquire(rig.token.reader_id))).lease
            waiting = asyncio.ensure_future(alice.leases.AcquireLease(acquire(rig.token.reader_id, wait=True)))
            deadline = asyncio.get_running_loop().time() + 10
            while not rig.orch.pool.queue():
                assert asyncio.get_running_loop().time() < deadline, "alice's request never queued"
                await asyncio.sleep(0.02)
            over = await refusal(alice.leases.AcquireLease(acquire(rig.token.reader_id, wait=True)))
            await bob.leases.ReleaseLease(lease_pb.ReleaseLeaseRequest(lease_id=bobs.lease_id))
            got = (await asyncio.wait_for(waiting, 10)).lease
            return over, got

    over, got = asyncio.run(body())
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert got.lease_id


# --- service identities and their readers -------------------------------------------------------

async def as_caller(caller: PeerIdentity, work: Callable[[], Awaitable[Any]]) -> Any:
    """WORK run as CALLER, as if the authorising interceptor had admitted its certificate."""
    with calling_as(caller):
        return await work()


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """FN(*ARGS) as a coroutine, for `as_caller`."""
    return fn(*args)


BILLING = PeerIdentity("service", "billing-svc", 0x5E)
DESK_3 = {"billing-svc": {"site": "branch", "labels": {"desk": "3"}}}


@contextlib.asynccontextmanager
async def two_sites(tmp_path, **settings) -> AsyncIterator[tuple[Any, FakeGateway]]:
    """The rig's station-1 (site hq) and a station-2 at site branch, label desk=3."""
    async with rule_orchestrator(tmp_path, pool={"service_readers": DESK_3}, **settings) as rig:
        desk = FakeGateway("station-2", (fake_token(),), site="branch", labels={"desk": "3"})
        await desk.connect(rig.orch.address)
        try:
            yield rig, desk
        finally:
            await desk.close()


def test_service_leases_only_readers_matching_its_selectors(tmp_path):
    async def body():
        async with two_sites(tmp_path) as (rig, desk):
            leases = leases_of(rig)
            got = []

            async def lease_read_and_release() -> tuple[str, cards.StepValue]:
                lease = await leases.acquire(ReaderSelector(), holder="billing")
                value = await leases.run_step(lease.lease_id, cards.Step(cards.ReadCardInfo()))
                leases.release(lease.lease_id)
                return lease.gateway_id, value

            for _ in range(2):            # hq's reader is the least recently used: still never handed out
                gateway_id, value = await as_caller(BILLING, lease_read_and_release)
                got.append(gateway_id)
            held = await as_caller(BILLING, lambda: leases.acquire(ReaderSelector(), holder="billing"))
            with pytest.raises(ReaderBusy):           # its only reader is taken: hq's is not offered
                await as_caller(BILLING, lambda: leases.acquire(ReaderSelector(), holder="billing"))
            return got, value, held, desk

    got, value, held, desk = asyncio.run(body())
    assert got == ["station-2", "station-2"] and held.gateway_id == "station-2"
    assert isinstance(value, cards.Reader) and value.reader_id == desk.token.reader_id


def test_service_cannot_lease_a_reader_outside_its_selectors(tmp_path):
    async def body():
        async with two_sites(tmp_path) as (rig, _desk):
            leases = leases_of(rig)
            with pytest.raises(PermissionDenied) as outside:
                await as_caller(BILLING, lambda: leases.acquire(ReaderSelector(reader_id=rig.token.reader_id)))
            with pytest.raises(PermissionDenied) as unlisted:
                await as_caller(PeerIdentity("service", "payroll-svc", 0x5F),
                                lambda: leases.acquire(ReaderSelector()))
            # Other roles are not bound by the service selectors, whatever their name.
            client = await as_caller(PeerIdentity("admin", "billing-svc", 0x60),
                                     lambda: leases.acquire(ReaderSelector(reader_id=rig.token.reader_id)))
            held = [(x.owner, x.gateway_id) for x in leases.list()]
            return outside.value, unlisted.value, client, held

    outside, unlisted, client, held = asyncio.run(body())
    assert "billing-svc" in outside.message and "{site=branch, label desk=3}" in outside.message
    assert "payroll-svc" in unlisted.message and "pool.service_readers" in unlisted.message
    assert client.gateway_id == "station-1"
    assert held == [("admin:billing-svc", "station-1")]


def test_admin_may_release_another_identitys_lease_but_not_run_steps_on_or_renew_it(tmp_path):
    admin = PeerIdentity("admin", "root", 0xAD)

    async def body():
        async with rule_orchestrator(tmp_path, pool=SERVICES_AT_HQ) as rig:
            leases = leases_of(rig)
            alices = await as_caller(PeerIdentity("service", ALICE, 0xA1),
                                     lambda: leases.acquire(ReaderSelector(reader_id=rig.token.reader_id)))
            with pytest.raises(PermissionDenied):
                await as_caller(admin, lambda: leases.run_step(alices.lease_id, cards.Step(cards.ReadCardInfo())))
            with pytest.raises(PermissionDenied):
                await as_caller(admin, lambda: call(leases.renew, alices.lease_id))
            await as_caller(admin, lambda: call(leases.release, alices.lease_id))
            return alices, leases.list(), rig.orch.pool.list()

    alices, held, pooled = asyncio.run(body())
    assert alices.owner == f"service:{ALICE}" and held == []
    assert [p.holder for p in pooled] == [""]
