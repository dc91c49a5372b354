"""Pkcs11TokenDriver key import, PIN management and data objects against a real SoftHSM2 token,
checked with `cryptography` and OpenSC's pkcs11-tool (an independent PKCS#11 client)."""
from __future__ import annotations

import datetime as dt
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from gateway.drivers.base import KeyType, ObjectClass, SignatureAlgorithm
from gateway.drivers.pkcs11 import Pkcs11TokenDriver
from shared.errors import InvalidArgument, PinIncorrect, WriteRefused

pytestmark = pytest.mark.hardware

NAME = x509.Name.from_rfc4514_string("CN=Recovered Key,O=Example")


@pytest.fixture
def driver(softhsm_token):
    drv = Pkcs11TokenDriver(softhsm_token.module_path)
    yield drv
    drv.close()


@pytest.fixture
def tok(softhsm_token):
    return softhsm_token


def pkcs8(key) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def issue(public_key, serial: int = 0x2A) -> x509.Certificate:
    """A throwaway certificate from a throwaway software CA."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(NAME)
            .issuer_name(x509.Name.from_rfc4514_string("CN=Throwaway Test CA"))
            .public_key(public_key).serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=1))
            .sign(ca_key, hashes.SHA256()))


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pkcs11_tool(tok, *args: str, pin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which("pkcs11-tool") is None:
        pytest.skip("pkcs11-tool (OpenSC) not installed")
    login = ["--login", "--pin", pin] if pin is not None else []
    return subprocess.run(["pkcs11-tool", "--module", tok.module_path, "--slot", str(tok.slot_id), *args, *login],
                          env=tok.env, capture_output=True, timeout=60, check=check)


def opensc_objects(tok, pin: str | None = None) -> list[dict]:
    """The token's objects as pkcs11-tool lists them; without a PIN, what a public session sees."""
    out = pkcs11_tool(tok, "--list-objects", pin=pin).stdout.decode()
    objects: list[dict] = []
    for line in out.splitlines():
        if line and not line[0].isspace():          # "Private Key Object; RSA", "Data object 5"
            objects.append({"kind": line.split(";")[0].strip().rstrip("0123456789").strip()})
        elif objects and ":" in line:
            key, _, value = line.strip().partition(":")
            objects[-1][key.strip()] = value.strip().strip("'")
    return objects


def private_key_of(kind: str):
    return {"EC P-256": lambda: ec.generate_private_key(ec.SECP256R1()),
            "EC P-384": lambda: ec.generate_private_key(ec.SECP384R1()),
            "RSA-2048": lambda: rsa.generate_private_key(65537, 2048),
            "RSA-4096": lambda: rsa.generate_private_key(65537, 4096)}[kind]()


def verify(public_key, signature: bytes, data: bytes) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    else:
        public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


# --- key import ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["EC P-256", "EC P-384", "RSA-2048", "RSA-4096"])
def test_imported_key_signs_and_the_signature_verifies_with_the_certificate(driver, tok, kind):
    key = private_key_of(kind)
    cert = issue(key.public_key())
    driver.import_key_pair(tok.slot_id, tok.user_pin, b"\x10\x01", "recovered", pkcs8(key), der(cert))

    algorithm = (SignatureAlgorithm.ECDSA_SHA256 if kind.startswith("EC")
                 else SignatureAlgorithm.RSA_PKCS1_SHA256)
    signature = driver.sign(tok.slot_id, tok.user_pin, b"\x10\x01", algorithm, b"archived message")
    verify(cert.public_key(), signature, b"archived message")


