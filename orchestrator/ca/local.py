"""LocalCa: a small CA on `cryptography`, kept in one directory. The default CA of a fresh
installation and of the tests; real deployments connect their own CA through the same
CaConnector interface.

Directory layout (created on first start):

    ca-key.pem          EC P-256 CA key, PKCS#8 encrypted with the passphrase (mode 0600).
                        The key is never written to disk unencrypted.
    ca-cert.pem         self-signed CA certificate.
    requests/<sha256(request_id)>.json
                        the CA's record of every issuance: request_id, serial, certificate.
                        Written before the certificate is returned, so an issuance whose
                        answer was lost can be found again (find_issued, C16).
    issued/<serial_hex>.pem
                        every issued certificate by serial (lowercase hex, no leading zeros,
                        like the store's serial_hex); an index rebuilt from requests/.
    revocations.json    revoked serials with reason and date, and the CRL number.

The passphrase is not in the directory: it is read from the passphrase_file argument or the
file CARDLINE_CA_PASSPHRASE_FILE names (e.g. a docker secret), which must lie outside the
directory (base.passphrase_file_of); a random one is created there (mode 0600) on first start
if the file is missing.

Every file is replaced atomically (write to a temporary file, fsync, rename). One LocalCa
object per directory and process: a lock makes it thread-safe, nothing makes two processes
sharing the directory safe.

The CA key on a PKCS#11 token (`pkcs11=Pkcs11KeyRef(module_path, token_label, pin_file,
key_label)`): there is no ca-key.pem and no passphrase. On first start the EC P-256 key pair
is generated on the token (private key: token object, private, sensitive, never extractable,
sign only; both halves carry a random CKA_ID and CKA_LABEL = key_label), the self-signed CA
certificate is signed by the token and written to ca-cert.pem, then also stored on the token
under the key's CKA_ID and label. Later starts find the key by its label, and check it
against ca-cert.pem. Every certificate and CRL is signed by the token; the rest of the
directory is as above. python-pkcs11 is not thread-safe (docs/ca-connectors.md): every token call
runs on the module's one thread, owned by shared.pkcs11_module for the whole process (the
KEK may share the module and the token). close() releases the module; the last user's
release logs out and finalises it.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import pathlib
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator.ca.base import (
    REVOCATION_REASONS,
    IssueProfile,
    checked_request,
    passphrase_file_of,
    revocation_reason,
)
from shared.errors import CardlineError, CaRefused, CaUnavailable, ConfigurationError
from shared.files import write_atomic
from shared.logging import get_logger

log = get_logger(__name__)

CA_VALIDITY = dt.timedelta(days=3650)
CRL_VALIDITY = dt.timedelta(days=1)
# Certificates start a little in the past so that a relying party whose clock is slightly
# behind does not reject a certificate issued a second ago.
BACKDATE = dt.timedelta(minutes=5)


T = TypeVar("T")


@dataclass(frozen=True)
class Pkcs11KeyRef:
    """Where a LocalCa keeps its key on a PKCS#11 token. The user PIN is read from pin_file
    (its first line); it is never taken from the environment or the command line."""
    module_path: str
    token_label: str
    pin_file: str | os.PathLike[str]
    key_label: str = "cardline-ca"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class LocalCa:
    def __init__(self, directory: str | os.PathLike[str], name: str = "local", *,
                 passphrase_file: str | os.PathLike[str] | None = None,
                 pkcs11: Pkcs11KeyRef | None = None) -> None:
        self._name = name
        self._dir = pathlib.Path(directory)
        if pkcs11 is not None and passphrase_file is not None:
            raise ConfigurationError(f"CA {name!r}: a key on a PKCS#11 token has no passphrase_file")
        passphrase_path = passphrase_file_of(name, self._dir, passphrase_file) if pkcs11 is None else None
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._requests = self._dir / "requests"
        self._issued = self._dir / "issued"
        self._requests.mkdir(exist_ok=True)
        self._issued.mkdir(exist_ok=True)
        self._revocations_path = self._dir / "revocations.json"
        self._lock = threading.RLock()
        self._token: _TokenCaKey | None = None
        if pkcs11 is not None:
            self._key, self._cert = self._load_or_create_on_token(pkcs11)
        else:
            assert passphrase_path is not None  # resolved above for a key on disk
            self._key, self._cert = self._load_or_create(passphrase_path)
        try:
            self._ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._rebuild_index()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Releases the token (logs out, finalises the module); nothing to do for a key in the
        directory. Signing after close() raises CaUnavailable."""
        if self._token is not None:
            self._token.close()

    def __enter__(self) -> LocalCa:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def key_on_token(self) -> bool:
        return self._token is not None

    @property
    def token_call_threads(self) -> frozenset[int]:
        """Idents of every thread that made a call to the CA key's token (one, by construction;
        empty for a key in the directory)."""
        return self._token.token_call_threads if self._token is not None else frozenset()

    # -- start-up ------------------------------------------------------------------------

    def _load_or_create(self, passphrase_path: pathlib.Path):
        key_path, cert_path = self._dir / "ca-key.pem", self._dir / "ca-cert.pem"
        if not key_path.exists():
            if cert_path.exists():
                raise ConfigurationError(f"{cert_path} exists but its key {key_path} is missing")
            if not passphrase_path.exists():
                # O_EXCL + 0600: the passphrase is never readable by others, not even briefly.
                fd = os.open(passphrase_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(32) + "\n")
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(self._passphrase(passphrase_path)))
            write_atomic(key_path, pem, mode=0o600)
        try:
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), self._passphrase(passphrase_path))
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"cannot open CA key {key_path} with the passphrase from "
                                     f"{passphrase_path}: {exc}") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ConfigurationError(f"CA key {key_path} is not an EC key", directory=str(self._dir))
        key = loaded
        if cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if _spki(cert.public_key()) != _spki(key.public_key()):
                raise ConfigurationError(f"{cert_path} does not belong to the key {key_path}")
        else:
            # First start (or a crash right after the key was written).
            cert = self._self_sign(key)
            write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return key, cert

    def _load_or_create_on_token(self, ref: Pkcs11KeyRef):
        key_path, cert_path = self._dir / "ca-key.pem", self._dir / "ca-cert.pem"
        if key_path.exists():
            raise ConfigurationError(
                f"CA {self._name!r}: {key_path} exists, so this CA's key is in its directory, not on "
                f"the PKCS#11 token {ref.token_label!r}; remove the pkcs11 setting, or give the token CA "
                "a new directory", directory=str(self._dir))
        token = self._token = _TokenCaKey(ref, self._name)
        try:
            found = token.find_key()
            if cert_path.exists():
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                if found is None:
                    raise ConfigurationError(
                        f"{cert_path} exists but its key {ref.key_label!r} is not on the PKCS#11 token "
                        f"{ref.token_label!r}", directory=str(self._dir), key_label=ref.key_label)
                key, token_cert = found
                if _spki(cert.public_key()) != _spki(key.public_key()):
                    raise ConfigurationError(
                        f"{cert_path} does not belong to the key {ref.key_label!r} on the PKCS#11 token "
                        f"{ref.token_label!r}", directory=str(self._dir), key_label=ref.key_label)
            else:
                # First start, or a crash between key generation and the certificate's write.
                key, token_cert = found if found is not None else (token.generate_key(), None)
                if token_cert is not None and _spki(token_cert.public_key()) == _spki(key.public_key()):
                    cert = token_cert      # the directory was lost; the token kept the certificate
                else:
                    cert = self._self_sign(key)
                write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
            if token_cert is None or token_cert != cert:
                token.store_certificate(cert)
        except BaseException:
            token.close()
            raise
        return key, cert

    @staticmethod
    def _passphrase(path: pathlib.Path) -> bytes:
        try:
            passphrase = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the CA key passphrase: {exc}") from None
        if not passphrase:
            raise ConfigurationError(f"the CA key passphrase file {path} is empty")
        return passphrase

    def _self_sign(self, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cardline"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"cardline {self._name} CA")])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        return (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE).not_valid_after(now + CA_VALIDITY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=True, crl_sign=True,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(ski, critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                               critical=False)
                .sign(key, hashes.SHA256()))

    def _rebuild_index(self) -> None:
        """requests/ is the record; issued/ is derived and may lag after a crash."""
        for path in self._requests.glob("*.json"):
            record = json.loads(path.read_text())
            pem_path = self._issued / f"{record['serial_hex']}.pem"
            if not pem_path.exists():
                write_atomic(pem_path, record["certificate"].encode())

    # -- CaConnector ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    def ca_certificate_der(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.DER)

    def issue(self, csr_der: bytes, profile: IssueProfile, request_id: str) -> bytes:
        csr = checked_request(csr_der, request_id)
        public_key = csr.public_key()

        with self._lock:
            earlier = self._find(request_id)
            if earlier is not None:
                # The same request again (a retry after a lost answer): the first certificate,
                # never a second one. A different key under the same id is a caller bug.
                if _spki(earlier.public_key()) != _spki(public_key):
                    raise CaRefused(f"request_id {request_id!r} was already used for a different key",
                                    request_id=request_id)
                return earlier.public_bytes(serialization.Encoding.DER)
            cert = self._sign(csr, profile)
            pem = cert.public_bytes(serialization.Encoding.PEM).decode()
            serial_hex = format(cert.serial_number, "x")
            record = {"request_id": request_id, "serial_hex": serial_hex,
                      "issued_at": _now().isoformat(), "certificate": pem}
            # The request record first: once it exists the issuance is on record and
            # find_issued finds it; the by-serial index can be rebuilt from it. A certificate
            # the CA could not record is never handed out.
            try:
                write_atomic(self._request_path(request_id), json.dumps(record, indent=1).encode())
            except OSError as exc:
                raise CaUnavailable(f"the CA could not record the issuance: {exc.strerror}: {exc.filename}",
                                    request_id=request_id) from None
            try:
                write_atomic(self._issued / f"{serial_hex}.pem", pem.encode())
            except OSError:
                log.warning("serial index not written; rebuilt from the request records at start-up",
                            serial=serial_hex)
            return cert.public_bytes(serialization.Encoding.DER)

    def find_issued(self, request_id: str) -> bytes | None:
        with self._lock:
            cert = self._find(request_id)
            return None if cert is None else cert.public_bytes(serialization.Encoding.DER)

    def revoke(self, serial: int, reason: str) -> None:
        revocation_reason(reason)   # unknown names are refused before anything happens (C17)
        if reason == "removeFromCRL":
            return self.lift_hold(serial)
        with self._lock:
            serial_hex = self._known_serial(serial)
            state = self._load_revocations()
            current = state["revoked"].get(serial_hex)
            if current is not None:
                if current["reason"] == reason:
                    return           # a retried revocation is not an error
                if current["reason"] != "certificateHold":
                    raise CaRefused(f"certificate {serial_hex} is already revoked ({current['reason']})",
                                    serial_hex=serial_hex)
                # A hold may turn into a final revocation (RFC 5280 5.3.1).
            state["revoked"][serial_hex] = {"reason": reason, "revoked_at": _now().isoformat()}
            self._save_revocations(state)

    def lift_hold(self, serial: int) -> None:
        with self._lock:
            serial_hex = self._known_serial(serial)
            state = self._load_revocations()
            current = state["revoked"].get(serial_hex)
            if current is None or current["reason"] != "certificateHold":
                raise CaRefused(f"certificate {serial_hex} is not on hold "
                                f"({current['reason'] if current else 'not revoked'})", serial_hex=serial_hex)
            del state["revoked"][serial_hex]
            self._save_revocations(state)

    def crl_der(self) -> bytes:
        with self._lock:
            state = self._load_revocations()
            state["crl_number"] += 1   # CRL numbers only ever grow (RFC 5280 5.2.3)
            self._save_revocations(state)
            now = _now()
            builder = (x509.CertificateRevocationListBuilder()
                       .issuer_name(self._cert.subject)
                       .last_update(now).next_update(now + CRL_VALIDITY)
                       .add_extension(x509.CRLNumber(state["crl_number"]), critical=False)
                       .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                           self._ca_ski), critical=False))
            for serial_hex, entry in sorted(state["revoked"].items()):
                revoked = (x509.RevokedCertificateBuilder().serial_number(int(serial_hex, 16))
                           .revocation_date(dt.datetime.fromisoformat(entry["revoked_at"])))
                if entry["reason"] != "unspecified":   # RFC 5280: omit the code rather than say unspecified
                    revoked = revoked.add_extension(x509.CRLReason(REVOCATION_REASONS[entry["reason"]]),
                                                    critical=False)
                builder = builder.add_revoked_certificate(revoked.build())
            return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    # -- for the reconciler --------------------------------------------------------------

    def issued_by_request(self) -> dict[str, bytes]:
        """Every issuance on record: request_id -> certificate (DER)."""
        with self._lock:
            out = {}
            for path in self._requests.glob("*.json"):
                record = json.loads(path.read_text())
                out[record["request_id"]] = x509.load_pem_x509_certificate(
                    record["certificate"].encode()).public_bytes(serialization.Encoding.DER)
            return out

    # -- helpers -------------------------------------------------------------------------

    def _request_path(self, request_id: str) -> pathlib.Path:
        # Hashed: any string is a valid request_id, none can escape the directory.
        return self._requests / f"{hashlib.sha256(request_id.encode()).hexdigest()}.json"

    def _find(self, request_id: str) -> x509.Certificate | None:
        path = self._request_path(request_id)
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        if record["request_id"] != request_id:   # cannot happen short of a SHA-256 collision
            raise CaRefused(f"request record {path} belongs to {record['request_id']!r}")
        return x509.load_pem_x509_certificate(record["certificate"].encode())

    def _sign(self, csr: x509.CertificateSigningRequest, profile: IssueProfile) -> x509.Certificate:
        # Exactly the profile's subject and subjectAltNames: nothing of the request but its key.
        subject, san = profile.x509_subject(), profile.x509_subject_alt_name()
        now = _now()
        not_after = min(now + dt.timedelta(days=profile.validity_days), self._cert.not_valid_after_utc)
        public_key = csr.public_key()
        serial = x509.random_serial_number()
        while (self._issued / f"{serial:x}.pem").exists():   # 159 random bits: practically never
            serial = x509.random_serial_number()
        builder = (x509.CertificateBuilder()
                   .subject_name(subject).issuer_name(self._cert.subject).public_key(public_key)
                   .serial_number(serial).not_valid_before(now - BACKDATE).not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ca_ski),
                                  critical=False))
        if (ku := profile.x509_key_usage()) is not None:
            builder = builder.add_extension(ku, critical=True)
        if (eku := profile.x509_extended_key_usage()) is not None:
            builder = builder.add_extension(eku, critical=False)
        if san is not None:
            # RFC 5280 4.2.1.6: critical when the subject is empty.
            builder = builder.add_extension(san, critical=not subject.rdns)
        return builder.sign(self._key, hashes.SHA256())

    def _known_serial(self, serial: int) -> str:
        serial_hex = format(serial, "x")
        if not (self._issued / f"{serial_hex}.pem").exists():
            raise CaRefused(f"CA {self._name!r} did not issue a certificate with serial {serial_hex}",
                            serial_hex=serial_hex)
        return serial_hex

    def _load_revocations(self) -> dict:
        if not self._revocations_path.exists():
            return {"crl_number": 0, "revoked": {}}
        return json.loads(self._revocations_path.read_text())

    def _save_revocations(self, state: dict) -> None:
        write_atomic(self._revocations_path, json.dumps(state, indent=1, sort_keys=True).encode())


