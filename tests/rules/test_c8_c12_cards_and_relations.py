"""C8 (production makes a card, operation works on the card of the process map) and C9–C12
(CreateObjectRelation always / success / never, ObjectRelationType), on processes run
against a fake gateway."""
from __future__ import annotations

import asyncio

import pytest

from shared import cards
from shared.errors import CardIoError
from tests.rules.processes import operation_encoding, operation_process, produce_process
from tests.rules.rig import ISSUED, PIN, START, descriptor, rule_orchestrator


def produce_then_operate(tmp_path, relation: str | None, *, relation_type: str | None = None,
                         fail_operation: bool = False, **settings):
    """A card is produced, then a card operation runs on it (the card in the process map)."""
    async def body():
        async with rule_orchestrator(
                tmp_path, encodings={"operation": operation_encoding(relation, relation_type=relation_type)},
                processes={"produce": produce_process(), "operate": operation_process(with_card=True)},
                **settings) as rig:
            produced = await rig.process("produce", person="Jane Doe", pin=PIN)
            assert produced.state == "SUCCEEDED", produced.error_message
            cards_before = rig.card_count()
            if fail_operation:
                rig.gateway.fail(CardIoError("reader unplugged"), operation=cards.WriteCertificates)
            operated = await rig.process("operate", card=descriptor(produced, "card"), pin=PIN)
            return rig, descriptor(produced, "card"), operated, cards_before

    return asyncio.run(body())


def operate_without_card(tmp_path, relation: str | None):
    async def body():
        async with rule_orchestrator(tmp_path, encodings={"operation": operation_encoding(relation)},
                                     processes={"operate": operation_process(with_card=False)}) as rig:
            return rig, await rig.process("operate", pin=PIN)

    return asyncio.run(body())


def related(rig, card_id: str) -> dict[str, str]:
    return {r.target_id: r.relation_type for r in rig.relations(card_id=card_id)}


# --- C8 ---------------------------------------------------------------------------------------

def test_c8_production_process_puts_the_new_card_object_in_the_process_map(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path, processes={"produce": produce_process()}) as rig:
            return rig, await rig.process("produce", person="Jane Doe", pin=PIN)

    rig, instance = asyncio.run(body())
    assert instance.state == "SUCCEEDED", instance.error_message
    card = descriptor(instance, "card")
    assert (card.type, card.template) == ("Card", "EmployeeCard")
    assert rig.card(card.id).serial == rig.token.serial and rig.card_count() == 1
    assert rig.token.user_pin == PIN                  # SetPIN=true personalised the card
    assert "pin" not in instance.process_map and PIN not in str(instance)


def test_c8_operation_creates_no_card_and_works_on_the_card_of_the_process_map(tmp_path):
    rig, card, operated, cards_before = produce_then_operate(tmp_path, "success")
    assert operated.state == "SUCCEEDED", operated.error_message
    assert rig.card_count() == cards_before == 1
    [task] = rig.tasks(operated.id)
    assert task.card_id == card.id


def test_c8_operation_on_another_card_than_the_process_map_names_fails_before_issuing(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path, encodings={"operation": operation_encoding("success")},
                                     processes={"produce": produce_process(),
                                                "operate": operation_process(with_card=True)}) as rig:
            produced = await rig.process("produce", person="Jane Doe", pin=PIN)
            rig.token.serial = "SOMEONE-ELSES-CARD"        # another card now lies in the reader
            return rig, await rig.process("operate", card=descriptor(produced, "card"), pin=PIN)

    rig, operated = asyncio.run(body())
    assert (operated.state, operated.error_reason) == ("FAILED", "ENCODING_FAILED")
    assert "SOMEONE-ELSES-CARD" in operated.error_message
    assert rig.certificates(process_instance_id=operated.id) == []


# --- C9 always ---------------------------------------------------------------------------------

