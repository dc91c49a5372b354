"""Pkcs11TokenDriver against a real SoftHSM2 token, checked with `cryptography` and OpenSC."""
from __future__ import annotations

import datetime as dt
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from gateway.drivers.base import KeyType, ObjectClass, SignatureAlgorithm
from gateway.drivers.pkcs11 import Pkcs11TokenDriver
from shared.errors import (
    CardIoError,
    InvalidArgument,
    KeyNotFound,
    NoCardPresent,
    PinIncorrect,
    ReaderNotFound,
    WriteRefused,
)
from tests.support import softhsm

pytestmark = pytest.mark.hardware

SUBJECT = "CN=Jane Doe,O=Example"


@pytest.fixture
def driver(softhsm_token):
    drv = Pkcs11TokenDriver(softhsm_token.module_path)
    yield drv
    drv.close()


@pytest.fixture
def tok(softhsm_token):
    return softhsm_token


def load_spki(der: bytes):
    return serialization.load_der_public_key(der)


def issue(public_key, subject: x509.Name, serial: int = 0x0123456789) -> x509.Certificate:
    """A throwaway certificate from a throwaway software CA."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject)
            .issuer_name(x509.Name.from_rfc4514_string("CN=Throwaway Test CA"))
            .public_key(public_key).serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


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
        if line and not line[0].isspace():          # "Certificate Object; type = X.509 cert"
            objects.append({"kind": line.split(";")[0].strip()})
        elif objects and ":" in line:
            key, _, value = line.strip().partition(":")
            objects[-1][key.strip()] = value.strip()
    return objects


# --- inventory ---------------------------------------------------------------------------

def test_list_tokens_names_the_token_by_module_and_serial(driver, tok):
    infos = {i.slot_id: i for i in driver.list_tokens()}
    info = infos[tok.slot_id]
    assert info.reader_id == f"pkcs11:softhsm2:{tok.serial}"
    assert (info.token_present, info.token_label, info.token_serial) == (True, tok.label, tok.serial)
    assert info.token_model == "SoftHSM v2"


# --- key generation and CSRs ---------------------------------------------------------------

@pytest.mark.parametrize("key_type, size", [(KeyType.EC_P256, 256), (KeyType.RSA_2048, 2048),
                                            (KeyType.RSA_3072, 3072)])
def test_generated_key_csr_is_signed_by_the_token_key(driver, tok, key_type, size):
    gen = driver.generate_key_pair(tok.slot_id, tok.user_pin, key_type, "card key", b"\x01\x02", SUBJECT)
    public = load_spki(gen.public_key_der)
    csr = x509.load_der_x509_csr(gen.csr_der)
    assert gen.key_id == b"\x01\x02"
    assert public.key_size == size
    assert csr.is_signature_valid
    assert csr.public_key() == public
    assert csr.subject == x509.Name.from_rfc4514_string(SUBJECT)


def test_generate_without_subject_returns_no_csr(driver, tok):
    gen = driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "k", b"\x07")
    assert gen.csr_der == b""
    assert isinstance(load_spki(gen.public_key_der), ec.EllipticCurvePublicKey)


def test_generated_private_key_is_sensitive_never_extractable_with_id_and_label_on_both_halves(driver, tok):
    driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "both-halves", b"\xab\xcd")
    objs = [o for o in opensc_objects(tok) if o.get("ID") == "abcd"]
    kinds = {o["kind"]: o for o in objs}
    assert set(kinds) == {"Private Key Object", "Public Key Object"}
    assert all(o["label"] == "both-halves" for o in objs)
    access = kinds["Private Key Object"]["Access"]
    assert "sensitive" in access and "never extractable" in access


def test_bad_csr_subject_is_invalid_argument_and_creates_no_key(driver, tok):
    with pytest.raises(InvalidArgument):
        driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "k", b"\x01", "not a DN")
    assert driver.list_objects(tok.slot_id, tok.user_pin) == []


def test_generating_over_an_existing_key_id_is_refused(driver, tok):
    driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "k", b"\x01")
    with pytest.raises(WriteRefused):
        driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "k2", b"\x01")


# --- signing -------------------------------------------------------------------------------

def test_ecdsa_sha256_signature_verifies_with_the_public_key(driver, tok):
    gen = driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "k", b"\x01")
    sig = driver.sign(tok.slot_id, tok.user_pin, b"\x01", SignatureAlgorithm.ECDSA_SHA256, b"message")
    load_spki(gen.public_key_der).verify(sig, b"message", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        load_spki(gen.public_key_der).verify(sig, b"other", ec.ECDSA(hashes.SHA256()))


def test_rsa_pkcs1_sha256_signature_verifies_with_the_public_key(driver, tok):
    gen = driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.RSA_2048, "k", b"\x02")
    sig = driver.sign(tok.slot_id, tok.user_pin, b"\x02", SignatureAlgorithm.RSA_PKCS1_SHA256, b"message")
    load_spki(gen.public_key_der).verify(sig, b"message", padding.PKCS1v15(), hashes.SHA256())


def test_sign_with_an_algorithm_of_the_other_key_family_is_invalid_argument(driver, tok):
    driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "k", b"\x01")
    with pytest.raises(InvalidArgument):
        driver.sign(tok.slot_id, tok.user_pin, b"\x01", SignatureAlgorithm.RSA_PKCS1_SHA256, b"m")


def test_sign_with_unknown_key_id_is_key_not_found(driver, tok):
    with pytest.raises(KeyNotFound):
        driver.sign(tok.slot_id, tok.user_pin, b"\x99", SignatureAlgorithm.ECDSA_SHA256, b"m")


# --- certificates --------------------------------------------------------------------------

def test_written_certificate_has_the_key_id_as_seen_by_opensc(driver, tok):
    gen = driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "card key", b"\x42\x01", SUBJECT)
    csr = x509.load_der_x509_csr(gen.csr_der)
    cert = issue(csr.public_key(), csr.subject, serial=0x3039)
    driver.write_certificate(tok.slot_id, tok.user_pin, b"\x42\x01", "card cert", der(cert))

    certs = [o for o in opensc_objects(tok) if o["kind"] == "Certificate Object"]
    assert len(certs) == 1
    assert certs[0]["ID"] == "4201"
    assert certs[0]["label"] == "card cert"
    assert certs[0]["serial"] == "3039"          # OpenSC decodes our DER INTEGER
    assert "CN=Jane Doe" in certs[0]["subject"]
    listed = [o for o in driver.list_objects(tok.slot_id, tok.user_pin) if o.object_class is ObjectClass.CERTIFICATE]
    assert [(o.key_id, o.certificate_der) for o in listed] == [(b"\x42\x01", der(cert))]


def test_writing_a_new_certificate_replaces_the_old_one_for_that_key(driver, tok):
    gen = driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.RSA_2048, "k", b"\x05", "CN=r")
    public = load_spki(gen.public_key_der)
    name = x509.Name.from_rfc4514_string("CN=r")
    driver.write_certificate(tok.slot_id, tok.user_pin, b"\x05", "old", der(issue(public, name, 1)))
    renewed = issue(public, name, 2)
    driver.write_certificate(tok.slot_id, tok.user_pin, b"\x05", "new", der(renewed))
    certs = [o for o in driver.list_objects(tok.slot_id, tok.user_pin) if o.object_class is ObjectClass.CERTIFICATE]
    assert [(o.label, o.certificate_der) for o in certs] == [("new", der(renewed))]


def test_certificate_for_another_public_key_is_refused(driver, tok):
    driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "k", b"\x01")
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(WriteRefused):
        driver.write_certificate(tok.slot_id, tok.user_pin, b"\x01", "c",
                                 der(issue(stranger, x509.Name.from_rfc4514_string("CN=x"))))
    assert not [o for o in opensc_objects(tok) if o["kind"] == "Certificate Object"]


def test_certificate_without_a_private_key_of_that_id_is_refused(driver, tok):
    gen = driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "k", b"\x01")
    cert = issue(load_spki(gen.public_key_der), x509.Name.from_rfc4514_string("CN=x"))
    with pytest.raises(WriteRefused):
        driver.write_certificate(tok.slot_id, tok.user_pin, b"\x02", "c", der(cert))


def test_malformed_certificate_der_is_invalid_argument(driver, tok):
    driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "k", b"\x01")
    with pytest.raises(InvalidArgument):
        driver.write_certificate(tok.slot_id, tok.user_pin, b"\x01", "c", b"\x30\x03garbage")


# --- objects -------------------------------------------------------------------------------

def test_list_objects_reports_class_id_label_and_key_type(driver, tok):
    driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "ec", b"\x01")
    driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.RSA_2048, "rsa", b"\x02")
    seen = {(o.object_class, o.key_id, o.label, o.key_type) for o in driver.list_objects(tok.slot_id, tok.user_pin)}
    assert seen == {
        (ObjectClass.PUBLIC_KEY, b"\x01", "ec", KeyType.EC_P256),
        (ObjectClass.PRIVATE_KEY, b"\x01", "ec", KeyType.EC_P256),
        (ObjectClass.PUBLIC_KEY, b"\x02", "rsa", KeyType.RSA_2048),
        (ObjectClass.PRIVATE_KEY, b"\x02", "rsa", KeyType.RSA_2048),
    }


def test_delete_objects_removes_key_pair_and_certificate_of_that_id_only(driver, tok):
    gen = driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "gone", b"\x01", "CN=g")
    driver.write_certificate(tok.slot_id, tok.user_pin, b"\x01", "gone",
                             der(issue(load_spki(gen.public_key_der), x509.Name.from_rfc4514_string("CN=g"))))
    driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "kept", b"\x02")
    assert driver.delete_objects(tok.slot_id, tok.user_pin, b"\x01") == 3
    assert {o.key_id for o in driver.list_objects(tok.slot_id, tok.user_pin)} == {b"\x02"}
    assert driver.delete_objects(tok.slot_id, tok.user_pin, b"\x01") == 0
    with pytest.raises(KeyNotFound):
        driver.sign(tok.slot_id, tok.user_pin, b"\x01", SignatureAlgorithm.ECDSA_SHA256, b"m")


# --- PIN, slots, disappearing tokens ---------------------------------------------------------

def test_wrong_pin_is_pin_incorrect_and_does_not_leak_the_pin(driver, tok):
    with pytest.raises(PinIncorrect) as caught:
        driver.list_objects(tok.slot_id, "987654")
    assert "987654" not in str(caught.value) and "987654" not in str(caught.value.metadata)


def test_wrong_pin_is_refused_even_after_a_session_logged_in_with_the_right_one(driver, tok):
    driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "k", b"\x01")
    with pytest.raises(PinIncorrect):
        driver.sign(tok.slot_id, "987654", b"\x01", SignatureAlgorithm.ECDSA_SHA256, b"m")
    # ... and the right PIN logs in again afterwards.
    assert driver.sign(tok.slot_id, tok.user_pin, b"\x01", SignatureAlgorithm.ECDSA_SHA256, b"m")


def test_empty_pin_is_invalid_argument(driver, tok):
    with pytest.raises(InvalidArgument):
        driver.list_objects(tok.slot_id, "")


def test_unknown_slot_is_reader_not_found(driver, tok):
    with pytest.raises(ReaderNotFound):
        driver.list_objects(0x7FFF_FFF0, tok.user_pin)


def test_token_deleted_between_calls_gives_a_clear_error_and_the_driver_lives_on(driver, tok):
    driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "k", b"\x01")
    softhsm.delete_token(tok.conf_path, tok.serial)
    with pytest.raises((NoCardPresent, CardIoError)):
        driver.sign(tok.slot_id, tok.user_pin, b"\x01", SignatureAlgorithm.ECDSA_SHA256, b"m")
    with pytest.raises((NoCardPresent, CardIoError)):
        driver.list_objects(tok.slot_id, tok.user_pin)
    gone = [i for i in driver.list_tokens() if i.slot_id == tok.slot_id]
    assert all(not i.token_present for i in gone)


def test_closed_driver_refuses_calls(tok):
    drv = Pkcs11TokenDriver(tok.module_path)
    drv.close()
    with pytest.raises(CardIoError):
        drv.list_tokens()
