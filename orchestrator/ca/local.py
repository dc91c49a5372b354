"""LocalCa: a small CA on `cryptography`, kept in one directory. The default CA of a fresh
installation and of the tests; real deployments connect their own CA through the same
CaConnector interface.

Directory layout (created on first start):

    ca-key.pem          EC P-256 CA key, PKCS#8 encrypted with the passphrase (mode 0600).
                        The key is never written to disk unencrypted.
    ca-key.passphrase   random passphrase (mode 0600), created with the key. If the
                        environment variable CARDLINE_CA_PASSPHRASE_FILE is set (or the
                        passphrase_file argument given), the passphrase is read from that file
                        instead - e.g. a docker secret - and created there on first start if
                        missing.
    ca-cert.pem         self-signed CA certificate.
    requests/<sha256(request_id)>.json
                        the CA's record of every issuance: request_id, serial, certificate.
                        Written before the certificate is returned, so an issuance whose
                        answer was lost can be found again (find_issued, C16).
    issued/<serial_hex>.pem
                        every issued certificate by serial (lowercase hex, no leading zeros,
                        like the store's serial_hex); an index rebuilt from requests/.
    revocations.json    revoked serials with reason and date, and the CRL number.

Every file is replaced atomically (write to a temporary file, fsync, rename). One LocalCa
object per directory and process: a lock makes it thread-safe, nothing makes two processes
sharing the directory safe.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import pathlib
import secrets
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from orchestrator.ca.base import REVOCATION_REASONS, IssueProfile, revocation_reason
from shared.files import write_atomic
from shared.errors import CaRefused, CaUnavailable, ConfigurationError, CsrInvalid, InvalidArgument
from shared.logging import get_logger

log = get_logger(__name__)

PASSPHRASE_ENV = "CARDLINE_CA_PASSPHRASE_FILE"
CA_VALIDITY = dt.timedelta(days=3650)
CRL_VALIDITY = dt.timedelta(days=1)
# Certificates start a little in the past so that a relying party whose clock is slightly
# behind does not reject a certificate issued a second ago.
BACKDATE = dt.timedelta(minutes=5)
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
MIN_RSA_BITS = 2048


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _spki(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class LocalCa:
    def __init__(self, directory: str | os.PathLike[str], name: str = "local", *,
                 passphrase_file: str | os.PathLike[str] | None = None) -> None:
        self._name = name
        self._dir = pathlib.Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._requests = self._dir / "requests"
        self._issued = self._dir / "issued"
        self._requests.mkdir(exist_ok=True)
        self._issued.mkdir(exist_ok=True)
        self._revocations_path = self._dir / "revocations.json"
        self._lock = threading.RLock()
        passphrase_path = pathlib.Path(passphrase_file or os.environ.get(PASSPHRASE_ENV)
                                       or self._dir / "ca-key.passphrase")
        self._key, self._cert = self._load_or_create(passphrase_path)
        self._ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self._rebuild_index()

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
            key = serialization.load_pem_private_key(key_path.read_bytes(), self._passphrase(passphrase_path))
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"cannot open CA key {key_path} with the passphrase from "
                                     f"{passphrase_path}: {exc}") from None
        if cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            if _spki(cert.public_key()) != _spki(key.public_key()):
                raise ConfigurationError(f"{cert_path} does not belong to the key {key_path}")
        else:
            # First start (or a crash right after the key was written).
            cert = self._self_sign(key)
            write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
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
        if not request_id:
            raise InvalidArgument("issue needs a request_id (the idempotency key)")
        try:
            csr = x509.load_der_x509_csr(csr_der)
        except ValueError as exc:
            raise CsrInvalid(f"not a DER PKCS#10 request: {exc}", request_id=request_id) from None
        if not csr.is_signature_valid:
            raise CsrInvalid("the request's signature does not verify with its public key",
                             request_id=request_id)
        public_key = csr.public_key()
        self._check_key(public_key, request_id)

        with self._lock:
            earlier = self._find(request_id)
            if earlier is not None:
                # The same request again (a retry after a lost answer): the first certificate,
                # never a second one. A different key under the same id is a caller bug.
                if _spki(earlier.public_key()) != _spki(public_key):
                    raise CaRefused(f"request_id {request_id!r} was already used for a different key",
                                    request_id=request_id)
                return earlier.public_bytes(serialization.Encoding.DER)
            cert = self._sign(csr, profile, request_id)
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

    @staticmethod
    def _check_key(public_key, request_id: str) -> None:
        if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ACCEPTED_CURVES):
            return
        if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= MIN_RSA_BITS:
            return
        raise CaRefused(f"key type not accepted: {type(public_key).__name__} "
                        f"({getattr(public_key, 'key_size', '?')} bits); EC P-256/384/521 or RSA >= "
                        f"{MIN_RSA_BITS}", request_id=request_id)

    def _sign(self, csr: x509.CertificateSigningRequest, profile: IssueProfile,
              request_id: str) -> x509.Certificate:
        subject = x509.Name.from_rfc4514_string(profile.subject) if profile.subject else csr.subject
        san = None
        if profile.copy_subject_alt_names:
            try:
                san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            except x509.ExtensionNotFound:
                pass
        if not subject.rdns and san is None:
            raise CaRefused("the certificate would name nobody: empty subject and no subjectAltName",
                            request_id=request_id)
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
