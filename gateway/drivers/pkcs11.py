"""TokenDriver over any PKCS#11 module, through python-pkcs11 (tested with SoftHSM2).

Not thread-safe, by necessity: python-pkcs11 calls C_Initialize(NULL), which tells the
module the application is single-threaded, so SoftHSM2 switches its own locking off and two
threads on one module crash it. Construct and call a driver from one thread only
(gateway.core.token_worker.TokenWorker does that), and load each module in one driver per
process.

Sessions: PKCS#11 login state belongs to the process (a second C_Login on the same token
raises UserAlreadyLoggedIn), and every call brings the user PIN. We keep one logged-in R/W
session per slot and reuse it while the same PIN comes back; a different PIN logs out and
logs in again, so a wrong PIN is always refused by the token itself. Measured on SoftHSM2
2.6 (2 cores, token holding one key), ECDSA sign through the driver including the slot
lookup and C_GetTokenInfo check each call makes: 0.6 ms median on the cached session,
2.5 ms with open+login+logout+close around each call. (With ~100 objects on a SoftHSM2
token the key search dominates instead, ~4 ms.) On a real card the saved PIN verify is
10-900 ms. The cached session is dropped on any PKCS#11 error, when the slot's token
changes serial, and on close().

The PIN itself is kept only inside the live session's login state: the cache remembers an
HMAC of it under a random key that exists only in this process, never the PIN.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pkcs11
import pkcs11.exceptions as p11err
from asn1crypto.core import Integer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric import utils as asym_utils
from pkcs11 import Attribute, CertificateType, Mechanism, TokenFlag
from pkcs11 import KeyType as P11KeyType
from pkcs11 import ObjectClass as P11Class
from pkcs11.util.ec import encode_ec_public_key, encode_ecdsa_signature, encode_named_curve_parameters
from pkcs11.util.rsa import encode_rsa_public_key

from gateway.drivers.base import (
    GeneratedKey, KeyType, ObjectClass, SignatureAlgorithm, StoredObject, TokenInfo,
)
from shared.errors import (
    CardIoError, CardlineError, ConfigurationError, InvalidArgument, KeyNotFound, NoCardPresent,
    PinIncorrect, PinLocked, ReaderNotFound, WriteRefused,
)
from shared.logging import get_logger

log = get_logger(__name__)

# DER of the named-curve OID for P-256, as CKA_EC_PARAMS holds it.
_P256_PARAMS = encode_named_curve_parameters("secp256r1")
_RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072}

_CLASS_MAP = {
    P11Class.PUBLIC_KEY: ObjectClass.PUBLIC_KEY,
    P11Class.PRIVATE_KEY: ObjectClass.PRIVATE_KEY,
    P11Class.CERTIFICATE: ObjectClass.CERTIFICATE,
    P11Class.DATA: ObjectClass.DATA,
    P11Class.SECRET_KEY: ObjectClass.SECRET_KEY,
}

# The token says the card or its session is gone: report "no card", not a generic I/O error.
_GONE = (p11err.TokenNotPresent, p11err.TokenNotRecognised, p11err.DeviceRemoved)
_BAD_PIN = (p11err.PinIncorrect, p11err.PinLenRange, p11err.PinInvalid)
_REFUSED_WRITE = (p11err.TokenWriteProtected, p11err.SessionReadOnly, p11err.DeviceMemory,
                  p11err.TemplateInconsistent, p11err.TemplateIncomplete, p11err.AttributeValueInvalid,
                  p11err.AttributeReadOnly, p11err.FunctionRejected)

# DigestInfo prefix for SHA-256 (RFC 8017 §9.2 note 1), for tokens with only raw CKM_RSA_PKCS.
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def module_short_name(module_path: str) -> str:
    """'/usr/lib/softhsm/libsofthsm2.so' -> 'softhsm2'; 'opensc-pkcs11.so' -> 'opensc-pkcs11'."""
    name = os.path.basename(module_path).split(".so")[0]
    return name.removeprefix("lib") or name


def _text(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    return raw.strip()


@dataclass
class _CachedSession:
    session: Any            # pkcs11.Session, logged in
    token_serial: bytes
    pin_tag: bytes          # HMAC of the PIN under the driver's per-process key


class Pkcs11TokenDriver:
    """One PKCS#11 module. reader_id = "pkcs11:<module short name>:<token serial>", which
    survives restarts and slot renumbering (SoftHSM2 derives slot ids from serials, but
    OpenSC numbers slots by reader order); a slot without a readable token serial falls back
    to "pkcs11:<module>:slot-<slot id>".

    New SoftHSM2 tokens (created by softhsm2-util in another process) become visible only
    after the module is initialised again: close() finalises the module so that the next
    driver re-reads SOFTHSM2_CONF and the token directory.
    """

    def __init__(self, module_path: str) -> None:
        self._module_path = module_path
        self._short_name = module_short_name(module_path)
        try:
            # pkcs11.lib caches per path and (re)initialises it if a previous driver finalised it.
            self._lib = pkcs11.lib(module_path)
        except p11err.PKCS11Error as exc:
            raise ConfigurationError(f"cannot load PKCS#11 module {module_path}: {exc}",
                                     module=module_path) from exc
        self._sessions: dict[int, _CachedSession] = {}
        self._pin_key = os.urandom(32)
        self._closed = False

    # --- TokenDriver ---------------------------------------------------------------------

    def list_tokens(self) -> list[TokenInfo]:
        self._check_open()
        try:
            slots = self._lib.get_slots()
        except p11err.PKCS11Error as exc:
            raise CardIoError(f"cannot list slots of {self._short_name}: {type(exc).__name__}") from exc
        infos = []
        for slot in slots:
            token = None
            if slot.flags & pkcs11.SlotFlag.TOKEN_PRESENT:
                try:
                    token = slot.get_token()
                except p11err.PKCS11Error:
                    # Gone or unreadable (SoftHSM2 answers GeneralError for a deleted token):
                    # listed as empty rather than failing the whole inventory.
                    token = None
            serial = _text(token.serial) if token is not None else ""
            infos.append(TokenInfo(
                reader_id=f"pkcs11:{self._short_name}:{serial or f'slot-{slot.slot_id}'}",
                slot_id=slot.slot_id,
                slot_description=_text(slot.slot_description),
                token_present=token is not None,
                token_label=_text(token.label) if token is not None else "",
                token_serial=serial,
                token_model=_text(token.model) if token is not None else "",
            ))
        return infos

    def generate_key_pair(self, slot_id: int, pin: str, key_type: KeyType, label: str,
                          key_id: bytes, csr_subject: str = "") -> GeneratedKey:
        if not key_id:
            raise InvalidArgument("key_id must not be empty")
        if not isinstance(key_type, KeyType):
            raise InvalidArgument(f"unsupported key type {key_type!r}")
        subject = _parse_subject(csr_subject) if csr_subject else None
        with self._session(slot_id, pin) as session:
            if _find(session, P11Class.PRIVATE_KEY, key_id):
                raise WriteRefused("a private key with this id is already on the token",
                                   key_id=key_id.hex())
            # Both halves carry CKA_ID and CKA_LABEL; the private key can never leave the token.
            private_template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                Attribute.PRIVATE: True}
            common = dict(store=True, id=key_id, label=label, private_template=private_template)
            try:
                if key_type is KeyType.EC_P256:
                    params = session.create_domain_parameters(
                        P11KeyType.EC, {Attribute.EC_PARAMS: _P256_PARAMS}, local=True)
                    pub, priv = params.generate_keypair(**common)
                else:
                    pub, priv = session.generate_keypair(P11KeyType.RSA, _RSA_BITS[key_type], **common)
            except _REFUSED_WRITE as exc:
                raise WriteRefused(f"the token refused to create the key: {type(exc).__name__}",
                                   key_id=key_id.hex()) from exc
            adapter = _adapter(priv, _spki_of_public(pub))
            public_der = adapter.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            csr_der = b""
            if subject is not None:
                # cryptography builds the request; the adapter makes the token sign it.
                csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(
                    adapter, hashes.SHA256())
                csr_der = csr.public_bytes(serialization.Encoding.DER)
        log.info("key pair generated", slot_id=slot_id, key_type=key_type.value, key_id=key_id.hex())
        return GeneratedKey(key_id=key_id, public_key_der=public_der, csr_der=csr_der)

    def sign(self, slot_id: int, pin: str, key_id: bytes, algorithm: SignatureAlgorithm,
             data: bytes) -> bytes:
        with self._session(slot_id, pin) as session:
            priv = self._private_key(session, key_id)
            kind = priv[Attribute.KEY_TYPE]
            if algorithm is SignatureAlgorithm.ECDSA_SHA256 and kind == P11KeyType.EC:
                return _ecdsa_sha256(priv, data)
            if algorithm is SignatureAlgorithm.RSA_PKCS1_SHA256 and kind == P11KeyType.RSA:
                return _rsa_pkcs1_sha256(priv, data)
            raise InvalidArgument(f"{getattr(algorithm, 'value', algorithm)} does not fit the "
                                  f"{P11KeyType(kind).name} key {key_id.hex()}")

    def write_certificate(self, slot_id: int, pin: str, key_id: bytes, label: str,
                          certificate_der: bytes) -> None:
        try:
            cert = x509.load_der_x509_certificate(certificate_der)
            cert_spki = cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"not a DER X.509 certificate: {exc}") from exc
        with self._session(slot_id, pin) as session:
            privs = _find(session, P11Class.PRIVATE_KEY, key_id)
            if not privs:
                raise WriteRefused("no private key with this id on the token", key_id=key_id.hex())
            key_spki = self._key_spki(session, key_id, privs[0])
            if key_spki is None:
                raise WriteRefused("the token does not reveal this key's public key; cannot check "
                                   "the certificate against it", key_id=key_id.hex())
            if key_spki != cert_spki:
                raise WriteRefused("the certificate's public key is not this key's", key_id=key_id.hex())
            old = _find(session, P11Class.CERTIFICATE, key_id)
            try:
                new = session.create_object({
                    Attribute.CLASS: P11Class.CERTIFICATE,
                    Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                    Attribute.LABEL: label or _label_of(privs[0]),
                    Attribute.ID: key_id,
                    Attribute.SUBJECT: cert.subject.public_bytes(),
                    Attribute.ISSUER: cert.issuer.public_bytes(),
                    # PKCS#11 wants the DER encoding of the INTEGER, not the bare number.
                    Attribute.SERIAL_NUMBER: Integer(cert.serial_number).dump(),
                    Attribute.VALUE: certificate_der,
                })
            except _REFUSED_WRITE as exc:
                raise WriteRefused(f"the token refused the certificate: {type(exc).__name__}",
                                   key_id=key_id.hex()) from exc
            # The new certificate replaces any earlier one for this key (renewal); it is
            # written first so a failure never leaves the key without a certificate.
            for obj in old:
                if obj.handle != new.handle:
                    obj.destroy()
        log.info("certificate written", slot_id=slot_id, key_id=key_id.hex(), replaced=len(old))

    def list_objects(self, slot_id: int, pin: str) -> list[StoredObject]:
        with self._session(slot_id, pin) as session:
            result = []
            for obj in list(session.get_objects()):
                attrs = obj.get_attributes([Attribute.CLASS, Attribute.ID, Attribute.LABEL])
                cls = _CLASS_MAP.get(attrs.get(Attribute.CLASS))
                if cls is None:     # domain parameters, mechanisms, profiles: not card objects
                    continue
                key_type = None
                cert_der = b""
                if cls in (ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY):
                    key_type = _key_type_of(obj)
                elif cls is ObjectClass.CERTIFICATE:
                    cert_der = obj.get_attributes([Attribute.VALUE]).get(Attribute.VALUE, b"")
                result.append(StoredObject(object_class=cls, key_id=bytes(attrs.get(Attribute.ID, b"")),
                                           label=attrs.get(Attribute.LABEL, "") or "",
                                           key_type=key_type, certificate_der=cert_der))
            return result

    def delete_objects(self, slot_id: int, pin: str, key_id: bytes) -> int:
        if not key_id:
            raise InvalidArgument("key_id must not be empty (it would match nothing or everything)")
        with self._session(slot_id, pin) as session:
            # Collect first: destroying objects while a C_FindObjects search is open is undefined.
            objects = list(session.get_objects({Attribute.ID: key_id}))
            try:
                for obj in objects:
                    obj.destroy()
            except _REFUSED_WRITE as exc:
                raise WriteRefused(f"the token refused to delete: {type(exc).__name__}",
                                   key_id=key_id.hex()) from exc
        log.info("objects deleted", slot_id=slot_id, key_id=key_id.hex(), count=len(objects))
        return len(objects)

    def close(self) -> None:
        """Logs out, closes the sessions and finalises the module (see the class docstring)."""
        if self._closed:
            return
        self._closed = True
        for slot_id in list(self._sessions):
            self._drop(slot_id)
        with contextlib.suppress(p11err.PKCS11Error):
            self._lib.finalize()

    # --- sessions ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CardIoError("the PKCS#11 driver is closed")

    @contextlib.contextmanager
    def _session(self, slot_id: int, pin: str) -> Iterator[Any]:
        """A logged-in R/W session on the slot's token; PKCS#11 errors become cardline errors."""
        self._check_open()
        if not isinstance(pin, str) or not pin:
            raise InvalidArgument("a user PIN is required")
        token = self._token(slot_id)
        session = self._login(slot_id, token, pin)
        try:
            yield session
        except CardlineError:
            raise           # our own verdicts (KeyNotFound...): the session is still good
        except p11err.PKCS11Error as exc:
            self._drop(slot_id)
            if isinstance(exc, (*_GONE, p11err.SessionClosed, p11err.SessionHandleInvalid)):
                raise NoCardPresent(f"the token in slot {slot_id} went away", slot_id=str(slot_id)) from exc
            raise CardIoError(f"PKCS#11 error on slot {slot_id}: {type(exc).__name__}",
                              slot_id=str(slot_id)) from exc

    def _token(self, slot_id: int):
        try:
            slots = {s.slot_id: s for s in self._lib.get_slots()}
        except p11err.PKCS11Error as exc:
            raise CardIoError(f"cannot list slots of {self._short_name}: {type(exc).__name__}") from exc
        slot = slots.get(slot_id)
        if slot is None:
            self._drop(slot_id)
            raise ReaderNotFound(f"no slot {slot_id} in {self._short_name}", slot_id=str(slot_id))
        try:
            return slot.get_token()
        except _GONE as exc:
            self._drop(slot_id)
            raise NoCardPresent(f"no token in slot {slot_id}", slot_id=str(slot_id)) from exc
        except p11err.PKCS11Error as exc:
            self._drop(slot_id)
            # SoftHSM2 answers GeneralError for a token deleted under a live process.
            raise CardIoError(f"the token in slot {slot_id} cannot be read (removed?): "
                              f"{type(exc).__name__}", slot_id=str(slot_id)) from exc

    def _login(self, slot_id: int, token, pin: str):
        tag = hmac.new(self._pin_key, pin.encode(), hashlib.sha256).digest()
        cached = self._sessions.get(slot_id)
        if cached is not None:
            if cached.token_serial == token.serial and hmac.compare_digest(cached.pin_tag, tag):
                return cached.session
            self._drop(slot_id)     # other token or other PIN: log out, then in again
        if token.flags & TokenFlag.USER_PIN_LOCKED:
            raise PinLocked(f"the user PIN of the token in slot {slot_id} is blocked", slot_id=str(slot_id))
        try:
            session = self._open(token, pin)
        except _BAD_PIN as exc:
            raise self._pin_error(slot_id) from exc
        except p11err.PinLocked as exc:
            raise PinLocked(f"the user PIN of the token in slot {slot_id} is blocked",
                            slot_id=str(slot_id)) from exc
        except _GONE as exc:
            raise NoCardPresent(f"no token in slot {slot_id}", slot_id=str(slot_id)) from exc
        except p11err.UserAlreadyLoggedIn as exc:
            # Someone else in this process holds a login we do not know about; we cannot
            # check the PIN against it, so refuse rather than ride on it.
            raise CardIoError(f"the token in slot {slot_id} is already logged in by another "
                              "session of this process", slot_id=str(slot_id)) from exc
        except p11err.PKCS11Error as exc:
            raise CardIoError(f"cannot log in to slot {slot_id}: {type(exc).__name__}",
                              slot_id=str(slot_id)) from exc
        self._sessions[slot_id] = _CachedSession(session, token.serial, tag)
        return session

    @staticmethod
    def _open(token, pin: str):
        try:
            return token.open(rw=True, user_pin=pin)
        except p11err.TokenWriteProtected:
            # Read-only tokens still sign; writes then fail as SessionReadOnly -> WriteRefused.
            return token.open(rw=False, user_pin=pin)

    def _pin_error(self, slot_id: int) -> CardlineError:
        """PKCS#11 reveals retries only as flags: 'final try' means one left."""
        try:
            flags = self._token(slot_id).flags
        except CardlineError:
            flags = TokenFlag(0)
        if flags & TokenFlag.USER_PIN_LOCKED:
            return PinLocked(f"the user PIN of the token in slot {slot_id} is now blocked", slot_id=str(slot_id))
        if flags & TokenFlag.USER_PIN_FINAL_TRY:
            return PinIncorrect("wrong user PIN", slot_id=str(slot_id), attempts_remaining="1")
        return PinIncorrect("wrong user PIN", slot_id=str(slot_id))

    def _drop(self, slot_id: int) -> None:
        cached = self._sessions.pop(slot_id, None)
        if cached is not None:
            # The session may already be dead (token removed); closing is best effort.
            with contextlib.suppress(p11err.PKCS11Error):
                cached.session.close()

    # --- keys ----------------------------------------------------------------------------

    def _private_key(self, session, key_id: bytes):
        privs = _find(session, P11Class.PRIVATE_KEY, key_id)
        if not privs:
            raise KeyNotFound("no private key with this id on the token", key_id=key_id.hex())
        if len(privs) > 1:
            raise InvalidArgument("several private keys share this id on the token", key_id=key_id.hex())
        return privs[0]

    def _key_spki(self, session, key_id: bytes, priv) -> bytes | None:
        """SubjectPublicKeyInfo of the key pair, from its public object or, for RSA, the private one."""
        for pub in _find(session, P11Class.PUBLIC_KEY, key_id):
            with contextlib.suppress(p11err.PKCS11Error, ValueError):
                return _spki_of_public(pub).public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if priv[Attribute.KEY_TYPE] == P11KeyType.RSA:
            with contextlib.suppress(p11err.PKCS11Error, ValueError):
                numbers = rsa.RSAPublicNumbers(int.from_bytes(priv[Attribute.PUBLIC_EXPONENT], "big"),
                                               int.from_bytes(priv[Attribute.MODULUS], "big"))
                return numbers.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return None


