"""LeaseService: thin — convert the request, call the lease service, convert the answer (the
*_shared calls: on PostgreSQL, the leases of every replica; else this process's)."""
from __future__ import annotations

import asyncio
import uuid

from orchestrator.api import convert as conv
from orchestrator.api import paging
from orchestrator.services.leases import LeaseService
from orchestrator.store.client_requests import fingerprint
from orchestrator.store.store import Store
from shared import convert
from shared.errors import InvalidArgument
from shared.proto import lease_service_pb2 as pb
from shared.proto import lease_service_pb2_grpc
from shared.rpc import rpc_errors


class LeaseServicer(lease_service_pb2_grpc.LeaseServiceServicer):
    def __init__(self, leases: LeaseService, store: Store) -> None:
        self.leases = leases
        self.store = store

    @rpc_errors
    async def AcquireLease(self, request, context):
        lease_id = uuid.uuid4().hex
        if request.request_id:
            print_ = fingerprint(request.selector.SerializeToString(deterministic=True), request.ttl_s,
                                 request.holder, request.wait)
            first = await asyncio.to_thread(self.store.client_requests.claim, "lease", request.request_id,
                                            lease_id, print_)
            if first != lease_id:
                # The first call's lease while it is held (NotFound once it ended, or while
                # the first call still waits for a reader), to the identity that made it only.
                return pb.AcquireLeaseResponse(lease=conv.lease_to_proto(
                    await self.leases.owned_shared(first, "repeat the request of")))
        try:
            lease = await self.leases.acquire(conv.selector_from_proto(request.selector), ttl_s=request.ttl_s,
                                              holder=request.holder, wait=request.wait, lease_id=lease_id)
        except BaseException:       # no lease granted: a retry with the same id tries again
            if request.request_id:
                await asyncio.to_thread(self.store.client_requests.release, "lease", request.request_id, lease_id)
            raise
        return pb.AcquireLeaseResponse(lease=conv.lease_to_proto(lease))

    @rpc_errors
    async def RenewLease(self, request, context):
        return pb.RenewLeaseResponse(lease=conv.lease_to_proto(await self.leases.renew_shared(request.lease_id)))

    @rpc_errors
    async def ReleaseLease(self, request, context):
        await self.leases.release_shared(request.lease_id)
        return pb.ReleaseLeaseResponse()

    @rpc_errors
    async def GetLease(self, request, context):
        return pb.GetLeaseResponse(lease=conv.lease_to_proto(await self.leases.get_shared(request.lease_id)))

    @rpc_errors
    async def ListLeases(self, request, context):
        page, token = paging.memory_page(await self.leases.list_shared(), request, lambda lease: lease.lease_id)
        return pb.ListLeasesResponse(leases=[conv.lease_to_proto(lease) for lease in page], next_page_token=token)

    @rpc_errors
    async def RunLeasedStep(self, request, context):
        if not request.HasField("step") or not request.step.WhichOneof("operation"):
            raise InvalidArgument("the request carries no step", field="step")
        step = convert.step_from_proto(request.step)
        value = await self.leases.run_step_shared(request.lease_id, step, request.step_number)
        return pb.RunLeasedStepResponse(outcome=convert.value_to_outcome(value))
