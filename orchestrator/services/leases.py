"""Leases for other services: a reader or token of the pool borrowed by selector, steps run on
it through the orchestrator (one round trip per step: the script runs next to the reader),
given back by ReleaseLease.

A lease ends when:
- its holder releases it;
- its holder stops renewing it: it expires `ttl_s` after it was acquired or last renewed
  (a step still running then finishes first; the reader is freed right after it);
- its gateway goes away (stream ended, heartbeats silent, or the gateway reattached on a new
  stream): steps could not reach the reader any more.
A lease that ended is remembered for a while with the reason, so that the holder hears why.

Steps relayed for a lease carry (task id "lease-<id>", step number): the caller may give its
own step number so that a step it resends after a lost answer is answered by the gateway's
StepMemo, not run twice; without one, every call is a new step.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from orchestrator.services.pool import SERVICE, GatewaySession, Lease, ReaderPool, ReaderSelector
from shared import cards
from shared.errors import InvalidArgument, NotFound, quoted
from shared.logging import get_logger

log = get_logger(__name__)


@dataclass(eq=False)
class ServiceLease:
    lease_id: str
    holder: str
    ttl_s: float
    expires_at: dt.datetime
    pool_lease: Lease
    timer: asyncio.TimerHandle | None = None
    auto_steps: int = 0
    in_flight: int = 0
    ended: str = ""                        # why it ended, once it has
    acquired_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))

    @property
    def gateway_id(self) -> str:
        return self.pool_lease.gateway_id

    @property
    def reader(self) -> cards.Reader:
        return self.pool_lease.reader


class LeaseService:
    def __init__(self, pool: ReaderPool, *, default_ttl_s: float = 30.0, max_ttl_s: float = 3600.0,
                 step_timeout_s: float = 120.0, remember_ended: int = 1000) -> None:
        self.pool = pool
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s
        self.step_timeout_s = step_timeout_s
        self._leases: dict[str, ServiceLease] = {}
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._remember = remember_ended
        self._unsubscribe = pool.on_gateway_gone(self._gateway_gone)

    # --- life of a lease -------------------------------------------------------------------

    async def acquire(self, selector: ReaderSelector, *, ttl_s: float = 0, holder: str = "",
                      wait: bool = False, lease_id: str | None = None) -> ServiceLease:
        """lease_id: chosen by the caller (recorded with a client's request id first), else new."""
        ttl = float(ttl_s or self.default_ttl_s)
        if ttl > self.max_ttl_s:
            raise InvalidArgument(f"ttl_s {ttl:g} is above the maximum of {self.max_ttl_s:g} s", field="ttl_s")
        lease_id = lease_id or uuid.uuid4().hex
        shown = f"{holder} (lease {lease_id})" if holder else f"lease {lease_id}"
        pool_lease = await self.pool.acquire(selector, need_card=selector.card_present, wait=wait, kind=SERVICE,
                                             holder=shown)
        lease = ServiceLease(lease_id, holder, ttl, _in(ttl), pool_lease)
        self._leases[lease_id] = lease
        self._arm(lease)
        log.info("lease acquired", lease_id=lease_id, holder=holder, gateway_id=lease.gateway_id,
                 reader_id=lease.reader.reader_id, ttl_s=ttl)
        return lease

    def renew(self, lease_id: str) -> ServiceLease:
        lease = self.get(lease_id)
        lease.expires_at = _in(lease.ttl_s)
        self._arm(lease)
        return lease

    def release(self, lease_id: str) -> None:
        self._end(self.get(lease_id), "released")

    def get(self, lease_id: str) -> ServiceLease:
        lease = self._leases.get(lease_id)
        if lease is None or lease.ended:
            why = lease.ended if lease is not None else self._ended.get(lease_id)
            raise NotFound(f"lease {quoted(lease_id)} is not held" + (f": it {why}" if why else " (unknown id)"),
                           lease_id=lease_id, ended=why or "unknown")
        return lease

    def list(self) -> list[ServiceLease]:
        return [lease for lease in self._leases.values() if not lease.ended]

    async def run_step(self, lease_id: str, step: cards.Step, step_number: int = 0) -> cards.StepValue:
        lease = self.get(lease_id)
        if step_number:
            task_id = f"lease-{lease_id}"
        else:
            lease.auto_steps += 1
            task_id, step_number = f"lease-{lease_id}-auto", lease.auto_steps
        lease.in_flight += 1
        try:
            return await lease.pool_lease.run(step, task_id=task_id, step_number=step_number,
                                              timeout_s=self.step_timeout_s)
        finally:
            lease.in_flight -= 1
            if lease.ended and lease.in_flight == 0:
                lease.pool_lease.release()

    def stop(self) -> None:
        self._unsubscribe()
        for lease in list(self._leases.values()):
            self._end(lease, "ended with the orchestrator")

    # --- plumbing ----------------------------------------------------------------------------

    def _arm(self, lease: ServiceLease) -> None:
        if lease.timer is not None:
            lease.timer.cancel()
        lease.timer = asyncio.get_running_loop().call_later(lease.ttl_s, self._end, lease,
                                                            f"expired (not renewed within {lease.ttl_s:g} s)")

    def _gateway_gone(self, session: GatewaySession) -> None:
        for lease in list(self._leases.values()):
            if lease.pool_lease.session is session:
                self._end(lease, f"ended: its gateway {session.gateway_id!r} went away")

    def _end(self, lease: ServiceLease, why: str) -> None:
        if lease.ended:
            return
        lease.ended = why
        if lease.timer is not None:
            lease.timer.cancel()
        self._leases.pop(lease.lease_id, None)
        self._ended[lease.lease_id] = why
        while len(self._ended) > self._remember:
            self._ended.popitem(last=False)
        if lease.in_flight == 0:              # otherwise the running step frees it when it ends
            lease.pool_lease.release()
        log.info("lease ended", lease_id=lease.lease_id, holder=lease.holder, why=why)


def _in(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
