"""LeaseService: thin — convert the request, call the lease service, convert the answer."""
from __future__ import annotations

from orchestrator.api import convert as conv
from orchestrator.services.leases import LeaseService
from shared import convert
from shared.errors import InvalidArgument
from shared.proto import lease_service_pb2 as pb
from shared.proto import lease_service_pb2_grpc
from shared.rpc import rpc_errors


class LeaseServicer(lease_service_pb2_grpc.LeaseServiceServicer):
    def __init__(self, leases: LeaseService) -> None:
        self.leases = leases

    @rpc_errors
    async def AcquireLease(self, request, context):
        lease = await self.leases.acquire(conv.selector_from_proto(request.selector), ttl_s=request.ttl_s,
                                          holder=request.holder, wait=request.wait)
        return pb.AcquireLeaseResponse(lease=conv.lease_to_proto(lease))

    @rpc_errors
    async def RenewLease(self, request, context):
        return pb.RenewLeaseResponse(lease=conv.lease_to_proto(self.leases.renew(request.lease_id)))

    @rpc_errors
    async def ReleaseLease(self, request, context):
        self.leases.release(request.lease_id)
        return pb.ReleaseLeaseResponse()

    @rpc_errors
    async def RunLeasedStep(self, request, context):
        if not request.HasField("step") or not request.step.WhichOneof("operation"):
            raise InvalidArgument("the request carries no step", field="step")
        step = convert.step_from_proto(request.step)
        value = await self.leases.run_step(request.lease_id, step, request.step_number)
        return pb.RunLeasedStepResponse(outcome=convert.value_to_outcome(value))
