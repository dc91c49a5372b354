"""Generated protobuf and gRPC code (from protos/, by `make protos`; do not edit below
shared/proto/cardline/). scripts/gen_protos.py rewrites the generated imports into this
package, so nothing is put on sys.path. Import messages as `from shared.proto import common_pb2`.
"""
from shared.proto.cardline.common.v1 import common_pb2
from shared.proto.cardline.gateway.v1 import gateway_pb2, gateway_pb2_grpc, steps_pb2
from shared.proto.cardline.orchestrator.v1 import (
    audit_service_pb2,
    audit_service_pb2_grpc,
    ca_service_pb2,
    ca_service_pb2_grpc,
    card_service_pb2,
    card_service_pb2_grpc,
    certificate_service_pb2,
    certificate_service_pb2_grpc,
    lease_service_pb2,
    lease_service_pb2_grpc,
    link_pb2,
    link_pb2_grpc,
    order_service_pb2,
    order_service_pb2_grpc,
    process_service_pb2,
    process_service_pb2_grpc,
    reader_pool_service_pb2,
    reader_pool_service_pb2_grpc,
    replica_service_pb2,
    replica_service_pb2_grpc,
)

__all__ = [
    "audit_service_pb2",
    "audit_service_pb2_grpc",
    "ca_service_pb2",
    "ca_service_pb2_grpc",
    "card_service_pb2",
    "card_service_pb2_grpc",
    "certificate_service_pb2",
    "certificate_service_pb2_grpc",
    "common_pb2",
    "gateway_pb2",
    "gateway_pb2_grpc",
    "lease_service_pb2",
    "lease_service_pb2_grpc",
    "link_pb2",
    "link_pb2_grpc",
    "order_service_pb2",
    "order_service_pb2_grpc",
    "process_service_pb2",
    "process_service_pb2_grpc",
    "reader_pool_service_pb2",
    "reader_pool_service_pb2_grpc",
    "replica_service_pb2",
    "replica_service_pb2_grpc",
    "steps_pb2",
]
