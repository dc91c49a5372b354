"""Pkcs11Kek on a real SoftHSM2 token, checked with OpenSC's pkcs11-tool (C7 recovery).

Closing every Pkcs11Kek (the `kek` fixture does) releases the module (the last release
finalises it), so these tests share
one pytest process with tests/hardware/test_pkcs11_driver.py, which loads the same module.
"""
from __future__ import annotations

import shutil
import subprocess
import threading

import pytest
from cryptography.hazmat.primitives import serialization

from orchestrator.services.key_archive import (
    ALGORITHM,
    FileKek,
    KeyArchive,
    KeyEncryptionKey,
    Pkcs11Kek,
    generate_key,
    kek_from_settings,
)
from shared.cards import KeyType
from shared.errors import CardIoError, ConfigurationError, InvalidArgument

pytestmark = pytest.mark.hardware

KEY_LABEL = "cardline-kek"


@pytest.fixture
def tok(softhsm_token):
    return softhsm_token


@pytest.fixture
def kek(tok):
    k = Pkcs11Kek(tok.module_path, tok.label, tok.user_pin, KEY_LABEL)
    yield k
    k.close()


def pkcs8(key) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


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
        if line and not line[0].isspace():          # "Secret Key Object; AES length 32"
            kind, _, detail = line.partition(";")
            objects.append({"kind": kind.strip(), "detail": detail.strip()})
        elif objects and ":" in line:
            key, _, value = line.strip().partition(":")
            objects[-1][key.strip()] = value.strip()
    return objects


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_2048])
def test_c7_key_sealed_on_the_token_opens_to_the_same_pkcs8(kek, tok, key_type):
    archive = KeyArchive(kek)
    key = generate_key(key_type)
    kek_id, algorithm, blob = archive.seal(key, "cert-1")
    assert kek_id == f"pkcs11:{tok.label}:{KEY_LABEL}"
    assert algorithm == ALGORITHM
    assert isinstance(kek, KeyEncryptionKey)
    assert archive.open(kek_id, algorithm, blob, "cert-1") == pkcs8(key)
    for i in range(0, len(pkcs8(key)) - 16, 16):
        assert pkcs8(key)[i:i + 16] not in blob


def test_kek_key_is_a_non_extractable_sensitive_aes_secret_key_with_its_label(kek, tok):
    KeyArchive(kek).seal(generate_key(KeyType.EC_P256), "cert-1")
    objects = opensc_objects(tok)
    assert len(objects) == 1
    obj = objects[0]
    assert obj["kind"] == "Secret Key Object"
    assert obj["detail"] == "AES length 32"
    assert obj["label"] == KEY_LABEL
    access = obj["Access"]
    assert "sensitive" in access and "never extractable" in access
    assert "encrypt" in obj["Usage"] and "decrypt" in obj["Usage"]
    assert "wrap" not in obj["Usage"]


def test_the_key_survives_a_restart_and_is_not_created_twice(tok):
    key = generate_key(KeyType.EC_P256)
    with Pkcs11Kek(tok.module_path, tok.label, tok.user_pin, KEY_LABEL) as first:
        sealed = KeyArchive(first).seal(key, "cert-1")
    with Pkcs11Kek(tok.module_path, tok.label, tok.user_pin, KEY_LABEL) as second:
        assert KeyArchive(second).open(*sealed, "cert-1") == pkcs8(key)
        # The same key: the same key tag (what replicas compare), the one in the blob's header.
        assert second.key_tag == first.key_tag == sealed[2][1:9].hex()
    assert [o["kind"] for o in opensc_objects(tok)] == ["Secret Key Object"]


def test_every_token_call_runs_on_one_thread_whoever_calls(kek):
    archive = KeyArchive(kek)
    key = generate_key(KeyType.EC_P256)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                cert = f"cert-{n}-{i}"
                assert archive.open(*archive.seal(key, cert), cert) == pkcs8(key)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert kek.token_call_threads == {kek.worker_thread_ident()}
    assert threading.get_ident() not in kek.token_call_threads


