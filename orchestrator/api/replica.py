"""ReplicaService: thin — a step for a reader whose gateway is linked here, sent by another
replica on the same database (docs/replicas.md), and the client the replicas call it with.

Only the role `orchestrator` may call it (shared/permissions.py). The step runs on this
replica's own link to the gateway, with the same outcome-kind check as every step, and only
while the reader is held in the database under the hold the caller names
(FederatedPool.run_relayed).
"""
from __future__ import annotations

import asyncio

import grpc

from orchestrator.services.pool import ReaderPool
from orchestrator.services.pool_federated import FederatedPool
from shared import cards, convert
from shared.errors import GatewayNotConnected, InvalidArgument, StepTimeout
from shared.proto import replica_service_pb2 as pb
from shared.proto import replica_service_pb2_grpc
from shared.rpc import MESSAGE_SIZE_OPTIONS, error_from_rpc, rpc_errors
from shared.tls import TlsFiles

MAX_CHANNELS = 64          # replicas one replica keeps a channel to


class ReplicaServicer(replica_service_pb2_grpc.ReplicaServiceServicer):
    def __init__(self, pool: ReaderPool) -> None:
        self.pool = pool

    @rpc_errors
    async def RunStep(self, request, context):
        if not isinstance(self.pool, FederatedPool):
            raise InvalidArgument("this orchestrator runs no pool shared with replicas (SQLite)", field="hold_id")
        if not request.HasField("step") or not request.step.WhichOneof("operation"):
            raise InvalidArgument("the request carries no step", field="step")
        value = await self.pool.run_relayed(request.gateway_id, request.reader_id, request.hold_id,
                                            convert.step_from_proto(request.step), task_id=request.task_id,
                                            step_number=request.step_number,
                                            timeout_s=request.timeout_ms / 1000 if request.timeout_ms else 0)
        return pb.RunStepResponse(outcome=convert.value_to_outcome(value))


class ReplicaClient:
    """Calls other replicas' ReplicaService with this replica's own certificate (mutual TLS;
    plaintext when TLS is None, development only)."""

    def __init__(self, tls: TlsFiles | None) -> None:
        self.tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if len(self._channels) >= MAX_CHANNELS:
                _, oldest = self._channels.popitem()
                asyncio.get_running_loop().create_task(oldest.close())
            channel = (grpc.aio.secure_channel(address, self.tls.channel_credentials(), options=MESSAGE_SIZE_OPTIONS)
                       if self.tls is not None else grpc.aio.insecure_channel(address, options=MESSAGE_SIZE_OPTIONS))
            self._channels[address] = channel
        return channel

    async def run_step(self, address: str, gateway_id: str, reader_id: str, hold_id: str, step: cards.Step,
                       task_id: str, step_number: int, timeout_s: float) -> cards.StepValue:
        stub = replica_service_pb2_grpc.ReplicaServiceStub(self._channel(address))
        request = pb.RunStepRequest(gateway_id=gateway_id, reader_id=reader_id, hold_id=hold_id, task_id=task_id,
                                    step_number=step_number, step=convert.step_to_proto(step),
                                    timeout_ms=int(timeout_s * 1000))
        try:
            response = await stub.RunStep(request, timeout=timeout_s + 10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                raise StepTimeout(f"replica {address} did not answer step {step_number} within {timeout_s:g} s",
                                  gateway_id=gateway_id, step=str(step_number)) from None
            error = error_from_rpc(exc)        # the replica's own error (CARD_IO, ...), when it sent one
            if error.reason == grpc.StatusCode.UNAVAILABLE.name:
                raise GatewayNotConnected(f"gateway {gateway_id!r} is linked to replica {address}, which cannot be "
                                          f"reached: {exc.details()}", gateway_id=gateway_id) from None
            raise error from None
        return convert.value_from_outcome(response.outcome)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
