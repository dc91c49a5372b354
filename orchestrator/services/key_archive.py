"""Server-side key generation and key archival for `ArchiveKey=true` applications (C7 recovery).

An application with `ArchiveKey=true` has its key pair generated here (not on the card), the
private key archived encrypted under a key-encryption key (KEK), and the key imported onto
the card. Recovery later opens the archived key and writes it onto a new card.

    archive = KeyArchive(kek_from_settings("file", data_dir))
    key = generate_key(KeyType.EC_P256)
    kek_id, algorithm, blob = archive.seal(key, certificate_id)     # store all three
    pkcs8_der = archive.open(kek_id, algorithm, blob, certificate_id)

Blob format (both KEK kinds, algorithm "AES-256-GCM"):

    version (1 byte, 0x01) | key tag (8 bytes) | nonce (12 bytes) | ciphertext | GCM tag (16 bytes)

- The GCM associated data is a fixed context string, the 9 header bytes and the caller's
  associated data. KeyArchive passes the certificate id, so a blob copied onto another
  certificate's row does not decrypt.
- The key tag names the actual AES key (not only its label): a blob from another KEK — a
  rotated or replaced key file, a token key recreated under the same label — is refused as a
  ConfigurationError that says so, instead of a bare authentication failure. A blob that is
  merely modified, or bound to another certificate, is refused as InvalidArgument.
- Nonces are 96 random bits per blob; with one blob per archived key the NIST SP 800-38D
  limit of 2^32 random-nonce messages per key is far away.

FileKek keeps a 256-bit AES key in a file (mode 0600, created on first use). Pkcs11Kek keeps
it on a PKCS#11 token, non-extractable and sensitive, and encrypts on the token with
CKM_AES_GCM (measured: SoftHSM2 2.6.1 through python-pkcs11 0.10 supports CKM_AES_GCM with
associated data, and its output is the standard ciphertext||tag, so both KEK kinds share one
blob format; the key-wrap-pad fallback was not needed). The private key therefore passes
through the orchestrator's memory in plain form when it is generated and when it is opened
for recovery — inherent to server-side generation — but never through a file, a log or the
store.

Pkcs11Kek and threads: python-pkcs11 initialises a module as single-threaded, and login
belongs to the process, so every token call (including C_Initialize and C_Finalize) runs on
the module's one thread, owned by shared.pkcs11_module for the whole process: the KEK and
the CA key (orchestrator/ca/local.py) may share one module, even one token. close()
releases the module; the last user's release finalises it, so a later user initialises it
afresh.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import stat
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.cards import KeyType
from shared.errors import CardIoError, CardlineError, ConfigurationError, InvalidArgument
from shared.logging import get_logger

log = get_logger(__name__)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
T = TypeVar("T")

ALGORITHM = "AES-256-GCM"
_VERSION = b"\x01"
_KEY_TAG_LEN = 8
_NONCE_LEN = 12
_GCM_TAG_LEN = 16
_HEADER_LEN = 1 + _KEY_TAG_LEN
_AAD_CONTEXT = b"cardline/kek-blob/v1\x00"
_ARCHIVE_CONTEXT = b"cardline/key-archive/v1\x00certificate:"
_RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072}


# --- key generation ----------------------------------------------------------------------

def generate_key(key_type: KeyType) -> PrivateKey:
    """A new private key of that type, generated in this process (for ArchiveKey=true)."""
    if key_type is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type in _RSA_BITS:
        return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS[key_type])
    raise InvalidArgument(f"cannot generate a key of type {key_type!r}",
                          key_type=getattr(key_type, "value", str(key_type)))


# --- the KEK interface and the blob format ---------------------------------------------------

@runtime_checkable
class KeyEncryptionKey(Protocol):
    """Encrypts small secrets (PKCS#8 private keys) bound to associated data."""

    @property
    def kek_id(self) -> str: ...

    @property
    def key_tag(self) -> str:
        """The key tag in every blob's header, in hex: names the actual AES key, not only its
        label or file, and is no secret (every blob carries it)."""
        ...

    @property
    def algorithm(self) -> str: ...

    def wrap(self, plaintext: bytes, associated_data: bytes) -> bytes: ...

    def unwrap(self, blob: bytes, associated_data: bytes) -> bytes: ...


def _key_tag(*parts: bytes) -> bytes:
    digest = hashlib.sha256(b"cardline/kek-tag/v1")
    for part in parts:
        digest.update(len(part).to_bytes(4, "big") + part)
    return digest.digest()[:_KEY_TAG_LEN]


def _header(key_tag: bytes) -> bytes:
    return _VERSION + key_tag


def _aad(header: bytes, associated_data: bytes) -> bytes:
    if not isinstance(associated_data, (bytes, bytearray)):
        raise InvalidArgument("associated_data must be bytes")
    return _AAD_CONTEXT + header + bytes(associated_data)


def _split_blob(blob: bytes, kek_id: str, key_tag: bytes) -> tuple[bytes, bytes, bytes]:
    """(header, nonce, ciphertext||tag); refuses malformed blobs and blobs of another KEK."""
    if not isinstance(blob, (bytes, bytearray)):
        raise InvalidArgument("the archived key blob must be bytes")
    blob = bytes(blob)
    if len(blob) < _HEADER_LEN + _NONCE_LEN + _GCM_TAG_LEN:
        raise InvalidArgument(f"the archived key blob is truncated ({len(blob)} bytes)", kek_id=kek_id)
    if blob[:1] != _VERSION:
        raise InvalidArgument(f"the archived key blob has unknown format version {blob[0]}", kek_id=kek_id)
    header = blob[:_HEADER_LEN]
    if header[1:] != key_tag:
        raise ConfigurationError(
            f"the archived key blob was wrapped by another key-encryption key (key tag "
            f"{header[1:].hex()}), not by {kek_id} (key tag {key_tag.hex()}); was the KEK rotated "
            "or replaced? Configure the KEK that sealed it.",
            kek_id=kek_id, blob_key_tag=header[1:].hex(), key_tag=key_tag.hex())
    return header, blob[_HEADER_LEN:_HEADER_LEN + _NONCE_LEN], blob[_HEADER_LEN + _NONCE_LEN:]


def _does_not_decrypt(kek_id: str) -> InvalidArgument:
    return InvalidArgument("the archived key blob does not decrypt: it was modified, or it belongs "
                           "to another certificate", kek_id=kek_id)


# --- file KEK ------------------------------------------------------------------------------

class FileKek:
    """A 256-bit AES key in a file (raw 32 bytes, mode 0600), created on first use.

    The file is created atomically and exclusively (a 0600 temporary file made with
    O_CREAT|O_EXCL, then hard-linked into place), so two processes starting together end
    up with the same key. An existing file that group or others may read, or that is not
    exactly 32 bytes, is refused. Back the file up: without it no archived key can be opened.
    """

    algorithm = ALGORITHM

    def __init__(self, path: str | os.PathLike) -> None:
        self._path = pathlib.Path(path)
        self._lock = threading.Lock()
        self._aes: AESGCM | None = None
        self._kek_id = ""
        self._tag = b""

    def __repr__(self) -> str:
        return f"FileKek({str(self._path)!r})"

    @property
    def path(self) -> pathlib.Path:
        return self._path

    @property
    def kek_id(self) -> str:
        self._load()
        return self._kek_id

    @property
    def key_tag(self) -> str:
        self._load()
        return self._tag.hex()

    def wrap(self, plaintext: bytes, associated_data: bytes) -> bytes:
        aes = self._load()
        header = _header(self._tag)
        nonce = os.urandom(_NONCE_LEN)
        return header + nonce + aes.encrypt(nonce, bytes(plaintext), _aad(header, associated_data))

    def unwrap(self, blob: bytes, associated_data: bytes) -> bytes:
        aes = self._load()
        header, nonce, sealed = _split_blob(blob, self._kek_id, self._tag)
        try:
            return aes.decrypt(nonce, sealed, _aad(header, associated_data))
        except InvalidTag:
            raise _does_not_decrypt(self._kek_id) from None

    def close(self) -> None:
        """Nothing to release (present so that every KEK can be closed alike)."""

    # --- the key file ----------------------------------------------------------------------

    def _load(self) -> AESGCM:
        with self._lock:
            if self._aes is None:
                key = self._read() if self._path.exists() else self._create()
                fingerprint = hashlib.sha256(key).hexdigest()[:16]
                self._kek_id = f"file:{fingerprint}"
                self._tag = _key_tag(b"file", key)
                self._aes = AESGCM(key)
            return self._aes

    def _read(self) -> bytes:
        try:
            st = os.stat(self._path)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigurationError(f"the KEK file {self._path} is not a regular file",
                                         path=str(self._path))
            if st.st_mode & 0o077:
                raise ConfigurationError(
                    f"the KEK file {self._path} may be read by group or others (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}); run chmod 600 on it", path=str(self._path))
            key = self._path.read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the KEK file {self._path}: {exc.strerror}",
                                     path=str(self._path)) from exc
        if len(key) != 32:
            raise ConfigurationError(f"the KEK file {self._path} holds {len(key)} bytes, not a "
                                     "256-bit key (32 bytes)", path=str(self._path))
        return key

    def _create(self) -> bytes:
        directory = self._path.parent
        tmp = directory / f".{self._path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        key = os.urandom(32)
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self._path)        # atomic; fails if another process won
            except FileExistsError:
                return self._read()
            finally:
                tmp.unlink()
            with contextlib.suppress(OSError):
                dir_fd = os.open(directory, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise ConfigurationError(f"cannot create the KEK file {self._path}: {exc.strerror}",
                                     path=str(self._path)) from exc
        log.warning("new key-encryption key created; back it up", path=str(self._path))
        return key


# --- PKCS#11 KEK ---------------------------------------------------------------------------

class Pkcs11Kek:
    """An AES-256 key on a PKCS#11 token; encryption (CKM_AES_GCM) happens on the token.

    The key (CKA_LABEL = key_label, class secret key, type AES) is created on first use as a
    token object that is private, sensitive and never extractable, allowed to encrypt and
    decrypt only; it carries a random CKA_ID that goes into every blob's key tag, so a key
    recreated under the same label is told apart. An existing key with that label that is
    extractable or not sensitive is refused.

    Token calls go through this process's owner of the module (shared.pkcs11_module; see the
    module docstring). The PIN stays in memory only (to log in again if the session is lost).
    Construction connects, logs in and finds or creates the key, so a wrong module, token
    label or PIN fails at start-up as a ConfigurationError. Call close() when done.
    """

    algorithm = ALGORITHM

    def __init__(self, module_path: str, token_label: str, pin: str,
                 key_label: str = "cardline-kek") -> None:
        from shared.pkcs11_module import Pkcs11Module, TokenLogin  # python-pkcs11 only when configured

        if not token_label or not key_label:
            raise ConfigurationError("a PKCS#11 KEK needs a token label and a key label")
        if not isinstance(pin, str) or not pin:
            raise ConfigurationError("a PKCS#11 KEK needs the token's user PIN")
        self._token_label = token_label
        self._key_label = key_label
        self._kek_id = f"pkcs11:{token_label}:{key_label}"
        self._key: Any = None
        self._tag = b""
        self._closed = False
        self._threads: set[int] = set()    # idents of threads that made token calls (diagnostics)
        self._module = Pkcs11Module.acquire(module_path)
        self._login = TokenLogin(self._module, token_label, pin, self._found_again)
        try:
            self._key, self._tag = self._run(lambda session: self._find_or_create_key(session, create=True))
        except CardlineError as exc:
            self.close()
            if isinstance(exc, ConfigurationError):
                raise
            raise ConfigurationError(f"the KEK token: {exc.message}", kek_id=self._kek_id) from exc
        log.info("PKCS#11 key-encryption key ready", kek_id=self._kek_id)

    def __repr__(self) -> str:
        return f"Pkcs11Kek({self._kek_id!r})"

    @property
    def kek_id(self) -> str:
        return self._kek_id

    @property
    def key_tag(self) -> str:
        return self._tag.hex()

    def wrap(self, plaintext: bytes, associated_data: bytes) -> bytes:
        plaintext = bytes(plaintext)
        header = _header(self._tag)
        aad = _aad(header, associated_data)
        nonce = os.urandom(_NONCE_LEN)
        sealed = self._run(lambda session: self._crypt("encrypt", plaintext, nonce, aad))
        return header + nonce + sealed

    def unwrap(self, blob: bytes, associated_data: bytes) -> bytes:
        header, nonce, sealed = _split_blob(blob, self._kek_id, self._tag)
        aad = _aad(header, associated_data)
        return self._run(lambda session: self._crypt("decrypt", sealed, nonce, aad))

    def worker_thread_ident(self) -> int:
        """The id of the thread that makes every token call (the module's)."""
        return self._module.thread.ident

    @property
    def token_call_threads(self) -> frozenset[int]:
        """Idents of every thread that has made a token call (one, by construction)."""
        return frozenset(self._threads)

    def close(self) -> None:
        """Releases the module (the last user's release logs out and finalises it)."""
        if self._closed:
            return
        self._closed = True
        self._login.forget_pin()
        self._module.release()

    def __enter__(self) -> Pkcs11Kek:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- on the module's thread --------------------------------------------------------------

    def _run(self, fn: Callable[[Any], T]) -> T:
        if self._closed:
            raise CardIoError("the PKCS#11 key-encryption key is closed", kek_id=self._kek_id)

        def on_thread(session: Any) -> T:
            self._threads.add(threading.get_ident())
            return fn(session)
        return self._login.run(on_thread)

    def _found_again(self, session: Any) -> None:
        """After a new login: the key found before must still be there, the same key."""
        if not self._tag:
            return
        key, tag = self._find_or_create_key(session, create=False)
        if tag != self._tag:
            raise ConfigurationError(f"the KEK {self._key_label!r} on token {self._token_label!r} was "
                                     "replaced while cardline was running", kek_id=self._kek_id)
        self._key = key

    def _find_or_create_key(self, session: Any, create: bool) -> tuple[Any, bytes]:
        from pkcs11 import Attribute, ObjectClass
        from pkcs11 import KeyType as P11KeyType

        found = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                          Attribute.LABEL: self._key_label}))
        if len(found) > 1:
            raise ConfigurationError(
                f"{len(found)} secret keys are labelled {self._key_label!r} on token "
                f"{self._token_label!r}; keep only the one that sealed the archived keys",
                kek_id=self._kek_id)
        if found:
            key = found[0]
            attrs = key.get_attributes([Attribute.KEY_TYPE, Attribute.VALUE_LEN, Attribute.SENSITIVE,
                                        Attribute.EXTRACTABLE, Attribute.ID])
            problems = []
            if attrs.get(Attribute.KEY_TYPE) != P11KeyType.AES or attrs.get(Attribute.VALUE_LEN) != 32:
                problems.append("not an AES-256 key")
            if not attrs.get(Attribute.SENSITIVE) or attrs.get(Attribute.EXTRACTABLE):
                problems.append("extractable or not sensitive")
            if problems:
                raise ConfigurationError(
                    f"the key {self._key_label!r} on token {self._token_label!r} cannot serve as the "
                    f"KEK: {', '.join(problems)}", kek_id=self._kek_id)
            key_id = bytes(attrs.get(Attribute.ID) or b"")
        elif not create:
            raise ConfigurationError(f"the KEK {self._key_label!r} is no longer on token "
                                     f"{self._token_label!r}", kek_id=self._kek_id)
        else:
            key_id = os.urandom(16)
            key = session.generate_key(
                P11KeyType.AES, 256, id=key_id, label=self._key_label, store=True,
                template={Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                          Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
                          Attribute.WRAP: False, Attribute.UNWRAP: False, Attribute.SIGN: False,
                          Attribute.VERIFY: False, Attribute.DERIVE: False})
            log.warning("new key-encryption key created on the token", kek_id=self._kek_id)
        return key, _key_tag(b"pkcs11", self._token_label.encode(), self._key_label.encode(), key_id)

    def _crypt(self, direction: str, data: bytes, nonce: bytes, aad: bytes) -> bytes:
        import pkcs11.exceptions as p11err
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams

        params = GCMParams(nonce, aad, _GCM_TAG_LEN * 8)
        method = self._key.encrypt if direction == "encrypt" else self._key.decrypt
        try:
            return method(data, mechanism=Mechanism.AES_GCM, mechanism_param=params, buffer_size=len(data) + 64)
        except (p11err.EncryptedDataInvalid, p11err.EncryptedDataLenRange) as exc:
            raise _does_not_decrypt(self._kek_id) from exc
        except p11err.GeneralError as exc:
            if direction == "decrypt":
                # SoftHSM2 answers CKR_GENERAL_ERROR to a failed GCM tag check.
                raise _does_not_decrypt(self._kek_id) from exc
            raise


