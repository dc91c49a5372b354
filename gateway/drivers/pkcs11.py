"""TokenDriver over any PKCS#11 module, through python-pkcs11 (tested with SoftHSM2).

The module, its one thread and its logged-in sessions belong to shared.pkcs11_module's
Pkcs11Module: every public method runs on the module's thread (a call from another thread is
handed over and waited for), so the driver may be called from any thread, and the gateway
awaits it through `driver.thread.call_async`.

Sessions: every call brings the user PIN; the module keeps one logged-in R/W session per
slot and reuses it while the same PIN comes back (see shared/pkcs11_module.py). Measured on
SoftHSM2 2.6 (2 cores, token holding one key), ECDSA sign through the driver including the
slot lookup and C_GetTokenInfo check each call makes: 0.6 ms median on the cached session,
2.5 ms with open+login+logout+close around each call. (With ~100 objects on a SoftHSM2
token the key search dominates instead, ~4 ms.) On a real card the saved PIN verify is
10-900 ms.

set_pins does not use the cached session: user and SO cannot be logged in at once, and the
cache is keyed by the old PIN; it logs in as user or SO in short sessions of its own.
SoftHSM2 keeps the PINs it loaded for as long as the module is initialised: a PIN changed by
another process is seen only after the module is released by every user and acquired again.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import pkcs11
import pkcs11.exceptions as p11err
from asn1crypto.core import Integer, OctetString
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, CertificateType
from pkcs11 import KeyType as P11KeyType
from pkcs11 import ObjectClass as P11Class
from pkcs11.util import biginteger
from pkcs11.util.ec import encode_named_curve_parameters

from gateway.drivers.base import (
    GeneratedKey,
    KeyType,
    ObjectClass,
    SignatureAlgorithm,
    StoredObject,
    TokenInfo,
)
from gateway.drivers.softhsm_store import unreadable_tokens
from shared.errors import CardIoError, CardlineError, InvalidArgument, KeyNotFound, WriteRefused
from shared.logging import get_logger

# Token keys as cryptography keys, shared with the orchestrator's LocalCa on a token.
from shared.pkcs11_keys import ecdsa_sha256 as _ecdsa_sha256
from shared.pkcs11_keys import public_key_of as _spki_of_public
from shared.pkcs11_keys import rsa_pkcs1_sha256 as _rsa_pkcs1_sha256
from shared.pkcs11_keys import token_key as _adapter
from shared.pkcs11_module import REFUSED_WRITE as _REFUSED_WRITE
from shared.pkcs11_module import OwnerThread, Pkcs11Module, cardline_error, module_short_name

P = ParamSpec("P")
R = TypeVar("R")

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

def _text(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    return raw.strip()


def _on_module_thread(method: Callable[P, R]) -> Callable[P, R]:
    """Runs a public driver method on its module's thread (after checking the driver is open)."""
    @functools.wraps(method)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        driver: Pkcs11TokenDriver = args[0]  # type: ignore[assignment]
        driver._check_open()
        return driver.thread.call(lambda: method(*args, **kwargs))
    return run


