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

set_pins does not use that cache: it drops the slot's cached session (user and SO cannot be
logged in at once, and the cache is keyed by the old PIN) and logs in as user or SO in short
sessions of its own. SoftHSM2 keeps the PINs it loaded for as long as the module is
initialised: a PIN changed by another process is seen only after close() and a new driver.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import hmac
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pkcs11
import pkcs11.exceptions as p11err
from asn1crypto.core import Integer, OctetString
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, CertificateType, TokenFlag
from pkcs11 import KeyType as P11KeyType
from pkcs11 import ObjectClass as P11Class
from pkcs11.util import biginteger
from pkcs11.util.ec import encode_named_curve_parameters

from gateway.drivers.base import (
    GeneratedKey, KeyType, ObjectClass, SignatureAlgorithm, StoredObject, TokenInfo,
)
from gateway.drivers.softhsm_store import unreadable_tokens
from shared.errors import (
    CardIoError, CardlineError, ConfigurationError, InvalidArgument, KeyNotFound, NoCardPresent,
    PinIncorrect, PinLocked, ReaderNotFound, WriteRefused,
)
from shared.logging import get_logger
# Token keys as cryptography keys, shared with the orchestrator's LocalCa on a token.
from shared.pkcs11_keys import ecdsa_sha256 as _ecdsa_sha256
from shared.pkcs11_keys import public_key_of as _spki_of_public
from shared.pkcs11_keys import rsa_pkcs1_sha256 as _rsa_pkcs1_sha256
from shared.pkcs11_keys import token_key as _adapter

log = get_logger(__name__)

