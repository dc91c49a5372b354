"""GatewayService: direct card I/O for local tools. Thin: convert, call the core, convert."""
from __future__ import annotations

from gateway.core.executor import StepExecutor
from gateway.core.registry import ReaderRegistry
from shared import cards, convert
from shared.errors import InvalidArgument
from shared.limits import Backlog
from shared.proto import gateway_pb2, gateway_pb2_grpc
from shared.rpc import rpc_errors
from shared.tls import current_caller


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, registry: ReaderRegistry, executor: StepExecutor) -> None:
        self.registry = registry
        self.executor = executor

    @rpc_errors
    async def ListReaders(self, request, context):
        return gateway_pb2.ListReadersResponse(readers=[convert.reader_to_proto(r) for r in self.registry.readers()])

    @rpc_errors
    async def RunStep(self, request, context):
        if not request.reader_id:
            raise InvalidArgument("reader_id is empty", field="reader_id")
        step = convert.step_from_proto(request.step)
        # Remembered under the caller's certificate: a caller is answered from its own steps only.
        value, replayed = await self.executor.run(request.reader_id, step, request.task_id, request.step_number,
                                                  caller=current_caller())
        return gateway_pb2.RunStepResponse(outcome=convert.value_to_outcome(value), replayed=replayed)

    @rpc_errors
    async def WatchReaders(self, request, context):
        # Bounded: a watcher that falls behind is dropped with the reason (shared/limits.py).
        queue: Backlog[tuple[str, cards.Reader]] = Backlog()
        unsubscribe = self.registry.subscribe(lambda kind, reader: queue.put((kind, reader)))
        try:
            for reader in self.registry.readers():
                yield convert.reader_event_to_proto("present", reader)
            while True:
                kind, reader = await queue.get()
                yield convert.reader_event_to_proto(kind, reader)
        finally:
            unsubscribe()
