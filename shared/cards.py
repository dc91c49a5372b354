"""Card-level value types both sides speak: key types, APDUs, objects on a token.

Plain dataclasses; shared/convert.py maps them to and from protobuf at the edges.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


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


@dataclass(frozen=True)
class ApduResponse:
    data: bytes
    sw: int
