"""CardService: thin — convert the request, call a service, convert the answer."""
from __future__ import annotations

import asyncio
import uuid

from orchestrator.api import convert as conv
from orchestrator.api import paging
from orchestrator.api.streams import follow
from orchestrator.domain.templates import Templates
from orchestrator.services.card_secrets import CardPukStore
from orchestrator.services.card_tasks import CardTaskService
from orchestrator.services.production import production_order
from orchestrator.store.client_requests import fingerprint
from orchestrator.store.store import Store
from shared.errors import ConfigurationError, InvalidArgument, NotFound, quoted
from shared.proto import card_service_pb2 as pb
from shared.proto import card_service_pb2_grpc
from shared.rpc import rpc_errors
from shared.tls import current_actor


class CardServicer(card_service_pb2_grpc.CardServiceServicer):
    def __init__(self, store: Store, card_tasks: CardTaskService, templates: Templates,
                 card_puks: CardPukStore | None = None) -> None:
        self.store = store
        self.card_tasks = card_tasks
        self.templates = templates
        self.card_puks = card_puks

    @rpc_errors
    async def ProduceCard(self, request, context):
        order = production_order(self.templates, conv.selector_from_proto(request.reader), request.subject,
                                 conv.certificate_orders_from_proto(request), request.user_pin,
                                 card_template=request.card_template)
        task_id = str(uuid.uuid4())
        if request.request_id:
            # The PIN stays out of the fingerprint: it is stored.
            print_ = fingerprint(request.reader.SerializeToString(deterministic=True), request.subject,
                                 [c.SerializeToString(deterministic=True) for c in request.certificates],
                                 request.card_template)
            first = await asyncio.to_thread(self.store.client_requests.claim, "task", request.request_id, task_id,
                                            print_)
            if first != task_id:
                task = await self._task_when_ended(first, request.request_id)
                yield pb.ProduceCardResponse(task_id=task.id, message="request already handled", task=task)
                return
        async for p in self._produce(order, task_id, request.request_id):
            ended = conv.task_to_proto(p.task, list(p.certificate_ids)) if p.task is not None else None
            yield pb.ProduceCardResponse(task_id=p.task_id, step_number=p.step_number, message=p.message, task=ended)

    @rpc_errors
    async def GetCard(self, request, context):
        card = await asyncio.to_thread(self.store.cards.get, request.card_id)
        ids = await asyncio.to_thread(self.store.cards.certificate_ids, card.id)
        return pb.GetCardResponse(card=conv.card_to_proto(card, ids))

    async def _produce(self, order, task_id: str, request_id: str):
        """The production's progress; a request id whose call failed before its task existed
        (no reader, a bad request) is released, so a retry tries again."""
        try:
            async for p in follow(lambda sink: self.card_tasks.run(order, sink, task_id=task_id),
                                  lambda p: p.task is not None):
                yield p
        except Exception:     # not on a caller gone away: the production runs on (api/streams.py)
            if request_id and not await asyncio.to_thread(self._task_exists, task_id):
                await asyncio.to_thread(self.store.client_requests.release, "task", request_id, task_id)
            raise

    def _task_exists(self, task_id: str) -> bool:
        try:
            self.store.tasks.get(task_id)
        except NotFound:
            return False
        return True

    async def _task_when_ended(self, task_id: str, request_id: str) -> pb.Task:
        """The task a first ProduceCard with the same request id started, once it ended
        (polled: it may run on another orchestrator, or still wait for its reader)."""
        delay = 0.05
        while True:
            try:
                task = await asyncio.to_thread(self._task, task_id)
            except NotFound:      # the first call still waits for a reader: no task row yet
                task = None
                if await asyncio.to_thread(self.store.client_requests.find, "task", request_id) != task_id:
                    raise NotFound(f"the first call with request id {quoted(request_id)} failed before it started a "
                                   "task; send the request again", request_id=request_id) from None
            if task is not None and task.state != pb.TASK_STATE_RUNNING:
                return task
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _task(self, task_id: str) -> pb.Task:
        task = self.store.tasks.get(task_id)
        certs = self.store.certificates.list(task_id=task.id)
        return conv.task_to_proto(task, [c.id for c in certs])

    @rpc_errors
    async def GetTask(self, request, context):
        return pb.GetTaskResponse(task=await asyncio.to_thread(self._task, request.task_id))

    @rpc_errors
    async def ListTasks(self, request, context):
        size = paging.page_size(request)
        after = paging.keyset_of(request)
        state = conv.task_state_from_proto(request.state)

        def tasks():
            rows = self.store.tasks.list(process_instance_id=request.process_instance_id or None, state=state,
                                         card_id=request.card_id or None, after=after, limit=size + 1)
            page, token = paging.keyset_page(rows, size, lambda t: (t.created_at, t.id))
            certificates = self.store.certificates.ids_by_task([t.id for t in page])
            return [conv.task_to_proto(t, certificates[t.id]) for t in page], token

        page, token = await asyncio.to_thread(tasks)
        return pb.ListTasksResponse(tasks=page, next_page_token=token)

    @rpc_errors
    async def ListCards(self, request, context):
        size = paging.page_size(request)
        after = paging.keyset_of(request)

        def cards_with_certificates():
            cards = self.store.cards.list(holder=request.holder or None, state=request.state or None,
                                          template=request.template or None,
                                          token_serial=request.token_serial or None, after=after, limit=size + 1)
            page, token = paging.keyset_page(cards, size, lambda c: (c.created_at, c.id))
            certificates = self.store.cards.certificate_ids_of([c.id for c in page])
            return [(c, certificates[c.id]) for c in page], token

        rows, token = await asyncio.to_thread(cards_with_certificates)
        return pb.ListCardsResponse(cards=[conv.card_to_proto(c, ids) for c, ids in rows], next_page_token=token)

    @rpc_errors
    async def SetCardPuk(self, request, context):
        if self.card_puks is None:
            raise ConfigurationError("this orchestrator keeps no card PUKs")
        if not request.token_serial:
            raise InvalidArgument("token_serial is required", field="token_serial")
        await asyncio.to_thread(self.card_puks.set, request.token_serial, request.puk, actor=current_actor())
        return pb.SetCardPukResponse()
