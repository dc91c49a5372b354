"""Card secrets: each card's own PUK (SO PIN), sealed under the key-encryption key, keyed by
the card's token serial (revision 0006). The store only ever sees the sealed blob; sealing and
opening are orchestrator/services/card_secrets.py's job."""
from __future__ import annotations

from sqlalchemy import select

from orchestrator.store.models import CardSecret, utcnow
from orchestrator.store.records import TOKEN_SERIAL, CardSecretRecord
from orchestrator.store.rows import add_audit, record
from orchestrator.store.sessions import Sessions
from shared.errors import InvalidArgument, NotFound, quoted


class CardSecrets:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions

    def put(self, token_serial: str, kek_id: str, algorithm: str, sealed: bytes, *, actor: str,
            action: str) -> CardSecretRecord:
        """Stores (or replaces) the sealed PUK of a card and audits `action` in ONE transaction;
        the audit detail names the KEK, never the secret."""
        if not token_serial or not kek_id or not algorithm or not sealed:
            raise InvalidArgument("a card secret needs a token serial, a KEK id, an algorithm and the sealed value")
        with self._db.write() as s:
            now = utcnow()
            row = s.get(CardSecret, token_serial, with_for_update=True)
            replaced = row is not None
            if row is None:
                row = CardSecret(token_serial=token_serial, created_at=now)
                s.add(row)
            row.kek_id, row.algorithm, row.sealed, row.updated_at = kek_id, algorithm, bytes(sealed), now
            add_audit(s, action, TOKEN_SERIAL, token_serial, actor, {"kek_id": kek_id, "replaced": replaced}, now)
            s.flush()
            return record(CardSecretRecord, row)

    def get(self, token_serial: str) -> CardSecretRecord:
        with self._db.read() as s:
            row = s.get(CardSecret, token_serial)
            if row is None:
                raise NotFound(f"no PUK stored for the card with token serial {quoted(token_serial)}",
                               token_serial=token_serial)
            return record(CardSecretRecord, row)

    def find(self, token_serial: str) -> CardSecretRecord | None:
        with self._db.read() as s:
            row = s.scalar(select(CardSecret).where(CardSecret.token_serial == token_serial))
            return None if row is None else record(CardSecretRecord, row)
