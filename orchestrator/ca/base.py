"""The CA connector interface, after smallstep's cas/apiv1: a few blocking calls that every
CA (the built-in local CA, `openssl ca`, a remote CA) can implement.

Everything crosses as DER bytes, integers and names, so connectors stay independent of
the store and the domain. A connector raises shared.errors: CsrInvalid for a request whose
signature does not verify, CaRefused when the CA says no, CaUnavailable when it cannot be
reached, InvalidArgument for a bad profile or reason name.
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from shared.errors import CaRefused, ConfigurationError, CsrInvalid, InvalidArgument, quoted

#: Names the passphrase file of every CA whose settings give no passphrase_file (never holds
#: the passphrase itself: secrets are not put in the environment).
PASSPHRASE_ENV = "CARDLINE_CA_PASSPHRASE_FILE"


def passphrase_file_of(ca_name: str, ca_directory: pathlib.Path,
                       passphrase_file: str | os.PathLike[str] | None) -> pathlib.Path:
    """The file holding the passphrase of a CA key kept on disk: the CA's passphrase_file, else
    the file $CARDLINE_CA_PASSPHRASE_FILE names. One of them is required, and the file must not
    be inside the CA directory: a passphrase beside its key protects nothing once the
    directory is copied. (A CA key on a PKCS#11 token has no passphrase.)"""
    named = passphrase_file or os.environ.get(PASSPHRASE_ENV)
    if not named:
        raise ConfigurationError(
            f"CA {ca_name!r}: its key in {ca_directory} needs a passphrase file outside that directory: "
            f"set passphrase_file in its cas entry or {PASSPHRASE_ENV} (the file's path, never the "
            "passphrase), or keep the key on a PKCS#11 token (docs/ca-connectors.md)", path=str(ca_directory))
    path = pathlib.Path(named)
    if path.resolve().is_relative_to(ca_directory.resolve()):
        raise ConfigurationError(
            f"CA {ca_name!r}: the passphrase file {path} is inside the CA directory {ca_directory}, beside the "
            "key it protects; keep it elsewhere (docs/ca-connectors.md)", path=str(path))
    return path

# RFC 5280 5.3.1 CRLReason names. Only these names pass; a typo never revokes (C17).
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "removeFromCRL": x509.ReasonFlags.remove_from_crl,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}

# RFC 5280 4.2.1.3 names -> keyword arguments of cryptography's x509.KeyUsage.
KEY_USAGES: dict[str, str] = {
    "digitalSignature": "digital_signature",
    "nonRepudiation": "content_commitment",
    "contentCommitment": "content_commitment",
    "keyEncipherment": "key_encipherment",
    "dataEncipherment": "data_encipherment",
    "keyAgreement": "key_agreement",
    "keyCertSign": "key_cert_sign",
    "cRLSign": "crl_sign",
    "encipherOnly": "encipher_only",
    "decipherOnly": "decipher_only",
}

# Extended key usage names (OpenSSL's short names) -> OIDs.
EXTENDED_KEY_USAGES: dict[str, ObjectIdentifier] = {
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "timeStamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "OCSPSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
    "smartcardLogon": ExtendedKeyUsageOID.SMARTCARD_LOGON,   # Microsoft, 1.3.6.1.4.1.311.20.2.2
}


# Subject attribute names of a template's subject pattern -> OIDs
# (orchestrator/domain/certificate_content.py SUBJECT_ATTRIBUTE_BOUNDS has the same keys).
SUBJECT_ATTRIBUTES: dict[str, ObjectIdentifier] = {
    "CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME, "L": NameOID.LOCALITY_NAME, "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "STREET": NameOID.STREET_ADDRESS, "DC": NameOID.DOMAIN_COMPONENT, "UID": NameOID.USER_ID,
    "emailAddress": NameOID.EMAIL_ADDRESS, "serialNumber": NameOID.SERIAL_NUMBER, "GN": NameOID.GIVEN_NAME,
    "SN": NameOID.SURNAME, "title": NameOID.TITLE,
}

#: Microsoft's user principal name (smart card logon), an otherName holding a UTF8String.
UPN_OID = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")


def _upn(value: str) -> x509.GeneralName:
    encoded = value.encode()
    return x509.OtherName(UPN_OID, b"\x0c" + der_length(len(encoded)) + encoded)


def der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


