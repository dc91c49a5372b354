"""OrderService: thin — convert the request, call the order service, convert the answer."""
from __future__ import annotations

from orchestrator.api import convert as conv
from orchestrator.services.orders import OrderService
from shared.proto import order_service_pb2 as pb
from shared.proto import order_service_pb2_grpc
from shared.rpc import rpc_errors


class OrderServicer(order_service_pb2_grpc.OrderServiceServicer):
    def __init__(self, orders: OrderService) -> None:
        self.orders = orders

    @rpc_errors
    async def CreateOrder(self, request, context):
        items = [{k: conv.value_from_proto(v) for k, v in item.inputs.items()} for item in request.items]
        order = self.orders.create(request.process, conv.selector_from_proto(request.selector), items,
                                   dict(request.secret_inputs))
        return pb.CreateOrderResponse(order=conv.order_to_proto(order))

    @rpc_errors
    async def WatchOrder(self, request, context):
        async for order in self.orders.watch(request.order_id):
            yield pb.WatchOrderResponse(order=conv.order_to_proto(order))

    @rpc_errors
    async def ListOrders(self, request, context):
        return pb.ListOrdersResponse(orders=[conv.order_to_proto(o) for o in self.orders.list()])
