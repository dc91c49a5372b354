"""Card-level value types both sides speak: key types, APDUs, objects on a token.

Plain dataclasses; shared/convert.py maps them to and from protobuf at the edges.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class KeyType(enum.Enum):
    EC_P256 = "EC_P256"
    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"


class SignatureAlgorithm(enum.Enum):
    ECDSA_SHA256 = "ECDSA_SHA256"
    RSA_PKCS1_SHA256 = "RSA_PKCS1_SHA256"


class ObjectClass(enum.Enum):
    PUBLIC_KEY = "PUBLIC_KEY"
    PRIVATE_KEY = "PRIVATE_KEY"
    CERTIFICATE = "CERTIFICATE"
    DATA = "DATA"
    SECRET_KEY = "SECRET_KEY"


@dataclass(frozen=True)
class GeneratedKey:
    key_id: bytes
    public_key_der: bytes     # SubjectPublicKeyInfo
    csr_der: bytes = b""      # PKCS#10 signed by the new key, when a subject was given


@dataclass(frozen=True)
class StoredObject:
    object_class: ObjectClass
    key_id: bytes
    label: str
    key_type: KeyType | None = None
    certificate_der: bytes = b""


@dataclass(frozen=True)
class Apdu:
    command: bytes
    expected_sw: tuple[str, ...] = ("9000",)   # 4 hex digits, "X" = any digit


def check_command_apdu(apdu: bytes) -> str | None:
    """Why ``apdu`` is not a well-formed ISO 7816-4 command APDU, or None when it is.

    The gateway applies it before sending anything (no half-run script); the orchestrator
    applies it when it loads inline scripts, so a broken one is rejected at start-up, not
    half-way through encoding a card.
    """
    n = len(apdu)
    if n < 4:
        return f"{n} bytes; a command APDU has at least CLA INS P1 P2"
    if apdu[1] & 0xF0 in (0x60, 0x90):
        return f"INS {apdu[1]:02X} is invalid (6X and 9X are status bytes)"
    if n in (4, 5):                                    # case 1, case 2 short
        return None
    if apdu[4] != 0:                                   # short Lc
        lc = apdu[4]
        return None if n in (5 + lc, 6 + lc) else f"Lc={lc} but {n - 5} bytes follow it"
    if n == 6:
        return "a 00 byte after the header must start a 3-byte extended length"
    if n == 7:                                         # case 2 extended
        return None
    lc = apdu[5] << 8 | apdu[6]
    if lc == 0:
        return "extended Lc is 0"
    return None if n in (7 + lc, 9 + lc) else f"extended Lc={lc} but {n - 7} bytes follow it"


@dataclass(frozen=True)
class ApduResponse:
    data: bytes
    sw: int


class ReaderKind(enum.Enum):
    PCSC = "PCSC"
    PKCS11 = "PKCS11"


@dataclass(frozen=True)
class Reader:
    """A reader (PC/SC slot or PKCS#11 slot) as its gateway reports it."""
    reader_id: str
    kind: ReaderKind
    name: str
    card_present: bool
    atr: bytes = b""
    token_label: str = ""
    token_serial: str = ""
    token_model: str = ""
    error: str = ""             # non-empty: unusable, and why (e.g. a token's object store unreadable)


# --- steps: whole operations run next to the reader ------------------------------------

@dataclass(frozen=True)
class GenerateKeyPair:
    key_type: KeyType
    label: str
    key_id: bytes
    csr_subject: str = ""


@dataclass(frozen=True)
class Sign:
    key_id: bytes
    algorithm: SignatureAlgorithm
    data: bytes


@dataclass(frozen=True)
class CertificateObject:
    key_id: bytes
    label: str
    certificate_der: bytes


@dataclass(frozen=True)
class WriteCertificates:
    certificates: tuple[CertificateObject, ...]


@dataclass(frozen=True)
class ListObjects:
    pass


@dataclass(frozen=True)
class DeleteObjects:
    key_id: bytes


@dataclass(frozen=True)
class RunApduScript:
    apdus: tuple[Apdu, ...]


@dataclass(frozen=True)
class ReadCardInfo:
    pass


@dataclass(frozen=True)
class ImportKeyPair:
    """A key pair made off-card (key archival, recovery); the private key lives only in this step."""
    key_id: bytes
    label: str
    private_key_der: bytes = field(repr=False)      # PKCS#8
    certificate_der: bytes = b""


@dataclass(frozen=True)
class SetPins:
    new_user_pin: str = field(default="", repr=False)
    new_so_pin: str = field(default="", repr=False)


@dataclass(frozen=True)
class WriteDataObject:
    application: str
    label: str
    value: bytes
    private: bool = False


Operation = (GenerateKeyPair | Sign | WriteCertificates | ListObjects | DeleteObjects | RunApduScript | ReadCardInfo
             | ImportKeyPair | SetPins | WriteDataObject)


@dataclass(frozen=True)
class Step:
    operation: Operation
    # PINs travel with the step and live only as long as it; repr hides them.
    user_pin: str = field(default="", repr=False)
    so_pin: str = field(default="", repr=False)


# What a step returns, by operation: GeneratedKey, Signature, WrittenCertificates,
# tuple[StoredObject, ...], DeletedCount, tuple[ApduResponse, ...], Reader.
@dataclass(frozen=True)
class Signature:
    signature: bytes


@dataclass(frozen=True)
class WrittenCertificates:
    key_ids: tuple[bytes, ...]


@dataclass(frozen=True)
class DeletedCount:
    count: int


@dataclass(frozen=True)
class ObjectListing:
    objects: tuple[StoredObject, ...]


@dataclass(frozen=True)
class ApduScriptResult:
    responses: tuple[ApduResponse, ...]


@dataclass(frozen=True)
class KeyPairImported:
    key_id: bytes


@dataclass(frozen=True)
class PinsSet:
    pass


@dataclass(frozen=True)
class DataObjectWritten:
    label: str


StepValue = (GeneratedKey | Signature | WrittenCertificates | ObjectListing | DeletedCount | ApduScriptResult | Reader
             | KeyPairImported | PinsSet | DataObjectWritten)
