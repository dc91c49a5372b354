"""C6 (revokeOnIssue) and C7 (recovery: archived certificates written, never stored again),
on processes run against a fake gateway."""
from __future__ import annotations

import asyncio

from cryptography.hazmat.primitives import serialization

from shared import cards
from shared.errors import CardIoError
from tests.rules.processes import (
    ARCHIVED_ENCRYPTION,
    KEY_LIST_ENCODING,
    RECOVERY_ENCODING,
    key_list_process,
    operation_encoding,
    operation_process,
    produce_process,
    reader_of,
    recovery_process,
)
from tests.rules.rig import ISSUED, PIN, START, descriptor, fake_token, rule_orchestrator


def hold_on_issue(tmp_path, *, fail_write: bool = False):
    async def body():
        async with rule_orchestrator(tmp_path, encodings={"operation": operation_encoding(revoke_on_issue=True)},
                                     processes={"operate": operation_process(with_card=False)}) as rig:
            if fail_write:
                rig.gateway.fail(CardIoError("reader unplugged"), operation=cards.WriteCertificates)
            return rig, await rig.process("operate", pin=PIN)

    return asyncio.run(body())


def test_c6_revoke_on_issue_holds_at_the_ca_while_the_store_reaches_the_start_state(tmp_path):
    rig, instance = hold_on_issue(tmp_path)
    assert instance.state == "SUCCEEDED", instance.error_message
    cert = rig.certificate(descriptor(instance, "newCert").id)
    assert cert.state == START                                           # the store follows C1/C2
    assert rig.crl_reasons() == {cert.serial: "certificate_hold"}        # the CA holds it
    assert [c.der for c in rig.token.certificates.values()] == [cert.der]


def test_c6_revoke_on_issue_is_audited_with_the_task_and_the_ca(tmp_path):
    rig, instance = hold_on_issue(tmp_path)
    cert_id = descriptor(instance, "newCert").id
    [event] = rig.audit(object_id=cert_id, action="revoke_on_issue")
    assert event.detail["reason"] == "certificateHold" and event.detail["ca"] == "local"
    assert event.detail["task_id"] == rig.certificate(cert_id).task_id


def test_c6_held_certificate_of_a_failed_task_stays_in_the_issued_state(tmp_path):
    rig, instance = hold_on_issue(tmp_path, fail_write=True)
    assert instance.state == "FAILED"
    cert = rig.certificate(descriptor(instance, "newCert").id)
    assert cert.state == ISSUED                                          # C3 still applies
    assert rig.crl_reasons() == {cert.serial: "certificate_hold"}


def test_c6_configuration_warns_when_no_change_state_follows_revoke_on_issue(tmp_path):
    rig, _ = hold_on_issue(tmp_path)
    assert any("change_state" in w and "revokeOnIssue" in w for w in rig.orch.configuration.warnings)


def test_c6_no_hold_without_revoke_on_issue(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path, encodings={"operation": operation_encoding()},
                                     processes={"operate": operation_process(with_card=False)}) as rig:
            return rig, await rig.process("operate", pin=PIN)

    rig, instance = asyncio.run(body())
    assert instance.state == "SUCCEEDED" and rig.crl_reasons() == {}
    assert rig.audit(action="revoke_on_issue") == []


# --- C7 -----------------------------------------------------------------------------------

def archive_then(tmp_path, second_encoding: str, second_process: str, run_second, *, archived: int = 1):
    """Makes ARCHIVED certificates with archived keys on a first card, then runs RUN_SECOND(rig,
    descriptors, target_token) with the second card's process. Returns what it returns."""
    first, second = fake_token(label="old-card"), fake_token(label="new-card")

    async def body():
        encodings = {"operation": operation_encoding(issue=ARCHIVED_ENCRYPTION), "second": second_encoding}
        processes = {"operate": operation_process(with_card=False, reader=reader_of(first)),
                     "second": second_process.replace("encoding: recover-only", "encoding: second")
                                            .replace("encoding: key-list", "encoding: second")
                                            .replace("READER", reader_of(second))}
        async with rule_orchestrator(tmp_path, encodings=encodings, processes=processes,
                                     tokens=(first, second)) as rig:
            made = [await rig.process("operate", pin=PIN) for _ in range(archived)]
            assert [m.state for m in made] == ["SUCCEEDED"] * archived, made
            return await run_second(rig, [descriptor(m, "newCert") for m in made], second)

    return asyncio.run(body())


