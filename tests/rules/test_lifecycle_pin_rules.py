"""PIN change and unblock (docs/lifecycle.md) on a fake token that counts PIN attempts like a
smart card (SoftHSM2 keeps no counter; tests/integration/test_lifecycle_pin.py runs the same
processes on it): a wrong PIN reports the attempts remaining, typed, down to a blocked PIN;
`unblock-pin` unblocks it with the card's own PUK from the orchestrator and the new PIN works."""
from __future__ import annotations

import asyncio

from orchestrator.services.card_tasks import task_error
from shared.errors import PinIncorrect, PinLocked
from tests.rules.processes import produce_process
from tests.rules.rig import PIN, descriptor, fake_token, rule_orchestrator

NEW_PIN, CARD_PUK = "97531", "card-own-puk"


def test_wrong_pins_report_attempts_remaining_until_blocked_and_unblock_pin_with_the_card_puk_unblocks(tmp_path):
    token = fake_token(pin_tries=3)

    async def body():
        async with rule_orchestrator(tmp_path, processes={"produce": produce_process()}, tokens=(token,)) as rig:
            produced = await rig.process("produce", person="Jane Doe", pin=PIN)
            card = descriptor(produced, "card")
            errors = []
            for _ in range(3):
                wrong = await rig.process("change-pin", card=card, pin="000000", new_pin=NEW_PIN)
                errors.append(task_error(rig.tasks(wrong.id)[0]))
            blocked = await rig.process("change-pin", card=card, pin=PIN, new_pin=NEW_PIN)
            # The card has its own PUK now, which the orchestrator keeps (the transport PUK no longer works).
            token.so_pin = CARD_PUK
            puks = rig.orch.card_tasks.card_puks
            assert puks is not None
            await asyncio.to_thread(puks.set, token.serial, CARD_PUK, actor="test")
            unblocked = await rig.process("unblock-pin", card=card, new_pin=NEW_PIN)
            changed = await rig.process("change-pin", card=card, pin=NEW_PIN, new_pin=PIN)
            return produced, errors, task_error(rig.tasks(blocked.id)[0]), unblocked, changed

    produced, errors, blocked, unblocked, changed = asyncio.run(body())
    assert produced.state == "SUCCEEDED", produced.error_message
    assert [type(e) for e in errors[:2]] == [PinIncorrect, PinIncorrect]
    assert [e.attempts_remaining for e in errors[:2]] == [2, 1]             # typed, counted down
    assert isinstance(errors[2], PinLocked) and isinstance(blocked, PinLocked)   # the right PIN no longer helps
    assert unblocked.state == "SUCCEEDED", unblocked.error_message
    assert changed.state == "SUCCEEDED", changed.error_message               # the new PIN works
    assert token.user_pin == PIN and token.user_tries_left == 3


def test_unblock_pin_without_a_puk_kept_falls_back_to_the_transport_puk_never_to_the_station(tmp_path):
    """A card that never got its own PUK still has the factory one, which the orchestrator
    reads from the card template's transport PUK file; the process takes no PUK input at all."""
    async def body():
        async with rule_orchestrator(tmp_path, processes={"produce": produce_process()}) as rig:
            produced = await rig.process("produce", person="Jane Doe", pin=PIN)
            unblock = rig.orch.processes.definition("unblock-pin")
            unblocked = await rig.process("unblock-pin", card=descriptor(produced, "card"), new_pin=NEW_PIN)
            return rig, unblock, unblocked

    rig, unblock, unblocked = asyncio.run(body())
    assert unblock.inputs == ("card", "new_pin") and unblock.secret_inputs == ("new_pin",)
    assert unblocked.state == "SUCCEEDED", unblocked.error_message
    assert rig.token.user_pin == NEW_PIN
