"""The secret inputs of RUNNING process instances, sealed under the key-encryption key
(revision 0012), for a replica that takes a dead replica's task over (C16, takeover). The
store only ever sees the sealed blob; sealing and opening are
orchestrator/services/processes.py's job (bound to the instance id)."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select

from orchestrator.store.models import ProcessInstance, ProcessSecret, utcnow
from orchestrator.store.records import ProcessState
from orchestrator.store.sessions import Sessions
from shared.errors import InvalidArgument


@dataclass(frozen=True)
class SealedProcessSecrets:
    process_instance_id: str
    kek_id: str
    algorithm: str
    sealed: bytes


class ProcessSecrets:
    def __init__(self, sessions: Sessions) -> None:
        self._db = sessions

    def put(self, process_instance_id: str, kek_id: str, algorithm: str, sealed: bytes) -> None:
        """Keeps the sealed secrets of a process instance; the first kept stay. Joins the
        transaction that creates the instance (Store.together); an instance that was not
        created (a retried start with a request id follows the first call's instance, which
        keeps that call's secrets) gets nothing."""
        if not process_instance_id or not kek_id or not algorithm or not sealed:
            raise InvalidArgument("process secrets need an instance id, a KEK id, an algorithm and the sealed value")
        with self._db.write() as s:
            if s.get(ProcessInstance, process_instance_id) is not None \
                    and s.get(ProcessSecret, process_instance_id) is None:
                s.add(ProcessSecret(process_instance_id=process_instance_id, kek_id=kek_id, algorithm=algorithm,
                                    sealed=bytes(sealed), created_at=utcnow()))
                s.flush()

    def find(self, process_instance_id: str) -> SealedProcessSecrets | None:
        with self._db.read() as s:
            row = s.get(ProcessSecret, process_instance_id)
            return None if row is None else SealedProcessSecrets(row.process_instance_id, row.kek_id, row.algorithm,
                                                                 bytes(row.sealed))

    def drop(self, process_instance_id: str) -> None:
        with self._db.write() as s:
            s.execute(delete(ProcessSecret).where(ProcessSecret.process_instance_id == process_instance_id))

    def drop_ended(self) -> int:
        """Drops the secrets of every instance that is no longer RUNNING (its run ended, or the
        reconciler ended it); how many."""
        ended = select(ProcessInstance.id).where(ProcessInstance.state != ProcessState.RUNNING)
        with self._db.write() as s:
            result = s.execute(delete(ProcessSecret).where(ProcessSecret.process_instance_id.in_(ended)))
            return int(getattr(result, "rowcount", 0) or 0)