def test_c7_recovery_writes_the_archived_key_and_certificate_without_storing_again(tmp_path):
    async def recover(rig, olds, target):
        before = len(rig.certificates())
        instance = await rig.process("recover", old=olds[0], pin=PIN)
        return rig, olds[0], target, instance, before

    rig, old, target, instance, before = archive_then(
        tmp_path, RECOVERY_ENCODING.format(relation="never"), recovery_process("READER", with_card=False), recover)
    assert instance.state == "SUCCEEDED", instance.error_message
    assert len(rig.certificates()) == before                          # never stored again
    record = rig.certificate(old.id)
    assert record.state == START                                      # state untouched
    assert [a.action for a in rig.audit(object_id=old.id)] == ["recover"]
    [(key_id, written)] = target.certificates.items()
    assert written.der == record.der and written.label == "Encryption (previous)"
    key = target.keys[key_id].private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert target.keys[key_id].imported and key == target.keys[key_id].public_key_der


def test_c7_recovered_certificate_is_related_to_the_card_it_is_written_to(tmp_path):
    async def recover(rig, olds, target):
        # the new card is produced first, so the recovery runs on a card of the process map
        produced = await rig.process("produce", person="Jane Doe", pin=PIN)
        instance = await rig.process("recover", old=olds[0], card=descriptor(produced, "card"), pin=PIN)
        return rig, olds[0], descriptor(produced, "card"), instance

    first, second = fake_token(label="old-card"), fake_token(label="new-card")

    async def body():
        encodings = {"operation": operation_encoding(issue=ARCHIVED_ENCRYPTION),
                     "second": RECOVERY_ENCODING.format(relation="always")}
        processes = {"operate": operation_process(with_card=False, reader=reader_of(first)),
                     "produce": produce_process(reader=reader_of(second)),
                     "second": recovery_process(reader_of(second), with_card=True)
                     .replace("encoding: recover-only", "encoding: second")}
        async with rule_orchestrator(tmp_path, encodings=encodings, processes=processes,
                                     tokens=(first, second)) as rig:
            archived = await rig.process("operate", pin=PIN)
            return await recover(rig, [descriptor(archived, "newCert")], second)

    rig, old, card, instance = asyncio.run(body())
    assert instance.state == "SUCCEEDED", instance.error_message
    assert (old.id, "HAS_CERTIFICATE") in {(r.target_id, r.relation_type) for r in rig.relations(card_id=card.id)}
    assert rig.certificate(old.id).state == START


def test_c7_return_field_on_a_recovery_has_no_effect_and_is_warned_about(tmp_path):
    encoding = RECOVERY_ENCODING.format(relation="never").replace("[Fields]\n", "[Fields]\nNewCert=\n") \
        + "CertCoreObjectDescriptorReturnField=NewCert\n"
    process = recovery_process("READER", with_card=False).replace(
        'OldEncryptionCert: "${old}"', 'OldEncryptionCert: "${old}", NewCert: "${newCert}"')

    async def recover(rig, olds, target):
        return rig, olds[0], await rig.process("recover", old=olds[0], pin=PIN)

    rig, _old, instance = archive_then(tmp_path, encoding, process, recover)
    assert instance.state == "SUCCEEDED", instance.error_message
    assert "newCert" not in instance.process_map or instance.process_map["newCert"] is None
    assert any("no effect on a recovery" in w for w in rig.orch.configuration.warnings)


def test_c7_cert_key_list_writes_every_archived_pair_without_touching_the_store(tmp_path):
    async def restore(rig, olds, target):
        states = {d.id: rig.certificate(d.id).state for d in olds}
        before = len(rig.certificates())
        instance = await rig.process("restore", certs=olds, pin=PIN)
        return rig, olds, target, instance, states, before

    rig, olds, target, instance, states, before = archive_then(
        tmp_path, KEY_LIST_ENCODING, key_list_process("READER"),
        restore, archived=2)
    assert instance.state == "SUCCEEDED", instance.error_message
    assert {d.id: rig.certificate(d.id).state for d in olds} == states
    assert len(rig.certificates()) == before
    assert sorted(c.der for c in target.certificates.values()) == sorted(rig.certificate(d.id).der for d in olds)
    assert all(target.keys[kid].imported for kid in target.certificates)