# DER of the named-curve OID for P-256, as CKA_EC_PARAMS holds it.
_P256_PARAMS = encode_named_curve_parameters("secp256r1")
_RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072}
# What import_key_pair accepts (more than the driver generates: escrowed keys come from elsewhere).
_IMPORT_CURVES = {"secp256r1": _P256_PARAMS, "secp384r1": encode_named_curve_parameters("secp384r1")}
_IMPORT_RSA_BITS = (2048, 3072, 4096)

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
        self._get_token_info: Any = None     # C_GetTokenInfo through ctypes; False: not available
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
        listed = {i.token_serial for i in infos}
        infos += [TokenInfo(reader_id=f"pkcs11:{self._short_name}:{t.serial}", slot_id=-1,
                            slot_description=f"SoftHSM2 token {t.directory.name}", token_present=False,
                            token_serial=t.serial, error=t.reason)
                  for t in unreadable_tokens(self._module_path) if t.serial not in listed]
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
        cert, cert_spki = _parse_certificate(certificate_der)
        with self._session(slot_id, pin) as session:
            if not key_id:      # a certificate for a key already on the card: find the key by its public key
                key_id = self._key_id_for(session, cert_spki)
            privs = _find(session, P11Class.PRIVATE_KEY, key_id)
            if not privs:
                raise WriteRefused("no private key with this id on the token", key_id=key_id.hex())
            _, replaced = self._store_certificate(session, key_id, label, privs[0], cert, cert_spki,
                                                  certificate_der)
        log.info("certificate written", slot_id=slot_id, key_id=key_id.hex(), replaced=replaced)

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

    def import_key_pair(self, slot_id: int, pin: str, key_id: bytes, label: str, private_key_der: bytes,
                        certificate_der: bytes = b"") -> None:
        """Stores a key pair made off-card (archival, recovery): the private key becomes a
        sensitive, non-extractable token object; its public half and, when given, its
        certificate go beside it under the same CKA_ID.

        Everything that can be checked is checked before the first write; if the token then
        refuses a later object, the objects this call created are destroyed again.
        """
        if not isinstance(key_id, bytes) or not key_id:
            raise InvalidArgument("key_id must not be empty")
        if not isinstance(label, str):
            raise InvalidArgument("label must be text")
        private_key = _load_private_key(private_key_der)
        spki = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        cert = None
        if certificate_der:
            cert, cert_spki = _parse_certificate(certificate_der)
            if cert_spki != spki:
                raise WriteRefused("the certificate's public key is not the imported key's",
                                   key_id=key_id.hex())
        with self._session(slot_id, pin) as session:
            if _find(session, P11Class.PRIVATE_KEY, key_id) or _find(session, P11Class.PUBLIC_KEY, key_id):
                raise WriteRefused("a key with this id is already on the token", key_id=key_id.hex())
            if cert is None:
                # A certificate left under this id must not end up beside a key it does not certify.
                for old_cert in _find(session, P11Class.CERTIFICATE, key_id):
                    if _certificate_spki(old_cert) != spki:
                        raise WriteRefused("a certificate for another key is on the token under this id",
                                           key_id=key_id.hex())
            private_template, public_template = _key_templates(private_key, key_id, label)
            del private_key
            created = []
            try:
                try:
                    created.append(session.create_object(private_template))
                    private_template.clear()        # drop our reference to the key material
                    created.append(session.create_object(public_template))
                except _REFUSED_WRITE as exc:
                    raise WriteRefused(f"the token refused the key: {type(exc).__name__}",
                                       key_id=key_id.hex()) from exc
                if cert is not None:
                    self._store_certificate(session, key_id, label, created[0], cert, spki, certificate_der)
            except BaseException:
                private_template.clear()
                for obj in reversed(created):
                    # Best effort: the session may be gone with the token.
                    with contextlib.suppress(p11err.PKCS11Error):
                        obj.destroy()
                raise
        log.info("key pair imported", slot_id=slot_id, key_id=key_id.hex(),
                 key_type=public_template[Attribute.KEY_TYPE].name, certificate=cert is not None)

    def set_pins(self, slot_id: int, user_pin: str, so_pin: str, new_user_pin: str, new_so_pin: str) -> None:
        """Changes the user PIN (C_SetPIN as user), resets it with the SO PIN when the user PIN
        is not given (C_InitPIN as SO, which also unblocks it), and changes the SO PIN (the
        "PUK"; C_SetPIN as SO).

        The PINs that will be needed are all checked by the token before anything changes, so
        a wrong one changes nothing. The cached session of the slot is dropped (it is keyed by
        the old PIN, and SO and user cannot be logged in at the same time).
        """
        self._check_open()
        for name, value in (("user_pin", user_pin), ("so_pin", so_pin), ("new_user_pin", new_user_pin),
                            ("new_so_pin", new_so_pin)):
            if not isinstance(value, str):
                raise InvalidArgument(f"{name} must be text")
        if not new_user_pin and not new_so_pin:
            raise InvalidArgument("set_pins sets no PIN")
        if new_user_pin and not user_pin and not so_pin:
            raise InvalidArgument("changing the user PIN needs the current user PIN or the SO PIN")
        if new_so_pin and not so_pin:
            raise InvalidArgument("changing the SO PIN needs the current SO PIN")
        token = self._token(slot_id)
        limits = self._pin_limits(slot_id)
        for role, new in (("user", new_user_pin), ("SO", new_so_pin)):
            if new and limits is not None and not limits[0] <= len(new.encode()) <= limits[1]:
                raise InvalidArgument(f"the new {role} PIN must have {limits[0]} to {limits[1]} bytes",
                                      slot_id=str(slot_id))
        self._drop(slot_id)
        change_user = bool(new_user_pin and user_pin)
        reset_user = bool(new_user_pin and not user_pin)
        as_so = reset_user or bool(new_so_pin)
        if change_user and as_so:
            # Both roles are needed: check the user PIN before the SO part changes anything.
            with self._pin_session(slot_id, token, user_pin=user_pin):
                pass
        if as_so:
            with self._pin_session(slot_id, token, so_pin=so_pin) as session:
                if reset_user:
                    session.init_pin(new_user_pin)
                if new_so_pin:
                    session.set_pin(so_pin, new_so_pin)
        if change_user:
            with self._pin_session(slot_id, token, user_pin=user_pin) as session:
                session.set_pin(user_pin, new_user_pin)
        log.info("PINs set", slot_id=slot_id, user_pin_changed=change_user, user_pin_reset=reset_user,
                 so_pin_changed=bool(new_so_pin))

    def write_data_object(self, slot_id: int, pin: str, application: str, label: str, value: bytes,
                          private: bool) -> None:
        """A CKO_DATA object named by CKA_APPLICATION + CKA_LABEL; it replaces the data object of
        that name (the new one is written first, so a failure never loses the old value)."""
        if not isinstance(application, str) or not isinstance(label, str) or not label:
            raise InvalidArgument("a data object needs a label (and a textual application)")
        if not isinstance(value, (bytes, bytearray)):
            raise InvalidArgument("the data object value must be bytes")
        name = {Attribute.CLASS: P11Class.DATA, Attribute.APPLICATION: application, Attribute.LABEL: label}
        with self._session(slot_id, pin) as session:
            old = list(session.get_objects(name))
            try:
                new = session.create_object({**name, Attribute.TOKEN: True, Attribute.PRIVATE: bool(private),
                                             Attribute.VALUE: bytes(value)})
            except _REFUSED_WRITE as exc:
                raise WriteRefused(f"the token refused the data object: {type(exc).__name__}",
                                   label=label) from exc
            for obj in old:
                if obj.handle != new.handle:
                    obj.destroy()
        log.info("data object written", slot_id=slot_id, application=application, label=label,
                 private=bool(private), size=len(value), replaced=len(old))

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

    def _pin_error(self, slot_id: int, so: bool = False) -> CardlineError:
        """PKCS#11 reveals retries only as flags: 'final try' means one left."""
        try:
            flags = self._token(slot_id).flags
        except CardlineError:
            flags = TokenFlag(0)
        role, locked, final = (("SO", TokenFlag.SO_PIN_LOCKED, TokenFlag.SO_PIN_FINAL_TRY) if so else
                               ("user", TokenFlag.USER_PIN_LOCKED, TokenFlag.USER_PIN_FINAL_TRY))
        if flags & locked:
            return PinLocked(f"the {role} PIN of the token in slot {slot_id} is now blocked", slot_id=str(slot_id))
        if flags & final:
            return PinIncorrect(f"wrong {role} PIN", slot_id=str(slot_id), attempts_remaining="1")
        return PinIncorrect(f"wrong {role} PIN", slot_id=str(slot_id))

    @contextlib.contextmanager
    def _pin_session(self, slot_id: int, token, *, user_pin: str | None = None,
                     so_pin: str | None = None) -> Iterator[Any]:
        """A short R/W session logged in as user or SO, for PIN management; closed (and so
        logged out) on exit. PKCS#11 errors become cardline errors."""
        role = "SO" if so_pin is not None else "user"
        try:
            session = token.open(rw=True, user_pin=user_pin, so_pin=so_pin)
        except _BAD_PIN as exc:
            raise self._pin_error(slot_id, so=so_pin is not None) from exc
        except p11err.PinLocked as exc:
            raise PinLocked(f"the {role} PIN of the token in slot {slot_id} is blocked",
                            slot_id=str(slot_id)) from exc
        except _GONE as exc:
            raise NoCardPresent(f"no token in slot {slot_id}", slot_id=str(slot_id)) from exc
        except (p11err.UserAlreadyLoggedIn, p11err.AnotherUserAlreadyLoggedIn) as exc:
            raise CardIoError(f"the token in slot {slot_id} is already logged in by another "
                              "session of this process", slot_id=str(slot_id)) from exc
        except p11err.PKCS11Error as exc:
            raise CardIoError(f"cannot log in as {role} to slot {slot_id}: {type(exc).__name__}",
                              slot_id=str(slot_id)) from exc
        try:
            yield session
        except (p11err.PinLenRange, p11err.PinInvalid, p11err.PinTooWeak) as exc:
            raise InvalidArgument(f"the token refused the new PIN: {type(exc).__name__}",
                                  slot_id=str(slot_id)) from exc
        except p11err.PinIncorrect as exc:
            raise self._pin_error(slot_id, so=so_pin is not None) from exc
        except (*_GONE, p11err.SessionClosed, p11err.SessionHandleInvalid) as exc:
            raise NoCardPresent(f"the token in slot {slot_id} went away", slot_id=str(slot_id)) from exc
        except p11err.PKCS11Error as exc:
            raise CardIoError(f"PKCS#11 error on slot {slot_id}: {type(exc).__name__}",
                              slot_id=str(slot_id)) from exc
        finally:
            with contextlib.suppress(p11err.PKCS11Error):
                session.close()

    def _pin_limits(self, slot_id: int) -> tuple[int, int] | None:
        """(ulMinPinLen, ulMaxPinLen) of the slot's token, or None if they cannot be read.

        python-pkcs11 0.10 keeps only some CK_TOKEN_INFO fields, so this asks the module
        itself through its C_GetFunctionList (the module is already initialised by
        python-pkcs11 in this process; dlopen hands back the same loaded copy)."""
        if self._get_token_info is None:
            self._get_token_info = _token_info_function(self._module_path) or False
        if not self._get_token_info:
            return None
        info = _CkTokenInfo()
        if self._get_token_info(slot_id, ctypes.byref(info)) != 0:      # CKR_OK
            return None
        low, high = int(info.ulMinPinLen), int(info.ulMaxPinLen)
        if high == 0 or high < low or high >= 1 << 31:   # unknown / CK_UNAVAILABLE_INFORMATION
            return None
        return low, high

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

    def _key_id_for(self, session, cert_spki: bytes) -> bytes:
        """CKA_ID of the private key on the token whose public key the certificate certifies."""
        for priv in list(session.get_objects({Attribute.CLASS: P11Class.PRIVATE_KEY})):   # one find at a time
            key_id = bytes(priv.get_attributes([Attribute.ID]).get(Attribute.ID, b""))
            if key_id and self._key_spki(session, key_id, priv) == cert_spki:
                return key_id
        raise WriteRefused("no key on the token matches the certificate's public key")

    def _store_certificate(self, session, key_id: bytes, label: str, priv, cert: x509.Certificate,
                           cert_spki: bytes, certificate_der: bytes):
        """Writes the certificate of the key pair `priv` under key_id after checking that it
        certifies that key; replaces earlier certificates of that id. Returns (object, replaced)."""
        key_spki = self._key_spki(session, key_id, priv)
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
                Attribute.LABEL: label or _label_of(priv),
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
        return new, len(old)

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