# --- the archive ---------------------------------------------------------------------------

class KeyArchive:
    """Seals private keys under a KEK, bound to their certificate, and opens them again."""

    def __init__(self, kek: KeyEncryptionKey) -> None:
        self._kek = kek

    @property
    def kek(self) -> KeyEncryptionKey:
        return self._kek

    def seal(self, private_key: PrivateKey, certificate_id: str) -> tuple[str, str, bytes]:
        """(kek_id, algorithm, blob) to store beside the certificate."""
        if not isinstance(private_key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise InvalidArgument(f"cannot archive a {type(private_key).__name__}; "
                                  "EC and RSA private keys only")
        aad = _certificate_aad(certificate_id)
        der = private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        blob = self._kek.wrap(der, aad)
        return self._kek.kek_id, self._kek.algorithm, blob

    def open(self, kek_id: str, algorithm: str, blob: bytes, certificate_id: str) -> bytes:
        """The archived private key as PKCS#8 DER (unencrypted: handle with care)."""
        aad = _certificate_aad(certificate_id)
        if kek_id != self._kek.kek_id:
            raise ConfigurationError(
                f"the archived key of certificate {certificate_id} was sealed by key-encryption key "
                f"{kek_id!r}, but this orchestrator uses {self._kek.kek_id!r}",
                certificate_id=certificate_id, kek_id=kek_id, configured_kek_id=self._kek.kek_id)
        if algorithm != self._kek.algorithm:
            raise ConfigurationError(
                f"the archived key of certificate {certificate_id} uses algorithm {algorithm!r}; "
                f"{self._kek.kek_id} offers {self._kek.algorithm!r}",
                certificate_id=certificate_id, algorithm=algorithm)
        return self._kek.unwrap(blob, aad)


def _certificate_aad(certificate_id: str) -> bytes:
    if not isinstance(certificate_id, str) or not certificate_id:
        raise InvalidArgument("an archived key needs the id of its certificate")
    return _ARCHIVE_CONTEXT + certificate_id.encode("utf-8")


# --- secret mappings (process and order inputs) ------------------------------------------------

def seal_json(kek: KeyEncryptionKey, mapping: Mapping[str, object], binding: bytes) -> bytes:
    """MAPPING as JSON wrapped under KEK, bound to BINDING (a blob copied onto another row does
    not open). Keys are sorted: rows sealed so far hold exactly this plaintext."""
    return kek.wrap(json.dumps(dict(mapping), sort_keys=True).encode("utf-8"), binding)


def open_json(kek: KeyEncryptionKey | None, blob: bytes, binding: bytes, *, kek_id: str | None,
              what: str = "the sealed secrets", **details: object) -> dict[str, object]:
    """The mapping seal_json sealed in BLOB; KEK_ID is the one stored beside it, WHAT and
    DETAILS name the secrets in the errors (ConfigurationError when this orchestrator lacks
    that KEK, InvalidArgument when the blob is modified, bound to another row or not a mapping)."""
    if kek is None or kek_id != kek.kek_id:
        having = ("which this orchestrator does not have" if kek is None
                  else f"but this orchestrator uses {kek.kek_id!r}")
        raise ConfigurationError(f"{what} were sealed by key-encryption key {kek_id!r}, {having}",
                                 kek_id=kek_id, **details)
    try:
        opened = json.loads(kek.unwrap(blob, binding))
    except ValueError:
        opened = None
    if not isinstance(opened, dict):
        raise InvalidArgument(f"{what} did not open to a JSON object", kek_id=kek_id, **details)
    return opened


# --- wiring --------------------------------------------------------------------------------

KEK_KINDS = ("file", "pkcs11")


def kek_from_settings(kind: str, data_dir: pathlib.Path, *, pkcs11_module: str | None = None,
                      token_label: str | None = None, pin_file: str | os.PathLike | None = None,
                      key_label: str = "cardline-kek",
                      file_path: str | os.PathLike | None = None) -> KeyEncryptionKey:
    """The configured KEK: "file" (file_path, default data_dir/kek.key) or "pkcs11".

    The PKCS#11 PIN is read from pin_file (first line, without the line break); it is never
    taken from the environment or the command line.
    """
    kind = (kind or "file").strip().lower()
    if kind == "file":
        return FileKek(pathlib.Path(file_path) if file_path else pathlib.Path(data_dir) / "kek.key")
    if kind == "pkcs11":
        missing = [name for name, value in (("pkcs11_module", pkcs11_module), ("token_label", token_label),
                                            ("pin_file", pin_file)) if not value]
        if missing:
            raise ConfigurationError(f"the pkcs11 KEK needs {', '.join(missing)}", kind=kind)
        assert pin_file is not None  # else it is missing
        return Pkcs11Kek(str(pkcs11_module), str(token_label), _read_pin(pathlib.Path(pin_file)),
                         key_label=key_label)
    raise ConfigurationError(f"unknown KEK kind {kind!r}; expected one of {', '.join(KEK_KINDS)}",
                             kind=kind)


def _read_pin(path: pathlib.Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the KEK PIN file {path}: {exc}", path=str(path)) from exc
    lines = text.splitlines()
    pin = lines[0] if lines else ""
    if not pin:
        raise ConfigurationError(f"the KEK PIN file {path} is empty", path=str(path))
    return pin
