"""LocalCa with its key on a real SoftHSM2 token, checked with OpenSC's pkcs11-tool.

Every LocalCa here is closed (the `token_ca` fixture and `with` blocks), which releases the
module (the last release finalises it), so these tests share one pytest process with the other SoftHSM2 tests
(tests/hardware/test_key_archive_pkcs11.py, tests/hardware/test_pkcs11_driver.py).
"""
from __future__ import annotations

import shutil
import subprocess
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator.ca import CaConnector, IssueProfile, LocalCa
from orchestrator.ca.local import Pkcs11KeyRef
from orchestrator.ca.registry import build_cas
from orchestrator.services.key_archive import KeyArchive, Pkcs11Kek, generate_key
from shared.cards import KeyType
from shared.errors import CaUnavailable, ConfigurationError

pytestmark = pytest.mark.hardware

KEY_LABEL = "cardline-ca"
AUTH = IssueProfile(validity_days=365, subject="CN=Alice Example", key_usage=frozenset({"digitalSignature"}),
                    extended_key_usage=("clientAuth",))


@pytest.fixture
def tok(softhsm_token):
    return softhsm_token


@pytest.fixture
def pin_file(tok, tmp_path):
    path = tmp_path / "ca-token.pin"
    path.touch(mode=0o600)
    path.write_text(tok.user_pin + "\n")
    return path


@pytest.fixture
def ref(tok, pin_file) -> Pkcs11KeyRef:
    return Pkcs11KeyRef(tok.module_path, tok.label, pin_file, key_label=KEY_LABEL)


@pytest.fixture
def token_ca(tmp_path, ref):
    ca = LocalCa(tmp_path / "ca", "local", pkcs11=ref)
    yield ca
    ca.close()


def pkcs8(key) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_csr(cn: str = "Alice Example") -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def ca_cert(ca: CaConnector) -> x509.Certificate:
    return x509.load_der_x509_certificate(ca.ca_certificate_der())


def ca_public_key(ca: CaConnector) -> ec.EllipticCurvePublicKey:
    key = ca_cert(ca).public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def opensc_objects(tok) -> list[dict]:
    """The token's objects as OpenSC's pkcs11-tool (an independent implementation) lists them."""
    if shutil.which("pkcs11-tool") is None:
        pytest.skip("pkcs11-tool (OpenSC) not installed")
    out = subprocess.run(
        ["pkcs11-tool", "--module", tok.module_path, "--slot", str(tok.slot_id),
         "--list-objects", "--login", "--pin", tok.user_pin],
        env=tok.env, capture_output=True, text=True, timeout=60, check=True).stdout
    objects: list[dict] = []
    for line in out.splitlines():
        if line and not line[0].isspace():          # "Private Key Object; EC"
            kind, _, detail = line.partition(";")
            objects.append({"kind": kind.strip(), "detail": detail.strip()})
        elif objects and ":" in line:
            key, _, value = line.strip().partition(":")
            objects[-1][key.strip()] = value.strip()
    return objects


def test_ca_key_is_generated_on_the_token_and_nothing_of_it_is_on_disk(token_ca: LocalCa, tok, tmp_path):
    assert isinstance(token_ca, CaConnector) and token_ca.key_on_token
    cert = ca_cert(token_ca)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca_public_key(token_ca).curve.name == "secp256r1"
    cert.verify_directly_issued_by(cert)                # self-signed by the token
    token_ca.close()

    objects = opensc_objects(tok)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["Certificate Object", "Private Key Object", "Public Key Object"]
    priv = next(o for o in objects if o["kind"] == "Private Key Object")
    assert priv["detail"].startswith("EC")
    assert priv["label"] == KEY_LABEL
    assert "sensitive" in priv["Access"] and "never extractable" in priv["Access"]
    assert priv["Usage"] == "sign"
    ids = {o["ID"] for o in objects}
    assert len(ids) == 1                                # key pair and certificate share CKA_ID
    assert all(o["label"] == KEY_LABEL for o in objects)

    files = sorted(p.name for p in (tmp_path / "ca").iterdir())
    assert files == ["ca-cert.pem", "issued", "requests"]
    for path in (tmp_path / "ca").rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes()
    assert (tmp_path / "ca" / "ca-cert.pem").read_bytes() == cert.public_bytes(serialization.Encoding.PEM)