# subjectAltName kinds of a template's rules (certificate_content.py SAN_KINDS) -> general names.
SAN_BUILDERS: dict[str, Callable[[str], x509.GeneralName]] = {
    "email": x509.RFC822Name, "dns": x509.DNSName, "uri": x509.UniformResourceIdentifier, "upn": _upn,
}


def subject_name(rdns: Iterable[Iterable[tuple[str, str]]]) -> x509.Name:
    """An x509 name from RDNs written in RFC 4514 order (most specific first) of
    (attribute name, value): each value one attribute value, never parsed again."""
    try:
        return x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(SUBJECT_ATTRIBUTES[kind], value)
                                                          for kind, value in rdn])
                          for rdn in reversed(list(rdns))])
    except (KeyError, ValueError) as exc:
        raise InvalidArgument(f"subject cannot be built: {exc}") from None


def general_names(pairs: Iterable[tuple[str, str]]) -> list[x509.GeneralName]:
    names = []
    for kind, value in pairs:
        builder = SAN_BUILDERS.get(kind)
        if builder is None:
            raise InvalidArgument(f"unknown subjectAltName kind {kind!r}; known: {', '.join(SAN_BUILDERS)}")
        try:
            names.append(builder(value))
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"subjectAltName {kind} {value[:80]!r}: {exc}") from None
    return names


# Keys a cardline CA certifies.
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
MIN_RSA_BITS = 2048


def checked_request(csr_der: bytes, request_id: str) -> x509.CertificateSigningRequest:
    """What every CA checks before it issues: an idempotency key, a PKCS#10 request whose
    signature verifies (proof of possession), a key type it certifies."""
    if not request_id:
        raise InvalidArgument("issue needs a request_id (the idempotency key)")
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except ValueError as exc:
        raise CsrInvalid(f"not a DER PKCS#10 request: {exc}", request_id=request_id) from None
    if not csr.is_signature_valid:
        raise CsrInvalid("the request's signature does not verify with its public key", request_id=request_id)
    key = csr.public_key()
    if not ((isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ACCEPTED_CURVES))
            or (isinstance(key, rsa.RSAPublicKey) and key.key_size >= MIN_RSA_BITS)):
        raise CaRefused(f"key type not accepted: {type(key).__name__} ({getattr(key, 'key_size', '?')} bits); "
                        f"EC P-256/384/521 or RSA >= {MIN_RSA_BITS}", request_id=request_id)
    return csr


#: Bounds of what an audit row tells of a request that asked for more than it got.
_SHOWN_CHARS, _SHOWN_ITEMS = 200, 8


def requested_beyond(csr: x509.CertificateSigningRequest, profile: IssueProfile) -> dict[str, Any]:
    """What a request asks for that the profile does not give — another subject, other
    subjectAltNames, extensions — bounded for an audit row; {} when it asks for nothing more.
    Every connector ignores all of it (it issues exactly the profile); the caller records it."""
    asked: dict[str, Any] = {}
    if csr.subject != profile.x509_subject():
        asked["subject"] = quoted(csr.subject.rfc4514_string(), _SHOWN_CHARS)
    extensions = list(csr.extensions)
    for extension in extensions:
        if isinstance(extension.value, x509.SubjectAlternativeName):
            granted = set(general_names(profile.subject_alt_names))
            extra = [n for n in extension.value if n not in granted]
            if extra:
                asked["subject_alt_names"] = [f"{type(n).__name__}:{quoted(n.value, _SHOWN_CHARS)}"
                                              for n in extra[:_SHOWN_ITEMS]]
                if len(extra) > _SHOWN_ITEMS:
                    asked["subject_alt_names_not_shown"] = len(extra) - _SHOWN_ITEMS
    others = [e.oid for e in extensions if not isinstance(e.value, x509.SubjectAlternativeName)]
    if others:
        asked["extensions"] = [oid.dotted_string for oid in others[:_SHOWN_ITEMS]]
        if len(others) > _SHOWN_ITEMS:
            asked["extensions_not_shown"] = len(others) - _SHOWN_ITEMS
    return asked


def revocation_reason(name: str) -> x509.ReasonFlags:
    try:
        return REVOCATION_REASONS[name]
    except KeyError:
        raise InvalidArgument(f"unknown revocation reason {name!r}; RFC 5280 names are: "
                              f"{', '.join(REVOCATION_REASONS)}", reason_name=name) from None