# --- helpers ---------------------------------------------------------------------------------

def _parse_subject(subject: str) -> x509.Name:
    try:
        name = x509.Name.from_rfc4514_string(subject)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"csr_subject is not an RFC 4514 name: {exc or subject!r}") from exc
    if not list(name):
        raise InvalidArgument("csr_subject is empty")
    return name


def _find(session, cls: P11Class, key_id: bytes) -> list:
    return list(session.get_objects({Attribute.CLASS: cls, Attribute.ID: key_id}))


def _label_of(obj) -> str:
    return obj.get_attributes([Attribute.LABEL]).get(Attribute.LABEL, "") or ""


def _key_type_of(obj) -> KeyType | None:
    try:
        kind = obj[Attribute.KEY_TYPE]
        if kind == P11KeyType.EC:
            # EC_PARAMS is public on both halves; compare with P-256's OID.
            return KeyType.EC_P256 if obj[Attribute.EC_PARAMS] == _P256_PARAMS else None
        if kind == P11KeyType.RSA:
            bits = len(obj[Attribute.MODULUS]) * 8
            return {2048: KeyType.RSA_2048, 3072: KeyType.RSA_3072}.get(bits)
    except p11err.PKCS11Error:
        pass
    return None


def _spki_of_public(pub):
    """A cryptography public key from a PKCS#11 public key object."""
    if pub[Attribute.KEY_TYPE] == P11KeyType.EC:
        return serialization.load_der_public_key(encode_ec_public_key(pub))
    # encode_rsa_public_key gives PKCS#1 RSAPublicKey, which load_der_public_key also accepts.
    return serialization.load_der_public_key(encode_rsa_public_key(pub))


