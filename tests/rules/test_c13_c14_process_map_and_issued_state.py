"""C13 (CertCoreObjectDescriptorReturnField), C14 (the internal issued state's name), C6's
change_state follow-up and C17 (change state through the CA) on processes run against a
fake gateway; plus the gateway itself going away in the middle of a task (C3)."""
from __future__ import annotations

import asyncio

import pytest

from orchestrator import app as orchestrator_app
from shared import cards
from shared.errors import CardIoError, ConfigurationError
from tests.rules.processes import operation_encoding, operation_process, produce_process
from tests.rules.rig import ISSUED, PIN, START, descriptor, rule_orchestrator, settings_for, write_config


def run_produce(tmp_path, *, fail: bool = False, fields: str | None = None, **options):
    async def body():
        process = produce_process(**({"fields": fields} if fields is not None else {}))
        async with rule_orchestrator(tmp_path, processes={"produce": process}, **options) as rig:
            if fail:
                rig.gateway.fail(CardIoError("reader unplugged"), operation=cards.WriteCertificates, occurrence=2)
            return rig, await rig.process("produce", person="Jane Doe", pin=PIN)

    return asyncio.run(body())


# --- C13 ----------------------------------------------------------------------------------

def test_c13_return_field_holds_the_generated_certificate_after_success(tmp_path):
    rig, instance = run_produce(tmp_path)
    assert instance.state == "SUCCEEDED", instance.error_message
    generated = descriptor(instance, "theGeneratedCertificate")
    record = rig.certificate(generated.id)
    assert (generated.type, generated.template) == ("Certificate", "EmployeeAuthentication")
    assert (record.template, record.state) == ("EmployeeAuthentication", START)     # Application_A's, not B's
    assert rig.process_instance(instance.id).process_map == instance.process_map   # stored


def test_c13_return_field_holds_the_descriptor_after_a_failed_task(tmp_path):
    rig, instance = run_produce(tmp_path, fail=True)
    assert instance.state == "FAILED"
    generated = descriptor(instance, "theGeneratedCertificate")
    assert rig.certificate(generated.id).state == ISSUED       # the error path can find and revoke it


def test_c13_without_return_field_no_descriptor_reaches_the_process_map(tmp_path):
    async def body():
        async with rule_orchestrator(tmp_path, encodings={"operation": operation_encoding(return_field=False)},
                                     processes={"operate": operation_process(with_card=False)}) as rig:
            return rig, await rig.process("operate", pin=PIN)

    rig, instance = asyncio.run(body())
    assert instance.state == "SUCCEEDED", instance.error_message
    assert not any(isinstance(v, dict) and v.get("type") == "Certificate" for v in instance.process_map.values())
    assert len(rig.certificates(process_instance_id=instance.id)) == 1


def start_with(tmp_path, **config):
    cfg = write_config(tmp_path / "config", **config)
    return asyncio.run(orchestrator_app.start(settings_for(tmp_path, cfg)))


def test_c13_return_field_mapped_to_a_literal_stops_start_up_with_the_process_line(tmp_path):
    process = produce_process(fields='GeneratedCertApp_A: "theGeneratedCertificate"')
    with pytest.raises(ConfigurationError) as err:
        start_with(tmp_path, processes={"produce": process})
    assert "produce.yaml:" in str(err.value) and "GeneratedCertApp_A" in str(err.value)


def test_c13_return_field_not_declared_in_fields_stops_start_up(tmp_path):
    encoding = operation_encoding().replace("NewCert=\n", "")
    with pytest.raises(ConfigurationError) as err:
        start_with(tmp_path, encodings={"operation": encoding},
                   processes={"operate": operation_process(with_card=False)})
    assert "operation.ini:" in str(err.value) and "NewCert" in str(err.value)


# --- C14 ----------------------------------------------------------------------------------

def custom_issued_state(tmp_path):
    """examples/ with the internal issued state renamed to MyCustomState everywhere."""
    cfg = write_config(tmp_path / "config", processes={"produce": produce_process()})
    for path in [cfg / "state-graphs" / "certificate.yaml", *(cfg / "templates").glob("*.yaml")]:
        path.write_text(path.read_text().replace("Issued", "MyCustomState"))
    return cfg


