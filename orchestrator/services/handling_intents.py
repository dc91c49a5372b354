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
    """Intents not yet settled, oldest first."""
    settled = {a.detail.get("intent") for a in store.audit.list(action=AUDIT_CA_INTENT_SETTLED)}
    return [_intent(a) for a in store.audit.list(action=AUDIT_CA_INTENT) if a.id not in settled]


def settle(store, intent: HandlingIntent, actor: str, outcome: str) -> None:
    store.audit.record(AUDIT_CA_INTENT_SETTLED, CERTIFICATE, intent.certificate_id, actor,
                       {"intent": intent.audit_id, "outcome": outcome})


def _intent(audit: AuditRecord) -> HandlingIntent:
    d = audit.detail
    return HandlingIntent(audit.id, audit.object_id, d["ca"], d["serial_hex"], d["ca_action"], d["ca_reason"],
                          tuple((m[0], m[1], m[2]) for m in d["moves"]), audit.actor)