def _parse_certificate(certificate_der: bytes) -> tuple[x509.Certificate, bytes]:
    """The certificate and its SubjectPublicKeyInfo; InvalidArgument if it is not DER X.509."""
    try:
        cert = x509.load_der_x509_certificate(certificate_der)
        cert_spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidArgument(f"not a DER X.509 certificate: {exc}") from exc
    return cert, cert_spki


def _certificate_spki(obj) -> bytes | None:
    with contextlib.suppress(p11err.PKCS11Error, ValueError, TypeError, UnsupportedAlgorithm):
        return _parse_certificate(obj[Attribute.VALUE])[1]
    return None


def _load_private_key(private_key_der: bytes):
    """A supported private key from DER (PKCS#8; unencrypted). The exception texts of the
    parser are not passed on: they must never echo key material."""
    if not isinstance(private_key_der, bytes) or not private_key_der:
        raise InvalidArgument("private_key_der must be a non-empty DER PKCS#8 private key")
    try:
        key = serialization.load_der_private_key(private_key_der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidArgument("private_key_der is not an unencrypted DER PKCS#8 private key") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in _IMPORT_CURVES:
            raise InvalidArgument(f"EC curve {key.curve.name} cannot be imported (P-256, P-384 only)")
    elif isinstance(key, rsa.RSAPrivateKey):
        if key.key_size not in _IMPORT_RSA_BITS:
            raise InvalidArgument(f"RSA-{key.key_size} cannot be imported (2048, 3072, 4096 bits only)")
    else:
        raise InvalidArgument(f"{type(key).__name__.lstrip('_')} keys cannot be imported (EC, RSA only)")
    return key


def _key_templates(key, key_id: bytes, label: str) -> tuple[dict, dict]:
    """PKCS#11 templates for the private and public objects of an imported key pair."""
    common = {Attribute.TOKEN: True, Attribute.ID: key_id, Attribute.LABEL: label}
    private = {**common, Attribute.CLASS: P11Class.PRIVATE_KEY, Attribute.PRIVATE: True,
               Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True}
    public = {**common, Attribute.CLASS: P11Class.PUBLIC_KEY, Attribute.PRIVATE: False,
              Attribute.VERIFY: True}
    if isinstance(key, ec.EllipticCurvePrivateKey):
        params = _IMPORT_CURVES[key.curve.name]
        size = (key.curve.key_size + 7) // 8
        point = key.public_key().public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint)
        private.update({Attribute.KEY_TYPE: P11KeyType.EC, Attribute.EC_PARAMS: params,
                        Attribute.VALUE: key.private_numbers().private_value.to_bytes(size, "big"),
                        Attribute.DERIVE: False})
        # CKA_EC_POINT holds the DER OCTET STRING around the X9.62 point.
        public.update({Attribute.KEY_TYPE: P11KeyType.EC, Attribute.EC_PARAMS: params,
                       Attribute.EC_POINT: OctetString(point).dump(), Attribute.DERIVE: False})
    else:
        numbers = key.private_numbers()
        pub = numbers.public_numbers
        # Encryption keys are the main reason to import (escrowed decryption keys).
        private.update({Attribute.KEY_TYPE: P11KeyType.RSA, Attribute.MODULUS: biginteger(pub.n),
                        Attribute.PUBLIC_EXPONENT: biginteger(pub.e),
                        Attribute.PRIVATE_EXPONENT: biginteger(numbers.d),
                        Attribute.PRIME_1: biginteger(numbers.p), Attribute.PRIME_2: biginteger(numbers.q),
                        Attribute.EXPONENT_1: biginteger(numbers.dmp1),
                        Attribute.EXPONENT_2: biginteger(numbers.dmq1),
                        Attribute.COEFFICIENT: biginteger(numbers.iqmp),
                        Attribute.DECRYPT: True, Attribute.UNWRAP: True})
        public.update({Attribute.KEY_TYPE: P11KeyType.RSA, Attribute.MODULUS: biginteger(pub.n),
                       Attribute.PUBLIC_EXPONENT: biginteger(pub.e),
                       Attribute.ENCRYPT: True, Attribute.WRAP: True})
    return private, public


