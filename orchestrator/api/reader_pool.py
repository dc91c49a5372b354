"""ReaderPoolService: thin — the pool's gateways and readers, now and as they change."""
from __future__ import annotations

from orchestrator.api import convert as conv
from orchestrator.api import paging
from orchestrator.services.pool import PooledReader, ReaderPool
from shared.limits import Backlog
from shared.proto import reader_pool_service_pb2 as pb
from shared.proto import reader_pool_service_pb2_grpc
from shared.rpc import rpc_errors

# ReaderPool.subscribe's change kinds.
_CHANGES = {"present": pb.READER_CHANGE_PRESENT, "changed": pb.READER_CHANGE_CHANGED,
            "removed": pb.READER_CHANGE_REMOVED}


class ReaderPoolServicer(reader_pool_service_pb2_grpc.ReaderPoolServiceServicer):
    def __init__(self, pool: ReaderPool) -> None:
        self.pool = pool

    @rpc_errors
    async def ListGateways(self, request, context):
        page, token = paging.memory_page(self.pool.gateways(), request, lambda g: g.gateway_id,
                                         lambda g: conv.gateway_to_proto(g).ByteSize())
        return pb.ListGatewaysResponse(gateways=[conv.gateway_to_proto(g) for g in page], next_page_token=token)

    @rpc_errors
    async def ListReaders(self, request, context):
        selector = conv.selector_from_proto(request.selector)
        # Tab: below every printable character, so "gw" sorts before "gw-2".
        page, token = paging.memory_page(self.pool.list(selector), request,
                                         lambda p: f"{p.gateway_id}\t{p.reader.reader_id}",
                                         lambda p: conv.pooled_reader_to_proto(p).ByteSize())
        return pb.ListReadersResponse(readers=[conv.pooled_reader_to_proto(p) for p in page], next_page_token=token)

    @rpc_errors
    async def WatchReaders(self, request, context):
        selector = conv.selector_from_proto(request.selector)
        # Bounded: a watcher that falls behind is dropped with the reason (shared/limits.py).
        events: Backlog[tuple[str, PooledReader]] = Backlog()
        unsubscribe = self.pool.subscribe(lambda kind, p: events.put((kind, p)))
        try:
            for p in self.pool.list():
                if selector.matches_pooled(p):
                    yield pb.WatchReadersResponse(change=pb.READER_CHANGE_PRESENT,
                                                  reader=conv.pooled_reader_to_proto(p))
            while True:
                kind, p = await events.get()
                if selector.matches_pooled(p) or (kind == "removed" and not selector.card_present
                                                  and selector.matches_place(p.gateway_id, p.site, p.labels, p.reader)):
                    yield pb.WatchReadersResponse(change=_CHANGES[kind], reader=conv.pooled_reader_to_proto(p))
        finally:
            unsubscribe()
