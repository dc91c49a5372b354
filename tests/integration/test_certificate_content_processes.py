"""The orchestrator decides what a certificate says, with a real `cardline orchestrator serve`
process: a hostile station (the fake gateway of tests/support/fake_gateway.py — no real
gateway has a lying driver — speaking the link protocol over mutual TLS with its valid gateway
certificate) answers key generation with its own subject, subjectAltNames and a CA basic
constraint. An admin client starts produce-badge over the API: the certificate the API
returns carries the template's subject and subjectAltNames only, for the local CA and for
`openssl ca`, and the store's audit records the ignored request (docs/templates.md)."""
from __future__ import annotations

import asyncio
import shutil
from typing import Any

import pytest
import yaml
from cryptography import x509

from orchestrator.store import Store
from shared.proto import certificate_service_pb2 as certificate_pb
from shared.proto import common_pb2
from shared.proto import process_service_pb2 as process_pb
from tests.rules.rig import PIN, fake_token, write_config
from tests.rules.test_certificate_content import BADGE_ENCODING, BADGE_PROCESS, BADGE_TEMPLATES, LYING_CSR
from tests.support.api import OrchestratorApi
from tests.support.fake_gateway import FakeGateway
from tests.support.pki import default_pki
from tests.support.processes import orchestrator_process

# Starts `cardline` processes: with the hardware tests (tests/conftest.py keeps the fast suite free of them).
pytestmark = pytest.mark.hardware

EVIL = ("orchestrator.example", "ceo@example.com", "https://evil.example/admin")


async def produce_badge_over_the_api(address: str, gateway: FakeGateway) -> tuple[process_pb.ProcessInstance,
                                                                                   certificate_pb.Certificate]:
    await gateway.connect(address)
    try:
        async with default_pki().aio_channel(address) as channel:
            api: Any = OrchestratorApi.on(channel)      # aio stubs, typed as the blocking ones
            responses = [r async for r in api.processes.StartProcess(process_pb.StartProcessRequest(
                process="produce-badge", secret_inputs={"pin": PIN},
                inputs={"person": common_pb2.Value(text="Jane Doe"),
                        "email": common_pb2.Value(text="jane.doe@example.com")}))]
            instance = responses[-1].instance
            assert instance.state == process_pb.PROCESS_STATE_SUCCEEDED, instance.error.message
            listed = await api.certificates.ListCertificates(certificate_pb.ListCertificatesRequest(
                template="BadgeAuthentication"))
            [certificate] = listed.certificates
            return instance, certificate
    finally:
        await gateway.close()


@pytest.mark.parametrize("ca_kind", [
    "local",
    pytest.param("openssl", marks=pytest.mark.skipif(shutil.which("openssl") is None,
                                                      reason="needs the openssl command")),
])
def test_hostile_gateway_to_a_real_orchestrator_process_gets_the_templates_subject_and_sans(tmp_path, ca_kind):
    ca_name = "departmental" if ca_kind == "openssl" else "local"
    config_dir = write_config(tmp_path / "config", encodings={"badge-card": BADGE_ENCODING},
                              processes={"produce-badge": BADGE_PROCESS},
                              templates={"badge": BADGE_TEMPLATES.format(ca=ca_name)})
    settings = tmp_path / "settings.yaml"
    cas = [{"name": "departmental", "kind": "openssl", "directory": str(tmp_path / "dept-ca")}] \
        if ca_kind == "openssl" else []
    settings.write_text(yaml.safe_dump({"orchestrator": {"config_dir": str(config_dir), "cas": cas}}))
    data_dir = tmp_path / "orchestrator"
    gateway = FakeGateway("station-1", (fake_token(lying_csr=LYING_CSR),), site="hq")
    with orchestrator_process(data_dir, args=("--config", str(settings))) as address:
        instance, certificate = asyncio.run(produce_badge_over_the_api(address, gateway))

    cert = x509.load_der_x509_certificate(certificate.der)
    assert cert.subject == x509.Name.from_rfc4514_string("CN=Jane Doe,OU=Badges,O=Example")
    assert certificate.subject == "CN=Jane Doe,OU=Badges,O=Example"
    card_id = instance.process_map["card"].descriptor.id
    assert list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value) == [
        x509.RFC822Name("jane.doe@example.com"), x509.UniformResourceIdentifier(f"urn:uuid:{card_id}")]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert f"CN=cardline {ca_name} CA" in cert.issuer.rfc4514_string()      # the CA the template names

    rows = Store(f"sqlite:///{data_dir / 'cardline.db'}").audit.list(action="csr_request_ignored")
    [row] = rows
    assert row.object_id == certificate.task_id and row.actor == "gateway:station-1"
    assert row.detail["requested"]["subject"] == "'CN=Evil Chosen CN'"
    for evil in EVIL:
        assert any(evil in shown for shown in row.detail["requested"]["subject_alt_names"]), evil