def test_imported_key_public_half_and_certificate_share_the_id_as_seen_by_opensc(driver, tok):
    key = rsa.generate_private_key(65537, 2048)
    cert = issue(key.public_key(), serial=0x3039)
    driver.import_key_pair(tok.slot_id, tok.user_pin, b"\xbe\xef", "escrowed", pkcs8(key), der(cert))

    objects = {o["kind"]: o for o in opensc_objects(tok, tok.user_pin)}
    assert set(objects) == {"Private Key Object", "Public Key Object", "Certificate Object"}
    assert {o["ID"] for o in objects.values()} == {"beef"}
    assert {o["label"] for o in objects.values()} == {"escrowed"}
    assert objects["Certificate Object"]["serial"] == "3039"
    private = objects["Private Key Object"]
    assert "sensitive" in private["Access"] and "extractable" not in private["Access"]
    # An escrowed RSA key is mainly an encryption key: it must decrypt and unwrap, and sign.
    assert {"decrypt", "sign", "unwrap"} <= set(private["Usage"].replace(",", " ").split())


def test_imported_key_without_certificate_is_listed_as_a_key_pair(driver, tok):
    key = ec.generate_private_key(ec.SECP256R1())
    driver.import_key_pair(tok.slot_id, tok.user_pin, b"\x01", "no cert", pkcs8(key))
    seen = {(o.object_class, o.key_id, o.label, o.key_type) for o in driver.list_objects(tok.slot_id, tok.user_pin)}
    assert seen == {(ObjectClass.PRIVATE_KEY, b"\x01", "no cert", KeyType.EC_P256),
                    (ObjectClass.PUBLIC_KEY, b"\x01", "no cert", KeyType.EC_P256)}


def test_import_with_a_certificate_for_another_key_is_refused_and_leaves_nothing_on_the_token(driver, tok):
    key = ec.generate_private_key(ec.SECP256R1())
    stranger = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(WriteRefused):
        driver.import_key_pair(tok.slot_id, tok.user_pin, b"\x01", "k", pkcs8(key), der(issue(stranger.public_key())))
    assert opensc_objects(tok, tok.user_pin) == []


def test_import_over_an_existing_key_id_is_refused_and_keeps_the_existing_key(driver, tok):
    gen = driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "on-card", b"\x01")
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(WriteRefused):
        driver.import_key_pair(tok.slot_id, tok.user_pin, b"\x01", "imported", pkcs8(key))
    assert {o.label for o in driver.list_objects(tok.slot_id, tok.user_pin)} == {"on-card"}
    signature = driver.sign(tok.slot_id, tok.user_pin, b"\x01", SignatureAlgorithm.ECDSA_SHA256, b"m")
    verify(serialization.load_der_public_key(gen.public_key_der), signature, b"m")


def test_a_certificate_the_token_refuses_takes_the_imported_key_pair_away_again(driver, tok, monkeypatch):
    def refuse(*args, **kwargs):
        raise WriteRefused("the token refused the certificate: DeviceMemory")
    monkeypatch.setattr(driver, "_store_certificate", refuse)
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(WriteRefused):
        driver.import_key_pair(tok.slot_id, tok.user_pin, b"\x01", "k", pkcs8(key), der(issue(key.public_key())))
    assert opensc_objects(tok, tok.user_pin) == []


@pytest.mark.parametrize("private_key_der", [b"", b"\x30\x03garbage",
                                             pkcs8(ec.generate_private_key(ec.SECP521R1())),
                                             pkcs8(ed25519.Ed25519PrivateKey.generate())],
                         ids=["empty", "garbage", "P-521", "Ed25519"])
def test_malformed_or_unsupported_private_key_is_invalid_argument(driver, tok, private_key_der):
    with pytest.raises(InvalidArgument):
        driver.import_key_pair(tok.slot_id, tok.user_pin, b"\x01", "k", private_key_der)
    assert driver.list_objects(tok.slot_id, tok.user_pin) == []


def test_encrypted_private_key_is_invalid_argument_and_its_bytes_stay_out_of_the_error(driver, tok):
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"passphrase"))
    with pytest.raises(InvalidArgument) as caught:
        driver.import_key_pair(tok.slot_id, tok.user_pin, b"\x01", "k", encrypted)
    assert encrypted.hex() not in str(caught.value) and "passphrase" not in str(caught.value)


