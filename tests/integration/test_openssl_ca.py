"""OpenSslCa against a real `openssl ca` in tmp_path: issuance per profile, idempotent requests
after crashes (C16), certificateHold in the CRL (C6), strict reason names (C17), lifting a hold,
concurrency, the key at rest, and the CA registry."""
from __future__ import annotations

import datetime as dt
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from orchestrator.ca import CaConnector, IssueProfile, LocalCa
from orchestrator.ca.base import SUBJECT_ATTRIBUTES, subject_name
from orchestrator.ca.openssl import REQUEST_TAG_OID, OpenSslCa
from orchestrator.ca.registry import build_cas
from shared.errors import CaRefused, CaUnavailable, ConfigurationError, CsrInvalid, InvalidArgument

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

AUTH = IssueProfile(validity_days=365, subject="CN=Alice Example", subject_alt_names=(("email", "alice@example.org"),),
                    key_usage=frozenset({"digitalSignature", "keyEncipherment"}),
                    extended_key_usage=("clientAuth", "smartcardLogon"))


def make_csr(key=None, cn: str = "Alice Example", email: str | None = "alice@example.org") -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    if email:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def load(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


def spki(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def index_lines(ca: OpenSslCa) -> list[list[str]]:
    return [line.split("\t") for line in (ca.directory / "index.txt").read_text().splitlines()]


def crl_text(ca: OpenSslCa, tmp_path) -> str:
    """`openssl crl -text` of the DER CRL the connector hands out, checked against the CA cert."""
    (tmp_path / "crl.der").write_bytes(ca.crl_der())
    (tmp_path / "ca.der").write_bytes(ca.ca_certificate_der())
    subprocess.run(["openssl", "x509", "-inform", "DER", "-in", tmp_path / "ca.der", "-out", tmp_path / "ca.pem"],
                   check=True)
    out = subprocess.run(["openssl", "crl", "-inform", "DER", "-in", tmp_path / "crl.der", "-noout", "-text",
                          "-CAfile", tmp_path / "ca.pem"], check=True, capture_output=True, text=True)
    assert "verify OK" in out.stderr + out.stdout
    return out.stdout


def crl_entry_block(text: str, serial: int) -> str | None:
    """The lines of one revoked entry of `openssl crl -text` output."""
    digits = f"{serial:X}"
    marker = "Serial Number: " + ("0" * (len(digits) % 2)) + digits + "\n"   # openssl prints whole bytes
    if marker not in text:
        return None
    block = text.split(marker, 1)[1]
    return block.split("Serial Number:", 1)[0].split("Signature Algorithm", 1)[0]


@pytest.fixture
def openssl_ca(tmp_path) -> OpenSslCa:
    """Its passphrase in the session's file ($CARDLINE_CA_PASSPHRASE_FILE, tests/support/store_ca.py)."""
    return OpenSslCa(tmp_path / "openssl-ca", name="test-openssl")


# -- set-up and interface ------------------------------------------------------------------


def test_openssl_ca_implements_the_connector_interface(openssl_ca: OpenSslCa):
    assert isinstance(openssl_ca, CaConnector)
    assert openssl_ca.name == "test-openssl"
    ca = load(openssl_ca.ca_certificate_der())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey) and ca_key.curve.name == "secp256r1"
    assert ca.subject.rfc4514_string() == "CN=cardline test-openssl CA,O=cardline"
    config = openssl_ca.config_path.read_text()
    for setting in ("default_ca = CA_default", "database          = $dir/index.txt",
                    "new_certs_dir     = $dir/newcerts", "copy_extensions   = none", "unique_subject    = no"):
        assert setting in config
    for name in ("index.txt", "serial", "crlnumber", "newcerts", "ca-cert.pem", "private/ca-key.pem"):
        assert (openssl_ca.directory / name).exists(), name
    # Opening the directory again reuses the CA, it never makes a second one.
    again = OpenSslCa(openssl_ca.directory, name="test-openssl")
    assert again.ca_certificate_der() == openssl_ca.ca_certificate_der()


def test_ca_key_on_disk_is_encrypted_and_private(openssl_ca: OpenSslCa):
    key_path = openssl_ca.directory / "private" / "ca-key.pem"
    pem = key_path.read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(TypeError):   # cryptography: "Password was not given but private key is encrypted"
        serialization.load_pem_private_key(pem, password=None)
    wrong = subprocess.run(["openssl", "pkey", "-in", key_path, "-passin", "pass:wrong", "-noout"],
                           capture_output=True)
    assert wrong.returncode != 0
    for path in (key_path, openssl_ca.passphrase_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert not openssl_ca.passphrase_path.resolve().is_relative_to(openssl_ca.directory)   # not beside the key
    passphrase = openssl_ca.passphrase_path.read_bytes().strip()
    assert not any(passphrase in p.read_bytes() for p in openssl_ca.directory.rglob("*") if p.is_file())
    key = serialization.load_pem_private_key(pem, password=passphrase)
    assert spki(key) == load(openssl_ca.ca_certificate_der()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_plain_ca_key_is_refused(tmp_path):
    ca = OpenSslCa(tmp_path / "ca")
    key_path = tmp_path / "ca" / "private" / "ca-key.pem"
    subprocess.run(["openssl", "pkey", "-in", key_path, "-passin", f"file:{ca.passphrase_path}",
                    "-out", tmp_path / "plain.pem"], check=True)
    os.replace(tmp_path / "plain.pem", key_path)
    assert ca is not None
    with pytest.raises(ConfigurationError, match="not encrypted"):
        OpenSslCa(tmp_path / "ca")


def test_openssl_missing_is_ca_unavailable(tmp_path):
    with pytest.raises(CaUnavailable, match="not installed"):
        OpenSslCa(tmp_path / "ca", openssl=str(tmp_path / "no-such-openssl"))


# -- issuance ------------------------------------------------------------------------------


def test_issued_cert_chains_to_ca_and_has_profile_key_usage(openssl_ca: OpenSslCa, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    der = openssl_ca.issue(make_csr(key), AUTH, "task-1/step-1")
    cert, ca = load(der), load(openssl_ca.ca_certificate_der())

    cert.verify_directly_issued_by(ca)
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    verify = subprocess.run(["openssl", "verify", "-CAfile", tmp_path / "ca.pem", tmp_path / "c.pem"],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stderr
    assert cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo) == spki(key)
    assert cert.subject.rfc4514_string() == "CN=Alice Example"
    ext = cert.extensions
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.content_commitment and not ku.value.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SMARTCARD_LOGON]
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    assert ext.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.RFC822Name) == ["alice@example.org"]
    assert ext.get_extension_for_oid(REQUEST_TAG_OID).critical is False
    assert 364 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 366

    lines = index_lines(openssl_ca)
    assert len(lines) == 1 and lines[0][0] == "V" and int(lines[0][3], 16) == cert.serial_number
    assert (openssl_ca.directory / "newcerts" / f"{lines[0][3]}.pem").exists()


def test_request_extensions_are_never_copied_and_profile_subject_replaces_the_requests(openssl_ca: OpenSslCa):
    key = ec.generate_private_key(ec.SECP256R1())
    sneaky = (x509.CertificateSigningRequestBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")]))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    profile = IssueProfile(validity_days=30, key_usage=frozenset({"nonRepudiation"}),
                           subject="CN=Signer/1 \\+ x\\=y,O=cardline,C=DE")
    cert = load(openssl_ca.issue(sneaky, profile, "req-sign"))
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.subject == x509.Name.from_rfc4514_string("CN=Signer/1 \\+ x\\=y,O=cardline,C=DE")
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.content_commitment
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)


def test_subject_alt_names_are_the_profiles_exactly_including_a_upn_never_the_requests(openssl_ca: OpenSslCa):
    upn = x509.OtherName(x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"),
                         b"\x0c\x16alice@corp.example.org")   # UTF8String, as Windows smart card logon wants
    names = x509.SubjectAlternativeName([x509.RFC822Name("alice@example.org"), upn, x509.DNSName("a.example")])
    key = ec.generate_private_key(ec.SECP256R1())
    asked = x509.SubjectAlternativeName([x509.DNSName("orchestrator.example"), x509.RFC822Name("ceo@example.com")])
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(asked, critical=False).sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    profile = IssueProfile(validity_days=30, subject="", subject_alt_names=(
        ("email", "alice@example.org"), ("upn", "alice@corp.example.org"), ("dns", "a.example")))
    cert = load(openssl_ca.issue(csr, profile, "req-upn"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value == names
    assert san.critical                      # RFC 5280 4.2.1.6: the subject is empty
    assert cert.subject == x509.Name([])
    no_names = IssueProfile(validity_days=1, subject="CN=Only Subject")
    with pytest.raises(x509.ExtensionNotFound):
        load(openssl_ca.issue(csr, no_names, "req-no-san")).extensions.get_extension_for_class(
            x509.SubjectAlternativeName)


def test_every_pattern_attribute_is_issued_exactly_as_the_profile_says(openssl_ca: OpenSslCa):
    """`-subj` with -preserveDN keeps every attribute a template's subject pattern may name,
    values with separators included, whatever subject the request asks for."""
    rdns = [[(kind, f"{kind} a/b+c=d,e") for kind in SUBJECT_ATTRIBUTES if kind not in ("C", "DC", "emailAddress")],
            [("C", "DE")], [("DC", "example")], [("emailAddress", "jane@example.org")]]
    subject = subject_name(rdns)
    cert = load(openssl_ca.issue(make_csr(cn="Evil Chosen CN"), IssueProfile(validity_days=5, subject=subject),
                                 "req-all-attributes"))
    assert cert.subject == subject


def test_bad_requests_are_refused_before_openssl_runs(openssl_ca: OpenSslCa):
    bad = bytearray(make_csr())
    bad[-5] ^= 0x01
    with pytest.raises(CsrInvalid, match="signature does not verify"):
        openssl_ca.issue(bytes(bad), AUTH, "req-bad")
    with pytest.raises(CsrInvalid, match="not a DER PKCS#10"):
        openssl_ca.issue(b"\x30\x00", AUTH, "req-garbage")
    with pytest.raises(InvalidArgument, match="name nobody"):
        IssueProfile(validity_days=30, subject="")
    assert index_lines(openssl_ca) == []


def test_openssl_failure_is_ca_refused_without_the_passphrase(tmp_path):
    passphrase_file = tmp_path / "own-ca.pass"               # its own: this test spoils it
    openssl_ca = OpenSslCa(tmp_path / "own-ca", name="test-openssl", passphrase_file=passphrase_file)
    secret = "not-the-right-passphrase-42"
    passphrase_file.write_text(secret + "\n")
    with pytest.raises(CaRefused) as caught:
        openssl_ca.issue(make_csr(), AUTH, "req-wrong-pass")
    assert "openssl ca failed" in caught.value.message
    assert secret not in str(caught.value)
    assert index_lines(openssl_ca) == []


# -- C16: one request, one certificate -----------------------------------------------------


def test_c16_same_request_id_and_csr_yield_the_same_certificate(openssl_ca: OpenSslCa):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key)
    first = openssl_ca.issue(csr, AUTH, "task-1/step-3")
    assert openssl_ca.issue(csr, AUTH, "task-1/step-3") == first
    assert openssl_ca.issue(make_csr(key), AUTH, "task-1/step-3") == first     # a rebuilt CSR, same key
    assert len(index_lines(openssl_ca)) == 1
    assert len(list((openssl_ca.directory / "newcerts").glob("*.pem"))) == 1
    assert openssl_ca.find_issued("task-1/step-3") == first
    assert openssl_ca.find_issued("task-1/step-4") is None
    with pytest.raises(CaRefused, match="different key"):
        openssl_ca.issue(make_csr(), AUTH, "task-1/step-3")
    # A new request for the same key (a renewal) is a new certificate.
    renewed = openssl_ca.issue(csr, AUTH, "task-2/step-3")
    assert renewed != first and len(index_lines(openssl_ca)) == 2


def test_c16_found_after_a_crash_between_openssl_and_the_journal(openssl_ca: OpenSslCa):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key)
    first = openssl_ca.issue(csr, AUTH, "task-7/step-2")
    # openssl wrote index.txt and newcerts/, the connector died before its journal.
    shutil.rmtree(openssl_ca.directory / "requests")
    (openssl_ca.directory / "requests").mkdir()
    restarted = OpenSslCa(openssl_ca.directory, name="test-openssl")
    assert restarted.confirms_request_ids is True

    assert restarted.find_issued_for_key(spki(key)) == [first]
    assert restarted.find_issued_for_key(spki(ec.generate_private_key(ec.SECP256R1()))) == []
    assert restarted.find_issued("task-7/step-2") == first        # by the request tag in the certificate
    assert restarted.issue(csr, AUTH, "task-7/step-2") == first  # the retry gets it, openssl is not asked
    assert len(index_lines(restarted)) == 1
    assert len(list((restarted.directory / "requests").glob("*.json"))) == 1   # journal repaired


_KILLED_ISSUER = """
import os, signal, sys
from orchestrator.ca import IssueProfile
from orchestrator.ca.openssl import OpenSslCa
OpenSslCa._journal = lambda *args: os.kill(os.getpid(), signal.SIGKILL)   # dies right after openssl answered
ca = OpenSslCa(sys.argv[1], name="test-openssl")
ca.issue(open(sys.argv[2], "rb").read(), IssueProfile(validity_days=30, subject="CN=Alice Example"), "task-9/step-1")
"""


def test_c16_orchestrator_killed_after_openssl_issued(openssl_ca: OpenSslCa, tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "req.der").write_bytes(make_csr(key))
    done = subprocess.run([sys.executable, "-c", _KILLED_ISSUER, openssl_ca.directory, tmp_path / "req.der"],
                          cwd=pathlib.Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert list((openssl_ca.directory / "requests").iterdir()) == []     # the journal never got it
    [cert] = openssl_ca.find_issued_for_key(spki(key))
    assert openssl_ca.find_issued("task-9/step-1") == cert
    profile = IssueProfile(validity_days=30, subject="CN=Alice Example")
    assert openssl_ca.issue(make_csr(key), profile, "task-9/step-1") == cert
    assert len(index_lines(openssl_ca)) == 1


def test_c16_without_request_tags_a_retry_is_matched_by_its_public_key(tmp_path):
    ca = OpenSslCa(tmp_path / "ca", tag_requests=False)
    assert ca.confirms_request_ids is False
    key = ec.generate_private_key(ec.SECP256R1())
    first = ca.issue(make_csr(key), AUTH, "task-8/step-1")
    with pytest.raises(x509.ExtensionNotFound):
        load(first).extensions.get_extension_for_oid(REQUEST_TAG_OID)
    shutil.rmtree(tmp_path / "ca" / "requests")
    (tmp_path / "ca" / "requests").mkdir()
    assert ca.find_issued("task-8/step-1") is None                 # cannot be confirmed without the tag
    assert ca.issue(make_csr(key), AUTH, "task-8/step-1") == first  # but the key gives it away
    assert len(index_lines(ca)) == 1
    # Now journaled for task-8: a renewal with the same key gets a new certificate.
    assert ca.issue(make_csr(key), AUTH, "task-9/step-1") != first
    assert len(index_lines(ca)) == 2


def test_c16_an_openssl_run_killed_before_its_renames_is_completed(openssl_ca: OpenSslCa):
    """openssl writes index.txt.new / serial.new and newcerts/ before renaming them into place;
    a kill in between leaves the certificate signed but not yet in index.txt."""
    d = openssl_ca.directory
    openssl_ca.issue(make_csr(), AUTH, "req-before")
    index_before, serial_before = (d / "index.txt").read_bytes(), (d / "serial").read_bytes()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = openssl_ca.issue(make_csr(key), AUTH, "req-killed")
    # Put the directory back into the state of the kill: .new files beside the old ones.
    os.replace(d / "index.txt", d / "index.txt.new")
    os.replace(d / "serial", d / "serial.new")
    (d / "index.txt").write_bytes(index_before)
    (d / "serial").write_bytes(serial_before)
    shutil.rmtree(d / "requests")
    (d / "requests").mkdir()

    restarted = OpenSslCa(d, name="test-openssl")
    assert not (d / "index.txt.new").exists() and not (d / "serial.new").exists()
    assert restarted.find_issued_for_key(spki(key)) == [cert]
    assert restarted.find_issued("req-killed") == cert
    next_cert = load(restarted.issue(make_csr(), AUTH, "req-after"))
    assert next_cert.serial_number == load(cert).serial_number + 1     # no serial used twice


def test_c16_a_torn_index_from_a_killed_run_is_undone(openssl_ca: OpenSslCa):
    d = openssl_ca.directory
    openssl_ca.issue(make_csr(), AUTH, "req-1")
    (d / "index.txt.new").write_text((d / "index.txt").read_text() + "V\t2711")   # torn mid-line
    (d / "serial.new").write_text("FFFF\n")
    restarted = OpenSslCa(d, name="test-openssl")
    assert not (d / "index.txt.new").exists() and not (d / "serial.new").exists()
    assert len(index_lines(restarted)) == 1
    restarted.issue(make_csr(), AUTH, "req-2")
    assert len(index_lines(restarted)) == 2


def test_issued_between_and_issued_certificates(openssl_ca: OpenSslCa):
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=2)
    a = openssl_ca.issue(make_csr(), AUTH, "req-a")
    b = openssl_ca.issue(make_csr(), AUTH, "req-b")
    after = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    assert openssl_ca.issued_between(before, after) == [a, b]
    assert openssl_ca.issued_between(after, after + dt.timedelta(days=1)) == []
    assert openssl_ca.issued_between(before.replace(tzinfo=None), after.replace(tzinfo=None)) == [a, b]
    assert openssl_ca.issued_certificates() == [a, b]


def test_c16_concurrent_issues_from_threads_and_two_connectors(openssl_ca: OpenSslCa):
    # Two connector objects on one directory stand for two processes: only the flock orders them.
    other = OpenSslCa(openssl_ca.directory, name="test-openssl")
    results: dict[str, bytes] = {}
    errors: list[BaseException] = []
    csrs = {f"req-{i}": make_csr(cn=f"req-{i}") for i in range(8)}

    def work(ca: OpenSslCa, rid: str) -> None:
        try:
            der = ca.issue(csrs[rid], AUTH, rid)
            assert results.setdefault(rid, der) == der
        except BaseException as exc:   # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(openssl_ca if i % 2 else other, f"req-{i}")) for i in range(8)]
    threads += [threading.Thread(target=work, args=(other, "req-0")) for _ in range(3)]   # retries racing
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    serials = {load(der).serial_number for der in results.values()}
    assert len(serials) == 8
    lines = index_lines(openssl_ca)
    assert len(lines) == 8 and {int(line[3], 16) for line in lines} == serials
    assert all(line[0] == "V" for line in lines)
    # openssl itself still reads the database.
    subprocess.run(["openssl", "ca", "-config", openssl_ca.config_path, "-updatedb", "-passin",
                    f"file:{openssl_ca.passphrase_path}"], check=True, capture_output=True)
    assert len(openssl_ca.index_entries()) == 8


# -- C6 / C17: revocation through openssl ca -----------------------------------------------


def test_c17_key_compromise_is_in_the_openssl_crl(openssl_ca: OpenSslCa, tmp_path):
    serial = load(openssl_ca.issue(make_csr(), AUTH, "req-kc")).serial_number
    openssl_ca.revoke(serial, "keyCompromise")
    block = crl_entry_block(crl_text(openssl_ca, tmp_path), serial)
    assert block is not None and "Key Compromise" in block
    openssl_ca.revoke(serial, "keyCompromise")                # a retry is a no-op
    with pytest.raises(CaRefused, match="already revoked"):
        openssl_ca.revoke(serial, "superseded")
    assert [line[0] for line in index_lines(openssl_ca)] == ["R"]


def test_c6_certificate_hold_is_in_the_openssl_crl(openssl_ca: OpenSslCa, tmp_path):
    serial = load(openssl_ca.issue(make_csr(), AUTH, "req-hold")).serial_number
    openssl_ca.revoke(serial, "certificateHold")
    text = crl_text(openssl_ca, tmp_path)
    block = crl_entry_block(text, serial)
    assert block is not None and "Certificate Hold" in block


def test_c6_hold_instruction_when_configured(tmp_path):
    ca = OpenSslCa(tmp_path / "ca", hold_instruction="holdInstructionReject")
    serial = load(ca.issue(make_csr(), AUTH, "req-hold")).serial_number
    ca.revoke(serial, "certificateHold")
    block = crl_entry_block(crl_text(ca, tmp_path), serial)
    assert block is not None and "Certificate Hold" in block and "Hold Instruction Reject" in block
    ca.revoke(serial, "certificateHold")                      # retry: no-op
    ca.lift_hold(serial)
    assert crl_entry_block(crl_text(ca, tmp_path), serial) is None


def test_lift_hold_takes_the_serial_off_the_next_crl(openssl_ca: OpenSslCa, tmp_path):
    serial = load(openssl_ca.issue(make_csr(), AUTH, "req-hold")).serial_number
    other = load(openssl_ca.issue(make_csr(), AUTH, "req-other")).serial_number
    openssl_ca.revoke(serial, "certificateHold")
    openssl_ca.revoke(other, "superseded")
    assert index_lines(openssl_ca)[0][0] == "R"
    first = crl_text(openssl_ca, tmp_path)
    openssl_ca.lift_hold(serial)
    lines = index_lines(openssl_ca)
    assert lines[0][0] == "V" and lines[0][2] == "" and lines[1][0] == "R"
    second = crl_text(openssl_ca, tmp_path)
    assert crl_entry_block(second, serial) is None
    assert "Superseded" in (crl_entry_block(second, other) or "")
    numbers = [int(t.split("X509v3 CRL Number:", 1)[1].split()[0]) for t in (first, second)]
    assert numbers[1] > numbers[0]
    with pytest.raises(CaRefused, match="not on hold"):
        openssl_ca.lift_hold(serial)
    # removeFromCRL is the RFC 5280 name of the same thing.
    openssl_ca.revoke(serial, "certificateHold")
    openssl_ca.revoke(serial, "removeFromCRL")
    assert index_lines(openssl_ca)[0][0] == "V"


def test_lifting_a_final_revocation_is_refused(openssl_ca: OpenSslCa):
    serial = load(openssl_ca.issue(make_csr(), AUTH, "req-final")).serial_number
    openssl_ca.revoke(serial, "cessationOfOperation")
    before = (openssl_ca.directory / "index.txt").read_bytes()
    with pytest.raises(CaRefused, match="not on hold"):
        openssl_ca.lift_hold(serial)
    assert (openssl_ca.directory / "index.txt").read_bytes() == before


def test_a_hold_may_become_a_final_revocation(openssl_ca: OpenSslCa, tmp_path):
    serial = load(openssl_ca.issue(make_csr(), AUTH, "req-h2k")).serial_number
    openssl_ca.revoke(serial, "certificateHold")
    openssl_ca.revoke(serial, "keyCompromise")
    assert "Key Compromise" in (crl_entry_block(crl_text(openssl_ca, tmp_path), serial) or "")
    with pytest.raises(CaRefused, match="not on hold"):
        openssl_ca.lift_hold(serial)


def test_c17_unknown_or_unrecordable_reason_changes_nothing(openssl_ca: OpenSslCa):
    serial = load(openssl_ca.issue(make_csr(), AUTH, "req-typo")).serial_number
    before = (openssl_ca.directory / "index.txt").read_bytes()
    with pytest.raises(InvalidArgument, match="unknown revocation reason"):
        openssl_ca.revoke(serial, "keycompromise")
    with pytest.raises(InvalidArgument):
        openssl_ca.revoke(serial, "Suspended")
    with pytest.raises(CaRefused, match="cannot record"):
        openssl_ca.revoke(serial, "privilegeWithdrawn")
    with pytest.raises(CaRefused, match="did not issue"):
        openssl_ca.revoke(serial + 1000, "keyCompromise")
    assert (openssl_ca.directory / "index.txt").read_bytes() == before


# -- registry ------------------------------------------------------------------------------


def test_registry_always_has_the_local_ca_and_adds_configured_openssl_cas(tmp_path):
    assert list(build_cas(None, tmp_path)) == ["local"]
    cas = build_cas([{"name": "dept", "kind": "openssl", "directory": "dept-ca",
                      "subject": "CN=Dept CA,O=Example", "hold_instruction": "holdInstructionCallIssuer"},
                     {"name": "second", "kind": "local", "directory": str(tmp_path / "second")}], tmp_path)
    assert list(cas) == ["local", "dept", "second"]
    assert isinstance(cas["local"], LocalCa) and isinstance(cas["dept"], OpenSslCa)
    assert all(isinstance(ca, CaConnector) and ca.name == name for name, ca in cas.items())
    assert cas["dept"].directory == (tmp_path / "dept-ca").resolve()
    assert load(cas["dept"].ca_certificate_der()).subject.rfc4514_string() == "CN=Dept CA,O=Example"
    assert (tmp_path / "ca" / "ca-cert.pem").exists()


def test_registry_reports_every_mistake_at_once(tmp_path):
    with pytest.raises(ConfigurationError) as caught:
        build_cas([{"name": "local", "kind": "openssl", "directory": "x"},
                   {"name": "a", "kind": "opensll", "directory": "y"},
                   {"name": "b", "kind": "openssl", "directry": "z"},
                   "not a mapping"], tmp_path)  # type: ignore[list-item]  # bad input is the point
    message = caught.value.message
    assert "'local' is used twice" in message
    assert "kind 'opensll' is unknown" in message
    assert "unknown key(s) ['directry']" in message and "'directory' is missing" in message
    assert "expected a mapping" in message
    assert not (tmp_path / "ca").exists()          # nothing was created