def test_c9_always_relation_survives_a_failed_encoding(tmp_path):
    """employee-card.ini: Application_A relates `always` (type HAS_A), Application_B by default."""
    async def body():
        async with rule_orchestrator(tmp_path, processes={"produce": produce_process()}) as rig:
            rig.gateway.lose_card(operation=cards.WriteCertificates, occurrence=2)
            return rig, await rig.process("produce", person="Jane Doe", pin=PIN)

    rig, instance = asyncio.run(body())
    assert (instance.state, instance.error_reason) == ("FAILED", "CARD_REMOVED")
    [pooled] = rig.orch.pool.list()
    assert not pooled.reader.card_present                          # the gateway reported the card gone
    generated = descriptor(instance, "theGeneratedCertificate")
    assert related(rig, descriptor(instance, "card").id) == {generated.id: "HAS_A"}     # C9; C10: none for B
    assert {c.state for c in rig.certificates(process_instance_id=instance.id)} == {ISSUED}


def test_c9_always_relation_is_made_on_an_operation_with_a_card(tmp_path):
    rig, card, operated, _ = produce_then_operate(tmp_path, "always")
    assert operated.state == "SUCCEEDED", operated.error_message
    assert descriptor(operated, "newCert").id in related(rig, card.id)


def test_c9_always_relation_of_a_failed_operation_survives(tmp_path):
    rig, card, operated, _ = produce_then_operate(tmp_path, "always", fail_operation=True)
    assert operated.state == "FAILED"
    new = descriptor(operated, "newCert")
    assert new.id in related(rig, card.id) and rig.certificate(new.id).state == ISSUED


def test_c9_operation_without_card_fails_before_any_ca_request(tmp_path):
    rig, instance = operate_without_card(tmp_path, "always")
    assert (instance.state, instance.error_reason) == ("FAILED", "ENCODING_FAILED")
    assert "CreateObjectRelation=always" in instance.error_message
    assert rig.issued_by_ca() == {}                                      # nothing was asked of the CA
    assert rig.gateway.commands == []                                    # nor of the card
    assert rig.certificates() == []


# --- C10 success (the default) ----------------------------------------------------------------

@pytest.mark.parametrize("relation", ["success", None], ids=["explicit", "default"])
def test_c10_success_relation_is_made_when_the_whole_task_succeeds(tmp_path, relation):
    rig, card, operated, _ = produce_then_operate(tmp_path, relation)
    assert operated.state == "SUCCEEDED", operated.error_message
    assert related(rig, card.id)[descriptor(operated, "newCert").id] == "HAS_CERTIFICATE"


def test_c10_success_relation_is_not_made_when_the_task_fails(tmp_path):
    rig, card, operated, _ = produce_then_operate(tmp_path, "success", fail_operation=True)
    assert operated.state == "FAILED"
    new = descriptor(operated, "newCert")
    assert new.id not in related(rig, card.id)
    assert rig.relations(certificate_id=new.id) == []


def test_c10_operation_without_card_creates_no_relation_and_succeeds(tmp_path):
    rig, instance = operate_without_card(tmp_path, "success")
    assert instance.state == "SUCCEEDED", instance.error_message
    new = descriptor(instance, "newCert")
    assert rig.relations(certificate_id=new.id) == []
    assert rig.certificate(new.id).state == START


# --- C11 never --------------------------------------------------------------------------------

def test_c11_never_makes_no_relation_on_success(tmp_path):
    rig, _card, operated, _ = produce_then_operate(tmp_path, "never")
    assert operated.state == "SUCCEEDED", operated.error_message
    new = descriptor(operated, "newCert")
    assert rig.relations(certificate_id=new.id) == [] and rig.certificate(new.id).state == START


def test_c11_never_makes_no_relation_on_failure(tmp_path):
    rig, _card, operated, _ = produce_then_operate(tmp_path, "never", fail_operation=True)
    assert operated.state == "FAILED"
    assert rig.relations(certificate_id=descriptor(operated, "newCert").id) == []


# --- C12 ObjectRelationType -------------------------------------------------------------------

def test_c12_object_relation_type_names_the_relation(tmp_path):
    rig, card, operated, _ = produce_then_operate(tmp_path, "success", relation_type="OWNED_BY")
    assert related(rig, card.id)[descriptor(operated, "newCert").id] == "OWNED_BY"


def test_c12_configured_default_relation_type_when_none_is_named(tmp_path):
    rig, card, operated, _ = produce_then_operate(tmp_path, "success", default_relation_type="OWNS")
    types = related(rig, card.id)
    assert types[descriptor(operated, "newCert").id] == "OWNS"
    assert sorted(types.values()) == ["HAS_A", "OWNS", "OWNS"]     # production: A names HAS_A, B the default
