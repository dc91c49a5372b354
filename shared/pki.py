"""A development PKI for cardline's own gRPC connections (mutual TLS between orchestrator,
gateways and clients) — not the CA that issues card certificates.

One directory holds everything (`cardline pki init --pki-dir DIR`):

    ca.crt          the CA certificate (EC P-256, self-signed); every process trusts it
    ca.key          the CA's private key, PKCS#8 encrypted with the passphrase in ca.pass (0600)
    ca.pass         the passphrase (0600). Keeping it next to the key only protects a copied
                    ca.key; move it away (or the whole directory to the admin's machine)
                    for anything beyond development.
    NAME.crt        a leaf certificate: CN=NAME, OU=ROLE (one of ROLES); a gateway's also
                    carries its enrollment (site and labels, STATION_ENROLLMENT_OID)
    NAME.key        its private key: PKCS#8 PEM, *unencrypted* (gRPC only loads unencrypted
                    PEM keys), so it is protected by its mode (0600) and nothing else
    revoked.json    revoked serials (written atomically, under pki.lock) — the PKI's own record
    crl.pem         the CRL signed by the CA, rewritten on every revocation; servers read it
    bundles.json    the bundle directories made by `bundle` (their crl.pem follows this one)
    orchestrator/   the orchestrator's bundle, made by `cardline pki init` (or where
                    --orchestrator-dir says): ca.crt, crl.pem, orchestrator.crt/.key and
                    nothing else — the directory the orchestrator is given as --tls-dir. The
                    CA key and its passphrase stay in the PKI directory, apart from it.

The role travels in the certificate (subject OU) so that a server can authorise a peer by
what it is (shared/permissions.py: a gateway may open the GatewayLink, an operator may start
processes, ...) and the identity in the CN (a gateway's CN is its gateway id). Where a station
stands is enrolled too: a gateway certificate carries a non-critical extension
(STATION_ENROLLMENT_OID, under the UUID arc 2.25 of ITU-T X.667, which needs no registration)
whose value is

    StationEnrollment ::= SEQUENCE { site UTF8String, labels SEQUENCE OF Label }
    Label             ::= SEQUENCE { key UTF8String, value UTF8String }

The orchestrator reads a station's site and labels from there, never from what the station
says about itself (docs/stations.md).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import pathlib
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, TypedDict, TypeGuard, get_args

from asn1crypto.core import Sequence, SequenceOf, UTF8String
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes, CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.errors import AlreadyExists, ConfigurationError, InvalidArgument, NotFound
from shared.files import write_atomic
from shared.limits import (
    MAX_ENROLLED_LABEL_VALUE_CHARS,
    MAX_ENROLLED_LABELS,
    MAX_ENROLLMENT_BYTES,
    MAX_LABEL_KEY_CHARS,
)

#: Every role a certificate can carry (docs/permissions.md): the clients' roles, then the servers'.
ROLES = ("admin", "operator", "auditor", "service", "gateway", "orchestrator")
#: Roles of the people and programs calling the client API (the orchestrator's own certificate is not one).
CLIENT_ROLES = frozenset({"admin", "operator", "auditor", "service"})
#: Roles whose certificates also serve (TLS server authentication, SANs).
SERVER_ROLES = frozenset({"orchestrator", "gateway"})
CA_CERT, CA_KEY, CA_PASS, REVOKED, CRL = "ca.crt", "ca.key", "ca.pass", "revoked.json", "crl.pem"
BUNDLES = "bundles.json"
LOCK = "pki.lock"          # held while revoked.json and the CRL are rewritten
_RESERVED = {"ca", "crl", "revoked"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_DNS_LABEL}(\.{_DNS_LABEL})*$")
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")
CA_DAYS, LEAF_DAYS, CRL_DAYS = 3650, 825, 365
#: The gateway certificate extension holding the station's enrolled site and labels.
STATION_ENROLLMENT_OID = x509.ObjectIdentifier("2.25.56936530596558318526448121304882656253")
_LABEL_VALUE = re.compile(r"^[^\x00-\x1f\x7f]*$")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def check_name(name: str) -> str:
    if not _NAME.match(name or "") or name.lower() in _RESERVED:
        raise InvalidArgument(f"certificate name {name!r}: letters, digits, '.', '_' and '-' (at most 64, "
                              f"not starting with a sign), and not one of {', '.join(sorted(_RESERVED))}", field="name")
    return name


def role_of(cert: x509.Certificate) -> str | None:
    """The cardline role (subject OU) of a certificate, None when it carries none."""
    ous = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)]
    roles = [r for r in ous if r in ROLES]
    return roles[0] if len(roles) == 1 else None


def common_name_of(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else ""


def _san(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if not _HOSTNAME.match(name):
                raise InvalidArgument(f"{name!r} is neither an IP address nor a host name", field="sans") from None
            out.append(x509.DNSName(name))
    return out


class _Label(Sequence):  # type: ignore[misc]  # asn1crypto ships no types
    _fields: ClassVar[list[tuple[str, type]]] = [("key", UTF8String), ("value", UTF8String)]


class _Labels(SequenceOf):  # type: ignore[misc]
    _child_spec = _Label


class _StationEnrollment(Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[str, type]]] = [("site", UTF8String), ("labels", _Labels)]


@dataclass(frozen=True)
class Enrollment:
    """Where a station stands, as enrolled in its gateway certificate."""
    site: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(self.labels.items()))
        return f"site {self.site!r}, labels {{{labels}}}"


def check_enrollment(site: str, labels: Mapping[str, str]) -> Enrollment:
    """SITE and LABELS checked as a station's enrollment (limits in shared/limits.py): the site
    and label keys like certificate names, keys as short as a selector's (empty site: none),
    values printable, few and small enough that the gateway certificate still connects."""
    if site and not _NAME.match(site):
        raise InvalidArgument(f"site {site[:80]!r}: letters, digits, '.', '_' and '-' (at most 64, not starting "
                              "with a sign)", field="site")
    if len(labels) > MAX_ENROLLED_LABELS:
        raise InvalidArgument(f"{len(labels)} labels: at most {MAX_ENROLLED_LABELS}", field="labels")
    for key, value in labels.items():
        if len(key) > MAX_LABEL_KEY_CHARS or not _NAME.match(key):
            raise InvalidArgument(f"label key {key[:80]!r}: letters, digits, '.', '_' and '-' (at most "
                                  f"{MAX_LABEL_KEY_CHARS}, not starting with a sign)", field="labels")
        if len(value) > MAX_ENROLLED_LABEL_VALUE_CHARS or not _LABEL_VALUE.match(value):
            raise InvalidArgument(f"label {key}: value of at most {MAX_ENROLLED_LABEL_VALUE_CHARS} printable "
                                  "characters", field="labels")
    size = len(site.encode()) + sum(len(k.encode()) + len(v.encode()) for k, v in labels.items())
    if size > MAX_ENROLLMENT_BYTES:
        raise InvalidArgument(f"site and labels take {size} bytes in UTF-8: at most {MAX_ENROLLMENT_BYTES}",
                              field="labels")
    return Enrollment(site, dict(sorted(labels.items())))


def parse_labels(pairs: Iterable[str]) -> dict[str, str]:
    """KEY=VALUE strings (command-line --label) as a dict; a key given twice is an error."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"label {pair[:80]!r}: expected KEY=VALUE", field="labels")
        if key in labels:
            raise InvalidArgument(f"label {key!r} given twice", field="labels")
        labels[key] = value
    return labels


