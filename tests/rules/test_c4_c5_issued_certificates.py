"""C4 (search in the internal issued state) and C5 (no automatic handling; handle_issued in
a process's error path), on processes run against a fake gateway."""
from __future__ import annotations

import asyncio
import datetime as dt

from shared import cards
from shared.errors import CardIoError
from tests.rules.processes import HANDLE_ALL_ON_ERROR, HANDLE_GENERATED_ON_ERROR, produce_process
from tests.rules.rig import ISSUED, PIN, START, descriptor, fake_token, rule_orchestrator


def failing_production(tmp_path, on_error: str = ""):
    """The EmployeeCard production; the card breaks while the second certificate is written."""
    async def body():
        async with rule_orchestrator(tmp_path, processes={"produce": produce_process(on_error=on_error)}) as rig:
            rig.gateway.fail(CardIoError("reader unplugged"), operation=cards.WriteCertificates, occurrence=2)
            instance = await rig.process("produce", person="Jane Doe", pin=PIN)
            return rig, instance

    return asyncio.run(body())


def test_c4_issued_certificates_of_a_failed_task_are_found_by_card_task_template_gateway_and_reader(tmp_path):
    rig, instance = failing_production(tmp_path)
    assert instance.state == "FAILED"
    [task] = rig.tasks(instance.id)
    card = descriptor(instance, "card")
    search = rig.orch.certificates.search_issued
    everything = {h.id for h in search()}
    assert len(everything) == 2
    assert {h.id for h in search(card_id=card.id)} == everything
    assert {h.id for h in search(task_id=task.id)} == everything
    assert {h.id for h in search(gateway_id="station-1", reader_id=rig.token.reader_id)} == everything
    assert [h.template for h in search(template="EmployeeSignature")] == ["EmployeeSignature"]
    assert search(gateway_id="another-station") == [] and search(template="EmployeeEncryption") == []


def test_c4_each_hit_carries_descriptor_serial_issuer_and_the_tasks_error(tmp_path):
    rig, instance = failing_production(tmp_path)
    hits = rig.orch.certificates.search_issued(process_instance_id=instance.id)
    assert len(hits) == 2
    for hit in hits:
        record = rig.certificate(hit.id)
        assert (hit.descriptor.type, hit.descriptor.template) == ("Certificate", record.template)
        assert (hit.serial_hex, hit.issuer) == (record.serial_hex, record.issuer)
        assert (hit.task_error_reason, hit.task_error_message) == ("CARD_IO", "reader unplugged")


def test_c4_search_by_age_finds_only_certificates_older_than_asked(tmp_path):
    rig, _instance = failing_production(tmp_path)
    search = rig.orch.certificates.search_issued
    now = dt.datetime.now(dt.UTC)
    assert search(older_than=dt.timedelta(hours=1), now=now) == []
    assert len(search(older_than=dt.timedelta(hours=1), now=now + dt.timedelta(hours=2))) == 2


def test_c4_certificates_of_a_successful_task_are_not_in_the_issued_search(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path, processes={"produce": produce_process()}) as rig:
            return rig, await rig.process("produce", person="Jane Doe", pin=PIN)

    rig, instance = asyncio.run(body())
    assert instance.state == "SUCCEEDED", instance.error_message
    assert rig.orch.certificates.search_issued() == []
    assert {c.state for c in rig.certificates(process_instance_id=instance.id)} == {START}


def test_c5_no_automatic_handling_of_issued_certificates_by_default(tmp_path):
    rig, instance = failing_production(tmp_path)
    assert not rig.orch.settings.issued_sweeper.enabled
    rig.orch.reconciler.reconcile_once()            # the periodic work of a running orchestrator
    certs = rig.certificates(process_instance_id=instance.id)
    assert {c.state for c in certs} == {ISSUED}
    assert rig.crl_reasons() == {}                  # nothing revoked
    assert all(rig.audit(object_id=c.id, action="handle_issued") == [] for c in certs)


def test_c5_on_error_path_revokes_the_generated_certificate_and_audits_it(tmp_path):
    rig, instance = failing_production(tmp_path, on_error=HANDLE_GENERATED_ON_ERROR)
    assert instance.state == "FAILED" and instance.error_reason == "CARD_IO"
    generated = descriptor(instance, "theGeneratedCertificate")
    states = {c.id: c.state for c in rig.certificates(process_instance_id=instance.id)}
    assert states.pop(generated.id) == "Revoked"                       # handled in the error path
    assert set(states.values()) == {ISSUED}                            # the other one: not named, not handled
    assert rig.crl_reasons()[rig.certificate(generated.id).serial] == "cessation_of_operation"
    actions = [a.action for a in rig.audit(object_id=generated.id)]
    # the intent before the CA call (C16), then the revocation and the move, each audited
    assert actions[0] == "ca_handling_intent" and set(actions[1:]) == {"handle_issued"} and len(actions) >= 3


def test_c5_handle_issued_without_names_handles_every_issued_certificate_of_the_instance(tmp_path):
    rig, instance = failing_production(tmp_path, on_error=HANDLE_ALL_ON_ERROR)
    certs = rig.certificates(process_instance_id=instance.id)
    assert len(certs) == 2 and {c.state for c in certs} == {"Revoked"}
    assert set(rig.crl_reasons()) == {c.serial for c in certs}


def test_c3_card_refusing_the_transport_puk_fails_before_any_certificate_is_requested(tmp_path):
    async def body():
        blank = fake_token(user_pin="0000", so_pin="another-puk")     # left the factory with another PUK
        async with rule_orchestrator(tmp_path, processes={"produce": produce_process()}, tokens=(blank,)) as rig:
            return rig, await rig.process("produce", person="Jane Doe", pin=PIN)

    rig, instance = asyncio.run(body())
    assert (instance.state, instance.error_reason) == ("FAILED", "PIN_INCORRECT")
    assert rig.certificates(process_instance_id=instance.id) == [] and rig.issued_by_ca() == {}
    assert rig.card(descriptor(instance, "card").id).state == "ProductionFailed"
    assert rig.token.user_pin == "0000" and rig.token.keys == {}          # the card is untouched