def test_issued_certificate_verifies_against_the_ca_certificate(token_ca):
    der = token_ca.issue(make_csr(), AUTH, "req-1")
    cert = x509.load_der_x509_certificate(der)
    cert.verify_directly_issued_by(ca_cert(token_ca))
    assert cert.subject.rfc4514_string() == "CN=Alice Example"
    assert token_ca.issue(make_csr(), AUTH, "req-2") != der
    assert token_ca.find_issued("req-1") == der


def test_crl_is_signed_by_the_token_and_lists_revoked_serials_with_reasons(token_ca):
    compromised = x509.load_der_x509_certificate(token_ca.issue(make_csr("A"), AUTH, "req-a"))
    held = x509.load_der_x509_certificate(token_ca.issue(make_csr("B"), AUTH, "req-b"))
    token_ca.revoke(compromised.serial_number, "keyCompromise")
    token_ca.revoke(held.serial_number, "certificateHold")
    crl = x509.load_der_x509_crl(token_ca.crl_der())
    assert crl.is_signature_valid(ca_public_key(token_ca))
    assert crl.issuer == ca_cert(token_ca).subject
    reasons = {r.serial_number: r.extensions.get_extension_for_class(x509.CRLReason).value.reason
               for r in crl}
    assert reasons == {compromised.serial_number: x509.ReasonFlags.key_compromise,
                       held.serial_number: x509.ReasonFlags.certificate_hold}
    token_ca.lift_hold(held.serial_number)
    crl2 = x509.load_der_x509_crl(token_ca.crl_der())
    assert crl2.is_signature_valid(ca_public_key(token_ca))
    assert [r.serial_number for r in crl2] == [compromised.serial_number]


def test_a_second_ca_on_the_same_directory_and_token_reuses_the_key(tmp_path, ref, tok):
    with LocalCa(tmp_path / "ca", "local", pkcs11=ref) as first:
        first_ca = first.ca_certificate_der()
        issued = first.issue(make_csr(), AUTH, "req-1")
    with LocalCa(tmp_path / "ca", "local", pkcs11=ref) as second:
        assert second.ca_certificate_der() == first_ca
        assert second.find_issued("req-1") == issued
        later = x509.load_der_x509_certificate(second.issue(make_csr(), AUTH, "req-2"))
        later.verify_directly_issued_by(x509.load_der_x509_certificate(first_ca))
    assert sorted(o["kind"] for o in opensc_objects(tok)) == [
        "Certificate Object", "Private Key Object", "Public Key Object"]


def test_a_lost_directory_is_restarted_from_the_certificate_on_the_token(tmp_path, ref):
    with LocalCa(tmp_path / "ca", "local", pkcs11=ref) as first:
        first_ca = first.ca_certificate_der()
    with LocalCa(tmp_path / "new-ca", "local", pkcs11=ref) as second:
        assert second.ca_certificate_der() == first_ca


def test_every_token_call_runs_on_one_thread_whoever_calls(token_ca):
    errors: list[BaseException] = []
    callers: set[int] = set()

    def work(n: int) -> None:
        callers.add(threading.get_ident())
        try:
            for i in range(10):
                token_ca.issue(make_csr(f"user {n}-{i}"), AUTH, f"req-{n}-{i}")
            token_ca.crl_der()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(token_ca.token_call_threads) == 1
    assert not token_ca.token_call_threads & (callers | {threading.get_ident()})
    assert len(token_ca.issued_by_request()) == 40


def test_closed_ca_refuses_to_sign(tmp_path, ref):
    ca = LocalCa(tmp_path / "ca", "local", pkcs11=ref)
    ca.close()
    ca.close()                                          # idempotent
    with pytest.raises(CaUnavailable, match="closed"):
        ca.issue(make_csr(), AUTH, "req-1")
    assert ca.find_issued("req-1") is None


