"""OrderService: thin — convert the request, call the order service, convert the answer."""
from __future__ import annotations

import asyncio
import uuid

from orchestrator.api import convert as conv
from orchestrator.api import paging
from orchestrator.services.orders import OrderService
from orchestrator.store.client_requests import fingerprint
from orchestrator.store.store import Store
from shared.proto import order_service_pb2 as pb
from shared.proto import order_service_pb2_grpc
from shared.rpc import rpc_errors


class OrderServicer(order_service_pb2_grpc.OrderServiceServicer):
    def __init__(self, orders: OrderService, store: Store) -> None:
        self.orders = orders
        self.store = store

    @rpc_errors
    async def CreateOrder(self, request, context):
        items = [{k: conv.value_from_proto(v) for k, v in item.inputs.items()} for item in request.items]
        order_id = uuid.uuid4().hex[:12]
        if request.request_id:
            # Secrets stay out of the fingerprint: it is stored.
            print_ = fingerprint(request.process, request.selector.SerializeToString(deterministic=True),
                                 [i.SerializeToString(deterministic=True) for i in request.items])
            first = await asyncio.to_thread(self.store.client_requests.claim, "order", request.request_id,
                                            order_id, print_)
            if first != order_id:
                return pb.CreateOrderResponse(order=conv.order_to_proto(await self.orders.get(first)))
        try:
            order = await self.orders.create(request.process, conv.selector_from_proto(request.selector), items,
                                             dict(request.secret_inputs), order_id=order_id)
        except BaseException:       # refused before it existed: a retry with the same id tries again
            if request.request_id:
                await asyncio.to_thread(self.store.client_requests.release, "order", request.request_id, order_id)
            raise
        return pb.CreateOrderResponse(order=conv.order_to_proto(order))

    @rpc_errors
    async def GetOrder(self, request, context):
        return pb.GetOrderResponse(order=conv.order_to_proto(await self.orders.get(request.order_id)))

    @rpc_errors
    async def CancelOrder(self, request, context):
        return pb.CancelOrderResponse(order=conv.order_to_proto(await self.orders.cancel(request.order_id)))

    @rpc_errors
    async def WatchOrder(self, request, context):
        async for order in self.orders.watch(request.order_id):
            yield pb.WatchOrderResponse(order=conv.order_to_proto(order))

    @rpc_errors
    async def ListOrders(self, request, context):
        # Stored orders page by (creation time, id), oldest first.
        size = paging.page_size(request)
        orders = await self.orders.list(size + 1, paging.keyset_of(request))
        page, token = paging.keyset_page(orders, size, lambda o: (o.created_at, o.id))
        return pb.ListOrdersResponse(orders=[conv.order_to_proto(o) for o in page], next_page_token=token)
