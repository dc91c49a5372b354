"""The CLI's failover over several orchestrators (orchestrator/cli/client.py FailoverStub) and
the gateway's `orchestrator` setting (a list; a string of comma-separated addresses too).

A call the first orchestrator received and refused UNAVAILABLE is repeated on the next only
when repeating it is safe: a read, or a request with a request id (docs/api.md). The
orchestrators here are real gRPC servers on 127.0.0.1 serving OrderService from generic
handlers: the first refuses everything UNAVAILABLE after receiving it, the second answers."""
from __future__ import annotations

import collections
import socket
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from orchestrator.cli.client import stub
from shared import config
from shared.errors import ConfigurationError
from shared.proto import order_service_pb2 as pb
from shared.proto import order_service_pb2_grpc
from shared.tls import CLIENT_INSECURE_ENV

SERVICE = "cardline.orchestrator.v1.OrderService"
METHODS: dict[str, tuple[Any, Any]] = {"GetOrder": (pb.GetOrderRequest, pb.GetOrderResponse),
           "CancelOrder": (pb.CancelOrderRequest, pb.CancelOrderResponse),
           "CreateOrder": (pb.CreateOrderRequest, pb.CreateOrderResponse)}


class Orchestrator:
    """An OrderService that counts the calls it received and answers them, or refuses them
    all UNAVAILABLE (a replica going away after the request reached it)."""

    def __init__(self, unavailable: bool) -> None:
        self.unavailable = unavailable
        self.received: collections.Counter[str] = collections.Counter()
        self.request_ids: list[str] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            name: grpc.unary_unary_rpc_method_handler(self._handler(name, response), request.FromString,
                                                      response.SerializeToString)
            for name, (request, response) in METHODS.items()})])
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def _handler(self, name, response):
        def handle(request, context):
            self.received[name] += 1
            self.request_ids.append(getattr(request, "request_id", ""))
            if self.unavailable:
                context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
            return response(order=pb.Order(id="order-1"))
        return handle


@pytest.fixture
def orchestrators(monkeypatch) -> Iterator[tuple[Orchestrator, Orchestrator]]:
    monkeypatch.setenv(CLIENT_INSECURE_ENV, "1")
    refusing, answering = Orchestrator(unavailable=True), Orchestrator(unavailable=False)
    for o in (refusing, answering):
        o.server.start()
    yield refusing, answering
    for o in (refusing, answering):
        o.server.stop(None)


def orders(first: Orchestrator, second: Orchestrator) -> order_service_pb2_grpc.OrderServiceStub:
    return stub(order_service_pb2_grpc.OrderServiceStub, [first.address, second.address])


def test_failover_read_received_and_refused_unavailable_is_repeated_on_the_next_orchestrator(orchestrators):
    refusing, answering = orchestrators
    answer = orders(refusing, answering).GetOrder(pb.GetOrderRequest(order_id="order-1"), timeout=10)
    assert answer.order.id == "order-1"
    assert (refusing.received["GetOrder"], answering.received["GetOrder"]) == (1, 1)


def test_failover_state_change_without_request_id_is_not_repeated_once_an_orchestrator_received_it(orchestrators):
    refusing, answering = orchestrators
    with pytest.raises(grpc.RpcError) as refused:
        orders(refusing, answering).CancelOrder(pb.CancelOrderRequest(order_id="order-1"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (refusing.received["CancelOrder"], answering.received["CancelOrder"]) == (1, 0)


def test_failover_state_change_with_request_id_is_repeated_with_the_same_id(orchestrators):
    refusing, answering = orchestrators
    orders(refusing, answering).CreateOrder(pb.CreateOrderRequest(process="p", request_id="req-7"), timeout=10)
    assert (refusing.request_ids, answering.request_ids) == (["req-7"], ["req-7"])
    empty_id = pb.CreateOrderRequest(process="p")
    with pytest.raises(grpc.RpcError):
        orders(refusing, answering).CreateOrder(empty_id, timeout=10)
    assert answering.received["CreateOrder"] == 1              # the call without an id stayed where it was


def test_failover_asks_the_orchestrator_that_answered_first_on_the_next_call(orchestrators):
    refusing, answering = orchestrators
    service = orders(refusing, answering)
    service.GetOrder(pb.GetOrderRequest(order_id="order-1"), timeout=10)
    service.GetOrder(pb.GetOrderRequest(order_id="order-1"), timeout=10)
    assert (refusing.received["GetOrder"], answering.received["GetOrder"]) == (1, 2)


@pytest.mark.parametrize("given", ["a:1,b:2", " a:1 , b:2 ", ["a:1", "b:2"], ["a:1,b:2"]])
def test_gateway_orchestrator_setting_takes_a_list_or_comma_separated_addresses(given):
    assert config.load(config.GatewaySettings, orchestrator=given, insecure=True).orchestrator == ["a:1", "b:2"]


def test_gateway_orchestrator_setting_keeps_one_address_and_none(monkeypatch):
    assert config.load(config.GatewaySettings, orchestrator="orch:7400", insecure=True).orchestrator == ["orch:7400"]
    assert config.load(config.GatewaySettings, insecure=True).orchestrator == []
    monkeypatch.setenv("CARDLINE_GATEWAY_ORCHESTRATOR", "a:1,b:2")
    assert config.load(config.GatewaySettings, insecure=True).orchestrator == ["a:1", "b:2"]


@pytest.mark.parametrize(("given", "named"), [("a:1,b", "address 2: expected HOST:PORT, got 'b'"),
                                              ("a:1,,b:2", "empty address"),
                                              ("a:1,a:1", "given twice")])
def test_gateway_orchestrator_setting_error_names_the_field_and_the_address(given, named):
    with pytest.raises(ConfigurationError) as bad:
        config.load(config.GatewaySettings, orchestrator=given, insecure=True)
    assert "orchestrator:" in bad.value.message and named in bad.value.message


def test_grpc_pick_first_moves_past_a_frozen_address_of_one_target():
    """What docs/operator-guide.md relies on for a DNS name with several records: gRPC's
    pick_first, given the records' addresses, connects to the next when the first accepts
    TCP but never answers (a frozen host), in well under its 20 s connect
    timeout. (The `ipv4:` target hands pick_first the same list a resolved name does.)"""
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(16)                  # the kernel completes connections; nobody speaks
    live = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), live)
    port = live.add_insecure_port("127.0.0.1:0")
    live.start()
    try:
        with grpc.insecure_channel(f"ipv4:127.0.0.1:{frozen.getsockname()[1]},127.0.0.1:{port}") as channel:
            started = time.monotonic()
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10,
                                                                wait_for_ready=True)
            took = time.monotonic() - started
    finally:
        live.stop(None)
        frozen.close()
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert took < 5, f"pick_first took {took:.2f} s past the frozen address"