def test_start_up_mistakes_are_configuration_errors(tmp_path, tok, ref, pin_file):
    with pytest.raises(ConfigurationError, match=r"PIN .* was refused"):
        bad_pin = tmp_path / "bad.pin"
        bad_pin.write_text("9999\n")
        LocalCa(tmp_path / "ca", pkcs11=Pkcs11KeyRef(tok.module_path, tok.label, bad_pin))
    with pytest.raises(ConfigurationError, match="no PKCS#11 token labelled"):
        LocalCa(tmp_path / "ca", pkcs11=Pkcs11KeyRef(tok.module_path, "no-such-token", pin_file))
    with pytest.raises(ConfigurationError, match="cannot read the CA token PIN file"):
        LocalCa(tmp_path / "ca", pkcs11=Pkcs11KeyRef(tok.module_path, tok.label, tmp_path / "missing"))
    # A CA whose key is in its directory is not silently replaced by a token key.
    LocalCa(tmp_path / "file-ca").close()
    with pytest.raises(ConfigurationError, match="key is in its directory"):
        LocalCa(tmp_path / "file-ca", pkcs11=ref)
    # A certificate in the directory whose key is not on the token: never a new key.
    (tmp_path / "orphan").mkdir()
    shutil.copy(tmp_path / "file-ca" / "ca-cert.pem", tmp_path / "orphan" / "ca-cert.pem")
    with pytest.raises(ConfigurationError, match="is not on the PKCS#11 token"):
        LocalCa(tmp_path / "orphan", pkcs11=ref)
    # And a token CA's certificate that does not belong to the key on the token.
    with LocalCa(tmp_path / "ca", pkcs11=ref):
        pass
    shutil.copy(tmp_path / "file-ca" / "ca-cert.pem", tmp_path / "ca" / "ca-cert.pem")
    with pytest.raises(ConfigurationError, match="does not belong to the key"):
        LocalCa(tmp_path / "ca", pkcs11=ref)
    assert sorted(o["kind"] for o in opensc_objects(tok)).count("Private Key Object") == 1


def test_ca_key_and_kek_share_one_module_and_one_token_in_one_process(tmp_path, tok, ref):
    """One owner per module in the process: the CA key and the KEK run on the same module
    thread and share the token's login; closing one leaves the other working."""
    key = generate_key(KeyType.EC_P256)
    with Pkcs11Kek(tok.module_path, tok.label, tok.user_pin, "cardline-kek") as kek:
        sealed = KeyArchive(kek).seal(key, "cert-1")
        with LocalCa(tmp_path / "ca", pkcs11=ref) as ca:
            cert = x509.load_der_x509_certificate(ca.issue(make_csr(), AUTH, "req-1"))
            cert.verify_directly_issued_by(ca_cert(ca))
            assert KeyArchive(kek).open(*sealed, "cert-1") == pkcs8(key)
            assert ca.token_call_threads == kek.token_call_threads == {kek.worker_thread_ident()}
        # The CA released the module; the KEK still holds it and its login.
        assert KeyArchive(kek).open(*sealed, "cert-1") == pkcs8(key)
    with LocalCa(tmp_path / "ca", pkcs11=ref) as ca:     # and the CA starts again alone
        x509.load_der_x509_certificate(ca.issue(make_csr(), AUTH, "req-2")).verify_directly_issued_by(ca_cert(ca))
    kinds = sorted(o["kind"] for o in opensc_objects(tok))
    assert kinds == ["Certificate Object", "Private Key Object", "Public Key Object", "Secret Key Object"]


def test_a_session_lost_under_both_users_is_logged_in_again_once_and_keys_are_found_again(tmp_path, tok, ref):
    """The shared session closes behind the module's back (as when a token restarts): the CA
    key and the KEK each log in again on their next call and find their own keys again."""
    from shared.pkcs11_module import Pkcs11Module

    key = generate_key(KeyType.EC_P256)
    with Pkcs11Kek(tok.module_path, tok.label, tok.user_pin, "cardline-kek") as kek, \
            LocalCa(tmp_path / "ca", pkcs11=ref) as ca:
        sealed = KeyArchive(kek).seal(key, "cert-1")
        module = Pkcs11Module.acquire(tok.module_path)
        try:
            stale = module.thread.call(lambda: module.login(tok.slot_id, tok.user_pin))
            module.thread.call(stale.close)         # the cache still holds it: the next use fails
            cert = x509.load_der_x509_certificate(ca.issue(make_csr(), AUTH, "req-1"))
            cert.verify_directly_issued_by(ca_cert(ca))
            assert KeyArchive(kek).open(*sealed, "cert-1") == pkcs8(key)
            assert module.thread.call(lambda: module.login(tok.slot_id, tok.user_pin)) is not stale
        finally:
            module.release()
    kinds = sorted(o["kind"] for o in opensc_objects(tok))
    assert kinds == ["Certificate Object", "Private Key Object", "Public Key Object", "Secret Key Object"]