def _ecdsa_sha256(priv, data: bytes) -> bytes:
    # SoftHSM2 (and PIV/OpenPGP cards) offer only raw CKM_ECDSA: hash here, sign the digest there.
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return _ecdsa_digest(priv, digest.finalize())


def _ecdsa_digest(priv, digest: bytes) -> bytes:
    return encode_ecdsa_signature(priv.sign(digest, mechanism=Mechanism.ECDSA))   # r||s -> DER


def _rsa_pkcs1_sha256(priv, data: bytes) -> bytes:
    try:
        return priv.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
    except p11err.MechanismInvalid:
        # Some cards do only raw PKCS#1 v1.5: build the DigestInfo here.
        digest = hashes.Hash(hashes.SHA256())
        digest.update(data)
        return priv.sign(_SHA256_DIGEST_INFO + digest.finalize(), mechanism=Mechanism.RSA_PKCS)


def _adapter(priv, public_key):
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return _TokenEcKey(priv, public_key)
    return _TokenRsaKey(priv, public_key)


# cryptography's builders accept any instance of its private-key ABCs and only call
# public_key() and sign() on it, so these adapters let the token sign CSRs: the private key
# never leaves the token.

class _TokenEcKey(ec.EllipticCurvePrivateKey):
    def __init__(self, priv, public_key: ec.EllipticCurvePublicKey) -> None:
        self._priv = priv
        self._pub = public_key

    def sign(self, data, signature_algorithm):
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, asym_utils.Prehashed):
            return _ecdsa_digest(self._priv, bytes(data))
        digest = hashes.Hash(algorithm)
        digest.update(bytes(data))
        return _ecdsa_digest(self._priv, digest.finalize())

    def public_key(self):
        return self._pub

    @property
    def curve(self):
        return self._pub.curve

    @property
    def key_size(self):
        return self._pub.key_size

    def exchange(self, *args):
        raise NotImplementedError("key agreement is not offered for token keys")

    def private_numbers(self):
        raise TypeError("the private key stays on the token")

    def private_bytes(self, *args):
        raise TypeError("the private key stays on the token")

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


class _TokenRsaKey(rsa.RSAPrivateKey):
    def __init__(self, priv, public_key: rsa.RSAPublicKey) -> None:
        self._priv = priv
        self._pub = public_key

    def sign(self, data, pad, algorithm):
        if not isinstance(pad, padding.PKCS1v15) or not isinstance(algorithm, hashes.SHA256):
            raise NotImplementedError("token RSA keys sign PKCS#1 v1.5 with SHA-256 only")
        return _rsa_pkcs1_sha256(self._priv, bytes(data))

    def public_key(self):
        return self._pub

    @property
    def key_size(self):
        return self._pub.key_size

    def decrypt(self, *args):
        raise NotImplementedError("decryption is not offered for token keys")

    def private_numbers(self):
        raise TypeError("the private key stays on the token")

    def private_bytes(self, *args):
        raise TypeError("the private key stays on the token")

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self
