"""The API's request ids and page tokens (docs/api.md), through the real gRPC server of an
in-process orchestrator with a fake gateway: a retried StartProcess with the same request id
produces one card; paging lists every item exactly once."""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest

from shared.proto import card_service_pb2 as card_pb
from shared.proto import certificate_service_pb2 as certificate_pb
from shared.proto import common_pb2
from shared.proto import lease_service_pb2 as lease_pb
from shared.proto import order_service_pb2 as order_pb
from shared.proto import process_service_pb2 as process_pb
from shared.proto import reader_pool_service_pb2 as pool_pb
from tests.rules.processes import produce_process
from tests.rules.rig import PIN, fake_token, rule_orchestrator
from tests.support.api import OrchestratorApi
from tests.support.pki import default_pki


def _start(name: str, request_id: str, person: str = "Alice") -> process_pb.StartProcessRequest:
    return process_pb.StartProcessRequest(process=name, request_id=request_id,
                                          inputs={"person": common_pb2.Value(text=person)},
                                          secret_inputs={"pin": PIN})


async def _last(stream) -> process_pb.StartProcessResponse:
    responses = [r async for r in stream]
    assert responses[-1].HasField("instance")
    return responses[-1]


def test_retried_start_process_with_the_same_request_id_produces_one_card(tmp_path):
    async def body():
        # Two blank cards: a second production would find a card to run on.
        async with (rule_orchestrator(tmp_path, processes={"produce": produce_process()},
                                      tokens=(fake_token(), fake_token())) as rig,
                    default_pki().aio_channel(rig.orch.address) as channel):
            api = OrchestratorApi.on(channel)
            request_id = str(uuid.uuid4())
            # The retry arrives while the first call still runs, and again after it ended.
            first, during = await asyncio.gather(_last(api.processes.StartProcess(_start("produce", request_id))),
                                                 _last(api.processes.StartProcess(_start("produce", request_id))))
            after = await _last(api.processes.StartProcess(_start("produce", request_id)))
            other = await _last(api.processes.StartProcess(_start("produce", str(uuid.uuid4()))))
            instances = rig.orch.store.processes.list()
            return rig, first, during, after, other, instances

    rig, first, during, after, other, instances = asyncio.run(body())
    assert first.instance.state == process_pb.PROCESS_STATE_SUCCEEDED
    assert during.instance == first.instance and after.instance == first.instance
    assert other.instance.id != first.instance.id               # a new request id is a new production
    assert len(instances) == 2
    assert rig.card_count() == 2                                # one card per request id, not per call


def test_request_id_reused_for_a_different_request_is_refused(tmp_path):
    async def body():
        async with (rule_orchestrator(tmp_path, processes={"produce": produce_process()}) as rig,
                    default_pki().aio_channel(rig.orch.address) as channel):
            api = OrchestratorApi.on(channel)
            await _last(api.processes.StartProcess(_start("produce", "order-7")))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _last(api.processes.StartProcess(_start("produce", "order-7", person="Bob")))
            return rig, refused.value

    rig, refused = asyncio.run(body())
    assert refused.code() == grpc.StatusCode.ALREADY_EXISTS
    assert rig.card_count() == 1


