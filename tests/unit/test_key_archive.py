"""Server-side key generation and key archival under a file KEK (C7 recovery)."""
from __future__ import annotations

import json
import os
import stat
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from orchestrator.services.key_archive import (
    ALGORITHM,
    FileKek,
    KeyArchive,
    KeyEncryptionKey,
    Pkcs11Kek,
    generate_key,
    kek_from_settings,
    open_json,
    seal_json,
)
from shared.cards import KeyType
from shared.errors import ConfigurationError, InvalidArgument


def pkcs8(key) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture
def kek_path(tmp_path):
    return tmp_path / "data" / "kek.key"


@pytest.fixture
def archive(kek_path):
    return KeyArchive(FileKek(kek_path))


@pytest.fixture(scope="module")
def ec_key():
    return generate_key(KeyType.EC_P256)


# --- key generation --------------------------------------------------------------------------

@pytest.mark.parametrize("key_type, cls, size", [(KeyType.EC_P256, ec.EllipticCurvePrivateKey, 256),
                                                 (KeyType.RSA_2048, rsa.RSAPrivateKey, 2048),
                                                 (KeyType.RSA_3072, rsa.RSAPrivateKey, 3072)])
def test_generate_key_gives_the_requested_type(key_type, cls, size):
    key = generate_key(key_type)
    assert isinstance(key, cls)
    assert key.key_size == size
    if isinstance(key, ec.EllipticCurvePrivateKey):
        assert isinstance(key.curve, ec.SECP256R1)
    else:
        assert key.private_numbers().public_numbers.e == 65537


def test_generate_key_refuses_an_unknown_type():
    with pytest.raises(InvalidArgument):
        generate_key("EC_P384")  # type: ignore[arg-type]  # a wrong value is the point


# --- round trips -----------------------------------------------------------------------------

