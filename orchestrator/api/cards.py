"""CardService: thin — convert the request, call a service, convert the answer."""
from __future__ import annotations

import asyncio

from orchestrator.api import convert as conv
from orchestrator.api.streams import follow
from orchestrator.domain.templates import Templates
from orchestrator.services.card_tasks import CardTaskService
from orchestrator.services.production import production_order
from orchestrator.store.store import Store
from shared.proto import card_service_pb2 as pb
from shared.proto import card_service_pb2_grpc
from shared.rpc import rpc_errors


class CardServicer(card_service_pb2_grpc.CardServiceServicer):
    def __init__(self, store: Store, card_tasks: CardTaskService, templates: Templates) -> None:
        self.store = store
        self.card_tasks = card_tasks
        self.templates = templates

    @rpc_errors
    async def ProduceCard(self, request, context):
        order = production_order(self.templates, conv.selector_from_proto(request.reader), request.subject,
                                 conv.certificate_orders_from_proto(request), request.user_pin,
                                 card_template=request.card_template)
        async for p in follow(lambda sink: self.card_tasks.run(order, sink), lambda p: p.task is not None):
            task = None
            if p.task is not None:
                task = conv.task_to_proto(p.task, list(p.certificate_ids))
            yield pb.ProduceCardResponse(task_id=p.task_id, step_number=p.step_number, message=p.message, task=task)

    @rpc_errors
    async def GetCard(self, request, context):
        card = await asyncio.to_thread(self.store.cards.get, request.card_id)
        ids = await asyncio.to_thread(self.store.cards.certificate_ids, card.id)
        return pb.GetCardResponse(card=conv.card_to_proto(card, ids))

    @rpc_errors
    async def GetTask(self, request, context):
        task = await asyncio.to_thread(self.store.tasks.get, request.task_id)
        certs = await asyncio.to_thread(self.store.certificates.list, task_id=task.id)
        return pb.GetTaskResponse(task=conv.task_to_proto(task, [c.id for c in certs]))
