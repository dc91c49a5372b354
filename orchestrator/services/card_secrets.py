"""Each card's own PUK (SO PIN), kept by the orchestrator so that `unblock-pin` never asks the
station's operator for it.

The PUK is sealed under the key archive's key-encryption key (services/key_archive.py; the
same AES-256-GCM blob format), bound to the card's token serial: a blob copied onto another
card's row does not open. It is set when a card production gives the card its PUK
(`InitialPUK`) or by an administrator from a file (`cardline cards set-puk`), and read only by
the card task that authenticates a PIN reset with it. It is never logged, never put in a
process map, never returned by the API.
"""
from __future__ import annotations

from orchestrator.services.key_archive import KeyEncryptionKey
from orchestrator.store.records import AUDIT_SET_CARD_PUK
from orchestrator.store.store import Store
from shared.errors import ConfigurationError, InvalidArgument

_PUK_CONTEXT = b"cardline/card-puk/v1\x00token-serial:"


def _binding(token_serial: str) -> bytes:
    if not isinstance(token_serial, str) or not token_serial:
        raise InvalidArgument("a card PUK needs the card's token serial", field="token_serial")
    return _PUK_CONTEXT + token_serial.encode("utf-8")


class CardPukStore:
    """Per-card PUKs, sealed at rest, keyed by token serial."""

    def __init__(self, store: Store, kek: KeyEncryptionKey) -> None:
        self.store = store
        self.kek = kek

    def set(self, token_serial: str, puk: str, *, actor: str) -> None:
        """Seals and stores the card's PUK (replacing an earlier one); audited without it."""
        if not isinstance(puk, str) or not puk:
            raise InvalidArgument("the PUK must be non-empty text", field="puk")
        sealed = self.kek.wrap(puk.encode("utf-8"), _binding(token_serial))
        self.store.card_secrets.put(token_serial, self.kek.kek_id, self.kek.algorithm, sealed, actor=actor,
                                    action=AUDIT_SET_CARD_PUK)

    def get(self, token_serial: str) -> str | None:
        """The card's PUK, or None when none is stored for it."""
        row = self.store.card_secrets.find(token_serial)
        if row is None:
            return None
        if row.kek_id != self.kek.kek_id:
            raise ConfigurationError(f"the PUK of card {token_serial} was sealed by key-encryption key "
                                     f"{row.kek_id!r}, but this orchestrator uses {self.kek.kek_id!r}",
                                     token_serial=token_serial, kek_id=row.kek_id)
        return self.kek.unwrap(row.sealed, _binding(token_serial)).decode("utf-8")
