"""A card produced through both processes on a real SoftHSM2 token, checked independently:
the certificate chain with `cryptography`, the token's contents with OpenSC's pkcs11-tool,
the store through the orchestrator's API."""
from __future__ import annotations

import re
import subprocess

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from shared.proto import ca_service_pb2 as ca_pb
from shared.proto import card_service_pb2 as card_pb
from shared.proto import certificate_service_pb2 as certificate_pb
from shared.proto import common_pb2, gateway_pb2, gateway_pb2_grpc, steps_pb2
from shared.proto import reader_pool_service_pb2 as pool_pb
from shared.rpc import error_from_rpc
from tests.support.api import OrchestratorApi
from tests.support.processes import channel as client_channel
from tests.support.processes import (
    gateway_process,
    orchestrator_process,
    wait_for_pooled_reader,
)

pytestmark = pytest.mark.hardware
SUBJECT = "CN=Jane Doe,O=Example"


@pytest.fixture
def station(tmp_path, softhsm_token):
    """An orchestrator and one gateway holding the test's token, as separate processes."""
    with (orchestrator_process(tmp_path / "orchestrator") as orch,
          gateway_process(orch, "station-1", tmp_path / "gateway", pkcs11_module=softhsm_token.module_path,
                          env=softhsm_token.env) as (gw, _proc)):
        pooled = wait_for_pooled_reader(orch, lambda r: r.reader.token_label == softhsm_token.label)
        yield orch, gw, pooled


def produce(orch: str, reader_id: str, pin: str,
            certificates=None) -> tuple[list[card_pb.ProduceCardResponse], card_pb.Task]:
    certificates = certificates or [
        card_pb.CertificateRequest(template="EmployeeAuthentication", key_type=common_pb2.KEY_TYPE_EC_P256),
        card_pb.CertificateRequest(template="EmployeeSignature", key_type=common_pb2.KEY_TYPE_RSA_2048)]
    with client_channel(orch) as channel:
        stub = OrchestratorApi.on(channel)
        events = list(stub.cards.ProduceCard(card_pb.ProduceCardRequest(
            reader=pool_pb.ReaderSelector(reader_id=reader_id), subject=SUBJECT, certificates=certificates,
            user_pin=pin, card_template="EmployeeCard")))
    return events, events[-1].task


def token_objects(token) -> str:
    """OpenSC's view of the token: an independent check of what the gateway wrote."""
    return subprocess.run(
        ["pkcs11-tool", "--module", token.module_path, "--token-label", token.label, "--login", "--pin",
         token.user_pin, "--list-objects"], env=token.env, capture_output=True, text=True, check=True).stdout


def test_production_end_to_end_on_softhsm_through_orchestrator_and_gateway(station, softhsm_token):
    orch, _gw, pooled = station
    events, task = produce(orch, pooled.reader.reader_id, softhsm_token.user_pin)
    assert task.state == card_pb.TASK_STATE_SUCCEEDED, task.error
    assert any("issued" in e.message for e in events) and any("written" in e.message for e in events)

    with client_channel(orch) as channel:
        stub = OrchestratorApi.on(channel)
        card = stub.cards.GetCard(card_pb.GetCardRequest(card_id=task.card_id)).card
        ca = x509.load_der_x509_certificate(stub.ca.GetCaCertificate(ca_pb.GetCaCertificateRequest()).certificate_der)
        certs = [stub.certificates.GetCertificate(certificate_pb.GetCertificateRequest(certificate_id=cid)).certificate
                 for cid in card.certificate_ids]
    assert card.serial == softhsm_token.serial and card.state == "Active"
    assert sorted(c.template for c in certs) == ["EmployeeAuthentication", "EmployeeSignature"]
    assert {c.state for c in certs} == {"Active"}          # C2: moved to the start state

    listing = token_objects(softhsm_token)
    for record in certs:
        cert = x509.load_der_x509_certificate(record.der)
        assert cert.subject.rfc4514_string() == SUBJECT
        cert.verify_directly_issued_by(ca)                 # the chain: signed by the orchestrator's CA
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey if record.template == "EmployeeAuthentication"
                          else rsa.RSAPublicKey)
        assert int(record.serial_hex, 16) == cert.serial_number
    # pkcs11-tool sees both certificates, each next to a private key with the same ID
    cert_ids = [line.split(":", 1)[1].strip() for line in _blocks(listing, "Certificate Object", "ID")]
    key_ids = [line.split(":", 1)[1].strip() for line in _blocks(listing, "Private Key Object", "ID")]
    assert len(cert_ids) == 2 and sorted(cert_ids) == sorted(key_ids)


