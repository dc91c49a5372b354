"""What a certificate handling means to do, written down before it asks the CA (rule C16).

A handling - `handle_issued` (C5, also the sweeper's) or `change_state_in_ca` (C17) - first
acts at the CA (revoke, hold, lift a hold), then moves the certificate in the store. A crash
in between leaves the CA and the store disagreeing: revoked at the CA, still Issued in the
store. So, before the CA call, the handling records its intent (an audit entry: the moves it
will make and the CA action); the reconciler compares every intent whose run is gone with the
CA's CRL and finishes the moves if the CA acted (orchestrator/services/reconciler.py), then
marks the intent settled. This module is the one place that reads and writes them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.store.records import CERTIFICATE, AuditRecord, CertificateRecord

AUDIT_CA_INTENT = "ca_handling_intent"
AUDIT_CA_INTENT_SETTLED = "ca_handling_intent_settled"


@dataclass(frozen=True)
class HandlingIntent:
    audit_id: int
    certificate_id: str
    ca_name: str
    serial_hex: str
    ca_action: str                              # "revoke" or "lift_hold"
    ca_reason: str                              # the revocation reason (removeFromCRL for lift_hold)
    moves: tuple[tuple[str, str, str | None], ...]   # (from, to, transition reason), in order
    actor: str

    @property
    def serial(self) -> int:
        return int(self.serial_hex, 16)


def record_intent(store, record: CertificateRecord, actor: str, ca_action: str, ca_reason: str,
                  moves: Sequence[tuple[str, str, str | None]]) -> int:
    """Writes the intent before the CA is asked; its audit id."""
    row = store.audit.record(AUDIT_CA_INTENT, CERTIFICATE, record.id, actor, {
        "ca": record.ca_name, "serial_hex": record.serial_hex, "ca_action": ca_action, "ca_reason": ca_reason,
        "moves": [list(m) for m in moves]})
    return row.id


def open_intents(store) -> list[HandlingIntent]:
    """Intents not yet settled, oldest first (the whole trail read: see OpenIntents)."""
    return OpenIntents(store).read()


class OpenIntents:
    """The open intents, followed incrementally: the first read goes through the trail, each
    later one reads only the intent and settlement rows written since (by any replica), so a
    reconcile round costs what changed, not the whole history."""

    def __init__(self, store) -> None:
        self.store = store
        self._open: dict[int, HandlingIntent] = {}
        self._seen = {AUDIT_CA_INTENT: 0, AUDIT_CA_INTENT_SETTLED: 0}      # last audit id read, per action

    def read(self) -> list[HandlingIntent]:
        """Intents not yet settled, oldest first. Settlements are read before intents, each
        from where the last read stopped: a settlement is written after its intent, so the
        intent of every settlement read is known by the time it is applied."""
        settled = self._new(AUDIT_CA_INTENT_SETTLED)
        for row in self._new(AUDIT_CA_INTENT):
            self._open[row.id] = _intent(row)
        for row in settled:
            self._open.pop(int(row.detail["intent"]), None)
        return [self._open[k] for k in sorted(self._open)]

    def _new(self, action: str) -> list[AuditRecord]:
        rows = self.store.audit.list(action=action, after_id=self._seen[action])
        if rows:
            self._seen[action] = rows[-1].id
        return rows


def settle(store, intent: HandlingIntent, actor: str, outcome: str) -> None:
    store.audit.record(AUDIT_CA_INTENT_SETTLED, CERTIFICATE, intent.certificate_id, actor,
                       {"intent": intent.audit_id, "outcome": outcome})


def _intent(audit: AuditRecord) -> HandlingIntent:
    d = audit.detail
    return HandlingIntent(audit.id, audit.object_id, d["ca"], d["serial_hex"], d["ca_action"], d["ca_reason"],
                          tuple((m[0], m[1], m[2]) for m in d["moves"]), audit.actor)
