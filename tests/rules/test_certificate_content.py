"""The orchestrator decides what a certificate says (docs/templates.md, "Subject and
subjectAltNames"): the subject and subjectAltNames come from the certificate template and the
process inputs; a card's request contributes only its key and the proof of possession.

A hostile station (the fake gateway over the real link, mutual TLS with a valid gateway
certificate) answers key generation with a request of its own — `CN=Evil Chosen CN`,
subjectAltNames DNS:orchestrator.example, email:ceo@example.com and a URI, a CA basic
constraint: the certificate the CA issues and the store keeps carries the template's content
only, for the local CA and for `openssl ca`, and the audit records what was asked for."""
from __future__ import annotations

import asyncio
import shutil
from typing import Any

import pytest
from cryptography import x509

from shared.errors import InvalidArgument
from tests.rules.rig import PIN, descriptor, fake_token, rule_orchestrator
from tests.support.fake_gateway import LyingCsr

EVIL_NAMES = (x509.DNSName("orchestrator.example"), x509.RFC822Name("ceo@example.com"),
              x509.UniformResourceIdentifier("https://evil.example/admin"))
LYING_CSR = LyingCsr("CN=Evil Chosen CN", (x509.SubjectAlternativeName(list(EVIL_NAMES)),
                                           x509.BasicConstraints(ca=True, path_length=None)))

BADGE_TEMPLATES = """\
    certificate_templates:
      - name: BadgeAuthentication
        ca: {ca}
        key_type: EC_P256
        validity_days: 30
        key_usage: [digitalSignature]
        extended_key_usage: [clientAuth]
        subject: "CN=${{person}},OU=Badges,O=Example"
        subject_alt_names:
          - email: "${{email}}"
          - uri: "urn:uuid:${{card_id}}"
        state_graph: EmployeeCertificate
        internal_issued_state: Issued
    card_templates:
      - name: BadgeCard
        state_graph: EmployeeCard
        encoding: badge-card
        transport_puk_key_file: transport-puk.key
        produced_state: Active
        failed_state: ProductionFailed
    """
BADGE_ENCODING = """\
    [Encoding]
    Type=Chip

    [Fields]
    USER_PIN=

    [Description]
    SetPIN=true
    PIN=USER_PIN

    [Application_A]
    GenerateKeyPair=EC_P256
    CertificateTemplate=BadgeAuthentication
    KeyLabel=Badge
    """
BADGE_PROCESS = """\
    name: produce-badge
    inputs: [person, email, pin]
    secret_inputs: [pin]
    tasks:
      - type: card_production
        card_template: BadgeCard
        reader: {kind: pkcs11}
        fields:
          USER_PIN: "${pin}"
        holder: "${person}"
        card: "${card}"
    """
CAS = {"local": {}, "openssl": {"name": "departmental", "kind": "openssl"}}


def produce_badge(tmp_path, ca_kind: str, lying_csr: LyingCsr | None):
    """Runs produce-badge for Jane Doe on a token that lies (or not); the rig, the process
    instance, the stored certificate, the CA's copy of it and the task's audit rows."""
    ca = CAS[ca_kind]
    settings: dict[str, Any] = {"cas": [{**ca, "directory": str(tmp_path / "departmental-ca")}]} if ca else {}

    async def body():
        async with rule_orchestrator(
                tmp_path, templates={"badge": BADGE_TEMPLATES.format(ca=ca.get("name", "local"))},
                encodings={"badge-card": BADGE_ENCODING}, processes={"produce-badge": BADGE_PROCESS},
                tokens=(fake_token(lying_csr=lying_csr),), **settings) as rig:
            instance = await rig.process("produce-badge", person="Jane Doe", email="jane.doe@example.com", pin=PIN)
            assert instance.state == "SUCCEEDED", instance.error_message
            [stored] = rig.certificates(process_instance_id=instance.id)
            [request] = rig.ca_requests(stored.task_id)
            issued_by_ca = await asyncio.to_thread(rig.orch.cas[ca.get("name", "local")].find_issued,
                                                   request.request_id)
            audit = [a for a in rig.audit(action="csr_request_ignored") if a.object_id == stored.task_id]
            return rig, instance, stored, issued_by_ca, audit

    return asyncio.run(body())