def test_malformed_certificate_is_invalid_argument_and_imports_nothing(driver, tok):
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidArgument):
        driver.import_key_pair(tok.slot_id, tok.user_pin, b"\x01", "k", pkcs8(key), b"\x30\x03bad")
    assert driver.list_objects(tok.slot_id, tok.user_pin) == []


# --- PINs --------------------------------------------------------------------------------------

def test_changed_user_pin_logs_in_and_the_old_one_is_refused(driver, tok):
    driver.list_objects(tok.slot_id, tok.user_pin)          # leaves a session cached under the old PIN
    driver.set_pins(tok.slot_id, tok.user_pin, "", "246810", "")
    assert driver.list_objects(tok.slot_id, "246810") == []
    with pytest.raises(PinIncorrect):
        driver.list_objects(tok.slot_id, tok.user_pin)
    assert pkcs11_tool(tok, "--list-objects", pin="246810").returncode == 0


def test_changed_so_pin_works_and_the_old_one_is_refused(driver, tok):
    driver.set_pins(tok.slot_id, "", tok.so_pin, "", "SO-87654321")
    with pytest.raises(PinIncorrect):
        driver.set_pins(tok.slot_id, "", tok.so_pin, "", "SO-11111111")
    # An independent client agrees: the old SO PIN is refused, the new one resets the user PIN.
    assert pkcs11_tool(tok, "--login", "--login-type", "so", "--so-pin", tok.so_pin, "--init-pin",
                       "--new-pin", "555555", check=False).returncode != 0
    pkcs11_tool(tok, "--login", "--login-type", "so", "--so-pin", "SO-87654321", "--init-pin", "--new-pin", "555555")
    # (Checked with pkcs11-tool again: a SoftHSM2 process that is already running keeps the PINs
    # it loaded and sees another process's PIN change only after re-initialising the module.)
    assert pkcs11_tool(tok, "--list-objects", pin="555555").returncode == 0


def test_so_pin_resets_a_forgotten_user_pin(driver, tok):
    driver.generate_key_pair(tok.slot_id, tok.user_pin, KeyType.EC_P256, "kept", b"\x01")
    driver.set_pins(tok.slot_id, "", tok.so_pin, "135790", "")
    assert {o.label for o in driver.list_objects(tok.slot_id, "135790")} == {"kept"}
    with pytest.raises(PinIncorrect):
        driver.list_objects(tok.slot_id, tok.user_pin)


def test_user_and_so_pins_change_in_one_call(driver, tok):
    driver.set_pins(tok.slot_id, tok.user_pin, tok.so_pin, "111222", "SO-44445555")
    assert driver.list_objects(tok.slot_id, "111222") == []
    driver.set_pins(tok.slot_id, "", "SO-44445555", "333444", "")
    assert driver.list_objects(tok.slot_id, "333444") == []


def test_wrong_user_pin_is_pin_incorrect_and_changes_nothing(driver, tok):
    with pytest.raises(PinIncorrect) as caught:
        driver.set_pins(tok.slot_id, "999999", "", "246810", "")
    assert "999999" not in str(caught.value) and "246810" not in str(caught.value)
    assert driver.list_objects(tok.slot_id, tok.user_pin) == []


def test_wrong_so_pin_changes_neither_pin(driver, tok):
    with pytest.raises(PinIncorrect):
        driver.set_pins(tok.slot_id, tok.user_pin, "wrong-so-pin", "246810", "SO-87654321")
    assert driver.list_objects(tok.slot_id, tok.user_pin) == []
    driver.set_pins(tok.slot_id, "", tok.so_pin, "", "SO-87654321")      # the SO PIN is still the old one


