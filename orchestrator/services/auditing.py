"""Who the audit names and audit rows written from the event loop (docs/audit.md).

The actor is the verified caller of the RPC being served (shared.tls.current_actor(): role,
name and certificate serial); work the orchestrator does on its own (a sweep, a lease that
expires, a reconciliation round) names itself. Rows never carry PINs, PUKs or keys."""
from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from orchestrator.store.records import AuditSubjects
from orchestrator.store.store import Store
from shared.logging import get_logger
from shared.tls import actor_of, current_caller

log = get_logger(__name__)

#: The actor of what the orchestrator decides by itself (leases expiring, gateways gone).
ORCHESTRATOR_ACTOR = "orchestrator"


def acting(own: str = ORCHESTRATOR_ACTOR) -> str:
    """The caller's identity when an authenticated call is being served, else OWN (the
    background part or in-process tool that acts)."""
    return actor_of(current_caller(), nobody=own)


class AuditTrail:
    """Audit rows from async code: `write` waits for the row; `later` (for synchronous code on
    the event loop, e.g. a timer) writes it on a worker thread without waiting."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._writing: set[asyncio.Future[Any]] = set()

    async def write(self, action: str, object_type: str, object_id: str, actor: str,
                    detail: Mapping[str, Any] | None = None, subjects: AuditSubjects | None = None) -> None:
        await asyncio.to_thread(self._record, action, object_type, object_id, actor, detail, subjects)

    def later(self, action: str, object_type: str, object_id: str, actor: str,
              detail: Mapping[str, Any] | None = None, subjects: AuditSubjects | None = None) -> None:
        future = asyncio.ensure_future(self.write(action, object_type, object_id, actor, detail, subjects))
        self._writing.add(future)
        future.add_done_callback(self._writing.discard)

    async def drain(self) -> None:
        """Waits for the rows `later` is still writing."""
        await asyncio.gather(*self._writing, return_exceptions=True)

    def _record(self, action: str, object_type: str, object_id: str, actor: str,
                detail: Mapping[str, Any] | None, subjects: AuditSubjects | None) -> None:
        try:
            self.store.audit.record(action, object_type, object_id, actor, detail, subjects=subjects)
        except Exception:   # the action happened; a lost row must not undo it, but is loud
            log.exception("could not write an audit row", action=action, object_type=object_type,
                          object_id=object_id)
