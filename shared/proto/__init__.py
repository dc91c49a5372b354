"""Generated protobuf and gRPC code (from protos/, by `make protos`; do not edit).

The generated modules import each other as top-level `cardline.*`, so this folder is put
on sys.path once, here. Import messages as `from shared.proto import common_pb2, ...`.
"""
import pathlib
import sys

_HERE = str(pathlib.Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

from cardline.common.v1 import common_pb2  # noqa: E402
from cardline.gateway.v1 import gateway_pb2, gateway_pb2_grpc, steps_pb2  # noqa: E402
from cardline.orchestrator.v1 import (  # noqa: E402
    link_pb2,
    link_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
)

__all__ = [
    "common_pb2", "gateway_pb2", "gateway_pb2_grpc", "steps_pb2",
    "link_pb2", "link_pb2_grpc", "orchestrator_pb2", "orchestrator_pb2_grpc",
]
