"""C5: the opt-in sweeper for certificates left in the internal issued state.

The founding document's default is no automatic handling at all, and that stays the
default: nothing constructs an IssuedSweeper unless the configuration asks for one. When
configured, it periodically handles every certificate that has been in the internal issued
state longer than the grace period and whose task has finished (never one whose task is
still RUNNING: that task may still succeed and move it to its start state, C2). Handling is
CertificateService.handle_issued with actor "sweeper": optionally revoke at the CA with the
configured reason, then move Issued -> start state -> target state; every action audited.

Reference: docs/certificate-handling.md.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging

from orchestrator.ca.base import revocation_reason
from orchestrator.domain.ca_actions import REMOVE_FROM_CRL
from orchestrator.services.certificates import CertificateService, HandlingResult
from shared.errors import InvalidArgument

log = logging.getLogger(__name__)

__all__ = ["SWEEPER_ACTOR", "IssuedSweeper"]

SWEEPER_ACTOR = "sweeper"


class IssuedSweeper:
    def __init__(self, service: CertificateService, *, grace_period: dt.timedelta, revoke_reason: str | None,
                 target_state: str | None, interval_s: float = 60, transition_reason: str | None = None) -> None:
        """grace_period: how long a certificate may stay in the internal issued state before
        it is handled (measured from when the store received it from the CA).
        target_state is required: a certificate that is only revoked stays in the internal
        issued state and would be found (and revoked, and audited) again on every sweep.
        transition_reason: reason of the move start -> target_state when it needs one (see
        CertificateService.handle_issued)."""
        problems = []
        if not isinstance(grace_period, dt.timedelta) or grace_period <= dt.timedelta(0):
            problems.append(f"grace_period must be a positive duration, got {grace_period!r}")
        if revoke_reason is not None:
            try:
                revocation_reason(revoke_reason)
            except InvalidArgument as exc:
                problems.append(exc.message)
            if revoke_reason == REMOVE_FROM_CRL:
                problems.append("removeFromCRL lifts a hold; it is no revocation reason")
        if not target_state:
            problems.append("target_state is required: a certificate left in the internal issued state would be "
                            "handled again on every sweep")
        elif target_state == service.issued_state:
            problems.append(f"target_state {target_state!r} is the internal issued state")
        if not interval_s > 0:
            problems.append(f"interval_s must be positive, got {interval_s!r}")
        if problems:
            raise InvalidArgument("issued-certificate sweeper: " + "; ".join(problems))
        self.service = service
        self.grace_period = grace_period
        self.revoke_reason = revoke_reason
        self.target_state = target_state
        self.transition_reason = transition_reason
        self.interval_s = float(interval_s)
        self._stop = asyncio.Event()

    def sweep_once(self, now: dt.datetime | None = None) -> list[HandlingResult]:
        """Handles every certificate older than the grace period (at `now`, default the
        current time) whose task has finished. Blocking; returns one result per certificate
        looked at (those of running tasks come back with `skipped` set)."""
        hits = self.service.search_issued(older_than=self.grace_period, now=now)
        if not hits:
            return []
        results = self.service.handle_issued([h.id for h in hits], revoke_reason=self.revoke_reason,
                                             target_state=self.target_state, actor=SWEEPER_ACTOR,
                                             only_finished_tasks=True, transition_reason=self.transition_reason)
        handled = sum(r.handled for r in results)
        failed = [r for r in results if r.error]
        if handled or failed:
            log.info("issued sweeper: %d handled, %d failed, %d skipped", handled, len(failed),
                     sum(r.skipped is not None for r in results))
        for r in failed:
            log.warning("issued sweeper: certificate %s (serial %s): %s", r.certificate_id, r.serial_hex, r.error)
        return results

    async def run_forever(self) -> None:
        """Sweeps every interval_s seconds until stop() or cancellation. A failing sweep
        (store or CA down) is logged and retried on the next round."""
        self._stop.clear()
        log.info("issued sweeper started: grace period %s, revoke reason %s, target state %s, every %.0f s",
                 self.grace_period, self.revoke_reason, self.target_state, self.interval_s)
        while not self._stop.is_set():
            try:
                await asyncio.to_thread(self.sweep_once)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("issued sweeper: sweep failed; retrying in %.0f s", self.interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.interval_s)
        log.info("issued sweeper stopped")

    def stop(self) -> None:
        """Ends run_forever after the sweep in progress (call from the event loop's thread)."""
        self._stop.set()