def test_paging_certificates_and_tasks_through_the_server_returns_each_once(tmp_path):
    async def body():
        tokens = tuple(fake_token() for _ in range(5))
        async with rule_orchestrator(tmp_path, tokens=tokens) as rig:
            for blank in tokens:
                await rig.produce("EmployeeAuthentication", token=blank)
            async with default_pki().aio_channel(rig.orch.address) as channel:
                api: Any = OrchestratorApi.on(channel)      # asyncio stubs: typed as the blocking ones
                seen, pages, token = [], 0, ""
                while True:
                    page = await api.certificates.ListCertificates(
                        certificate_pb.ListCertificatesRequest(page_size=2, page_token=token))
                    seen += [c.id for c in page.certificates]
                    pages += 1
                    token = page.next_page_token
                    if not token:
                        break
                tasks, token = [], ""
                while True:
                    page = await api.cards.ListTasks(card_pb.ListTasksRequest(page_size=3, page_token=token))
                    tasks += [t.id for t in page.tasks]
                    if not (token := page.next_page_token):
                        break
                with pytest.raises(grpc.aio.AioRpcError) as bad:
                    await api.certificates.ListCertificates(certificate_pb.ListCertificatesRequest(page_token="x!"))
                return rig, seen, pages, tasks, bad.value

    rig, seen, pages, tasks, bad = asyncio.run(body())
    stored = [c.id for c in rig.orch.store.certificates.list()]
    assert len(stored) == 5 and seen == stored and pages == 3
    assert sorted(tasks) == sorted(t.id for t in rig.orch.store.tasks.list()) and len(set(tasks)) == 5
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_produce_card_refused_before_its_task_existed_can_be_retried_with_the_same_id(tmp_path):
    def request(reader_id: str) -> card_pb.ProduceCardRequest:
        return card_pb.ProduceCardRequest(
            reader=pool_pb.ReaderSelector(reader_id=reader_id), subject="CN=Retry Tester", user_pin=PIN,
            certificates=[card_pb.CertificateRequest(template="EmployeeAuthentication")], request_id="produce-1",
            card_template="EmployeeCard")

    async def body():
        async with (rule_orchestrator(tmp_path) as rig,
                    default_pki().aio_channel(rig.orch.address) as channel):
            api: Any = OrchestratorApi.on(channel)
            codes = []
            for _ in range(2):       # no such reader: refused, and the id is free again
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    _ = [r async for r in api.cards.ProduceCard(request("no-such-reader"), timeout=30)]
                codes.append(refused.value.code())
            done = [r async for r in api.cards.ProduceCard(request(rig.token.reader_id), timeout=30)]
            again = [r async for r in api.cards.ProduceCard(request(rig.token.reader_id), timeout=30)]
            return rig, codes, done[-1].task, again[-1].task

    rig, codes, done, again = asyncio.run(body())
    assert codes == [grpc.StatusCode.NOT_FOUND] * 2
    assert done.state == card_pb.TASK_STATE_SUCCEEDED and again == done
    assert rig.card_count() == 1


def test_retried_acquire_lease_and_create_order_return_the_first_lease_and_order(tmp_path):
    async def body():
        async with (rule_orchestrator(tmp_path, processes={"produce": produce_process()},
                                      tokens=(fake_token(), fake_token())) as rig,
                    default_pki().aio_channel(rig.orch.address) as channel):
            api: Any = OrchestratorApi.on(channel)
            acquire = lease_pb.AcquireLeaseRequest(selector=pool_pb.ReaderSelector(reader_id=rig.token.reader_id),
                                                   ttl_s=30, holder="test", request_id="lease-1")
            leases = [(await api.leases.AcquireLease(acquire)).lease for _ in range(2)]
            listed = (await api.leases.ListLeases(lease_pb.ListLeasesRequest())).leases
            got = (await api.leases.GetLease(lease_pb.GetLeaseRequest(lease_id=leases[0].lease_id))).lease
            await api.leases.ReleaseLease(lease_pb.ReleaseLeaseRequest(lease_id=got.lease_id))
            create = order_pb.CreateOrderRequest(
                process="produce", request_id="order-1", secret_inputs={"pin": PIN},
                items=[order_pb.OrderItem(inputs={"person": common_pb2.Value(text="Carol")})])
            orders = [(await api.orders.CreateOrder(create)).order for _ in range(2)]
            final = [r.order async for r in api.orders.WatchOrder(order_pb.WatchOrderRequest(order_id=orders[0].id))]
            shown = (await api.orders.GetOrder(order_pb.GetOrderRequest(order_id=orders[0].id))).order
            listed_orders = (await api.orders.ListOrders(order_pb.ListOrdersRequest())).orders
            return rig, leases, listed, got, orders, final[-1], shown, listed_orders

    rig, leases, listed, got, orders, final, shown, listed_orders = asyncio.run(body())
    assert leases[0].lease_id == leases[1].lease_id == got.lease_id
    assert [lease.lease_id for lease in listed] == [leases[0].lease_id]
    assert orders[0].id == orders[1].id and [o.id for o in listed_orders] == [orders[0].id]
    assert [c.state for c in final.cards] == [order_pb.ORDER_CARD_STATE_SUCCEEDED] and shown == final
    assert rig.card_count() == 1
