"""LocalCa: CSR checks, issuance per profile, idempotent request ids, revocation and CRL, key at rest."""
from __future__ import annotations

import os
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from orchestrator.ca import CaConnector, IssueProfile, LocalCa
from shared.errors import CaRefused, ConfigurationError, CsrInvalid, InvalidArgument

AUTH = IssueProfile(validity_days=365, subject="CN=Alice Example", subject_alt_names=(("email", "alice@example.org"),),
                    key_usage=frozenset({"digitalSignature", "keyEncipherment"}),
                    extended_key_usage=("clientAuth", "emailProtection"))


def make_csr(key=None, cn: str = "Alice Example", email: str | None = "alice@example.org") -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if email:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def load(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


def test_local_ca_implements_the_connector_interface(local_ca: LocalCa):
    assert isinstance(local_ca, CaConnector)
    assert local_ca.name == "test-local"
    ca = load(local_ca.ca_certificate_der())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey) and ca_key.curve.name == "secp256r1"


def test_csr_with_bad_signature_refused(local_ca: LocalCa, tmp_path):
    good = bytearray(make_csr())
    good[-5] ^= 0x01   # inside the signature BIT STRING
    with pytest.raises(CsrInvalid, match="signature does not verify"):
        local_ca.issue(bytes(good), AUTH, "req-bad-sig")
    with pytest.raises(CsrInvalid, match="not a DER PKCS#10"):
        local_ca.issue(b"\x30\x00", AUTH, "req-garbage")
    assert local_ca.find_issued("req-bad-sig") is None
    assert list((tmp_path / "ca" / "issued").iterdir()) == []


def test_weak_key_refused(local_ca: LocalCa):
    with pytest.raises(CaRefused, match="key type not accepted"):
        local_ca.issue(make_csr(rsa.generate_private_key(65537, 1024)), AUTH, "req-weak")


def test_issued_cert_chains_to_ca_and_has_profile_key_usage(local_ca: LocalCa):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = load(local_ca.issue(make_csr(key), AUTH, "req-1"))
    ca = load(local_ca.ca_certificate_der())

    cert.verify_directly_issued_by(ca)     # issuer name matches and the signature verifies
    assert cert.public_key() == key.public_key()
    assert cert.serial_number > 0 and cert.serial_number.bit_length() > 64
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Alice Example"
    ext = cert.extensions
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.content_commitment and not ku.value.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION]
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == \
        ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert ext.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.RFC822Name) == ["alice@example.org"]
    assert 364 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 366


def test_profile_subject_and_non_repudiation(local_ca: LocalCa):
    profile = IssueProfile(validity_days=30, key_usage=frozenset({"nonRepudiation"}), subject="CN=Signer,O=cardline")
    cert = load(local_ca.issue(make_csr(rsa.generate_private_key(65537, 2048)), profile, "req-sign"))
    assert cert.subject.rfc4514_string() == "CN=Signer,O=cardline"
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.content_commitment
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)


def test_profile_with_unknown_names_refused():
    with pytest.raises(InvalidArgument, match="unknown key usage"):
        IssueProfile(validity_days=1, subject="CN=x", key_usage=frozenset({"digitalSignatur"}))
    with pytest.raises(InvalidArgument, match="unknown extended key usage"):
        IssueProfile(validity_days=1, subject="CN=x", extended_key_usage=("clientauth",))


