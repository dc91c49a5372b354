"""A card's life on the fake gateway: the card template of a direct production comes from the
request, one physical card holds one live card object, certificates follow their card's state
(docs/lifecycle.md, docs/state-graphs.md)."""
from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from orchestrator.services.pool import ReaderSelector
from shared import cards
from shared.errors import CardIoError, CaUnavailable
from shared.proto import card_service_pb2 as card_pb
from shared.proto import reader_pool_service_pb2 as pool_pb
from tests.rules.processes import produce_process
from tests.rules.rig import PIN, descriptor, fake_token, rule_orchestrator
from tests.support.api import OrchestratorApi
from tests.support.pki import default_pki


def _produce_over_grpc(rig, card_template: str):
    request = card_pb.ProduceCardRequest(
        reader=pool_pb.ReaderSelector(reader_id=rig.token.reader_id), subject="CN=Template Tester,O=Example",
        certificates=[card_pb.CertificateRequest(template="EmployeeAuthentication")], user_pin=PIN,
        card_template=card_template)

    async def call():
        async with default_pki().aio_channel(rig.orch.address) as channel:
            stream: Any = OrchestratorApi.on(channel).cards.ProduceCard(request)
            return [r async for r in stream]
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
                details = err.value.details() or ""
                assert words in details and "EmployeeCardWithRecovery" in details
            assert rig.card_count() == 0
    asyncio.run(body())


# --- one physical card, one live card object ------------------------------------------------------

def test_the_same_card_is_refused_for_production_unless_the_process_reissues_it(tmp_path):
    reissue = produce_process("reissue").replace('    card: "${card}"\n', '    card: "${card}"\n    reissue: true\n')

    async def body():
        async with rule_orchestrator(tmp_path, processes={"produce": produce_process(), "reissue": reissue}) as rig:
            first = await rig.process("produce", person="Jane Doe", pin=PIN)
            assert first.state == "SUCCEEDED", first.error_message
            card = descriptor(first, "card")
            identity = f"pkcs11:{rig.token.serial}"
            again = await rig.process("produce", person="John Doe", pin=PIN)
            assert (again.state, again.error_reason) == ("FAILED", "ALREADY_EXISTS")
            message = again.error_message or ""
            assert identity in message and card.id in message and "reissue: true" in message
            live = rig.orch.store.cards.live(identity)
            assert rig.card_count() == 1 and live is not None and live.id == card.id
            reissued = await rig.process("reissue", person="John Doe", pin=PIN)
            assert reissued.state == "SUCCEEDED", reissued.error_message
            new = descriptor(reissued, "card")
            live = rig.orch.store.cards.live(identity)
            assert live is not None and live.id == new.id and not rig.card(card.id).live
            [event] = rig.audit(object_id=card.id, action="card_taken_over")
            assert event.detail["by_card"] == new.id and event.detail["identity"] == identity
    asyncio.run(body())


def test_a_final_card_state_frees_the_card_for_a_new_production(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path, processes={"produce": produce_process()}) as rig:
            rig.gateway.fail(CardIoError("reader unplugged"), operation=cards.WriteCertificates)
            failed = await rig.process("produce", person="Jane Doe", pin=PIN)
            assert failed.state == "FAILED"
            card = descriptor(failed, "card")
            assert rig.card(card.id).state == "ProductionFailed" and not rig.card(card.id).live   # final
            retried = await rig.process("produce", person="Jane Doe", pin=PIN)
            assert retried.state == "SUCCEEDED", retried.error_message
    asyncio.run(body())


def test_an_order_never_puts_two_people_on_one_card_it_waits_for_the_card_to_change(tmp_path):
    async def body():
        first, second = fake_token(), fake_token()
        async with rule_orchestrator(tmp_path, processes={"produce": produce_process()},
                                     tokens=(first, second)) as rig:
            orders = rig.orch.orders
            assert orders is not None
            order = await orders.create("produce", ReaderSelector(),
                                        [{"person": f"Person {i}"} for i in range(3)], {"pin": PIN})
            async with asyncio.timeout(30):
                async for seen in orders.watch(order.id):
                    counts = seen.counts()
                    if counts["succeeded"] + counts["failed"] == 2 and counts["queued"] == 1:
                        break
            assert counts["failed"] == 0, [c.error_message for c in order.cards]
            third = fake_token()
            rig.gateway.insert(third)        # a new card: the waiting person gets it
            async with asyncio.timeout(30):
                async for _ in orders.watch(order.id):
                    pass
            assert [c.state for c in order.cards] == ["succeeded"] * 3, [c.error_message for c in order.cards]
            serials = sorted(rig.card(t.card_id).serial for t in rig.orch.store.tasks.list() if t.card_id)
            assert serials == sorted(t.serial for t in (first, second, third))
    asyncio.run(body())


# --- certificates follow their card ----------------------------------------------------------------

class _CaFailingOnce:
    """The local CA, except that the N-th revocation from now is answered CA_UNAVAILABLE."""

    def __init__(self, ca, failing_call: int) -> None:
        self._ca, self._left = ca, failing_call

    def __getattr__(self, name):
        return getattr(self._ca, name)

    def revoke(self, serial: int, reason: str) -> None:
        self._left -= 1
        if self._left == 0:
            raise CaUnavailable("the CA went away")
        self._ca.revoke(serial, reason)


def test_c17_a_card_change_interrupted_after_some_certificates_is_finished_by_running_it_again(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path, processes={"produce": produce_process()}) as rig:
            produced = await rig.process("produce", person="Jane Doe", pin=PIN)
            card = descriptor(produced, "card")
            certificates = rig.orch.store.cards.certificate_ids(card.id)
            assert len(certificates) == 2
            local = rig.orch.certificates.cas["local"]
            rig.orch.certificates.cas["local"] = _CaFailingOnce(local, failing_call=2)
            interrupted = await rig.process("lock-card", card=card)
            assert (interrupted.state, interrupted.error_reason) == ("FAILED", "CA_UNAVAILABLE")
            assert rig.card(card.id).state == "Active"          # the card moves last
            states = [rig.certificate(c).state for c in certificates]
            assert states == ["OnHold", "Active"]               # CA first, store after: each agrees
            assert rig.crl_reasons() == {rig.certificate(certificates[0]).serial: "certificate_hold"}
            rig.orch.certificates.cas["local"] = local
            finished = await rig.process("lock-card", card=card)
            assert finished.state == "SUCCEEDED", finished.error_message
            assert rig.card(card.id).state == "Locked"
            assert [rig.certificate(c).state for c in certificates] == ["OnHold", "OnHold"]
            assert rig.crl_reasons() == {rig.certificate(c).serial: "certificate_hold" for c in certificates}
            [event] = rig.audit(object_id=card.id, action="change_state")
            assert event.detail["certificates_moved"] == [certificates[1]]
    asyncio.run(body())
