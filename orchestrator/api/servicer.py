"""OrchestratorService: thin — convert the request, call a service, convert the answer."""
from __future__ import annotations

import asyncio

from orchestrator.api import convert as conv
from orchestrator.services.pool import ReaderPool
from orchestrator.services.production import Progress, ProductionService
from orchestrator.store.store import Store
from orchestrator.ca.base import CaConnector
from shared.errors import NotFound
from shared.proto import orchestrator_pb2 as pb
from shared.proto import orchestrator_pb2_grpc
from shared.rpc import rpc_errors


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(self, store: Store, pool: ReaderPool, production: ProductionService,
                 cas: dict[str, CaConnector]) -> None:
        self.store = store
        self.pool = pool
        self.production = production
        self.cas = cas

    @rpc_errors
    async def ProduceCard(self, request, context):
        order = conv.order_from_proto(request)
        events: asyncio.Queue = asyncio.Queue()
        job = asyncio.create_task(self.production.produce(order, events.put_nowait))
        # The production runs on even if the caller goes away: a task always ends in a
        # defined state, never half-done because a client disconnected.
        while True:
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield self._event(getter.result())
                if getter.result().task is not None:
                    return
            else:
                getter.cancel()
                job.result()   # raises the validation/lease error that ended it before a task existed
                while not events.empty():
                    yield self._event(events.get_nowait())
                return

    def _event(self, p: Progress) -> pb.TaskEvent:
        task = None
        if p.task is not None:
            task = conv.task_to_proto(p.task, [c.id for c in self.store.list_certificates(task_id=p.task.id)])
        return pb.TaskEvent(task_id=p.task_id, step_number=p.step_number, message=p.message, task=task)

    @rpc_errors
    async def GetTask(self, request, context):
        task = await asyncio.to_thread(self.store.get_task, request.task_id)
        certs = await asyncio.to_thread(self.store.list_certificates, task_id=task.id)
        return pb.GetTaskResponse(task=conv.task_to_proto(task, [c.id for c in certs]))

    @rpc_errors
    async def GetCard(self, request, context):
        card = await asyncio.to_thread(self.store.get_card, request.card_id)
        ids = await asyncio.to_thread(self.store.certificate_ids_of_card, card.id)
        return pb.GetCardResponse(card=conv.card_to_proto(card, ids))

    @rpc_errors
    async def GetCertificate(self, request, context):
        cert = await asyncio.to_thread(self.store.get_certificate, request.certificate_id)
        return pb.GetCertificateResponse(certificate=conv.certificate_to_proto(cert, self._card_of(cert.id)))

    @rpc_errors
    async def ListCertificates(self, request, context):
        certs = await asyncio.to_thread(
            self.store.list_certificates, state=request.state or None, template=request.template or None,
            card_id=request.card_id or None, task_id=request.task_id or None, limit=request.limit or None)
        return pb.ListCertificatesResponse(certificates=[conv.certificate_to_proto(c, self._card_of(c.id))
                                                         for c in certs])

    def _card_of(self, certificate_id: str) -> str:
        relations = self.store.list_relations(target_id=certificate_id)
        return next((r.source_id for r in relations if r.source_type == "Card"), "")

    @rpc_errors
    async def ListReaders(self, request, context):
        selector = conv.selector_from_proto(request.selector)
        return pb.ListReadersResponse(readers=[conv.pooled_reader_to_proto(p) for p in self.pool.list(selector)])

    @rpc_errors
    async def GetCaCertificate(self, request, context):
        name = request.ca or "local"
        ca = self.cas.get(name)
        if ca is None:
            raise NotFound(f"no CA named {name!r} (known: {', '.join(sorted(self.cas))})", ca=name)
        return pb.GetCaCertificateResponse(certificate_der=await asyncio.to_thread(ca.ca_certificate_der))