def test_card_key_signs_and_the_signature_verifies_with_the_certificate(station, softhsm_token):
    """Proof that the certificate belongs to the key on the card: sign on the card, verify with the certificate."""
    orch, gw, pooled = station
    _events, task = produce(orch, pooled.reader.reader_id, softhsm_token.user_pin)
    assert task.state == card_pb.TASK_STATE_SUCCEEDED
    with client_channel(gw) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        listing = stub.RunStep(gateway_pb2.RunStepRequest(reader_id=pooled.reader.reader_id, step=steps_pb2.Step(
            credentials=steps_pb2.Credentials(user_pin=softhsm_token.user_pin),
            list_objects=steps_pb2.ListObjects()))).outcome.object_list.objects
        certificates = [o for o in listing if o.object_class == steps_pb2.OBJECT_CLASS_CERTIFICATE]
        assert len(certificates) == 2
        for obj in certificates:
            cert = x509.load_der_x509_certificate(obj.certificate_der)
            public_key = cert.public_key()
            is_ec = isinstance(public_key, ec.EllipticCurvePublicKey)
            algorithm = (common_pb2.SIGNATURE_ALGORITHM_ECDSA_SHA256 if is_ec
                         else common_pb2.SIGNATURE_ALGORITHM_RSA_PKCS1_SHA256)
            signature = stub.RunStep(gateway_pb2.RunStepRequest(reader_id=pooled.reader.reader_id, step=steps_pb2.Step(
                credentials=steps_pb2.Credentials(user_pin=softhsm_token.user_pin),
                sign=steps_pb2.Sign(key_id=obj.key_id, algorithm=algorithm,
                                    data=b"challenge")))).outcome.signed.signature
            if isinstance(public_key, ec.EllipticCurvePublicKey):
                public_key.verify(signature, b"challenge", ec.ECDSA(hashes.SHA256()))
            else:
                assert isinstance(public_key, rsa.RSAPublicKey)
                public_key.verify(signature, b"challenge", padding.PKCS1v15(), hashes.SHA256())


def test_wrong_pin_fails_the_task_before_anything_is_issued(station, softhsm_token):
    orch, _gw, pooled = station
    _events, task = produce(orch, pooled.reader.reader_id, "000000")
    assert task.state == card_pb.TASK_STATE_FAILED
    assert task.error.reason == "PIN_INCORRECT"
    assert list(task.certificate_ids) == []
    assert "Certificate Object" not in token_objects(softhsm_token)


def test_unknown_reader_is_a_not_found_error(station):
    orch, _gw, _pooled = station
    with pytest.raises(grpc.RpcError) as err:
        produce(orch, "pkcs11:softhsm2:no-such-token", "1234")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_from_rpc(err.value).reason == "READER_NOT_FOUND"


def test_unknown_template_is_rejected_before_a_task_starts(station, softhsm_token):
    orch, _gw, pooled = station
    with pytest.raises(grpc.RpcError) as err:
        produce(orch, pooled.reader.reader_id, softhsm_token.user_pin,
                [card_pb.CertificateRequest(template="EmployeeAuthentikation")])
    assert error_from_rpc(err.value).reason == "TEMPLATE_NOT_FOUND"
    assert "EmployeeAuthentication" in (err.value.details() or "")


def test_gateway_refuses_wrong_pin_with_a_permission_error(station, softhsm_token):
    _orch, gw, pooled = station
    with client_channel(gw) as channel, pytest.raises(grpc.RpcError) as err:
        gateway_pb2_grpc.GatewayServiceStub(channel).RunStep(gateway_pb2.RunStepRequest(
            reader_id=pooled.reader.reader_id, step=steps_pb2.Step(
                credentials=steps_pb2.Credentials(user_pin="999999"), list_objects=steps_pb2.ListObjects())))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_from_rpc(err.value).reason == "PIN_INCORRECT"