def test_wrong_certificate_and_tampered_blob_are_refused_by_the_token(kek):
    archive = KeyArchive(kek)
    kek_id, algorithm, blob = archive.seal(generate_key(KeyType.EC_P256), "cert-1")
    with pytest.raises(InvalidArgument, match="does not decrypt"):
        archive.open(kek_id, algorithm, blob, "cert-2")
    bad = bytearray(blob)
    bad[-1] ^= 1
    with pytest.raises(InvalidArgument, match="does not decrypt"):
        archive.open(kek_id, algorithm, bytes(bad), "cert-1")


def test_a_key_recreated_under_the_same_label_is_told_apart(tok):
    key = generate_key(KeyType.EC_P256)
    with Pkcs11Kek(tok.module_path, tok.label, tok.user_pin, KEY_LABEL) as first:
        sealed = KeyArchive(first).seal(key, "cert-1")
    if shutil.which("pkcs11-tool") is None:
        pytest.skip("pkcs11-tool (OpenSC) not installed")
    subprocess.run(["pkcs11-tool", "--module", tok.module_path, "--slot", str(tok.slot_id), "--login",
                    "--pin", tok.user_pin, "--delete-object", "--type", "secrkey", "--label", KEY_LABEL],
                   env=tok.env, capture_output=True, check=True, timeout=60)
    with (Pkcs11Kek(tok.module_path, tok.label, tok.user_pin, KEY_LABEL) as second,
          pytest.raises(ConfigurationError, match="rotated or replaced")):
        assert second.key_tag != first.key_tag          # replicas with the two keys are told apart
        KeyArchive(second).open(*sealed, "cert-1")


def test_blob_of_a_file_kek_is_refused(kek, tmp_path):
    sealed = KeyArchive(FileKek(tmp_path / "kek.key")).seal(generate_key(KeyType.EC_P256), "cert-1")
    with pytest.raises(ConfigurationError, match="sealed by key-encryption key"):
        KeyArchive(kek).open(*sealed, "cert-1")


def test_wrong_pin_or_token_label_fails_at_start_up(tok):
    with pytest.raises(ConfigurationError, match="PIN"):
        Pkcs11Kek(tok.module_path, tok.label, "0000", KEY_LABEL)
    with pytest.raises(ConfigurationError, match="no PKCS#11 token labelled"):
        Pkcs11Kek(tok.module_path, "no-such-token", tok.user_pin, KEY_LABEL)
    with Pkcs11Kek(tok.module_path, tok.label, tok.user_pin, KEY_LABEL) as k:   # still usable after
        assert k.kek_id.endswith(KEY_LABEL)


def test_closed_kek_refuses_calls(tok):
    k = Pkcs11Kek(tok.module_path, tok.label, tok.user_pin, KEY_LABEL)
    k.close()
    k.close()       # idempotent
    with pytest.raises(CardIoError, match="closed"):
        k.wrap(b"x", b"ad")


def test_kek_from_settings_reads_the_pin_file(tok, tmp_path):
    pin_file = tmp_path / "kek.pin"
    pin_file.write_text(tok.user_pin + "\n")
    k = kek_from_settings("pkcs11", tmp_path, pkcs11_module=tok.module_path, token_label=tok.label,
                          pin_file=pin_file)
    assert isinstance(k, Pkcs11Kek)
    try:
        assert k.kek_id == f"pkcs11:{tok.label}:cardline-kek"
        key = generate_key(KeyType.EC_P256)
        assert KeyArchive(k).open(*KeyArchive(k).seal(key, "c"), "c") == pkcs8(key)
    finally:
        k.close()


def test_two_keks_on_one_token_share_the_module_and_its_login(kek, tok):
    """A second user of the module in this process joins the first (one owner, one login)
    instead of being refused; closing it leaves the first one working."""
    key = generate_key(KeyType.EC_P256)
    with Pkcs11Kek(tok.module_path, tok.label, tok.user_pin, KEY_LABEL) as second:
        assert second.worker_thread_ident() == kek.worker_thread_ident()
        sealed = KeyArchive(second).seal(key, "cert-1")
    assert KeyArchive(kek).open(*sealed, "cert-1") == pkcs8(key)
    assert [o["kind"] for o in opensc_objects(tok)] == ["Secret Key Object"]
