"""ProcessService: thin — convert the request, call the process service, convert the answer."""
from __future__ import annotations

import asyncio

from orchestrator.api import convert as conv
from orchestrator.api import paging
from orchestrator.api.streams import follow
from orchestrator.services.processes import ProcessService
from orchestrator.store.store import Store
from shared.errors import InvalidArgument
from shared.proto import card_service_pb2 as card_pb
from shared.proto import process_service_pb2 as pb
from shared.proto import process_service_pb2_grpc
from shared.rpc import rpc_errors


class ProcessServicer(process_service_pb2_grpc.ProcessServiceServicer):
    def __init__(self, store: Store, processes: ProcessService) -> None:
        self.store = store
        self.processes = processes

    @rpc_errors
    async def ListProcessDefinitions(self, request, context):
        page, token = paging.memory_page(list(self.processes.configuration.processes.values()), request,
                                         lambda d: d.name)
        return pb.ListProcessDefinitionsResponse(definitions=[conv.process_definition_to_proto(d) for d in page],
                                                 next_page_token=token)

    @rpc_errors
    async def StartProcess(self, request, context):
        inputs = {k: conv.value_from_proto(v) for k, v in request.inputs.items()}
        overlap = request.inputs.keys() & request.secret_inputs.keys()
        if overlap:
            raise InvalidArgument(f"inputs given both plain and secret: {', '.join(sorted(overlap))}", field="inputs")
        inputs.update(request.secret_inputs)
        async for p in follow(lambda sink: self.processes.start(request.process, inputs, sink,
                                                                request_id=request.request_id),
                              lambda p: p.instance is not None):
            instance = await self._instance(p.instance) if p.instance is not None else None
            yield pb.StartProcessResponse(
                process_instance_id=p.instance_id, task_index=p.task_index,
                task_type=conv.task_type_to_proto(p.task_type) if p.task_type else card_pb.TASK_TYPE_UNSPECIFIED,
                on_error=p.on_error, message=p.message, instance=instance)

    @rpc_errors
    async def GetProcessInstance(self, request, context):
        record = await asyncio.to_thread(self.store.processes.get, request.process_instance_id)
        return pb.GetProcessInstanceResponse(instance=await self._instance(record))

    @rpc_errors
    async def ListProcessInstances(self, request, context):
        size = paging.page_size(request)
        after = paging.keyset_of(request)
        rows = await asyncio.to_thread(self.store.processes.list, state=conv.process_state_from_proto(request.state),
                                       definition=request.definition or None, after=after, limit=size + 1)
        page, token = paging.keyset_page(rows, size, lambda p: (p.created_at, p.id))
        tasks = await asyncio.to_thread(self.store.tasks.ids_by_process, [r.id for r in page])
        return pb.ListProcessInstancesResponse(
            instances=[conv.process_instance_to_proto(r, tasks[r.id]) for r in page], next_page_token=token)

    async def _instance(self, record) -> pb.ProcessInstance:
        tasks = await asyncio.to_thread(self.store.tasks.list, process_instance_id=record.id)
        return conv.process_instance_to_proto(record, [t.id for t in tasks])