def _blocks(listing: str, header: str, field: str) -> list[str]:
    """Lines `field: ...` of every object block that starts with `header`."""
    found, inside = [], False
    for line in listing.splitlines():
        if line and not line.startswith(" "):
            inside = line.startswith(header)
        elif inside and line.strip().startswith(field + ":"):
            found.append(line.strip())
    return found


def test_missing_token_fails_cleanly_and_nothing_is_issued(station, softhsm_token):
    from tests.support import softhsm

    orch, _gw, pooled = station
    softhsm.delete_token(softhsm_token.conf_path, softhsm_token.serial)
    try:
        _events, task = produce(orch, pooled.reader.reader_id, softhsm_token.user_pin)
    except grpc.RpcError as exc:          # the gateway already reported the token gone
        assert error_from_rpc(exc).reason in {"CARD_NOT_PRESENT", "READER_NOT_FOUND"}
        return
    assert task.state == card_pb.TASK_STATE_FAILED
    assert task.error.reason in {"CARD_IO", "CARD_NOT_PRESENT", "CARD_REMOVED"}
    assert list(task.certificate_ids) == []


def test_health_and_reflection_on_both_processes(station):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from orchestrator.app import CLIENT_API, service_name

    orch, gw, _pooled = station
    expected = {orch: {service_name(m) for m in CLIENT_API} | {"cardline.orchestrator.v1.GatewayLink"},
                gw: {"cardline.gateway.v1.GatewayService"}}
    assert len(expected[orch]) >= 6     # one service per resource besides the link
    for address, services in expected.items():
        with client_channel(address) as channel:
            for service in services:
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
                assert health.status == health_pb2.HealthCheckResponse.SERVING, service
            answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            names = {s.name for a in answers for s in a.list_services_response.service}
            assert services <= names and "grpc.health.v1.Health" in names, names


def test_cli_lists_issued_certificates_and_shows_cards_as_json(station, softhsm_token):
    import json

    from tests.support.processes import CARDLINE

    orch, _gw, pooled = station
    produced = subprocess.run([CARDLINE, "produce", "--orchestrator", orch, "--reader-id", pooled.reader.reader_id,
                               "--subject", SUBJECT, "--card-template", "EmployeeCard", "--template",
                               "EmployeeAuthentication", "--secrets-stdin",
                               "--json"],
                              input=softhsm_token.user_pin + "\n", capture_output=True, text=True)
    assert produced.returncode == 0, produced.stderr
    task = json.loads(produced.stdout)
    # The PIN appears nowhere (ids and serials are hex runs that may contain its digits by chance).
    assert softhsm_token.user_pin not in re.sub(r"[0-9a-fA-F-]{8,}", "", produced.stdout + produced.stderr)
    shown = json.loads(subprocess.run([CARDLINE, "cards", "show", task["card_id"], "--orchestrator", orch, "--json"],
                                      capture_output=True, text=True, check=True).stdout)
    assert shown["id"] == task["card_id"] and shown["state"] == "Active" and len(shown["certificate_ids"]) == 1
    active = json.loads(subprocess.run([CARDLINE, "certs", "list", "--state", "Active", "--orchestrator", orch,
                                        "--json"], capture_output=True, text=True, check=True).stdout)
    issued = json.loads(subprocess.run([CARDLINE, "certs", "list", "--state", "Issued", "--orchestrator", orch,
                                        "--json"], capture_output=True, text=True, check=True).stdout)
    assert [c["id"] for c in active] == shown["certificate_ids"] and issued == []
    missing = subprocess.run([CARDLINE, "cards", "show", "no-such-card", "--orchestrator", orch],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    # The task of the card, with its type and state as API enum names (docs/api.md).
    task_shown = json.loads(subprocess.run([CARDLINE, "cards", "task", task["id"], "--orchestrator", orch, "--json"],
                                           capture_output=True, text=True, check=True).stdout)
    assert (task_shown["type"], task_shown["state"]) == ("TASK_TYPE_CARD_PRODUCTION", "TASK_STATE_SUCCEEDED")
    listed = subprocess.run([CARDLINE, "process", "list", "--orchestrator", orch], capture_output=True, text=True)
    assert listed.returncode == 0 and "card_production" in listed.stdout, listed.stderr
    bad = subprocess.run([CARDLINE, "certs", "issued", "--older-than", "5x", "--orchestrator", orch],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "duration '5x'" in bad.stderr
