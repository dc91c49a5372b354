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

A lease belongs to the identity that acquired it: the role and name of the caller's verified
certificate (shared/tls.py current_caller(); "local" in-process and on an --insecure
orchestrator). Running steps on, renewing or releasing another identity's lease is
PERMISSION_DENIED — its id is no bearer token — except that an `admin` may release any lease.
One identity holds or waits for at most `max_per_caller` leases (LEASE_QUOTA_EXCEEDED). A
`service` identity leases only readers matching one of the selectors configured for its
name (`pool.service_readers`); a request that only readers outside them could serve is
PERMISSION_DENIED, and the queue hands it none of those.

Steps relayed for a lease carry (task id "lease-<id>", step number): the caller may give its
own step number so that a step it resends after a lost answer is answered by the gateway's
StepMemo, not run twice; without one, every call is a new step.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from orchestrator.services.auditing import ORCHESTRATOR_ACTOR, AuditTrail, acting
from orchestrator.services.pool import (
    LEASE_SCOPE,
    SERVICE,
    GatewaySession,
    Lease,
    LeaseScope,
    ReaderPool,
    ReaderSelector,
)
from orchestrator.store.records import (
    AUDIT_LEASE_ACQUIRED,
    AUDIT_LEASE_ENDED,
    AUDIT_LEASE_RENEWED,
    AUDIT_RAW_STEP,
    LEASE,
    AuditSubjects,
)
from shared import cards
from shared.config import ReaderSelectorSettings
from shared.errors import CardlineError, InvalidArgument, LeaseQuotaExceeded, NotFound, PermissionDenied, quoted
from shared.logging import get_logger
from shared.permissions import ADMIN
from shared.permissions import SERVICE as SERVICE_CALLER
from shared.tls import LOCAL_ACTOR, PeerIdentity, current_caller

log = get_logger(__name__)

# Roles with a say here (ADMIN, SERVICE_CALLER from shared/permissions.py): an admin may
# release any lease; a service leases only the readers its selectors allow.


def identity_of(caller: PeerIdentity | None) -> str:
    """Whom a lease belongs to: the certificate's role and name (a renewed certificate of the
    same name keeps its leases); LOCAL_ACTOR without one."""
    return f"{caller.role or 'none'}:{caller.name}" if caller is not None else LOCAL_ACTOR


def selector_of_settings(s: ReaderSelectorSettings) -> ReaderSelector:
    return ReaderSelector(gateway_id=s.gateway or "", reader_id=s.reader or "",
                          kind=cards.ReaderKind(s.kind.upper()) if s.kind else None, site=s.site or "",
                          labels=dict(s.labels))


def service_selectors(configured: Mapping[str, Sequence[ReaderSelectorSettings]]
                      ) -> dict[str, tuple[ReaderSelector, ...]]:
    """`pool.service_readers` as selectors of the pool."""
    return {name: tuple(selector_of_settings(s) for s in selectors) for name, selectors in configured.items()}


