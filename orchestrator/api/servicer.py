"""OrchestratorService: thin — convert the request, call a service, convert the answer."""
from __future__ import annotations

import asyncio

from orchestrator.api import convert as conv
from orchestrator.api.pool_rpcs import PoolRpcs
from orchestrator.services.pool import ReaderPool
from orchestrator.domain.templates import Templates
from orchestrator.services.card_tasks import CardTaskService
from orchestrator.services.certificates import CertificateService
from orchestrator.services.processes import ProcessService
from orchestrator.services.production import production_order
from orchestrator.store.store import Store
from orchestrator.ca.base import CaConnector
from shared.errors import InvalidArgument, NotFound
from orchestrator.store.records import CARD, CaRequestState
from shared.errors import UnsupportedOperation
from shared.proto import orchestrator_pb2 as pb
from shared.proto import orchestrator_pb2_grpc
from shared.rpc import rpc_errors


class OrchestratorServicer(PoolRpcs, orchestrator_pb2_grpc.OrchestratorServiceServicer):
    def __init__(self, store: Store, pool: ReaderPool, card_tasks: CardTaskService, templates: Templates,
                 cas: dict[str, CaConnector], processes: ProcessService, certificates: CertificateService,
                 leases=None, orders=None, reconciler=None) -> None:
        self.store = store
        self.reconciler = reconciler      # C16: ListCaRequests, Reconcile (services/reconciler.py)
        self.pool = pool
        self.card_tasks = card_tasks
        self.templates = templates
        self.cas = cas
        self.processes = processes
        self.certificates = certificates
        self.leases = leases      # pool RPCs (api/pool_rpcs.py)
        self.orders = orders

    @rpc_errors
    async def ProduceCard(self, request, context):
        order = production_order(self.templates, conv.selector_from_proto(request.reader), request.subject,
                                 conv.certificate_orders_from_proto(request), request.user_pin)
        async for p in _follow(lambda sink: self.card_tasks.run(order, sink), lambda p: p.task is not None):
            task = None
            if p.task is not None:
                task = conv.task_to_proto(p.task, list(p.certificate_ids))
            yield pb.TaskEvent(task_id=p.task_id, step_number=p.step_number, message=p.message, task=task)

    @rpc_errors
    async def ListProcessDefinitions(self, request, context):
        return pb.ListProcessDefinitionsResponse(definitions=[
            pb.ProcessDefinition(name=d.name, description=d.description, inputs=d.inputs,
                                 secret_inputs=d.secret_inputs, task_types=[t.type for t in d.tasks])
            for d in sorted(self.processes.configuration.processes.values(), key=lambda d: d.name)])

    @rpc_errors
    async def StartProcess(self, request, context):
        inputs = {k: conv.value_from_proto(v) for k, v in request.inputs.items()}
        overlap = request.inputs.keys() & request.secret_inputs.keys()
        if overlap:
            raise InvalidArgument(f"inputs given both plain and secret: {', '.join(sorted(overlap))}", field="inputs")
        inputs.update(request.secret_inputs)
        async for p in _follow(lambda sink: self.processes.start(request.process, inputs, sink),
                               lambda p: p.instance is not None):
            instance = await self._instance(p.instance) if p.instance is not None else None
            yield pb.ProcessEvent(process_instance_id=p.instance_id, task_index=p.task_index, task_type=p.task_type,
                                  on_error=p.on_error, message=p.message, instance=instance)

    async def _instance(self, record) -> pb.ProcessInstance:
        tasks = await asyncio.to_thread(self.store.tasks.list, process_instance_id=record.id)
        return conv.process_instance_to_proto(record, [t.id for t in tasks])

    @rpc_errors
    async def GetProcessInstance(self, request, context):
        record = await asyncio.to_thread(self.store.processes.get, request.process_instance_id)
        return pb.GetProcessInstanceResponse(instance=await self._instance(record))

    @rpc_errors
    async def SearchIssuedCertificates(self, request, context):
        older_than = request.older_than.ToTimedelta() if request.HasField("older_than") else None
        hits = await asyncio.to_thread(self.certificates.search_issued, older_than=older_than,
                                       template=request.template or None, card_id=request.card_id or None,
                                       gateway_id=request.gateway_id or None, reader_id=request.reader_id or None,
                                       task_id=request.task_id or None, limit=request.limit or None)
        return pb.SearchIssuedCertificatesResponse(certificates=[conv.issued_hit_to_proto(h) for h in hits])

    @rpc_errors
    async def HandleIssuedCertificates(self, request, context):
        results = await asyncio.to_thread(
            self.certificates.handle_issued, list(request.certificate_ids) or None,
            revoke_reason=request.revoke_reason or None, target_state=request.target_state or None, actor="api")
        return pb.HandleIssuedCertificatesResponse(results=[conv.handling_result_to_proto(r) for r in results])

    @rpc_errors
    async def ChangeCertificateState(self, request, context):
        change = self.certificates.change_state_in_ca if request.in_ca else self.certificates.change_state
        record = await asyncio.to_thread(change, request.certificate_id, request.state, request.reason or None, "api")
        return pb.ChangeCertificateStateResponse(certificate=conv.certificate_to_proto(record))

    @rpc_errors
    async def GetTask(self, request, context):
        task = await asyncio.to_thread(self.store.tasks.get, request.task_id)
        certs = await asyncio.to_thread(self.store.certificates.list, task_id=task.id)
        return pb.GetTaskResponse(task=conv.task_to_proto(task, [c.id for c in certs]))

    @rpc_errors
    async def GetCard(self, request, context):
        card = await asyncio.to_thread(self.store.cards.get, request.card_id)
        ids = await asyncio.to_thread(self.store.cards.certificate_ids, card.id)
        return pb.GetCardResponse(card=conv.card_to_proto(card, ids))

    @rpc_errors
    async def GetCertificate(self, request, context):
        cert = await asyncio.to_thread(self.store.certificates.get, request.certificate_id)
        card_id = await asyncio.to_thread(self._card_of, cert.id)
        return pb.GetCertificateResponse(certificate=conv.certificate_to_proto(cert, card_id))

    @rpc_errors
    async def ListCertificates(self, request, context):
        def certificates_with_cards():
            certs = self.store.certificates.list(
                state=request.state or None, template=request.template or None, card_id=request.card_id or None,
                task_id=request.task_id or None, limit=request.limit or None)
            return [(c, self._card_of(c.id)) for c in certs]

        rows = await asyncio.to_thread(certificates_with_cards)      # store calls stay off the event loop
        return pb.ListCertificatesResponse(certificates=[conv.certificate_to_proto(c, card) for c, card in rows])

    def _card_of(self, certificate_id: str) -> str:
        """The card a certificate is related to (blocking: call it in a thread)."""
        relations = self.store.relations.list(target_id=certificate_id)
        return next((r.source_id for r in relations if r.source_type == CARD), "")

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



    # -- the CA request journal (C16) ------------------------------------------------------

    @rpc_errors
    async def ListCaRequests(self, request, context):
        states = [CaRequestState.PENDING] if request.unsettled_only else None
        rows = await asyncio.to_thread(self.store.ca_requests.list, states=states)
        return pb.ListCaRequestsResponse(requests=[pb.CaRequest(
            request_id=r.request_id, ca=r.ca_name, task_id=r.task_id, state=r.state, serial_hex=r.serial_hex or "",
            certificate_id=r.certificate_id or "", created_at=conv.timestamp(r.created_at),
            updated_at=conv.timestamp(r.updated_at)) for r in rows])

    @rpc_errors
    async def Reconcile(self, request, context):
        if self.reconciler is None:
            raise UnsupportedOperation("this orchestrator runs no reconciler")
        report = await asyncio.to_thread(self.reconciler.reconcile_once)
        return pb.ReconcileResponse(examined=report.examined, stored=report.stored, not_issued=report.not_issued,
                                    tasks_ended=report.tasks_ended)


async def _follow(start, is_last):
    """Runs `start(sink)` as its own task and yields what it reports until the last event.

    The work runs on even if the caller goes away: a task always ends in a defined state,
    never half-done because a client disconnected."""
    events: asyncio.Queue = asyncio.Queue()
    job = asyncio.create_task(start(events.put_nowait))
    while True:
        getter = asyncio.ensure_future(events.get())
        done, _ = await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield getter.result()
            if is_last(getter.result()):
                return
        else:
            getter.cancel()
            job.result()   # raises the error that ended it before it reported its end
            while not events.empty():
                yield events.get_nowait()
            return
