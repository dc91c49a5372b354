"""What the gateway core needs from a card driver. Drivers raise shared.errors exceptions.

Values crossing this boundary are plain Python (dataclasses, bytes), never protobuf:
conversion happens in gateway/api.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


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
class TokenInfo:
    """A PKCS#11 slot as seen now."""
    reader_id: str            # "pkcs11:<module short name>:<slot id>"
    slot_id: int
    slot_description: str
    token_present: bool
    token_label: str = ""
    token_serial: str = ""
    token_model: str = ""


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


class TokenDriver(Protocol):
    """One loaded PKCS#11 module. Not thread-safe: the core calls it from one worker."""

    def list_tokens(self) -> list[TokenInfo]: ...
    def generate_key_pair(self, slot_id: int, pin: str, key_type: KeyType, label: str,
                          key_id: bytes, csr_subject: str = "") -> GeneratedKey: ...
    def sign(self, slot_id: int, pin: str, key_id: bytes, algorithm: SignatureAlgorithm,
             data: bytes) -> bytes: ...
    def write_certificate(self, slot_id: int, pin: str, key_id: bytes, label: str,
                          certificate_der: bytes) -> None: ...
    def list_objects(self, slot_id: int, pin: str) -> list[StoredObject]: ...
    def delete_objects(self, slot_id: int, pin: str, key_id: bytes) -> int: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Apdu:
    command: bytes
    expected_sw: tuple[str, ...] = ("9000",)   # 4 hex digits, "X" = any digit


@dataclass(frozen=True)
class ApduResponse:
    data: bytes
    sw: int


@dataclass(frozen=True)
class PcscReaderInfo:
    reader_id: str            # "pcsc:<reader name>"
    name: str
    card_present: bool
    atr: bytes = b""


@dataclass(frozen=True)
class PcscEvent:
    kind: str                 # "inserted" | "removed" | "reader_added" | "reader_removed"
    reader: PcscReaderInfo


class PcscDriver(Protocol):
    def list_readers(self) -> list[PcscReaderInfo]: ...
    def run_script(self, reader_name: str, apdus: list[Apdu]) -> list[ApduResponse]: ...
    def wait_for_events(self, timeout_s: float) -> list[PcscEvent]: ...
    def close(self) -> None: ...