class Pkcs11TokenDriver:
    """One PKCS#11 module. reader_id = "pkcs11:<module short name>:<token serial>", which
    survives restarts and slot renumbering (SoftHSM2 derives slot ids from serials, but
    OpenSC numbers slots by reader order); a slot without a readable token serial falls back
    to "pkcs11:<module>:slot-<slot id>".

    New SoftHSM2 tokens (created by softhsm2-util in another process) become visible only
    after the module is initialised again: close() releases the module, and the last user's
    release finalises it, so that the next driver re-reads SOFTHSM2_CONF and the token
    directory.
    """

    def __init__(self, module_path: str) -> None:
        self._module = Pkcs11Module.acquire(module_path)
        self._short_name = module_short_name(module_path)
        self._closed = False

    @property
    def thread(self) -> OwnerThread:
        """The one thread every call runs on (the module's)."""
        return self._module.thread

    # --- TokenDriver ---------------------------------------------------------------------

    @_on_module_thread
    def list_tokens(self) -> list[TokenInfo]:
        infos = []
        for slot in self._module.slots():
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
                  for t in unreadable_tokens(self._module.path) if t.serial not in listed]
        return infos

    @_on_module_thread
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

    @_on_module_thread
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

    @_on_module_thread
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

    @_on_module_thread
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

    @_on_module_thread
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

    @_on_module_thread
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

    @_on_module_thread
    def set_pins(self, slot_id: int, user_pin: str, so_pin: str, new_user_pin: str, new_so_pin: str) -> None:
        """Changes the user PIN (C_SetPIN as user), resets it with the SO PIN when the user PIN
        is not given (C_InitPIN as SO, which also unblocks it), and changes the SO PIN (the
        "PUK"; C_SetPIN as SO).

        The PINs that will be needed are all checked by the token before anything changes, so
        a wrong one changes nothing. The cached session of the slot is dropped (it is keyed by
        the old PIN, and SO and user cannot be logged in at the same time).
        """
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
        self._module.token(slot_id)        # the slot and its token exist
        limits = self._module.pin_limits(slot_id)
        for role, new in (("user", new_user_pin), ("SO", new_so_pin)):
            if new and limits is not None and not limits[0] <= len(new.encode()) <= limits[1]:
                raise InvalidArgument(f"the new {role} PIN must have {limits[0]} to {limits[1]} bytes",
                                      slot_id=str(slot_id))
        change_user = bool(new_user_pin and user_pin)
        reset_user = bool(new_user_pin and not user_pin)
        as_so = reset_user or bool(new_so_pin)
        if change_user and as_so:
            # Both roles are needed: check the user PIN before the SO part changes anything.
            with self._pin_session(slot_id, user_pin=user_pin):
                pass
        if as_so:
            with self._pin_session(slot_id, so_pin=so_pin) as session:
                if reset_user:
                    session.init_pin(new_user_pin)
                if new_so_pin:
                    session.set_pin(so_pin, new_so_pin)
        if change_user:
            with self._pin_session(slot_id, user_pin=user_pin) as session:
                session.set_pin(user_pin, new_user_pin)
        log.info("PINs set", slot_id=slot_id, user_pin_changed=change_user, user_pin_reset=reset_user,
                 so_pin_changed=bool(new_so_pin))

    @_on_module_thread
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
        """Releases the module (the last user's release logs out and finalises it)."""
        if self._closed:
            return
        self._closed = True
        self._module.release()

    # --- sessions ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise CardIoError("the PKCS#11 driver is closed")

    @contextlib.contextmanager
    def _session(self, slot_id: int, pin: str) -> Iterator[Any]:
        """A logged-in R/W session on the slot's token; PKCS#11 errors become cardline errors."""
        if not isinstance(pin, str) or not pin:
            raise InvalidArgument("a user PIN is required")
        session = self._module.login(slot_id, pin)
        try:
            yield session
        except CardlineError:
            raise           # our own verdicts (KeyNotFound...): the session is still good
        except p11err.PKCS11Error as exc:
            self._module.drop(slot_id)
            raise cardline_error(exc, f"slot {slot_id}", slot_id=str(slot_id)) from exc

    @contextlib.contextmanager
    def _pin_session(self, slot_id: int, *, user_pin: str | None = None,
                     so_pin: str | None = None) -> Iterator[Any]:
        """A short session logged in as user or SO for PIN management; a PIN the token refuses
        as a new PIN is InvalidArgument, other PKCS#11 errors become cardline errors."""
        with self._module.role_session(slot_id, user_pin=user_pin, so_pin=so_pin) as session:
            try:
                yield session
            except (p11err.PinLenRange, p11err.PinInvalid, p11err.PinTooWeak) as exc:
                raise InvalidArgument(f"the token refused the new PIN: {type(exc).__name__}",
                                      slot_id=str(slot_id)) from exc
            except p11err.PinIncorrect as exc:
                raise self._module.pin_error(slot_id, so=so_pin is not None) from exc
            except p11err.PKCS11Error as exc:
                raise cardline_error(exc, f"slot {slot_id}", slot_id=str(slot_id)) from exc

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