def test_two_cas_share_one_module_with_keys_of_their_own(tmp_path, tok, pin_file):
    cas = build_cas([{"name": "local", "kind": "local",
                      "pkcs11": {"module": tok.module_path, "token_label": tok.label,
                                 "pin_file": str(pin_file), "key_label": "ca-one"}},
                     {"name": "second", "kind": "local", "directory": "second",
                      "pkcs11": {"module": tok.module_path, "token_label": tok.label,
                                 "pin_file": str(pin_file), "key_label": "ca-two"}}], tmp_path)
    try:
        issued = {name: x509.load_der_x509_certificate(ca.issue(make_csr(), AUTH, "req-1"))
                  for name, ca in cas.items()}
        for name, cert in issued.items():
            cert.verify_directly_issued_by(ca_cert(cas[name]))
        assert ca_cert(cas["local"]).public_key() != ca_cert(cas["second"]).public_key()
    finally:
        for ca in cas.values():
            assert isinstance(ca, LocalCa)
            ca.close()
    labels = {o["label"] for o in opensc_objects(tok) if o["kind"] == "Private Key Object"}
    assert labels == {"ca-one", "ca-two"}


def test_registry_puts_the_embedded_local_ca_on_the_token(tmp_path, tok, pin_file):
    cas = build_cas([{"name": "local", "kind": "local",
                      "pkcs11": {"module": tok.module_path, "token_label": tok.label,
                                 "pin_file": str(pin_file), "key_label": "embedded-ca"}}], tmp_path)
    try:
        assert list(cas) == ["local"]
        local = cas["local"]
        assert isinstance(local, LocalCa) and local.key_on_token
        cert = x509.load_der_x509_certificate(local.issue(make_csr(), AUTH, "req-1"))
        cert.verify_directly_issued_by(ca_cert(local))
        assert not (tmp_path / "ca" / "ca-key.pem").exists()
        assert (tmp_path / "ca" / "ca-cert.pem").exists()
    finally:
        for ca in cas.values():
            assert isinstance(ca, LocalCa)
            ca.close()
    labels = {o["label"] for o in opensc_objects(tok) if o["kind"] == "Private Key Object"}
    assert labels == {"embedded-ca"}


def test_registry_reports_every_pkcs11_mistake_at_once(tmp_path, tok, pin_file):
    with pytest.raises(ConfigurationError) as caught:
        build_cas([{"name": "local", "kind": "local", "pkcs11": {"module": tok.module_path, "pin": "1234"}},
                   {"name": "a", "kind": "local", "directory": "a", "passphrase_file": "x",
                    "pkcs11": {"module": tok.module_path, "token_label": tok.label, "pin_file": str(pin_file)}},
                   {"name": "b", "kind": "local", "directory": "b", "pkcs11": "yes"},
                   {"name": "c", "kind": "openssl", "directory": "c", "pkcs11": {}},
                   {"name": "d", "kind": "local", "directory": "d",
                    "pkcs11": {"module": tok.module_path, "token_label": tok.label, "pin_file": str(pin_file)}}],
                  tmp_path)
    message = caught.value.message
    assert "cas[1] (local): pkcs11 needs token_label, pin_file" in message
    assert "unknown key(s) ['pin'] in pkcs11" in message
    assert "cas[2] (a): passphrase_file and pkcs11 exclude each other" in message
    assert "cas[5] (d): the key 'cardline-ca' on PKCS#11 token" in message
    assert "used by two CAs (cas[2] (a) too)" in message
    assert "cas[3] (b): pkcs11 must be a mapping" in message
    assert "cas[4] (c): unknown key(s) ['pkcs11'] for kind openssl" in message
    assert not (tmp_path / "ca").exists()              # nothing was created
