"""A stub of every client service of the orchestrator (one service per resource), on one
channel, for tests and benchmarks that use several."""
from __future__ import annotations

from dataclasses import dataclass

from shared.proto import (
    ca_service_pb2_grpc,
    card_service_pb2_grpc,
    certificate_service_pb2_grpc,
    lease_service_pb2_grpc,
    order_service_pb2_grpc,
    process_service_pb2_grpc,
    reader_pool_service_pb2_grpc,
)


@dataclass(frozen=True)
class OrchestratorApi:
    cards: card_service_pb2_grpc.CardServiceStub
    certificates: certificate_service_pb2_grpc.CertificateServiceStub
    processes: process_service_pb2_grpc.ProcessServiceStub
    pool: reader_pool_service_pb2_grpc.ReaderPoolServiceStub
    leases: lease_service_pb2_grpc.LeaseServiceStub
    orders: order_service_pb2_grpc.OrderServiceStub
    ca: ca_service_pb2_grpc.CaServiceStub

    @classmethod
    def on(cls, channel) -> OrchestratorApi:
        """Stubs on CHANNEL (a grpc.Channel or grpc.aio.Channel)."""
        return cls(cards=card_service_pb2_grpc.CardServiceStub(channel),
                   certificates=certificate_service_pb2_grpc.CertificateServiceStub(channel),
                   processes=process_service_pb2_grpc.ProcessServiceStub(channel),
                   pool=reader_pool_service_pb2_grpc.ReaderPoolServiceStub(channel),
                   leases=lease_service_pb2_grpc.LeaseServiceStub(channel),
                   orders=order_service_pb2_grpc.OrderServiceStub(channel),
                   ca=ca_service_pb2_grpc.CaServiceStub(channel))