@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_2048, KeyType.RSA_3072])
def test_c7_sealed_key_opens_to_the_same_pkcs8(archive, key_type):
    key = generate_key(key_type)
    kek_id, algorithm, blob = archive.seal(key, "cert-1")
    assert kek_id == archive.kek.kek_id and kek_id.startswith("file:")
    assert algorithm == ALGORITHM == "AES-256-GCM"
    der = archive.open(kek_id, algorithm, blob, "cert-1")
    assert der == pkcs8(key)
    restored = serialization.load_der_private_key(der, password=None)
    assert isinstance(restored, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    assert restored.private_numbers() == key.private_numbers()


def test_a_new_kek_object_on_the_same_file_opens_old_blobs(kek_path, ec_key):
    kek_id, algorithm, blob = KeyArchive(FileKek(kek_path)).seal(ec_key, "cert-1")
    again = KeyArchive(kek_from_settings("file", kek_path.parent))
    assert again.kek.kek_id == kek_id
    assert again.open(kek_id, algorithm, blob, "cert-1") == pkcs8(ec_key)


def test_each_seal_uses_a_fresh_nonce(archive, ec_key):
    blobs = {archive.seal(ec_key, "cert-1")[2] for _ in range(20)}
    assert len(blobs) == 20


# --- the key file ----------------------------------------------------------------------------

def test_kek_file_is_created_on_first_use_with_mode_0600(kek_path, ec_key):
    kek = FileKek(kek_path)
    assert not kek_path.exists()
    KeyArchive(kek).seal(ec_key, "cert-1")
    st = os.stat(kek_path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 32
    assert not [p for p in kek_path.parent.iterdir() if p != kek_path]   # no temporary left behind


def test_kek_id_is_the_sha256_fingerprint_of_the_key(kek_path):
    import hashlib
    kek = FileKek(kek_path)
    kek_id = kek.kek_id
    assert kek_id == "file:" + hashlib.sha256(kek_path.read_bytes()).hexdigest()[:16]


def test_file_kek_key_tag_is_in_every_blob_and_follows_the_key_not_the_file(kek_path, tmp_path):
    kek = FileKek(kek_path)
    blob = kek.wrap(b"secret", b"aad")
    assert blob[1:9].hex() == kek.key_tag
    copy = tmp_path / "copy" / "kek.key"
    copy.parent.mkdir()
    copy.write_bytes(kek_path.read_bytes())
    copy.chmod(0o600)
    assert FileKek(copy).key_tag == kek.key_tag                      # a copy is the same key
    assert FileKek(tmp_path / "other.key").key_tag != kek.key_tag    # another key is not


def test_kek_file_created_concurrently_is_one_key(kek_path):
    keks = [FileKek(kek_path) for _ in range(8)]
    ids: list[str] = []
    threads = [threading.Thread(target=lambda k=k: ids.append(k.kek_id)) for k in keks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1


def test_kek_file_readable_by_others_is_refused(kek_path):
    assert FileKek(kek_path).kek_id
    os.chmod(kek_path, 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        _ = FileKek(kek_path).kek_id


def test_kek_file_of_the_wrong_size_is_refused(kek_path):
    kek_path.parent.mkdir(parents=True)
    fd = os.open(kek_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"too short")
    os.close(fd)
    with pytest.raises(ConfigurationError, match="not a 256-bit key"):
        FileKek(kek_path).wrap(b"x", b"ad")


# --- refusals --------------------------------------------------------------------------------

def test_blob_bound_to_another_certificate_is_refused(archive, ec_key):
    kek_id, algorithm, blob = archive.seal(ec_key, "cert-1")
    with pytest.raises(InvalidArgument, match="another certificate"):
        archive.open(kek_id, algorithm, blob, "cert-2")


@pytest.mark.parametrize("where", [9, 12, 30, -1])     # nonce, nonce, ciphertext, GCM tag
def test_tampered_blob_is_refused(archive, ec_key, where):
    kek_id, algorithm, blob = archive.seal(ec_key, "cert-1")
    bad = bytearray(blob)
    bad[where] ^= 0x01
    with pytest.raises(InvalidArgument, match="does not decrypt"):
        archive.open(kek_id, algorithm, bytes(bad), "cert-1")


def test_truncated_or_unknown_version_blob_is_refused(archive, ec_key):
    kek_id, algorithm, blob = archive.seal(ec_key, "cert-1")
    with pytest.raises(InvalidArgument, match="truncated"):
        archive.open(kek_id, algorithm, blob[:30], "cert-1")
    with pytest.raises(InvalidArgument, match="format version"):
        archive.open(kek_id, algorithm, b"\x02" + blob[1:], "cert-1")


def test_blob_of_another_kek_is_refused_by_the_archive(tmp_path, ec_key):
    sealed = KeyArchive(FileKek(tmp_path / "old.key")).seal(ec_key, "cert-1")
    other = KeyArchive(FileKek(tmp_path / "new.key"))
    with pytest.raises(ConfigurationError, match="sealed by key-encryption key"):
        other.open(*sealed, "cert-1")


def test_blob_of_a_replaced_kek_file_is_refused_by_the_kek_itself(tmp_path, ec_key):
    # The stored kek_id is bypassed (or forged): the blob's key tag still tells the KEKs apart.
    old, new = FileKek(tmp_path / "old.key"), FileKek(tmp_path / "new.key")
    _, _, blob = KeyArchive(old).seal(ec_key, "cert-1")
    with pytest.raises(ConfigurationError, match="another key-encryption key"):
        KeyArchive(new).open(new.kek_id, ALGORITHM, blob, "cert-1")
    with pytest.raises(ConfigurationError, match="rotated or replaced"):
        new.unwrap(blob, b"anything")


def test_unknown_algorithm_is_refused(archive, ec_key):
    kek_id, _, blob = archive.seal(ec_key, "cert-1")
    with pytest.raises(ConfigurationError, match="algorithm"):
        archive.open(kek_id, "AES-128-CBC", blob, "cert-1")


def test_seal_needs_a_certificate_id_and_a_private_key(archive, ec_key):
    with pytest.raises(InvalidArgument):
        archive.seal(ec_key, "")
    with pytest.raises(InvalidArgument):
        archive.seal(ec_key.public_key(), "cert-1")


# --- secret mappings (process and order inputs) --------------------------------------------------

def test_sealed_mapping_opens_to_the_same_mapping_only_under_its_binding(kek_path):
    kek = FileKek(kek_path)
    blob = seal_json(kek, {"pin": "123456", "puk": "12345678"}, b"row-1")
    assert open_json(kek, blob, b"row-1", kek_id=kek.kek_id) == {"pin": "123456", "puk": "12345678"}
    with pytest.raises(InvalidArgument, match="does not decrypt"):
        open_json(kek, blob, b"row-2", kek_id=kek.kek_id)


def test_mappings_sealed_before_seal_json_existed_still_open(kek_path):
    # Rows already stored hold the sorted-keys JSON their services wrapped directly.
    kek = FileKek(kek_path)
    stored = kek.wrap(json.dumps({"b": "2", "a": "1"}, sort_keys=True).encode(), b"row-1")
    assert open_json(kek, stored, b"row-1", kek_id=kek.kek_id) == {"a": "1", "b": "2"}
    assert kek.unwrap(seal_json(kek, {"b": "2", "a": "1"}, b"row-1"), b"row-1") == b'{"a": "1", "b": "2"}'


def test_mapping_sealed_by_a_kek_this_orchestrator_lacks_is_a_configuration_error_naming_it(kek_path):
    kek = FileKek(kek_path)
    blob = seal_json(kek, {"pin": "123456"}, b"row-1")
    with pytest.raises(ConfigurationError, match="key-encryption key 'kek-old', but this orchestrator uses") as other:
        open_json(kek, blob, b"row-1", kek_id="kek-old", what="the secret inputs of order o-1", order_id="o-1")
    assert other.value.message.startswith("the secret inputs of order o-1 were sealed")
    with pytest.raises(ConfigurationError, match="'kek-old', which this orchestrator does not have"):
        open_json(None, blob, b"row-1", kek_id="kek-old")


def test_blob_that_is_not_a_sealed_mapping_is_refused(kek_path):
    kek = FileKek(kek_path)
    with pytest.raises(InvalidArgument, match="JSON object"):
        open_json(kek, kek.wrap(b'["a list"]', b"row-1"), b"row-1", kek_id=kek.kek_id)
    with pytest.raises(InvalidArgument, match="JSON object"):
        open_json(kek, kek.wrap(b"\xff not json", b"row-1"), b"row-1", kek_id=kek.kek_id)


# --- the plain key never shows ---------------------------------------------------------------

@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_2048])
def test_plain_key_bytes_appear_nowhere_in_the_blob(archive, kek_path, key_type):
    key = generate_key(key_type)
    _, _, blob = archive.seal(key, "cert-1")
    der = pkcs8(key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        secret = key.private_numbers().private_value.to_bytes(32, "big")
        secrets = [secret]
    else:
        n = key.private_numbers()
        secrets = [n.p.to_bytes(n.p.bit_length() // 8 + 1, "big")[-16:],
                   n.d.to_bytes(key.key_size // 8, "big")[:16]]
    for chunk in [der[i:i + 16] for i in range(0, len(der) - 16, 16)] + [s[:16] for s in secrets]:
        assert chunk not in blob
    assert kek_path.read_bytes() not in blob


def test_kek_objects_satisfy_the_protocol(kek_path):
    assert isinstance(FileKek(kek_path), KeyEncryptionKey)
    assert hasattr(Pkcs11Kek, "wrap") and hasattr(Pkcs11Kek, "unwrap")
    assert "kek_id" in dir(Pkcs11Kek) and "algorithm" in dir(Pkcs11Kek)


# --- settings --------------------------------------------------------------------------------

def test_kek_from_settings_defaults_to_a_file_in_the_data_dir(tmp_path):
    kek = kek_from_settings("file", tmp_path)
    assert isinstance(kek, FileKek)
    assert kek.path == tmp_path / "kek.key"


def test_kek_from_settings_refuses_unknown_kinds_and_incomplete_pkcs11(tmp_path):
    with pytest.raises(ConfigurationError, match="unknown KEK kind"):
        kek_from_settings("vault", tmp_path)
    with pytest.raises(ConfigurationError, match="token_label, pin_file"):
        kek_from_settings("pkcs11", tmp_path, pkcs11_module="/usr/lib/softhsm/libsofthsm2.so")


def test_kek_from_settings_reads_the_pin_from_its_file_only(tmp_path, monkeypatch):
    empty = tmp_path / "pin"
    empty.write_text("\n")
    with pytest.raises(ConfigurationError, match="is empty"):
        kek_from_settings("pkcs11", tmp_path, pkcs11_module="/x.so", token_label="t", pin_file=empty)
    with pytest.raises(ConfigurationError, match="cannot read the KEK PIN file"):
        kek_from_settings("pkcs11", tmp_path, pkcs11_module="/x.so", token_label="t",
                          pin_file=tmp_path / "missing")