# --- the CA key on a PKCS#11 token ------------------------------------------------------------

def _read_pin(path: pathlib.Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the CA token PIN file {path}: {exc}", path=str(path)) from None
    lines = text.splitlines()
    pin = lines[0] if lines else ""
    if not pin:
        raise ConfigurationError(f"the CA token PIN file {path} is empty", path=str(path))
    return pin


class _TokenCaKey:
    """The CA's key pair on a PKCS#11 token, through this process's owner of the module
    (shared.pkcs11_module): every token call runs on the module's one thread, and the login
    is shared with any other user of the same token in this process (e.g. the KEK).

    Construction loads the module, finds the token by label and logs in, so a wrong module,
    token label or PIN is a ConfigurationError at start-up. Signing logs in again once after a
    lost session (token restarted); other token failures are CaUnavailable.
    """

    def __init__(self, ref: Pkcs11KeyRef, ca_name: str) -> None:
        from shared.pkcs11_module import Pkcs11Module, TokenLogin  # python-pkcs11 only when configured

        if not ref.module_path or not ref.token_label or not ref.key_label:
            raise ConfigurationError(f"CA {ca_name!r}: a key on a PKCS#11 token needs a module, a token "
                                     "label and a key label")
        self._ref = ref
        self._ca_name = ca_name
        self._where = f"key {ref.key_label!r} on PKCS#11 token {ref.token_label!r}"
        self._priv: Any = None
        self._key_id = b""
        self._closed = False
        self._threads: set[int] = set()
        pin = _read_pin(pathlib.Path(ref.pin_file))
        try:
            self._module = Pkcs11Module.acquire(ref.module_path)
        except CardlineError as exc:
            raise ConfigurationError(f"CA {ca_name!r}: {exc.message}", module=ref.module_path) from exc
        self._login = TokenLogin(self._module, ref.token_label, pin, self._found_again)
        try:
            self._login.run(lambda session: None)
        except CardlineError as exc:
            self.close()
            raise ConfigurationError(f"CA {ca_name!r}: {exc.message}", token_label=ref.token_label) from exc

    @property
    def token_call_threads(self) -> frozenset[int]:
        return frozenset(self._threads)

    def run(self, fn: Callable[[Any], T]) -> T:
        """Runs fn(session) on the module's thread; token failures are CaUnavailable."""
        if self._closed:
            raise CaUnavailable(f"CA {self._ca_name!r}: the token of its key is closed", ca=self._ca_name)

        def on_thread(session: Any) -> T:
            self._threads.add(threading.get_ident())
            return fn(session)
        try:
            return self._login.run(on_thread)
        except (CaUnavailable, ConfigurationError):
            raise
        except CardlineError as exc:
            raise CaUnavailable(f"CA {self._ca_name!r}: {exc.message}", ca=self._ca_name) from exc

    def close(self) -> None:
        """Releases the module (the last user's release logs out and finalises it)."""
        if self._closed:
            return
        self._closed = True
        self._login.forget_pin()
        self._module.release()

    # -- called from LocalCa ------------------------------------------------------------------

    def find_key(self):
        """(signing key, certificate on the token or None), or None when no key has the label."""
        return self.run(self._find_key)

    def generate_key(self):
        return self.run(self._generate_key)

    def store_certificate(self, cert: x509.Certificate) -> None:
        self.run(lambda session: self._store_certificate(session, cert))

    # -- on the module's thread ---------------------------------------------------------------

    def _found_again(self, session: Any) -> None:
        """After a new login: the key found before must still be there, under the same id."""
        if not self._key_id:
            return
        found = self._private_key_by_label(session)
        if found is None or found[1] != self._key_id:
            raise CaUnavailable(f"CA {self._ca_name!r}: the {self._where} was removed or replaced while "
                                "cardline was running", ca=self._ca_name)
        self._priv = found[0]

    def _private_key_by_label(self, session: Any):
        from pkcs11 import Attribute, ObjectClass
        from pkcs11 import KeyType as P11KeyType

        found = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                           Attribute.LABEL: self._ref.key_label}))
        if len(found) > 1:
            raise ConfigurationError(f"CA {self._ca_name!r}: {len(found)} private keys are labelled "
                                     f"{self._ref.key_label!r} on token {self._ref.token_label!r}; keep one",
                                     key_label=self._ref.key_label)
        if not found:
            return None
        priv = found[0]
        attrs = priv.get_attributes([Attribute.KEY_TYPE, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
                                     Attribute.SIGN, Attribute.ID])
        problems = []
        if attrs.get(Attribute.KEY_TYPE) != P11KeyType.EC:
            problems.append("not an EC key")
        if not attrs.get(Attribute.SENSITIVE) or attrs.get(Attribute.EXTRACTABLE):
            problems.append("extractable or not sensitive")
        if not attrs.get(Attribute.SIGN):
            problems.append("not allowed to sign")
        if not attrs.get(Attribute.ID):
            problems.append("no CKA_ID")
        if problems:
            raise ConfigurationError(f"CA {self._ca_name!r}: the {self._where} cannot be the CA key: "
                                     f"{', '.join(problems)}", key_label=self._ref.key_label)
        return priv, bytes(attrs[Attribute.ID])

    @staticmethod
    def _by_id(session: Any, cls, key_id: bytes) -> list:
        from pkcs11 import Attribute

        return list(session.get_objects({Attribute.CLASS: cls, Attribute.ID: key_id}))

    def _find_key(self, session: Any):
        from pkcs11 import Attribute, ObjectClass

        from shared.pkcs11_keys import public_key_of

        found = self._private_key_by_label(session)
        if found is None:
            return None
        self._priv, self._key_id = found
        token_cert = None
        for obj in self._by_id(session, ObjectClass.CERTIFICATE, self._key_id):
            with contextlib.suppress(ValueError):
                token_cert = x509.load_der_x509_certificate(bytes(obj[Attribute.VALUE]))
        publics = self._by_id(session, ObjectClass.PUBLIC_KEY, self._key_id)
        if publics:
            public_key = public_key_of(publics[0])
        elif token_cert is not None:
            public_key = token_cert.public_key()
        else:
            raise ConfigurationError(f"CA {self._ca_name!r}: the {self._where} has neither a public key "
                                     "nor a certificate with its CKA_ID; cannot tell its public key",
                                     key_label=self._ref.key_label)
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise ConfigurationError(f"CA {self._ca_name!r}: the {self._where} is not an EC key",
                                     key_label=self._ref.key_label)
        return self._adapter(public_key), token_cert

    def _generate_key(self, session: Any):
        from pkcs11 import Attribute, MechanismFlag
        from pkcs11 import KeyType as P11KeyType
        from pkcs11.util.ec import encode_named_curve_parameters

        from shared.pkcs11_keys import public_key_of

        key_id = os.urandom(16)
        params = session.create_domain_parameters(
            P11KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
        pub, priv = params.generate_keypair(
            store=True, id=key_id, label=self._ref.key_label,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            public_template={Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.VERIFY: True},
            private_template={Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                              Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.DERIVE: False})
        self._priv, self._key_id = priv, key_id
        log.warning("new CA key pair generated on the PKCS#11 token", ca=self._ca_name,
                    token_label=self._ref.token_label, key_label=self._ref.key_label, key_id=key_id.hex())
        return self._adapter(public_key_of(pub))

    def _adapter(self, public_key):
        from shared.pkcs11_keys import token_key

        # The adapter hashes on the caller's thread and hands the raw ECDSA to run(); the
        # private key object it is given resolves the current session's key there.
        return token_key(_SigningHandle(self), public_key, call=lambda fn: self.run(lambda session: fn()))

    def _store_certificate(self, session: Any, cert: x509.Certificate) -> None:
        import pkcs11.exceptions as p11err
        from asn1crypto.core import Integer
        from pkcs11 import Attribute, CertificateType, ObjectClass

        old = self._by_id(session, ObjectClass.CERTIFICATE, self._key_id)
        try:
            new = session.create_object({
                Attribute.CLASS: ObjectClass.CERTIFICATE,
                Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.LABEL: self._ref.key_label,
                Attribute.ID: self._key_id,
                Attribute.SUBJECT: cert.subject.public_bytes(),
                Attribute.ISSUER: cert.issuer.public_bytes(),
                # PKCS#11 wants the DER encoding of the INTEGER, not the bare number.
                Attribute.SERIAL_NUMBER: Integer(cert.serial_number).dump(),
                Attribute.VALUE: cert.public_bytes(serialization.Encoding.DER),
            })
        except p11err.PKCS11Error as exc:
            # The certificate in the directory is the one that counts; the token copy is a convenience.
            log.warning("the CA certificate could not be stored on the token", ca=self._ca_name,
                        error=type(exc).__name__)
            return
        for obj in old:     # written first, so the key is never without its certificate
            if obj.handle != new.handle:
                with contextlib.suppress(p11err.PKCS11Error):
                    obj.destroy()

    def sign_raw(self, data: bytes, mechanism) -> bytes:
        """The token's signature of data, by the key of the current session (module thread)."""
        return self._priv.sign(data, mechanism=mechanism)


class _SigningHandle:
    """Stands for the CA's private key object in shared.pkcs11_keys: sign() goes through the
    session in use at the time (called on the module's thread)."""

    def __init__(self, token: _TokenCaKey) -> None:
        self._token = token

    def sign(self, data: bytes, mechanism) -> bytes:
        return self._token.sign_raw(data, mechanism)