def enrollment_from_options(site: str | None, labels: Iterable[str]) -> Enrollment | None:
    """The enrollment `--site SITE --label KEY=VALUE ...` ask for; None when neither is given."""
    labels = list(labels)
    if not site and not labels:
        return None
    return check_enrollment(site or "", parse_labels(labels))


def enrollment_of(cert: x509.Certificate) -> Enrollment:
    """The site and labels enrolled in a (gateway) certificate; none (empty) without the
    extension. A malformed extension is a ConfigurationError naming the certificate."""
    try:
        ext = cert.extensions.get_extension_for_oid(STATION_ENROLLMENT_OID)
    except x509.ExtensionNotFound:
        return Enrollment()
    value = ext.value
    assert isinstance(value, x509.UnrecognizedExtension)  # cryptography knows nothing of our OID
    try:
        parsed = _StationEnrollment.load(value.value, strict=True)
        site = parsed["site"].native
        labels = {label["key"].native: label["value"].native for label in parsed["labels"]}
        return check_enrollment(site, labels)
    except (ValueError, TypeError, InvalidArgument) as exc:
        raise ConfigurationError(f"the certificate of {common_name_of(cert)!r} (serial {cert.serial_number:x}) has "
                                 f"a malformed station enrollment extension: {exc}") from None


