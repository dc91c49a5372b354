"""Orchestrator instances and their heartbeats: who runs what, for the reconciler."""
from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from orchestrator.store.models import OrchestratorInstance, utcnow
from orchestrator.store.sessions import Sessions
from shared.errors import InvalidArgument


class OrchestratorInstances:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions

    def beat(self, instance_id: str) -> None:
        """The orchestrator instance `instance_id` is alive now (upsert of its heartbeat)."""
        if not instance_id:
            raise InvalidArgument("an orchestrator instance needs an id")
        with self._db.write() as s:
            now = utcnow()
            s.execute(self._db.insert(OrchestratorInstance)
                      .values(id=instance_id, started_at=now, heartbeat_at=now)
                      .on_conflict_do_update(index_elements=[OrchestratorInstance.id], set_={"heartbeat_at": now}))

    def heartbeats(self) -> dict[str, dt.datetime]:
        """Orchestrator instance id -> when it last beat."""
        with self._db.read() as s:
            return {r.id: r.heartbeat_at for r in s.scalars(select(OrchestratorInstance))}
