"""A card's life on the fake gateway: the card template of a direct production comes from the
request, one physical card holds one live card object, certificates follow their card's state
(docs/lifecycle.md, docs/state-graphs.md)."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from shared.proto import card_service_pb2 as card_pb
from shared.proto import reader_pool_service_pb2 as pool_pb
from tests.rules.rig import PIN, rule_orchestrator
from tests.support.api import OrchestratorApi
from tests.support.pki import default_pki


def _produce_over_grpc(rig, card_template: str):
    request = card_pb.ProduceCardRequest(
        reader=pool_pb.ReaderSelector(reader_id=rig.token.reader_id), subject="CN=Template Tester,O=Example",
        certificates=[card_pb.CertificateRequest(template="EmployeeAuthentication")], user_pin=PIN,
        card_template=card_template)

    async def call():
        async with default_pki().aio_channel(rig.orch.address) as channel:
            return [r async for r in OrchestratorApi.on(channel).cards.ProduceCard(request)]
    return call()


def test_produce_card_takes_the_card_template_from_the_request(tmp_path):
    # Before: ProduceCard made every card an EmployeeCard, whatever the caller wanted.
    async def body():
        async with rule_orchestrator(tmp_path) as rig:
            responses = await _produce_over_grpc(rig, "EmployeeCardWithRecovery")
            task = responses[-1].task
            assert task.state == card_pb.TASK_STATE_SUCCEEDED, task.error
            assert rig.card(task.card_id).template == "EmployeeCardWithRecovery"
    asyncio.run(body())


def test_produce_card_without_or_with_an_unknown_card_template_is_refused(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path) as rig:
            for name, words in (("", "names no card template"), ("EmployeCard", "no card template 'EmployeCard'")):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _produce_over_grpc(rig, name)
                assert words in err.value.details() and "EmployeeCardWithRecovery" in err.value.details()
            assert rig.card_count() == 0
    asyncio.run(body())
