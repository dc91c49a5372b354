"""The fingerprints of the keys every replica on this database shares (its CAs, its KEK):
recorded by the first orchestrator to start, read by every later one."""
from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select, tuple_

from orchestrator.store.models import DeploymentKey, utcnow
from orchestrator.store.records import DeploymentKeyRecord
from orchestrator.store.rows import record
from orchestrator.store.sessions import Sessions
from shared.errors import InvalidArgument


class DeploymentKeys:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions

    def record_absent(self, fingerprints: Iterable[tuple[str, str, str]],
                      first_seen_by: str) -> dict[tuple[str, str], DeploymentKeyRecord]:
        """Records each (kind, name, fingerprint) not recorded yet and returns what is recorded
        for every one of them, keyed by (kind, name): the caller compares. One transaction.

        Race-safe: INSERT ... ON CONFLICT DO NOTHING, then a read. Of two orchestrators
        recording different fingerprints at once, the second's insert waits for the first's
        transaction (PostgreSQL's unique index; SQLite's BEGIN IMMEDIATE) and then does nothing,
        and its read sees the first one's row."""
        wanted = list(fingerprints)
        if not first_seen_by:
            raise InvalidArgument("a recorded key needs who saw it first")
        for kind, name, fingerprint in wanted:
            if not kind or not name or not fingerprint:
                raise InvalidArgument(f"a deployment key needs a kind, a name and a fingerprint, got "
                                      f"{(kind, name, fingerprint)!r}")
        if not wanted:
            return {}
        now = utcnow()
        with self._db.write() as s:
            s.execute(self._db.insert(DeploymentKey)
                      .values([{"kind": kind, "name": name, "fingerprint": fingerprint, "first_seen": now,
                                "first_seen_by": first_seen_by} for kind, name, fingerprint in wanted])
                      .on_conflict_do_nothing(index_elements=[DeploymentKey.kind, DeploymentKey.name]))
            keys = [(kind, name) for kind, name, _ in wanted]
            rows = s.scalars(select(DeploymentKey)
                             .where(tuple_(DeploymentKey.kind, DeploymentKey.name).in_(keys)))
            return {(r.kind, r.name): record(DeploymentKeyRecord, r) for r in rows}

    def recorded(self) -> list[DeploymentKeyRecord]:
        """Every recorded key, by kind and name."""
        with self._db.read() as s:
            return [record(DeploymentKeyRecord, r) for r in
                    s.scalars(select(DeploymentKey).order_by(DeploymentKey.kind, DeploymentKey.name))]
