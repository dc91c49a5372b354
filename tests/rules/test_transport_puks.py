"""Secrets go only where needed (docs/templates.md "Transport PUKs"): every blank card is
authenticated with its own transport PUK, derived for the serial of the card the task read and
recorded; a station claiming or holding another card gets no PUK at all, and the user PIN
travels only with the steps that log in to the card."""
from __future__ import annotations

import asyncio
import dataclasses

from shared import cards
from tests.rules.processes import produce_process
from tests.rules.rig import PIN, descriptor, fake_token, rule_orchestrator
from tests.support.transport_puk import transport_puk

NEW_PIN = "97531"


def _producing_on(*tokens) -> dict[str, str]:
    """A production process per token (produce-0, produce-1, ...), each on that token's reader
    (the example EmployeeCard: SetPIN with the transport PUK)."""
    return {f"produce-{i}": produce_process(f"produce-{i}", reader=f'{{reader: "{t.reader_id}"}}')
            for i, t in enumerate(tokens)}


def _sent_to(rig, token):
    return [c for c in rig.gateway.commands if c.reader_id == token.reader_id]


def test_two_blank_cards_are_each_authenticated_with_their_own_transport_puk(tmp_path):
    first, second = fake_token(), fake_token()

    async def body():
        async with rule_orchestrator(tmp_path, processes=_producing_on(first, second), tokens=(first, second)) as rig:
            return rig, [await rig.process(f"produce-{i}", person="Jane Doe", pin=PIN) for i in range(2)]

    rig, produced = asyncio.run(body())
    assert [p.state for p in produced] == ["SUCCEEDED", "SUCCEEDED"], [p.error_message for p in produced]
    puks = [[c.so_pin for c in _sent_to(rig, t) if isinstance(c.operation, cards.SetPins)] for t in (first, second)]
    assert puks == [[transport_puk(first.serial)], [transport_puk(second.serial)]]
    assert puks[0] != puks[1]


def test_a_station_claiming_a_produced_cards_serial_gets_no_puk(tmp_path):
    """Hostile station (valid certificate): its reader answers ReadCardInfo with the serial of a
    card produced elsewhere. The production is refused before any secret is sent."""
    honest, liar = fake_token(), fake_token()

    async def body():
        async with rule_orchestrator(tmp_path, processes=_producing_on(honest, liar), tokens=(honest, liar)) as rig:
            produced = await rig.process("produce-0", person="Jane Doe", pin=PIN)
            claimed = dataclasses.replace(liar.reader(), token_serial=honest.serial)
            liar.reader = lambda: claimed  # type: ignore[method-assign]  # lies from now on
            hostile = await rig.process("produce-1", person="Eve", pin=PIN)
            return rig, produced, hostile

    rig, produced, hostile = asyncio.run(body())
    assert produced.state == "SUCCEEDED", produced.error_message
    assert hostile.state == "FAILED" and honest.serial in hostile.error_message
    sent = _sent_to(rig, liar)
    assert [type(c.operation) for c in sent] == [cards.ReadCardInfo]
    assert all(c.so_pin == "" and c.user_pin == "" for c in sent)


def test_an_operation_on_a_reader_holding_another_card_sends_it_no_secret(tmp_path):
    """unblock-pin for card A while the only reader with a card holds card B: the orchestrator
    reads B's serial and refuses; neither a PUK nor the holder's new PIN reaches the station."""
    card_a, card_b = fake_token(), fake_token()

    async def body():
        async with rule_orchestrator(tmp_path, processes=_producing_on(card_a), tokens=(card_a, card_b)) as rig:
            produced = await rig.process("produce-0", person="Jane Doe", pin=PIN)
            assert produced.state == "SUCCEEDED", produced.error_message
            card_a.lose()
            unblock = await rig.process("unblock-pin", card=descriptor(produced, "card"), new_pin=NEW_PIN)
            return rig, unblock

    rig, unblock = asyncio.run(body())
    assert unblock.state == "FAILED" and card_b.serial in unblock.error_message
    sent = _sent_to(rig, card_b)
    assert sent and all(isinstance(c.operation, cards.ReadCardInfo) for c in sent)
    assert all(c.so_pin == "" and c.user_pin == "" for c in sent)
    assert card_b.user_pin == PIN


def test_the_user_pin_travels_only_with_steps_that_log_in(tmp_path):
    token = fake_token()

    async def body():
        async with rule_orchestrator(tmp_path, processes=_producing_on(token), tokens=(token,)) as rig:
            return rig, await rig.process("produce-0", person="Jane Doe", pin=PIN)

    rig, produced = asyncio.run(body())
    assert produced.state == "SUCCEEDED", produced.error_message
    by_kind = {type(c.operation): c for c in rig.gateway.commands}
    assert by_kind[cards.ReadCardInfo].user_pin == "" and by_kind[cards.ReadCardInfo].so_pin == ""
    assert by_kind[cards.GenerateKeyPair].user_pin == PIN and by_kind[cards.GenerateKeyPair].so_pin == ""
    assert by_kind[cards.SetPins].so_pin == transport_puk(token.serial)
