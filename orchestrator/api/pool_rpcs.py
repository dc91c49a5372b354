"""The pool's RPCs of OrchestratorService (gateways, reader watch, leases, orders). Thin: convert
the request, call the pool, lease or order service, convert the answer. Mixed into
OrchestratorServicer, which provides `self.pool`, `self.leases` and `self.orders`."""
from __future__ import annotations

import asyncio

from orchestrator.api import convert as conv
from orchestrator.services.leases import LeaseService
from orchestrator.services.orders import OrderService
from orchestrator.services.pool import PooledReader, ReaderPool
from shared import convert
from shared.errors import InvalidArgument
from shared.proto import orchestrator_pb2 as pb
from shared.rpc import rpc_errors


class PoolRpcs:
    pool: ReaderPool
    leases: LeaseService
    orders: OrderService

    @rpc_errors
    async def ListGateways(self, request, context):
        return pb.ListGatewaysResponse(gateways=[conv.gateway_to_proto(g) for g in self.pool.gateways()])

    @rpc_errors
    async def WatchReaders(self, request, context):
        selector = conv.selector_from_proto(request.selector)
        events: asyncio.Queue[tuple[str, PooledReader]] = asyncio.Queue()
        unsubscribe = self.pool.subscribe(lambda kind, p: events.put_nowait((kind, p)))
        try:
            for p in self.pool.list():
                if selector.matches_pooled(p):
                    yield pb.ReaderPoolEvent(kind="present", reader=conv.pooled_reader_to_proto(p))
            while True:
                kind, p = await events.get()
                if selector.matches_pooled(p) or (kind == "removed" and not selector.card_present
                                                  and selector.matches_place(p.gateway_id, p.site, p.labels, p.reader)):
                    yield pb.ReaderPoolEvent(kind=kind, reader=conv.pooled_reader_to_proto(p))
        finally:
            unsubscribe()

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

    @rpc_errors
    async def CreateOrder(self, request, context):
        items = [{k: conv.value_from_proto(v) for k, v in item.inputs.items()} for item in request.items]
        order = self.orders.create(request.process, conv.selector_from_proto(request.selector), items,
                                   dict(request.secret_inputs))
        return pb.CreateOrderResponse(order=conv.order_to_proto(order))

    @rpc_errors
    async def WatchOrder(self, request, context):
        async for order in self.orders.watch(request.order_id):
            yield pb.OrderEvent(order=conv.order_to_proto(order))

    @rpc_errors
    async def ListOrders(self, request, context):
        return pb.ListOrdersResponse(orders=[conv.order_to_proto(o) for o in self.orders.list()])