@dataclass(eq=False)
class ServiceLease:
    lease_id: str
    holder: str
    ttl_s: float
    expires_at: dt.datetime
    pool_lease: Lease
    owner: str = LOCAL_ACTOR               # identity_of() the caller that acquired it
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
                 step_timeout_s: float = 120.0, remember_ended: int = 1000, max_per_caller: int = 16,
                 service_readers: Mapping[str, Sequence[ReaderSelector]] | None = None,
                 audit: AuditTrail | None = None) -> None:
        self.pool = pool
        self.audit = audit                  # every acquire, renewal, end and step (docs/audit.md)
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s
        self.step_timeout_s = step_timeout_s
        self.max_per_caller = max_per_caller
        self.service_readers = {name: tuple(s) for name, s in (service_readers or {}).items()}
        self._leases: dict[str, ServiceLease] = {}
        self._acquiring: Counter[str] = Counter()          # identity -> acquires still waiting for a reader
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
        caller = current_caller()
        owner = identity_of(caller)
        self._check_quota(owner)
        scope = self._service_scope(caller, selector)
        shown = f"{holder} (lease {lease_id})" if holder else f"lease {lease_id}"
        self._acquiring[owner] += 1
        narrowed = LEASE_SCOPE.set(scope) if scope is not None else None
        try:
            pool_lease = await self.pool.acquire(selector, need_card=selector.card_present, wait=wait, kind=SERVICE,
                                                 holder=shown)
        finally:
            if narrowed is not None:
                LEASE_SCOPE.reset(narrowed)
            self._acquiring[owner] -= 1
            if not self._acquiring[owner]:
                del self._acquiring[owner]
        lease = ServiceLease(lease_id, holder, ttl, _in(ttl), pool_lease, owner=owner)
        self._leases[lease_id] = lease
        self._arm(lease)
        log.info("lease acquired", lease_id=lease_id, holder=holder, owner=owner, gateway_id=lease.gateway_id,
                 reader_id=lease.reader.reader_id, ttl_s=ttl)
        if self.audit is not None:
            await self.audit.write(AUDIT_LEASE_ACQUIRED, LEASE, lease_id, acting(),
                                   {"holder": holder, "ttl_s": ttl, "selector": selector.describe()}, _where(lease))
        return lease

    def renew(self, lease_id: str) -> ServiceLease:
        lease = self.owned(lease_id, "renew")
        lease.expires_at = _in(lease.ttl_s)
        self._arm(lease)
        if self.audit is not None:
            self.audit.later(AUDIT_LEASE_RENEWED, LEASE, lease_id, acting(), {"ttl_s": lease.ttl_s}, _where(lease))
        return lease

    def release(self, lease_id: str) -> None:
        self._end(self.owned(lease_id, "release"), "released", actor=acting())

    def owned(self, lease_id: str, action: str) -> ServiceLease:
        """The held lease LEASE_ID when the caller may ACTION it: its owner may do anything
        with it, an admin may release it; anyone else is refused."""
        lease = self.get(lease_id)
        caller = current_caller()
        identity = identity_of(caller)
        if identity != lease.owner and not (action == "release" and caller is not None
                                            and caller.role == ADMIN):
            log.warning("lease refused to another identity", lease_id=lease_id, owner=lease.owner, caller=identity,
                        action=action)
            raise PermissionDenied(f"lease {lease_id} belongs to {lease.owner}; {identity} may not {action} it",
                                   role=caller.role if caller is not None else None, lease_id=lease_id)
        return lease

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
        lease = self.owned(lease_id, "run steps on")
        if step_number:
            task_id = f"lease-{lease_id}"
        else:
            lease.auto_steps += 1
            task_id, step_number = f"lease-{lease_id}-auto", lease.auto_steps
        lease.in_flight += 1
        outcome = "failed"
        try:
            value = await lease.pool_lease.run(step, task_id=task_id, step_number=step_number,
                                               timeout_s=self.step_timeout_s)
            outcome = "succeeded"
            return value
        except CardlineError as exc:
            outcome = exc.reason
            raise
        finally:
            if self.audit is not None:      # the operation's kind only: a step's PINs never enter the audit
                self.audit.later(AUDIT_RAW_STEP, LEASE, lease_id, acting(),
                                 {"operation": type(step.operation).__name__, "outcome": outcome,
                                  "step_task": task_id}, replace(_where(lease), step=step_number))
            lease.in_flight -= 1
            if lease.ended and lease.in_flight == 0:
                lease.pool_lease.release()

    def stop(self) -> None:
        self._unsubscribe()
        for lease in list(self._leases.values()):
            self._end(lease, "ended with the orchestrator")

    # --- who may lease what ------------------------------------------------------------------

    def _check_quota(self, owner: str) -> None:
        taken = sum(1 for lease in self._leases.values() if lease.owner == owner) + self._acquiring[owner]
        if taken >= self.max_per_caller:
            raise LeaseQuotaExceeded(f"{owner} already holds or waits for {taken} leases, the most "
                                     f"pool.max_leases_per_caller ({self.max_per_caller}) allows; release one first",
                                     quota=self.max_per_caller, owner=owner)

    def _service_scope(self, caller: PeerIdentity | None, selector: ReaderSelector) -> LeaseScope | None:
        """For a `service` caller, the scope under which the pool hands it only readers of its
        selectors; refuses a request only readers outside them match. None for every other caller."""
        if caller is None or caller.role != SERVICE_CALLER:
            return None
        allowed = self.service_readers.get(caller.name, ())
        shown = " or ".join(s.describe() for s in allowed) or "none (pool.service_readers names no selector for it)"
        # Refused when no selector is configured for it, or when readers match the request but
        # none of them is its own; a request nothing in the pool matches yet is left to the
        # pool's own answer (wait or not found), as for any caller.
        matching = [p for p in self.pool.list() if selector.matches_place(p.gateway_id, p.site, p.labels, p.reader)]
        if not allowed or (matching and not any(a.matches_pooled(p) for p in matching for a in allowed)):
            raise PermissionDenied(f"service {caller.name!r} may lease readers matching {shown}; none of them "
                                   f"matches {selector.describe()}", role=caller.role, name=caller.name)

        def allowed_reader(gateway_id: str, reader: cards.Reader) -> bool:
            session = self.pool.session(gateway_id)
            return any(a.matches_place(gateway_id, session.site, session.labels, reader) for a in allowed)

        outer = LEASE_SCOPE.get()
        if outer is None or outer.accepts is None:
            return dataclasses.replace(outer or LeaseScope(), accepts=allowed_reader)
        also = outer.accepts
        return dataclasses.replace(outer, accepts=lambda g, r: allowed_reader(g, r) and also(g, r))

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

    def _end(self, lease: ServiceLease, why: str, actor: str = ORCHESTRATOR_ACTOR) -> None:
        if lease.ended:
            return
        if self.audit is not None:
            self.audit.later(AUDIT_LEASE_ENDED, LEASE, lease.lease_id, actor, {"why": why, "holder": lease.holder},
                             _where(lease))
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


def _where(lease: ServiceLease) -> AuditSubjects:
    return AuditSubjects(gateway_id=lease.gateway_id, reader_id=lease.reader.reader_id)


def _in(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
