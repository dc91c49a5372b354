"""gRPC plumbing both servers and all clients use: servers with health and reflection, the
error catalogue mapped to google.rpc.Status, and the way back on the client side."""
from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from shared.convert import error_from_proto, error_to_proto
from shared.errors import DOMAIN, CardlineError, InvalidArgument, from_reason
from shared.limits import MAX_MESSAGE_BYTES, check_message
from shared.logging import get_logger
from shared.proto import common_pb2

log = get_logger(__name__)
_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_Method = TypeVar("_Method", bound=Callable[..., Any])
#: The message size limits of every server and channel (docs/limits.md): set, not left to
#: each gRPC implementation's defaults, and the same both ways.
MESSAGE_SIZE_OPTIONS: list[tuple[str, Any]] = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                               ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def status_of(err: CardlineError) -> grpc.Status:
    """The gRPC status of ERR: its code, message, a google.rpc.ErrorInfo (reason and the
    details as text, for any client) and a cardline.common.v1.Error (the typed details, from
    which error_from_rpc rebuilds the same class)."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata))
    typed = any_pb2.Any()
    typed.Pack(error_to_proto(err))
    status: grpc.Status = rpc_status.to_status(status_pb2.Status(
        code=grpc.StatusCode[err.code].value[0], message=err.message, details=[info, typed]))
    return status


def rpc_errors(method: _Method) -> _Method:
    """Servicer decorator: the request checked against shared/limits.py first (INVALID_ARGUMENT
    naming the field over its limit); CardlineError → gRPC status with ErrorInfo; anything
    else → INTERNAL.

    Works for unary and server-streaming (async generator) methods; a streaming request
    (the gateway link) checks its messages itself.
    """
    async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
        if isinstance(exc, CardlineError):
            await context.abort_with_status(status_of(exc))
        log.exception("unhandled error in servicer", method=method.__name__)
        await context.abort_with_status(status_of(CardlineError(f"internal error: {type(exc).__name__}")))

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                if isinstance(request, Message):
                    check_message(request)
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # mapped to a status
                await _abort(context, exc)
        return cast(_Method, stream)

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if isinstance(request, Message):
                check_message(request)
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # mapped to a status
            await _abort(context, exc)
    return cast(_Method, unary)


def error_from_rpc(exc: grpc.RpcError) -> CardlineError:
    """The catalogue error a server reported (from its typed detail, else from its ErrorInfo),
    or a generic one built from the status."""
    # Sync errors give (key, value) named tuples, grpc.aio ones a Metadata of pairs: both unpack.
    trailing = cast("Iterable[tuple[str, bytes]]", exc.trailing_metadata() or ())
    for key, value in trailing:
        if key == _STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            typed, info = common_pb2.Error(), error_details_pb2.ErrorInfo()
            for detail in status.details:
                if detail.Is(typed.DESCRIPTOR):
                    detail.Unpack(typed)
                    return error_from_proto(typed)
            for detail in status.details:
                if detail.Unpack(info) and info.domain == DOMAIN:
                    return from_reason(info.reason, status.message, dict(info.metadata))
    err = CardlineError(f"{exc.code().name}: {exc.details()}")
    err.reason = exc.code().name
    return err


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgument(f"listen address {listen!r}: expected HOST:PORT", field="listen")
    return host, int(port)


class Server:
    """A grpc.aio server with health checking and reflection for the given services."""

    def __init__(self, listen: str, services: Iterable[tuple[Callable[[Any, grpc.aio.Server], None], Any, str]],
                 *, credentials: grpc.ServerCredentials | None = None,
                 interceptors: Iterable[grpc.aio.ServerInterceptor] = ()) -> None:
        """Plaintext when CREDENTIALS is None (development); shared.tls.server_security()
        gives the mutual-TLS credentials and the authorising interceptors."""
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *MESSAGE_SIZE_OPTIONS],
                                       interceptors=list(interceptors) or None)
        names = []
        for add, servicer, full_name in services:
            add(servicer, self._server)
            names.append(full_name)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self._names = names
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self._server)
        if credentials is None:
            self.port = self._server.add_insecure_port(listen)
        else:
            self.port = self._server.add_secure_port(listen, credentials)
        if self.port == 0:
            raise InvalidArgument(f"cannot listen on {listen}", field="listen")
        self.address = f"{listen.rpartition(':')[0]}:{self.port}"

    @property
    def service_names(self) -> tuple[str, ...]:
        """Full names of the services given (health and reflection, which it adds, aside)."""
        return tuple(self._names)

    async def start(self) -> None:
        await self._server.start()
        for name in ["", *self._names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)

    async def wait(self) -> None:
        await self._server.wait_for_termination()


code_pb2  # noqa: B018 - imported so google.rpc protos are registered for reflection users