def _enrollment_extension(enrollment: Enrollment) -> x509.UnrecognizedExtension:
    der = _StationEnrollment({"site": enrollment.site, "labels": [
        {"key": k, "value": v} for k, v in enrollment.labels.items()]}).dump()
    return x509.UnrecognizedExtension(STATION_ENROLLMENT_OID, der)


class RevokedEntry(TypedDict):
    """One revocation in revoked.json (serial in hex)."""
    serial: str
    name: str
    role: str | None
    revoked_at: str


@dataclass(frozen=True)
class Issued:
    name: str
    role: str
    serial: int
    cert_path: pathlib.Path
    key_path: pathlib.Path


@dataclass(frozen=True)
class Pki:
    """An initialised PKI directory (see the module doc)."""
    directory: pathlib.Path

    @property
    def ca_cert_path(self) -> pathlib.Path:
        return self.directory / CA_CERT

    @property
    def crl_path(self) -> pathlib.Path:
        return self.directory / CRL

    @property
    def revoked_path(self) -> pathlib.Path:
        return self.directory / REVOKED

    def cert_path(self, name: str) -> pathlib.Path:
        return self.directory / f"{check_name(name)}.crt"

    def key_path(self, name: str) -> pathlib.Path:
        return self.directory / f"{check_name(name)}.key"

    @classmethod
    def open(cls, directory: pathlib.Path | str) -> Pki:
        directory = pathlib.Path(directory)
        missing = [n for n in (CA_CERT, CA_KEY, CA_PASS) if not (directory / n).is_file()]
        if missing:
            raise ConfigurationError(f"{directory} is not a cardline PKI directory (missing {', '.join(missing)}); "
                                     f"create one with `cardline pki init --pki-dir {directory}`")
        return cls(directory)

    # -- the CA -----------------------------------------------------------------------------

    def ca_certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())

    def _ca_key(self) -> ec.EllipticCurvePrivateKey:
        passphrase = (self.directory / CA_PASS).read_bytes().strip()
        key = serialization.load_pem_private_key((self.directory / CA_KEY).read_bytes(), password=passphrase)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError(f"{self.directory / CA_KEY}: the CA key must be an EC key")
        return key

    # -- leaves -----------------------------------------------------------------------------

    def certificate(self, name: str) -> x509.Certificate:
        path = self.cert_path(name)
        if not path.is_file():
            raise NotFound(f"no certificate named {name!r} in {self.directory}", name=name)
        return x509.load_pem_x509_certificate(path.read_bytes())

    def issue(self, role: str, name: str, sans: Iterable[str] = (), *, days: int = LEAF_DAYS,
              enrollment: Enrollment | None = None) -> Issued:
        """A new key and certificate NAME.key / NAME.crt for ROLE. Servers (orchestrator,
        gateway) get SANs for localhost, 127.0.0.1, ::1, NAME when it is a host name, and
        `sans`. A gateway's certificate carries ENROLLMENT (its site and labels; none when
        not given). A name whose certificate is still valid (not revoked) is refused: revoke
        it first."""
        if role not in ROLES:
            raise InvalidArgument(f"role {role!r}: expected one of {', '.join(ROLES)}", field="role")
        check_name(name)
        if enrollment is not None and role != "gateway":
            raise InvalidArgument(f"only a gateway certificate carries a site and labels, not a {role} one",
                                  field="site")
        if self.cert_path(name).exists():
            existing = self.certificate(name)
            if existing.serial_number not in self.revoked_serials():
                raise AlreadyExists(f"{name!r} already has a certificate (serial {existing.serial_number:x}); "
                                    f"revoke it first with `cardline pki revoke --name {name}`", name=name)
        ca_cert, ca_key = self.ca_certificate(), self._ca_key()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        server = role in SERVER_ROLES
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cardline"),
                                            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                                            x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(ca_cert.subject)
                   .public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=False, crl_sign=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        if server:
            names = [*DEFAULT_SANS, *([name] if _HOSTNAME.match(name) else []), *sans]
            builder = builder.add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
        elif sans:
            raise InvalidArgument(f"a {role} certificate has no host names (sans given: {', '.join(sans)})",
                                  field="sans")
        if enrollment is not None and (enrollment.site or enrollment.labels):
            builder = builder.add_extension(_enrollment_extension(enrollment), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        write_atomic(self.key_path(name), key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()), 0o600)
        write_atomic(self.cert_path(name), cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return Issued(name, role, cert.serial_number, self.cert_path(name), self.key_path(name))

    def ensure(self, role: str, name: str, sans: Iterable[str] = ()) -> Issued:
        """NAME's certificate when it exists, is valid and has ROLE; a new one otherwise."""
        path = self.cert_path(name)
        if path.exists():
            cert = self.certificate(name)
            if role_of(cert) == role and cert.serial_number not in self.revoked_serials():
                return Issued(name, role, cert.serial_number, path, self.key_path(name))
            if cert.serial_number not in self.revoked_serials():
                raise AlreadyExists(f"{name!r} already has a {role_of(cert)} certificate, not a {role} one", name=name)
        return self.issue(role, name, sans)

    def export(self, name: str, out: pathlib.Path | str) -> dict[str, pathlib.Path]:
        """Copies NAME's certificate and key and the CA certificate into OUT (created 0700;
        the key stays 0600) and the current CRL: everything one process needs, as its
        --tls-dir, including whom to refuse from the start."""
        out = pathlib.Path(out)
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        files = {"ca": out / CA_CERT, "cert": out / f"{name}.crt", "key": out / f"{name}.key"}
        if self.crl_path.is_file():
            files["crl"] = out / CRL
        if out.resolve() != self.directory.resolve():
            write_atomic(files["ca"], self.ca_cert_path.read_bytes(), 0o644)
            write_atomic(files["cert"], self.cert_path(name).read_bytes(), 0o644)
            write_atomic(files["key"], self.key_path(name).read_bytes(), 0o600)
            if "crl" in files:
                write_atomic(files["crl"], self.crl_path.read_bytes(), 0o644)
        return files

    def bundle(self, name: str, out: pathlib.Path | str) -> dict[str, pathlib.Path]:
        """NAME's own files for a server that must not see the CA key: `export` plus crl.pem,
        with OUT recorded so that every later CRL is copied there too (a revocation reaches
        the server without a copy by hand)."""
        out = pathlib.Path(out).resolve()
        if out == self.directory.resolve():
            raise InvalidArgument(f"a bundle for {name!r} must be a directory apart from the PKI directory "
                                  f"{self.directory}, which holds the CA key", field="out")
        files = self.export(name, out)
        write_atomic(out / CRL, self.crl_path.read_bytes(), 0o644)
        bundles = sorted({*self._bundles(), str(out)})
        write_atomic(self.directory / BUNDLES, (json.dumps({"bundles": bundles}, indent=2) + "\n").encode(), 0o644)
        return {**files, "crl": out / CRL}

    def _bundles(self) -> list[str]:
        path = self.directory / BUNDLES
        return list(json.loads(path.read_text())["bundles"]) if path.exists() else []

    # -- revocation -------------------------------------------------------------------------

    def revoked(self) -> list[RevokedEntry]:
        if not self.revoked_path.exists():
            return []
        entries: list[RevokedEntry] = json.loads(self.revoked_path.read_text())["revoked"]
        return entries

    def revoked_serials(self) -> set[int]:
        return {int(r["serial"], 16) for r in self.revoked()}

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The PKI directory held against other revocations (threads or processes): revoked.json
        is read, changed and rewritten, and CRL numbers must only grow."""
        with open(self.directory / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def revoke(self, name: str) -> int:
        """Revokes NAME's current certificate: its serial goes to revoked.json and a new CRL
        is written. Returns the serial. Revoking twice is harmless."""
        cert = self.certificate(name)
        with self._locked():
            entries = self.revoked()
            if cert.serial_number not in {int(r["serial"], 16) for r in entries}:
                entries.append({"serial": f"{cert.serial_number:x}", "name": name, "role": role_of(cert),
                                "revoked_at": _now().isoformat(timespec="seconds")})
                write_atomic(self.revoked_path, (json.dumps({"revoked": entries}, indent=2) + "\n").encode(),
                             0o644)
            self._write_crl()
        return cert.serial_number

    def write_crl(self) -> pathlib.Path:
        with self._locked():
            return self._write_crl()

    def _write_crl(self) -> pathlib.Path:
        ca_cert, ca_key = self.ca_certificate(), self._ca_key()
        now = _now()
        # Gateways take only a CRL with a larger number than theirs: the time in milliseconds,
        # and always above the last one (two revocations within a millisecond).
        number = int(now.timestamp() * 1000)
        if self.crl_path.is_file():
            number = max(number, crl_number(x509.load_pem_x509_crl(self.crl_path.read_bytes())) + 1)
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(ca_cert.subject)
                   .last_update(now - dt.timedelta(minutes=5))
                   .next_update(now + dt.timedelta(days=CRL_DAYS))
                   .add_extension(x509.CRLNumber(number), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False))
        for entry in self.revoked():
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(entry["serial"], 16))
                .revocation_date(dt.datetime.fromisoformat(entry["revoked_at"])).build())
        crl = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        write_atomic(self.crl_path, crl, 0o644)
        for bundle in map(pathlib.Path, self._bundles()):
            if bundle.is_dir():                  # a bundle moved away is no longer ours to update
                write_atomic(bundle / CRL, crl, 0o644)
        return self.crl_path


def init_pki(directory: pathlib.Path | str, *, common_name: str = "cardline development CA",
             days: int = CA_DAYS) -> Pki:
    """Creates the CA of a new PKI in DIRECTORY (created 0700; it must not hold a CA yet):
    EC P-256 key encrypted at rest with a random passphrase (ca.pass, 0600), a self-signed CA
    certificate, an empty revocation list and CRL."""
    directory = pathlib.Path(directory)
    if (directory / CA_CERT).exists() or (directory / CA_KEY).exists():
        raise AlreadyExists(f"{directory} already holds a CA; use another directory or delete it first",
                            directory=str(directory))
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    passphrase = secrets.token_urlsafe(32).encode()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cardline"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    write_atomic(directory / CA_PASS, passphrase + b"\n", 0o600)
    write_atomic(directory / CA_KEY, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.BestAvailableEncryption(passphrase)), 0o600)
    write_atomic(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    pki = Pki(directory)
    pki.write_crl()
    return pki


def _can_sign_certificates(key: CertificatePublicKeyTypes) -> TypeGuard[CertificateIssuerPublicKeyTypes]:
    return isinstance(key, get_args(CertificateIssuerPublicKeyTypes))


def verified_crl(data: bytes, ca_cert: x509.Certificate, source: str) -> x509.CertificateRevocationList:
    """The CRL in DATA (PEM or DER, from SOURCE, for messages), which must be signed by CA_CERT."""
    try:
        crl = (x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----")
               else x509.load_der_x509_crl(data))
    except ValueError as exc:
        raise ConfigurationError(f"CRL {source}: {exc}") from exc
    ca_key = ca_cert.public_key()
    if (crl.issuer != ca_cert.subject or not _can_sign_certificates(ca_key)
            or not crl.is_signature_valid(ca_key)):
        raise ConfigurationError(f"CRL {source} is not signed by the CA {ca_cert.subject.rfc4514_string()}")
    return crl


def crl_number(crl: x509.CertificateRevocationList) -> int:
    """The CRL's number (0 without the extension): a later CRL of the CA has a larger one."""
    try:
        value = crl.extensions.get_extension_for_class(x509.CRLNumber).value
    except x509.ExtensionNotFound:
        return 0
    return value.crl_number


def load_crl(path: pathlib.Path, ca_cert: x509.Certificate) -> set[int]:
    """Revoked serials of the CRL at PATH, which must be signed by CA_CERT."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"CRL {path}: {exc}") from exc
    return {r.serial_number for r in verified_crl(data, ca_cert, str(path))}