def test_same_request_id_never_yields_a_second_certificate(local_ca: LocalCa, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    first = local_ca.issue(make_csr(key), AUTH, "task-1/step-3")
    again = local_ca.issue(make_csr(key), AUTH, "task-1/step-3")   # a retry after a lost answer
    assert again == first
    assert local_ca.find_issued("task-1/step-3") == first
    assert local_ca.find_issued("task-1/step-4") is None
    with pytest.raises(CaRefused, match="different key"):
        local_ca.issue(make_csr(), AUTH, "task-1/step-3")

    # Concurrent retries of one request: still one certificate.
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(local_ca.issue(make_csr(key), AUTH, "req-race")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 8

    # The record survives a restart of the CA, and the by-serial index matches it.
    reopened = LocalCa(tmp_path / "ca", name="test-local", passphrase_file=tmp_path / "ca-key.passphrase")
    assert reopened.find_issued("task-1/step-3") == first
    assert reopened.issued_by_request() == {"task-1/step-3": first, "req-race": results[0]}
    assert len(list((tmp_path / "ca" / "issued").glob("*.pem"))) == 2


def _crl_entry(local_ca: LocalCa, serial: int):
    crl = x509.load_der_x509_crl(local_ca.crl_der())
    ca_key = load(local_ca.ca_certificate_der()).public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey) and crl.is_signature_valid(ca_key)
    return crl, crl.get_revoked_certificate_by_serial_number(serial)


def test_certificate_hold_appears_in_crl_and_lift_hold_removes_it(local_ca: LocalCa):
    serial = load(local_ca.issue(make_csr(), AUTH, "req-hold")).serial_number
    local_ca.revoke(serial, "certificateHold")
    crl1, entry = _crl_entry(local_ca, serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.certificate_hold

    local_ca.lift_hold(serial)
    crl2, entry = _crl_entry(local_ca, serial)
    assert entry is None
    numbers = [c.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number for c in (crl1, crl2)]
    assert numbers[1] > numbers[0]
    with pytest.raises(CaRefused, match="not on hold"):
        local_ca.lift_hold(serial)


def test_revocation_reasons_and_rules(local_ca: LocalCa):
    serial = load(local_ca.issue(make_csr(), AUTH, "req-rev")).serial_number
    with pytest.raises(InvalidArgument, match="unknown revocation reason 'keycompromise'"):
        local_ca.revoke(serial, "keycompromise")          # a typo revokes nothing (C17)
    assert _crl_entry(local_ca, serial)[1] is None
    with pytest.raises(CaRefused, match="did not issue"):
        local_ca.revoke(12345, "keyCompromise")

    local_ca.revoke(serial, "certificateHold")
    local_ca.revoke(serial, "keyCompromise")              # a hold may become final
    local_ca.revoke(serial, "keyCompromise")              # a retry is harmless
    entry = _crl_entry(local_ca, serial)[1]
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    with pytest.raises(CaRefused, match="already revoked"):
        local_ca.revoke(serial, "certificateHold")
    with pytest.raises(CaRefused, match="not on hold"):
        local_ca.revoke(serial, "removeFromCRL")

    other = load(local_ca.issue(make_csr(), AUTH, "req-unspec")).serial_number
    local_ca.revoke(other, "unspecified")
    entry = _crl_entry(local_ca, other)[1]
    with pytest.raises(x509.ExtensionNotFound):          # RFC 5280: no reason code for unspecified
        entry.extensions.get_extension_for_class(x509.CRLReason)


def test_ca_key_file_on_disk_is_encrypted(local_ca: LocalCa, tmp_path):
    directory = tmp_path / "ca"
    pem = (directory / "ca-key.pem").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError):          # needs a password
        serialization.load_pem_private_key(pem, None)
    passphrase_file = tmp_path / "ca-key.passphrase"
    for path in (directory / "ca-key.pem", passphrase_file):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = serialization.load_pem_private_key(pem, passphrase_file.read_bytes().strip())
    assert key.public_key() == load(local_ca.ca_certificate_der()).public_key()
    assert not any(b"BEGIN PRIVATE KEY" in p.read_bytes() for p in directory.rglob("*") if p.is_file())


def test_passphrase_file_from_environment(tmp_path, monkeypatch):
    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple\n")
    monkeypatch.setenv("CARDLINE_CA_PASSPHRASE_FILE", str(secret))
    ca = LocalCa(tmp_path / "ca")
    assert not any("passphrase" in p.name for p in (tmp_path / "ca").rglob("*"))
    key = serialization.load_pem_private_key((tmp_path / "ca" / "ca-key.pem").read_bytes(),
                                             b"correct horse battery staple")
    assert key.public_key() == load(ca.ca_certificate_der()).public_key()
    secret.write_text("wrong\n")
    with pytest.raises(ConfigurationError, match="cannot open CA key"):
        LocalCa(tmp_path / "ca")


def test_a_ca_key_on_disk_without_a_passphrase_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("CARDLINE_CA_PASSPHRASE_FILE", raising=False)
    with pytest.raises(ConfigurationError, match="needs a passphrase file outside that directory"):
        LocalCa(tmp_path / "ca")
    assert not (tmp_path / "ca" / "ca-key.pem").exists()          # nothing half-made


def test_ca_passphrase_is_never_beside_its_key(tmp_path, monkeypatch):
    """The passphrase file must lie outside the CA directory, named by the setting or the
    variable; the variable names the file, it never holds the passphrase."""
    monkeypatch.setenv("CARDLINE_CA_PASSPHRASE_FILE", str(tmp_path / "ca" / "ca-key.passphrase"))
    with pytest.raises(ConfigurationError, match="inside the CA directory"):
        LocalCa(tmp_path / "ca")
    with pytest.raises(ConfigurationError, match="inside the CA directory"):
        LocalCa(tmp_path / "ca", passphrase_file=tmp_path / "ca" / "sub" / "pass")
    ca = LocalCa(tmp_path / "ca", passphrase_file=tmp_path / "elsewhere.pass")
    assert (tmp_path / "elsewhere.pass").read_text().strip()
    assert stat.S_IMODE((tmp_path / "elsewhere.pass").stat().st_mode) == 0o600
    files = [p for p in (tmp_path / "ca").rglob("*") if p.is_file()]
    passphrase = (tmp_path / "elsewhere.pass").read_bytes().strip()
    assert files and not any(passphrase in p.read_bytes() for p in files)
    assert ca.ca_certificate_der()
