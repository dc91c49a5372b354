"""The orchestrator takes a gateway's answer only when it is the outcome of the step it sent
(issue 10, steps bound to their caller): a DeleteObjects answered with card info — an older
answer replayed, or a station lying — fails the task with STEP_OUTCOME_MISMATCH naming both
kinds, journaled on the step; a raw step of a lease is refused the same way. The honest run
of the same work is next to each hostile one."""
from __future__ import annotations

import asyncio

import pytest

from orchestrator.domain.processes import CoreObjectDescriptor
from orchestrator.services.pool import ReaderSelector
from shared import cards
from shared.errors import StepOutcomeMismatch
from tests.rules.rig import PIN, rule_orchestrator

AUTH = "EmployeeAuthentication"


async def _produced_card(rig) -> CoreObjectDescriptor:
    outcome = await rig.produce(AUTH)
    assert outcome.task.state == "SUCCEEDED", outcome.task.error_message
    assert outcome.card is not None
    return outcome.card


def test_retire_card_deletes_the_objects_when_the_gateway_answers_each_step_with_its_own_kind(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path) as rig:
            card = await _produced_card(rig)
            instance = await rig.process("retire-card", card=card, pin=PIN)
            return rig, instance

    rig, instance = asyncio.run(body())
    assert instance.state == "SUCCEEDED", instance.error_message
    assert rig.token.keys == {} and rig.token.certificates == {}
    assert rig.gateway.operations(cards.DeleteObjects)


def test_step_outcome_of_another_kind_fails_the_task_naming_expected_and_received(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path) as rig:
            card = await _produced_card(rig)
            # The station answers the first DeleteObjects with the card info it read earlier.
            rig.gateway.answer_with(rig.token.reader(), operation=cards.DeleteObjects)
            instance = await rig.process("retire-card", card=card, pin=PIN)
            [task] = [t for t in rig.tasks(instance.id) if t.type == "card_operation"]
            return rig, card, instance, task, rig.orch.store.tasks.steps(task.id)

    rig, card, instance, task, steps = asyncio.run(body())
    assert instance.state == "FAILED" and instance.error_reason == "STEP_OUTCOME_MISMATCH"
    assert (task.state, task.error_reason) == ("FAILED", "STEP_OUTCOME_MISMATCH")
    assert "card_info" in task.error_message and "objects_deleted" in task.error_message
    assert task.error_details["expected"] == "objects_deleted" and task.error_details["received"] == "card_info"
    refused = [s for s in steps if s.state == "refused"]
    assert [s.name.split(":")[0] for s in refused] == ["delete_objects"]
    assert "card_info" in refused[0].detail
    # Taken for nothing: the card was not retired, the process stopped at the refused step.
    assert rig.card(card.id).state != "Retired"
    assert len(rig.gateway.operations(cards.DeleteObjects)) == 1


def test_leased_raw_step_answered_with_another_kind_is_refused(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path) as rig:
            leases = rig.orch.leases
            assert leases is not None
            lease = await leases.acquire(ReaderSelector(reader_id=rig.token.reader_id), holder="raw-steps")
            honest = await leases.run_step(lease.lease_id, cards.Step(cards.ListObjects(), user_pin=PIN))
            rig.gateway.answer_with(cards.PinsSet(), operation=cards.ListObjects)
            with pytest.raises(StepOutcomeMismatch) as refused:
                await leases.run_step(lease.lease_id, cards.Step(cards.ListObjects(), user_pin=PIN))
            leases.release(lease.lease_id)
            return honest, refused.value

    honest, refused = asyncio.run(body())
    assert isinstance(honest, cards.ObjectListing)
    assert (refused.expected, refused.received) == ("object_list", "pins_set")
    assert refused.gateway_id == "station-1"