def badge_content_is_the_templates(instance, stored, issued_by_ca) -> x509.Certificate:
    card_id = descriptor(instance, "card").id
    assert issued_by_ca == stored.der                 # what the CA issued is what the store keeps
    cert = x509.load_der_x509_certificate(stored.der)
    assert cert.subject == x509.Name.from_rfc4514_string("CN=Jane Doe,OU=Badges,O=Example")
    assert stored.subject == "CN=Jane Doe,OU=Badges,O=Example"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(san.value) == [x509.RFC822Name("jane.doe@example.com"),
                               x509.UniformResourceIdentifier(f"urn:uuid:{card_id}")]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    return cert


ca_kinds = pytest.mark.parametrize("ca_kind", [
    "local",
    pytest.param("openssl", marks=pytest.mark.skipif(shutil.which("openssl") is None,
                                                      reason="needs the openssl command")),
])


@ca_kinds
def test_hostile_gateway_csr_subject_and_sans_are_ignored_and_audited(tmp_path, ca_kind):
    rig, instance, stored, issued_by_ca, audit = produce_badge(tmp_path, ca_kind, LYING_CSR)
    cert = badge_content_is_the_templates(instance, stored, issued_by_ca)
    issued_names = {n.value for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}
    assert not issued_names & {"orchestrator.example", "ceo@example.com", "https://evil.example/admin"}
    assert "Evil" not in cert.subject.rfc4514_string()
    [row] = audit
    assert row.actor == "gateway:station-1" and row.object_type == "Task"
    assert (row.detail["task_id"], row.detail["gateway_id"], row.detail["reader_id"]) == \
        (stored.task_id, "station-1", rig.token.reader_id)
    assert row.detail["template"] == "BadgeAuthentication" and row.detail["step_number"] >= 1
    asked = row.detail["requested"]
    assert asked["subject"] == "'CN=Evil Chosen CN'"
    assert len(asked["subject_alt_names"]) == 3
    for evil in ("orchestrator.example", "ceo@example.com", "https://evil.example/admin"):
        assert any(evil in shown for shown in asked["subject_alt_names"]), evil
    assert asked["extensions"] == ["2.5.29.19"]       # basicConstraints, asked for CA:TRUE


@ca_kinds
def test_honest_production_certificate_follows_the_template_pattern_and_audits_nothing(tmp_path, ca_kind):
    _rig, instance, stored, issued_by_ca, audit = produce_badge(tmp_path, ca_kind, None)
    badge_content_is_the_templates(instance, stored, issued_by_ca)
    assert audit == []


def test_hostile_gateway_on_produce_card_path_gets_the_requests_subject_and_no_san(tmp_path):
    """A template without a subject pattern (examples/templates/templates.yaml) takes the
    task's subject — here the ProduceCard request's — never the CSR's."""
    async def body():
        async with rule_orchestrator(tmp_path, tokens=(fake_token(lying_csr=LYING_CSR),)) as rig:
            outcome = await rig.produce("EmployeeAuthentication", subject="CN=Rule Tester,O=Example")
            assert outcome.succeeded, outcome.task.error_message
            [stored] = rig.certificates(task_id=outcome.task.id)
            return stored, outcome, rig.audit(object_id=outcome.task.id, action="csr_request_ignored")

    stored, _outcome, audit = asyncio.run(body())
    cert = x509.load_der_x509_certificate(stored.der)
    assert cert.subject == x509.Name.from_rfc4514_string("CN=Rule Tester,O=Example")
    with pytest.raises(x509.ExtensionNotFound):           # the template gives none; the CSR's are not copied
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert [row.detail["requested"]["subject"] for row in audit] == ["'CN=Evil Chosen CN'"]


def test_template_variable_the_task_does_not_give_is_refused_before_the_card_is_touched(tmp_path):
    """A ProduceCard request gives no process inputs: a template reading one is refused
    before a task exists and before any step reaches the station."""
    async def body():
        async with rule_orchestrator(tmp_path, templates={"badge": BADGE_TEMPLATES.format(ca="local")},
                                     encodings={"badge-card": BADGE_ENCODING},
                                     processes={"produce-badge": BADGE_PROCESS}) as rig:
            with pytest.raises(InvalidArgument) as caught:
                await rig.produce("BadgeAuthentication")
            return rig, caught.value

    rig, error = asyncio.run(body())
    assert "BadgeAuthentication" in str(error) and "person" in str(error) and "email" in str(error)
    assert rig.gateway.commands == []