@dataclass(frozen=True)
class IssueProfile:
    """What the orchestrator asks of the CA for one certificate: its whole content but the key.

    subject: the certificate's subject, exactly (an x509.Name, or RFC 4514 text); the request's
    subject is never used. subject_alt_names: (kind, value) pairs, kinds as SAN_BUILDERS
    (email, dns, uri, upn); the certificate carries these and no other subjectAltName. Nothing
    else of the request (its extensions) reaches the certificate either.
    """

    validity_days: int
    subject: x509.Name | str
    key_usage: frozenset[str] = frozenset({"digitalSignature"})
    extended_key_usage: tuple[str, ...] = ()
    subject_alt_names: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Accept any iterable from callers but keep the record hashable and immutable.
        object.__setattr__(self, "key_usage", frozenset(self.key_usage))
        object.__setattr__(self, "extended_key_usage", tuple(self.extended_key_usage))
        object.__setattr__(self, "subject_alt_names", tuple((k, v) for k, v in self.subject_alt_names))
        if self.validity_days <= 0:
            raise InvalidArgument(f"validity_days must be positive, got {self.validity_days}")
        unknown = sorted(set(self.key_usage) - set(KEY_USAGES))
        if unknown:
            raise InvalidArgument(f"unknown key usage(s) {unknown}; known: {', '.join(KEY_USAGES)}")
        unknown = sorted(set(self.extended_key_usage) - set(EXTENDED_KEY_USAGES))
        if unknown:
            raise InvalidArgument(f"unknown extended key usage(s) {unknown}; "
                                  f"known: {', '.join(EXTENDED_KEY_USAGES)}")
        if isinstance(self.subject, str):
            try:
                object.__setattr__(self, "subject", x509.Name.from_rfc4514_string(self.subject))
            except ValueError as exc:
                raise InvalidArgument(f"subject {self.subject!r} is not an RFC 4514 name: {exc}") from None
        general_names(self.subject_alt_names)          # refused here, not halfway through signing
        if not self.x509_subject().rdns and not self.subject_alt_names:
            raise InvalidArgument("the certificate would name nobody: empty subject and no subjectAltName")

    def x509_subject(self) -> x509.Name:
        assert isinstance(self.subject, x509.Name)  # __post_init__ made it one
        return self.subject

    def x509_subject_alt_name(self) -> x509.SubjectAlternativeName | None:
        """The profile's subjectAltName extension (RFC 5280 4.2.1.6: critical when the
        subject is empty), None when it gives none."""
        if not self.subject_alt_names:
            return None
        return x509.SubjectAlternativeName(general_names(self.subject_alt_names))

    def x509_key_usage(self) -> x509.KeyUsage | None:
        if not self.key_usage:
            return None
        flags = {kw: False for kw in set(KEY_USAGES.values())}
        for name in self.key_usage:
            flags[KEY_USAGES[name]] = True
        return x509.KeyUsage(**flags)

    def x509_extended_key_usage(self) -> x509.ExtendedKeyUsage | None:
        if not self.extended_key_usage:
            return None
        return x509.ExtendedKeyUsage([EXTENDED_KEY_USAGES[n] for n in self.extended_key_usage])


@runtime_checkable
class CaConnector(Protocol):
    """One certificate authority as the orchestrator uses it. Calls block; they are made
    from worker threads (asyncio.to_thread) and must be thread-safe."""

    @property
    def name(self) -> str:
        """The name certificate templates use to pick this CA (stored as certificates.ca_name)."""
        ...

    def ca_certificate_der(self) -> bytes:
        """The issuing CA certificate."""
        ...

    def issue(self, csr_der: bytes, profile: IssueProfile, request_id: str) -> bytes:
        """Issues a certificate (DER) for a PKCS#10 request (DER).

        request_id is the idempotency key journaled before the call (C16): a second call with
        the same request_id returns the certificate of the first, never a second one.
        Raises CsrInvalid if the request's signature does not verify.
        """
        ...

    def revoke(self, serial: int, reason: str) -> None:
        """Revokes with an RFC 5280 reason name (REVOCATION_REASONS). certificateHold is
        temporary; removeFromCRL lifts a hold (same as lift_hold)."""
        ...

    def lift_hold(self, serial: int) -> None:
        """Takes a certificate on certificateHold off the CRL."""
        ...

    def crl_der(self) -> bytes:
        """A freshly signed CRL (DER)."""
        ...

    def find_issued(self, request_id: str) -> bytes | None:
        """The certificate (DER) issued for request_id, or None if the CA issued none."""
        ...