class _CkTokenInfo(ctypes.Structure):
    """CK_TOKEN_INFO with the default (non-Windows) structure packing."""
    _fields_ = [("label", ctypes.c_char * 32), ("manufacturerID", ctypes.c_char * 32),
                ("model", ctypes.c_char * 16), ("serialNumber", ctypes.c_char * 16),
                ("flags", ctypes.c_ulong), ("ulMaxSessionCount", ctypes.c_ulong),
                ("ulSessionCount", ctypes.c_ulong), ("ulMaxRwSessionCount", ctypes.c_ulong),
                ("ulRwSessionCount", ctypes.c_ulong), ("ulMaxPinLen", ctypes.c_ulong),
                ("ulMinPinLen", ctypes.c_ulong), ("ulTotalPublicMemory", ctypes.c_ulong),
                ("ulFreePublicMemory", ctypes.c_ulong), ("ulTotalPrivateMemory", ctypes.c_ulong),
                ("ulFreePrivateMemory", ctypes.c_ulong), ("hardwareVersion", ctypes.c_ubyte * 2),
                ("firmwareVersion", ctypes.c_ubyte * 2), ("utcTime", ctypes.c_char * 16)]


_C_GetTokenInfo = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(_CkTokenInfo))


class _CkFunctionListHead(ctypes.Structure):
    """The start of CK_FUNCTION_LIST, up to C_GetTokenInfo (same order in every version)."""
    _fields_ = [("version", ctypes.c_ubyte * 2)] + [
        (name, ctypes.c_void_p) for name in ("C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList",
                                             "C_GetSlotList", "C_GetSlotInfo")
    ] + [("C_GetTokenInfo", _C_GetTokenInfo)]


def _token_info_function(module_path: str):
    """The module's C_GetTokenInfo, or None where it cannot be had safely."""
    if os.name == "nt":     # PKCS#11 structures are packed to 1 byte there
        return None
    try:
        module = ctypes.CDLL(module_path)
        get_list = module.C_GetFunctionList
        get_list.restype = ctypes.c_ulong
        get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_CkFunctionListHead))]
        funcs = ctypes.POINTER(_CkFunctionListHead)()
        if get_list(ctypes.byref(funcs)) != 0 or not funcs:
            return None
        function = funcs.contents.C_GetTokenInfo
        return function if function else None
    except (OSError, AttributeError, ValueError):
        return None


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