def test_wrong_user_pin_changes_neither_pin_when_both_are_set(driver, tok):
    with pytest.raises(PinIncorrect):
        driver.set_pins(tok.slot_id, "999999", tok.so_pin, "246810", "SO-87654321")
    driver.set_pins(tok.slot_id, "", tok.so_pin, "", "SO-87654321")      # the SO PIN is still the old one
    assert driver.list_objects(tok.slot_id, tok.user_pin) == []


@pytest.mark.parametrize("new_user_pin, new_so_pin", [("12", ""), ("", "123"), ("1" * 256, "")],
                         ids=["user-too-short", "so-too-short", "user-too-long"])
def test_new_pin_of_a_length_the_token_refuses_is_invalid_argument(driver, tok, new_user_pin, new_so_pin):
    with pytest.raises(InvalidArgument):
        driver.set_pins(tok.slot_id, tok.user_pin, tok.so_pin, new_user_pin, new_so_pin)
    assert driver.list_objects(tok.slot_id, tok.user_pin) == []


@pytest.mark.parametrize("user_pin, so_pin, new_user_pin, new_so_pin", [
    ("1234", "12345678", "", ""),          # nothing to set
    ("", "", "246810", ""),                # no PIN to authorise the change
    ("1234", "", "", "SO-87654321"),       # the SO PIN changes only with the SO PIN
], ids=["nothing", "no-credentials", "so-without-so-pin"])
def test_pin_change_without_what_it_needs_is_invalid_argument(driver, tok, user_pin, so_pin, new_user_pin,
                                                               new_so_pin):
    with pytest.raises(InvalidArgument):
        driver.set_pins(tok.slot_id, user_pin, so_pin, new_user_pin, new_so_pin)


# --- data objects ------------------------------------------------------------------------------

def test_written_data_object_is_listed_by_label(driver, tok):
    driver.write_data_object(tok.slot_id, tok.user_pin, "cardline", "holder", b"Jane Doe", private=False)
    listed = [o for o in driver.list_objects(tok.slot_id, tok.user_pin) if o.object_class is ObjectClass.DATA]
    assert [(o.label, o.key_id) for o in listed] == [("holder", b"")]
    assert [(o["label"], o["application"]) for o in opensc_objects(tok) if o["kind"] == "Data object"] == [
        ("holder", "cardline")]


def test_data_object_with_the_same_application_and_label_is_replaced(driver, tok):
    driver.write_data_object(tok.slot_id, tok.user_pin, "cardline", "holder", b"old value", private=True)
    driver.write_data_object(tok.slot_id, tok.user_pin, "cardline", "holder", b"new value", private=True)
    driver.write_data_object(tok.slot_id, tok.user_pin, "other-app", "holder", b"other", private=True)
    data = [o for o in opensc_objects(tok, tok.user_pin) if o["kind"] == "Data object"]
    assert sorted(o["application"] for o in data) == ["cardline", "other-app"]
    value = pkcs11_tool(tok, "--read-object", "--type", "data", "--label", "holder",
                        "--application-label", "cardline", pin=tok.user_pin).stdout
    assert value == b"new value"


def test_private_data_object_is_invisible_without_login_and_a_public_one_is_not(driver, tok):
    driver.write_data_object(tok.slot_id, tok.user_pin, "cardline", "secret", b"\x00\x01", private=True)
    driver.write_data_object(tok.slot_id, tok.user_pin, "cardline", "public", b"\x02", private=False)
    assert {o["label"] for o in opensc_objects(tok) if o["kind"] == "Data object"} == {"public"}
    logged_in = opensc_objects(tok, tok.user_pin)
    assert {o["label"] for o in logged_in if o["kind"] == "Data object"} == {"secret", "public"}
    assert "private" in next(o for o in logged_in if o.get("label") == "secret")["flags"]


def test_data_object_without_a_label_is_invalid_argument(driver, tok):
    with pytest.raises(InvalidArgument):
        driver.write_data_object(tok.slot_id, tok.user_pin, "cardline", "", b"x", private=False)