def test_c14_configuration_disagreeing_with_the_internal_issued_state_stops_start_up_listing_all(tmp_path):
    cfg = custom_issued_state(tmp_path)
    with pytest.raises(ConfigurationError) as err:          # configured "Issued", files say MyCustomState
        asyncio.run(orchestrator_app.start(settings_for(tmp_path, cfg)))
    assert str(err.value).count("\n") >= 2                  # every violation listed, not only the first


def test_c14_custom_internal_issued_state_end_to_end(tmp_path):
    examples = custom_issued_state(tmp_path / "source")
    options = {"examples": examples, "certificate_internal_issued_state": "MyCustomState"}
    rig, ok = run_produce(tmp_path / "ok", **options)
    assert ok.state == "SUCCEEDED", ok.error_message
    assert {c.state for c in rig.certificates(process_instance_id=ok.id)} == {START}
    rig, failed = run_produce(tmp_path / "failed", fail=True, **options)
    assert failed.state == "FAILED"
    assert {c.state for c in rig.certificates(process_instance_id=failed.id)} == {"MyCustomState"}
    assert {h.id for h in rig.orch.certificates.search_issued()} == {
        c.id for c in rig.certificates(process_instance_id=failed.id)}


# --- C6's follow-up and C17 ------------------------------------------------------------------

HOLD_THEN_CHANGE_STATE = """\
  - type: change_state
    certificates: "${newCert}"
    state: OnHold
    reason: suspended
"""


def test_c6_change_state_after_revoke_on_issue_brings_the_store_in_line_with_the_ca(tmp_path):
    async def body():
        async with rule_orchestrator(
                tmp_path, encodings={"operation": operation_encoding(revoke_on_issue=True)},
                processes={"operate": operation_process(with_card=False) + HOLD_THEN_CHANGE_STATE}) as rig:
            return rig, await rig.process("operate", pin=PIN)

    rig, instance = asyncio.run(body())
    assert instance.state == "SUCCEEDED", instance.error_message
    cert = rig.certificate(descriptor(instance, "newCert").id)
    assert cert.state == "OnHold" and rig.crl_reasons() == {cert.serial: "certificate_hold"}
    assert not any("revokeOnIssue" in w for w in rig.orch.configuration.warnings)   # no warning needed


def change_state_in_ca(tmp_path, state: str, reason: str = ""):
    change = f'  - type: change_state_in_ca\n    certificates: "${{newCert}}"\n    state: {state}\n' \
        + (f"    reason: {reason}\n" if reason else "")

    async def body():
        async with rule_orchestrator(tmp_path, encodings={"operation": operation_encoding()},
                                     processes={"operate": operation_process(with_card=False) + change}) as rig:
            return rig, await rig.process("operate", pin=PIN)

    return asyncio.run(body())


def test_c17_change_state_in_ca_maps_the_hold_state_to_certificate_hold(tmp_path):
    rig, instance = change_state_in_ca(tmp_path, "OnHold", "suspended")
    assert instance.state == "SUCCEEDED", instance.error_message
    cert = rig.certificate(descriptor(instance, "newCert").id)
    assert cert.state == "OnHold" and rig.crl_reasons() == {cert.serial: "certificate_hold"}
    assert [a.action for a in rig.audit(object_id=cert.id, action="change_state_in_ca")] == ["change_state_in_ca"]


def test_c17_a_typo_in_the_target_state_stops_start_up_so_nothing_can_be_revoked(tmp_path):
    with pytest.raises(ConfigurationError, match=r"unknown state 'Activ' \(did you mean 'Active'\?\)"):
        change_state_in_ca(tmp_path, "Activ")


# --- the gateway going away (C3) --------------------------------------------------------------

def test_c3_gateway_gone_after_issuance_leaves_the_certificate_issued(tmp_path):
    async def hook(name, task_id):
        if name == "after_store":
            await holder["rig"].gateway.close()       # the station drops its link

    holder: dict = {}

    async def body():
        async with rule_orchestrator(tmp_path, boundary=hook) as rig:
            holder["rig"] = rig
            return rig, await rig.produce("EmployeeAuthentication")

    rig, outcome = asyncio.run(body())
    assert (outcome.task.state, outcome.task.error_reason) == ("FAILED", "GATEWAY_NOT_CONNECTED")
    [cert] = rig.certificates(task_id=outcome.task.id)
    assert cert.state == ISSUED and cert.task_error_reason == "GATEWAY_NOT_CONNECTED"
