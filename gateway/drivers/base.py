"""What the gateway core needs from a card driver. Drivers raise shared.errors exceptions.

Values crossing this boundary are plain Python (dataclasses, bytes), never protobuf:
conversion happens in gateway/api.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

# Card-level value types are shared with the orchestrator (both sides speak them).
from shared.cards import (  # noqa: F401  (re-exported for drivers)
    Apdu,
    ApduResponse,
    GeneratedKey,
    KeyType,
    ObjectClass,
    SignatureAlgorithm,
    StoredObject,
)

if TYPE_CHECKING:
    from shared.pkcs11_module import OwnerThread


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
    error: str = ""           # non-empty: a token the module cannot read (e.g. an empty object store)


class TokenDriver(Protocol):
    """One loaded PKCS#11 module. Its methods run on its module's one thread (`thread`): the
    core awaits them with `driver.thread.call_async(lambda: driver.sign(...))`."""

    @property
    def thread(self) -> OwnerThread: ...
    def list_tokens(self) -> list[TokenInfo]: ...
    def generate_key_pair(self, slot_id: int, pin: str, key_type: KeyType, label: str,
                          key_id: bytes, csr_subject: str = "") -> GeneratedKey: ...
    def sign(self, slot_id: int, pin: str, key_id: bytes, algorithm: SignatureAlgorithm,
             data: bytes) -> bytes: ...
    def write_certificate(self, slot_id: int, pin: str, key_id: bytes, label: str,
                          certificate_der: bytes) -> None: ...
    def list_objects(self, slot_id: int, pin: str) -> list[StoredObject]: ...
    def delete_objects(self, slot_id: int, pin: str, key_id: bytes) -> int: ...
    def import_key_pair(self, slot_id: int, pin: str, key_id: bytes, label: str, private_key_der: bytes,
                        certificate_der: bytes = b"") -> None: ...
    def set_pins(self, slot_id: int, user_pin: str, so_pin: str, new_user_pin: str, new_so_pin: str) -> None: ...
    def write_data_object(self, slot_id: int, pin: str, application: str, label: str, value: bytes,
                          private: bool) -> None: ...
    def close(self) -> None: ...


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
