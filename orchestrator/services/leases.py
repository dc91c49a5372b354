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

On PostgreSQL, with replicas (docs/replicas.md), a lease is also a row of the database
(orchestrator/store/pool.py, `shared`): Get, List, Renew, Release and steps work from any
replica, and the lease outlives a restart of the replica that granted it - its hold stays
until it expires or is released. Any replica ends the expired ones (`end_expired`, called by
the pool's rounds).

Steps relayed for a lease carry (task id "lease-<id>", step number): the caller may give its
own step number so that a step it resends after a lost answer is answered by the gateway's
StepMemo, not run twice; without one, every call is a new step.
"""
from __future__ import annotations

import asyncio
import builtins
import contextlib
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
    _Hold,
)
from orchestrator.services.pool_federated import FederatedLease, FederatedPool
from orchestrator.store.pool import LeaseRow, ReplicaPool
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
from shared.tls import LOCAL_ACTOR, PeerIdentity, actor_of, current_caller

log = get_logger(__name__)

# Roles with a say here (ADMIN, SERVICE_CALLER from shared/permissions.py): an admin may
# release any lease; a service leases only the readers its selectors allow.


def identity_of(caller: PeerIdentity | None) -> str:
    """Whom a lease belongs to: the certificate's role and name (a renewed certificate of the
    same name keeps its leases); LOCAL_ACTOR without one."""
    return actor_of(caller, serial=False)


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
                 audit: AuditTrail | None = None, shared: ReplicaPool | None = None) -> None:
        self.pool = pool
        self.shared = shared                # PostgreSQL: leases in the database, for every replica
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
        self._ending: set[asyncio.Task] = set()          # lease rows being removed (PostgreSQL)

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
        if self.shared is not None:
            try:
                await asyncio.to_thread(self.shared.add_lease, _row(lease))
            except BaseException:
                pool_lease.release()
                raise
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
        self._check_owner(lease, action)
        return lease

    @staticmethod
    def _check_owner(lease: ServiceLease, action: str) -> None:
        lease_id = lease.lease_id
        caller = current_caller()
        identity = identity_of(caller)
        if identity != lease.owner and not (action == "release" and caller is not None
                                            and caller.role == ADMIN):
            log.warning("lease refused to another identity", lease_id=lease_id, owner=lease.owner, caller=identity,
                        action=action)
            raise PermissionDenied(f"lease {lease_id} belongs to {lease.owner}; {identity} may not {action} it",
                                   role=caller.role if caller is not None else None, lease_id=lease_id)

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
        if not step_number:
            lease.auto_steps += 1
        return await self._run(lease, step, step_number, lease.auto_steps)

    async def _run(self, lease: ServiceLease, step: cards.Step, step_number: int, auto: int) -> cards.StepValue:
        """Runs STEP on the lease's reader: as the caller's step STEP_NUMBER, or (0) as the
        lease's automatic step AUTO; audited with its outcome."""
        lease_id = lease.lease_id
        if step_number:
            task_id = f"lease-{lease_id}"
        else:
            task_id, step_number = f"lease-{lease_id}-auto", auto
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

    # --- from any replica (PostgreSQL), or this process's memory --------------------------------

    async def get_shared(self, lease_id: str) -> ServiceLease:
        """get(), the database's lease on PostgreSQL: one any replica granted."""
        if self.shared is None:
            return self.get(lease_id)
        row = await asyncio.to_thread(self.shared.lease, lease_id)
        if row is None:
            local = self._leases.get(lease_id)
            if local is not None and not local.ended:          # released or ended by another replica
                self._end(local, "ended by another replica", audited=False)
            why = self._ended.get(lease_id)
            raise NotFound(f"lease {quoted(lease_id)} is not held" + (f": it {why}" if why else
                                                                       " (released, expired or unknown)"),
                           lease_id=lease_id, ended=why or "unknown")
        local = self._leases.get(lease_id)
        if local is not None and not local.ended:
            local.expires_at = row.expires_at
            return local
        return self._adopted(row)

    def _adopted(self, row: LeaseRow) -> ServiceLease:
        """A lease another replica (or this one before a restart) granted, as this one uses it."""
        assert isinstance(self.pool, FederatedPool)
        session = self.pool._session_for(row.gateway_id, row.hold_id)
        pool_lease = FederatedLease(self.pool, session, row.reader, _Hold(SERVICE, row.holder), row.hold_id)
        pool_lease.released = True          # giving it back is end_lease's, not this copy's
        return ServiceLease(row.lease_id, row.holder, row.ttl_s, row.expires_at, pool_lease, owner=row.owner,
                            acquired_at=row.acquired_at)

    async def owned_shared(self, lease_id: str, action: str) -> ServiceLease:
        lease = await self.get_shared(lease_id)
        self._check_owner(lease, action)
        return lease

    async def list_shared(self) -> builtins.list[ServiceLease]:
        if self.shared is None:
            return self.list()
        rows = await asyncio.to_thread(self.shared.leases)
        return [self._leases[r.lease_id] if r.lease_id in self._leases else self._adopted(r) for r in rows
                if r.gateway_id]

    async def renew_shared(self, lease_id: str) -> ServiceLease:
        if self.shared is None:
            return self.renew(lease_id)
        lease = await self.owned_shared(lease_id, "renew")
        row = await asyncio.to_thread(self.shared.renew_lease, lease_id, _in(lease.ttl_s))
        if row is None:
            raise NotFound(f"lease {quoted(lease_id)} is not held (released or expired)", lease_id=lease_id,
                           ended="unknown")
        lease.expires_at = row.expires_at
        if lease_id in self._leases:
            self._arm(lease)
        if self.audit is not None:
            self.audit.later(AUDIT_LEASE_RENEWED, LEASE, lease_id, acting(), {"ttl_s": lease.ttl_s}, _where(lease))
        return lease

    async def release_shared(self, lease_id: str) -> None:
        if self.shared is None:
            self.release(lease_id)
            return
        lease = await self.owned_shared(lease_id, "release")
        local = self._leases.get(lease_id)
        if local is not None:
            self._end(local, "released", actor=acting())
            return
        if await asyncio.to_thread(self.shared.end_lease, lease_id) is not None and self.audit is not None:
            self.audit.later(AUDIT_LEASE_ENDED, LEASE, lease_id, acting(), {"why": "released", "holder": lease.holder},
                             _where(lease))
        self._remember_end(lease_id, "released")

    async def run_step_shared(self, lease_id: str, step: cards.Step, step_number: int = 0) -> cards.StepValue:
        """run_step() on a lease of any replica (PostgreSQL)."""
        if self.shared is None:
            return await self.run_step(lease_id, step, step_number)
        lease = await self.owned_shared(lease_id, "run steps on")
        # Automatic step numbers are counted in the lease's row: two replicas never send the
        # same (task, step) for two different steps (the gateway's memo would answer the second).
        auto = 0 if step_number else await asyncio.to_thread(self.shared.next_auto_step, lease_id)
        return await self._run(lease, step, step_number, auto)

    async def end_expired(self) -> int:
        """Ends the leases of every replica whose time ran out (PostgreSQL); how many."""
        if self.shared is None:
            return 0
        ended = 0
        for row in await asyncio.to_thread(self.shared.expired_leases):
            local = self._leases.get(row.lease_id)
            why = f"expired (not renewed within {row.ttl_s:g} s)"
            if local is not None:
                self._end(local, why)
            elif await asyncio.to_thread(self.shared.end_lease, row.lease_id) is not None:
                self._remember_end(row.lease_id, why)
                if self.audit is not None:
                    self.audit.later(AUDIT_LEASE_ENDED, LEASE, row.lease_id, ORCHESTRATOR_ACTOR,
                                     {"why": why, "holder": row.holder},
                                     AuditSubjects(gateway_id=row.gateway_id, reader_id=row.reader.reader_id))
            ended += 1
        return ended

    def stop(self) -> None:
        self._unsubscribe()
        for lease in list(self._leases.values()):
            if self.shared is not None:          # it outlives this replica: its row and hold stay
                if lease.timer is not None:
                    lease.timer.cancel()
                continue
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
        delay = max(0.0, (lease.expires_at - dt.datetime.now(dt.UTC)).total_seconds())
        if self.shared is not None:          # renewed through another replica, maybe: the row decides
            lease.timer = asyncio.get_running_loop().call_later(
                delay, lambda: asyncio.get_running_loop().create_task(self._expire_shared(lease)))
            return
        lease.timer = asyncio.get_running_loop().call_later(lease.ttl_s, self._end, lease,
                                                            f"expired (not renewed within {lease.ttl_s:g} s)")

    async def _expire_shared(self, lease: ServiceLease) -> None:
        assert self.shared is not None
        try:
            row = await asyncio.to_thread(self.shared.lease, lease.lease_id)
        except Exception:
            log.exception("lease expiry check failed; trying again", lease_id=lease.lease_id)
            lease.expires_at = _in(1.0)
            self._arm(lease)
            return
        if row is None:
            self._end(lease, "ended by another replica", audited=False)
        elif row.expires_at > dt.datetime.now(dt.UTC):
            lease.expires_at = row.expires_at
            self._arm(lease)
        else:
            self._end(lease, f"expired (not renewed within {lease.ttl_s:g} s)")

    def _gateway_gone(self, session: GatewaySession) -> None:
        for lease in list(self._leases.values()):
            if lease.pool_lease.session is session:
                self._end(lease, f"ended: its gateway {session.gateway_id!r} went away")

    def _end(self, lease: ServiceLease, why: str, actor: str = ORCHESTRATOR_ACTOR, audited: bool = True) -> None:
        if lease.ended:
            return
        if audited and self.audit is not None and self.shared is None:
            self.audit.later(AUDIT_LEASE_ENDED, LEASE, lease.lease_id, actor, {"why": why, "holder": lease.holder},
                             _where(lease))
        lease.ended = why
        if lease.timer is not None:
            lease.timer.cancel()
        self._leases.pop(lease.lease_id, None)
        self._remember_end(lease.lease_id, why)
        if self.shared is not None:           # its row goes; audited by the replica that removed it
            with contextlib.suppress(RuntimeError):
                task = asyncio.get_running_loop().create_task(self._end_shared(lease, why, actor, audited))
                self._ending.add(task)
                task.add_done_callback(self._ending.discard)
        if lease.in_flight == 0:              # otherwise the running step frees it when it ends
            lease.pool_lease.release()
        log.info("lease ended", lease_id=lease.lease_id, holder=lease.holder, why=why)

    async def _end_shared(self, lease: ServiceLease, why: str, actor: str, audited: bool) -> None:
        assert self.shared is not None
        try:
            row = await asyncio.to_thread(self.shared.end_lease, lease.lease_id)
        except Exception:  # the database away: the lease expires there, and any replica ends it then
            log.exception("lease row not removed", lease_id=lease.lease_id)
            return
        if row is not None and audited and self.audit is not None:
            self.audit.later(AUDIT_LEASE_ENDED, LEASE, lease.lease_id, actor, {"why": why, "holder": lease.holder},
                             _where(lease))

    def _remember_end(self, lease_id: str, why: str) -> None:
        self._ended[lease_id] = why
        while len(self._ended) > self._remember:
            self._ended.popitem(last=False)


def _row(lease: ServiceLease) -> LeaseRow:
    hold_id = getattr(lease.pool_lease, "hold_id", "")
    return LeaseRow(lease.lease_id, hold_id, lease.gateway_id, lease.reader, lease.owner, lease.holder, lease.ttl_s,
                    lease.expires_at, lease.acquired_at, lease.auto_steps)


def _where(lease: ServiceLease) -> AuditSubjects:
    return AuditSubjects(gateway_id=lease.gateway_id, reader_id=lease.reader.reader_id)


def _in(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
